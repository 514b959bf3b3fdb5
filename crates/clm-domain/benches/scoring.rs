//! Scoring model benchmark: a 20-rule model's event rules matched against
//! touchpoints (rule evaluations per second), next to the same 20 checks
//! written by hand in Rust (the reference), with the ratio printed.
//!
//! `cargo bench -p clm-domain --features bench --bench scoring`.
#![forbid(unsafe_code)]

use chrono::{TimeZone, Utc};
use clm_domain::rules::{FieldCatalog, compile_touch_query};
use clm_domain::scoring::{Decay, ENGAGEMENT, EventRule, Model, RuleHistory};
use clm_domain::touchpoint::{Touchpoint, TouchpointKind};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::Instant;

const FEATURES: [&str; 10] = [
    "export", "import", "share", "invite", "report", "api", "sso", "billing", "search", "chat",
];

fn model() -> Model {
    let catalog = FieldCatalog::new();
    let mut rules = Vec::new();
    for (i, f) in FEATURES.iter().enumerate() {
        rules.push((
            format!("feature_{f}"),
            format!(r#"feature_use where feature = "{f}" and channel = "web""#),
            5 + i as i64,
        ));
        rules.push((
            format!("product_{f}"),
            format!(r#"product_access where product = "{f}""#),
            1,
        ));
    }
    Model {
        event_rules: rules
            .into_iter()
            .map(|(id, q, points)| EventRule {
                id,
                score: ENGAGEMENT.into(),
                trigger: compile_touch_query(&q, &catalog).expect("valid query"),
                points,
                once_per_customer: false,
                cap: None,
                decay: Decay::None,
            })
            .collect(),
        ..Model::default()
    }
}

fn touchpoints() -> Vec<Touchpoint> {
    (0..64)
        .map(|i| Touchpoint {
            event_id: format!("e{i}"),
            kind: if i % 2 == 0 {
                TouchpointKind::FeatureUse
            } else {
                TouchpointKind::ProductAccess
            },
            custom_type: None,
            occurred_time: Utc
                .timestamp_opt(1_770_000_000 + i, 0)
                .single()
                .expect("time"),
            usage_millis: None,
            product: Some(FEATURES[(i as usize / 2) % 10].into()),
            feature: Some(FEATURES[i as usize % 10].into()),
            revenue: None,
            campaign: None,
            channel: Some("web".into()),
            properties: Default::default(),
        })
        .collect()
}

/// The same 20 checks by hand.
fn by_hand(tp: &Touchpoint) -> usize {
    let mut n = 0;
    for f in FEATURES {
        if tp.kind == TouchpointKind::FeatureUse
            && tp.feature.as_deref() == Some(f)
            && tp.channel.as_deref() == Some("web")
        {
            n += 1;
        }
        if tp.kind == TouchpointKind::ProductAccess && tp.product.as_deref() == Some(f) {
            n += 1;
        }
    }
    n
}

fn rate(mut f: impl FnMut() -> usize, evaluations: usize) -> f64 {
    let rounds = 2_000;
    let start = Instant::now();
    let mut sink = 0;
    for _ in 0..rounds {
        sink += f();
    }
    black_box(sink);
    (rounds * evaluations) as f64 / start.elapsed().as_secs_f64()
}

fn bench(c: &mut Criterion) {
    let m = model();
    let tps = touchpoints();
    let evaluations = m.event_rules.len() * tps.len();
    let mut g = c.benchmark_group("scoring_20_rules");
    g.throughput(Throughput::Elements(evaluations as u64));
    g.bench_function("model.matching_rules", |b| {
        b.iter(|| {
            tps.iter()
                .map(|tp| m.matching_rules(black_box(tp)))
                .sum::<usize>()
        })
    });
    g.bench_function("award_touchpoint (with history)", |b| {
        b.iter(|| {
            let mut h = RuleHistory::new();
            tps.iter()
                .map(|tp| m.award_touchpoint(black_box(tp), &mut h).len())
                .sum::<usize>()
        })
    });
    g.bench_function("reference: by hand", |b| {
        b.iter(|| tps.iter().map(|tp| by_hand(black_box(tp))).sum::<usize>())
    });
    g.finish();
    let model_rate = rate(
        || tps.iter().map(|tp| m.matching_rules(tp)).sum(),
        evaluations,
    );
    let hand_rate = rate(|| tps.iter().map(by_hand).sum(), evaluations);
    println!(
        "20-rule model: {:.0} rule evaluations/s; reference (by hand): {:.0}/s; ratio {:.2}",
        model_rate,
        hand_rate,
        model_rate / hand_rate
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
