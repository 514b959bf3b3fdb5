//! Rule evaluator benchmarks: a 20-condition segment rule and a 20-rule
//! scoring model against one customer's facts, next to the same 20 checks
//! written by hand in Rust (the reference: what the interpreter costs).
//!
//! `cargo bench -p clm-domain --features bench --bench rules`; criterion prints elements/s
//! (conditions or rules per second) for each.
//!
//! `next_change_100_touchpoints/*`: next_change calls/s for a customer with
//! 100 touchpoints and a windowed count rule that stays true until most of
//! them have left the window (the segmentation service's timer queue),
//! indexed (`next_change`) beside the rescan it replaced
//! (`next_change_by_rescan`, the reference).
#![forbid(unsafe_code)]

use chrono::{DateTime, NaiveDate, TimeDelta, TimeZone, Utc};
use clm_domain::attributes::AttributeValue;
use clm_domain::demographics::Gender;
use clm_domain::lifecycle::Stage;
use clm_domain::money::Money;
use clm_domain::rules::{self, FactSet, FieldCatalog, Rule, ValueType};
use clm_domain::touchpoint::{Touchpoint, TouchpointKind};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;

const RULE_20: &str = r#"
    age between 25 and 45 and gender = FEMALE and income >= 30000.00 EUR
    and occupation contains "engineer" and email exists
    and attributes.plan in ("pro", "team") and attributes.seats >= 5 and attributes.vip = true
    and stage in (RETENTION, LOYALTY) and time_in_stage >= 7d
    and score.engagement > 40 and score.fit >= 10 and grade starts_with "A"
    and consent(marketing, email) and not nps.last_category = DETRACTOR
    and loyalty.tier = "gold" and not in_segment("segments/churn-risk")
    and count(feature_use where feature = "export", 7d) >= 3
    and sum(purchase.revenue, 30d) >= 10.00 EUR
    and last(purchase) within 90d
"#;

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0)
        .single()
        .expect("valid time")
}

fn facts() -> FactSet {
    let now = now();
    let mut f = FactSet::default();
    f.demographics.birth_date = NaiveDate::from_ymd_opt(1990, 5, 17);
    f.demographics.gender = Some(Gender::Female);
    f.demographics.annual_income = Some(Money {
        currency: "EUR".into(),
        amount_minor: 6_500_000,
    });
    f.demographics.occupation = Some("software engineer".into());
    f.email = Some("ada@example.com".into());
    f.attributes
        .insert("plan".into(), AttributeValue::String("team".into()));
    f.attributes
        .insert("seats".into(), AttributeValue::Number(12.0));
    f.attributes
        .insert("vip".into(), AttributeValue::Bool(true));
    f.stage = Some((Stage::Retention, now - TimeDelta::days(40)));
    f.scores.insert("engagement".into(), 62.0);
    f.scores.insert("fit".into(), 25.0);
    f.grade = Some("A2".into());
    f.grant("marketing", "email");
    f.nps_last = Some(9);
    f.loyalty_tier = Some("gold".into());
    f.loyalty_balance = Some(4200);
    for i in 0..30i64 {
        let at = now - TimeDelta::hours(i * 11);
        let mut tp = Touchpoint {
            event_id: format!("e{i}"),
            kind: TouchpointKind::FeatureUse,
            custom_type: None,
            occurred_time: at,
            usage_millis: None,
            product: Some("app".into()),
            feature: Some(if i % 3 == 0 { "export" } else { "search" }.into()),
            revenue: None,
            campaign: None,
            channel: Some("web".into()),
            properties: Default::default(),
        };
        if i % 10 == 0 {
            tp.kind = TouchpointKind::Purchase;
            tp.feature = None;
            tp.revenue = Some(Money {
                currency: "EUR".into(),
                amount_minor: 4900,
            });
        }
        f.touchpoints.push(tp);
    }
    f
}

fn catalog() -> FieldCatalog {
    FieldCatalog::new()
        .with_attribute("plan", ValueType::String)
        .with_attribute("seats", ValueType::Number)
        .with_attribute("vip", ValueType::Bool)
}

/// The same 20 conditions as [`RULE_20`], hand-written against the facts.
fn hand_written(f: &FactSet, now: DateTime<Utc>) -> bool {
    let age = f
        .demographics
        .birth_date
        .map(|b| clm_domain::demographics::age_on(b, now.date_naive()));
    let recent = |tp: &&Touchpoint, days: i64| tp.occurred_time > now - TimeDelta::days(days);
    age.is_some_and(|a| (25..=45).contains(&a))
        && f.demographics.gender == Some(Gender::Female)
        && f.demographics
            .annual_income
            .as_ref()
            .is_some_and(|m| m.currency == "EUR" && m.amount_minor >= 3_000_000)
        && f.demographics
            .occupation
            .as_deref()
            .is_some_and(|o| o.contains("engineer"))
        && f.email.is_some()
        && matches!(f.attributes.get("plan"), Some(AttributeValue::String(p)) if p == "pro" || p == "team")
        && matches!(f.attributes.get("seats"), Some(AttributeValue::Number(n)) if *n >= 5.0)
        && matches!(f.attributes.get("vip"), Some(AttributeValue::Bool(true)))
        && f.stage
            .is_some_and(|(s, _)| matches!(s, Stage::Retention | Stage::Loyalty))
        && f.stage.is_some_and(|(_, e)| now - e >= TimeDelta::days(7))
        && f.scores.get("engagement").is_some_and(|s| *s > 40.0)
        && f.scores.get("fit").is_some_and(|s| *s >= 10.0)
        && f.grade.as_deref().is_some_and(|g| g.starts_with('A'))
        && f.consents
            .get("marketing")
            .is_some_and(|c| c.contains("email"))
        && f.nps_last.is_none_or(|s| s > 6)
        && f.loyalty_tier.as_deref() == Some("gold")
        && !f.segments.contains("segments/churn-risk")
        && f.touchpoints
            .iter()
            .filter(|tp| {
                tp.kind == TouchpointKind::FeatureUse
                    && tp.feature.as_deref() == Some("export")
                    && recent(tp, 7)
            })
            .count()
            >= 3
        && f.touchpoints
            .iter()
            .filter(|tp| tp.kind == TouchpointKind::Purchase && recent(tp, 30))
            .filter_map(|tp| tp.revenue.as_ref())
            .filter(|m| m.currency == "EUR")
            .map(|m| m.amount_minor)
            .sum::<i64>()
            >= 1000
        && f.touchpoints
            .iter()
            .filter(|tp| tp.kind == TouchpointKind::Purchase)
            .map(|tp| tp.occurred_time)
            .max()
            .is_some_and(|t| t > now - TimeDelta::days(90))
}

fn bench(c: &mut Criterion) {
    let facts = facts();
    let now = now();
    let rule = rules::compile(RULE_20, &catalog()).expect("the bench rule compiles");
    assert!(
        rules::evaluate(&rule, &facts, now),
        "every condition holds, none is skipped"
    );
    assert!(hand_written(&facts, now));

    // A scoring model: 20 rules of one condition each, every one evaluated.
    let model: Vec<Rule> = match &rule {
        Rule::And(ops) => ops.clone(),
        _ => vec![rule.clone()],
    };
    assert_eq!(model.len(), 20);

    let mut g = c.benchmark_group("rules");
    g.throughput(Throughput::Elements(20));
    g.bench_function("evaluate_20_condition_rule", |b| {
        b.iter(|| rules::evaluate(black_box(&rule), black_box(&facts), black_box(now)))
    });
    g.bench_function("reference_hand_written_20_conditions", |b| {
        b.iter(|| hand_written(black_box(&facts), black_box(now)))
    });
    g.bench_function("evaluate_20_rule_model", |b| {
        b.iter(|| {
            black_box(&model)
                .iter()
                .filter(|r| rules::evaluate(r, black_box(&facts), now))
                .count()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("rules_other");
    g.throughput(Throughput::Elements(1));
    g.bench_function("compile_20_condition_rule", |b| {
        b.iter(|| rules::compile(black_box(RULE_20), &catalog()))
    });
    g.bench_function("next_change_20_condition_rule", |b| {
        b.iter(|| rules::next_change(black_box(&rule), black_box(&facts), now))
    });
    g.finish();
}

/// A customer with 100 touchpoints, one every 5 hours before [`now`]: a
/// third are purchases of 19.00 EUR, the rest feature uses.
fn facts_100() -> FactSet {
    let now = now();
    let mut f = FactSet::default();
    for i in 0..100i64 {
        let purchase = i % 3 == 0;
        f.touchpoints.push(Touchpoint {
            event_id: format!("e{i}"),
            kind: if purchase {
                TouchpointKind::Purchase
            } else {
                TouchpointKind::FeatureUse
            },
            custom_type: None,
            occurred_time: now - TimeDelta::hours(i * 5) - TimeDelta::minutes(i),
            usage_millis: (!purchase).then_some(60_000),
            product: Some("app".into()),
            feature: (!purchase).then(|| "export".into()),
            revenue: purchase.then(|| Money {
                currency: "EUR".into(),
                amount_minor: 1900,
            }),
            campaign: None,
            channel: Some("web".into()),
            properties: Default::default(),
        });
    }
    f
}

fn bench_next_change(c: &mut Criterion) {
    let facts = facts_100();
    let now = now();
    let cases = [
        ("count", "count(feature_use, 30d) >= 3"),
        (
            "count_sum_recency",
            "count(feature_use, 30d) >= 3 and sum(purchase.revenue, 30d) >= 19.00 EUR \
             and first(feature_use, 30d) within 30d",
        ),
    ];
    let mut g = c.benchmark_group("next_change_100_touchpoints");
    g.throughput(Throughput::Elements(1));
    for (name, text) in cases {
        let rule = rules::compile(text, &catalog()).expect("the bench rule compiles");
        let new = rules::next_change(&rule, &facts, now);
        assert!(new.is_some(), "{name}: the rule changes with time");
        assert_eq!(new, rules::next_change_by_rescan(&rule, &facts, now));
        g.bench_function(format!("{name}/indexed"), |b| {
            b.iter(|| rules::next_change(black_box(&rule), black_box(&facts), now))
        });
        g.bench_function(format!("{name}/reference_rescan"), |b| {
            b.iter(|| rules::next_change_by_rescan(black_box(&rule), black_box(&facts), now))
        });
    }
    g.finish();
}

criterion_group!(benches, bench, bench_next_change);
criterion_main!(benches);
