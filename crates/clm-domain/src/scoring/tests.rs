use super::*;
use crate::rules::{FieldCatalog, compile_touch_query};
use crate::touchpoint::{Touchpoint, TouchpointKind};
use chrono::{TimeDelta, TimeZone, Utc};
use proptest::prelude::*;

const DAY: i64 = 86_400_000_000;

fn tp(id: &str, kind: TouchpointKind, at_us: i64) -> Touchpoint {
    Touchpoint {
        event_id: id.into(),
        kind,
        custom_type: None,
        occurred_time: Utc.timestamp_micros(at_us).single().expect("time"),
        usage_millis: None,
        product: None,
        feature: Some("export".into()),
        revenue: None,
        campaign: None,
        channel: None,
        properties: Default::default(),
    }
}

fn spec(name: &str) -> ScoreSpec {
    ScoreSpec {
        name: name.into(),
        floor: None,
        ceiling: None,
        inactivity: None,
    }
}

fn rule(id: &str, query: &str, points: i64) -> EventRule {
    EventRule {
        id: id.into(),
        score: ENGAGEMENT.into(),
        trigger: compile_touch_query(query, &FieldCatalog::new()).expect("query"),
        points,
        once_per_customer: false,
        cap: None,
        decay: Decay::None,
    }
}

fn model(rules: Vec<EventRule>) -> Model {
    Model {
        scores: vec![spec(FIT), spec(ENGAGEMENT)],
        event_rules: rules,
        ..Model::default()
    }
}

/// 2026-11-23 is a Monday.
fn monday() -> i64 {
    Utc.with_ymd_and_hms(2026, 11, 23, 0, 0, 0)
        .single()
        .expect("time")
        .timestamp_micros()
}

#[test]
fn caps_cut_awards_per_iso_week() {
    let mut r = rule("visits", "product_access", 10);
    r.cap = Some(Cap {
        points: 25,
        period: Period::IsoWeek,
    });
    let m = model(vec![r]);
    let mut h = RuleHistory::new();
    let pts: Vec<i64> = (0..4)
        .flat_map(|i| {
            m.award_touchpoint(
                &tp(
                    &format!("e{i}"),
                    TouchpointKind::ProductAccess,
                    monday() + i * DAY,
                ),
                &mut h,
            )
        })
        .map(|a| a.points)
        .collect();
    assert_eq!(pts, vec![10, 10, 5]);
    // The next ISO week starts afresh.
    let next = m.award_touchpoint(
        &tp("e9", TouchpointKind::ProductAccess, monday() + 7 * DAY),
        &mut h,
    );
    assert_eq!(next[0].points, 10);
}

#[test]
fn once_per_customer_scores_once() {
    let mut r = rule("demo", "feature_use", 15);
    r.once_per_customer = true;
    let m = model(vec![r]);
    let mut h = RuleHistory::new();
    let a = m.award_touchpoint(&tp("a", TouchpointKind::FeatureUse, 0), &mut h);
    let b = m.award_touchpoint(&tp("b", TouchpointKind::FeatureUse, DAY), &mut h);
    assert_eq!(a.len(), 1);
    assert!(b.is_empty());
}

#[test]
fn grade_combines_bands() {
    let b = Bands::default();
    assert_eq!(b.grade(80.0, 10.0), "A4");
    assert_eq!(b.grade(30.0, 55.0), "C2");
    assert_eq!(b.grade(-5.0, 100.0), "D1");
}

#[test]
fn exponential_crossing_is_exact() {
    let e = [Entry {
        points: 100,
        award_us: 0,
        decay: Decay::Exponential {
            half_life: TimeDelta::days(30),
        },
    }];
    let s = spec(ENGAGEMENT);
    let t = next_crossing(&s, &e, None, 50.0, 0).expect("crosses");
    // 100 × 2^(−t/h) < 50 from the first microsecond after one half-life
    // (rounded to 4 places, the score is 50.0000 at exactly h).
    assert!(score_at(&s, &e, None, t) < 50.0);
    assert!(score_at(&s, &e, None, t - 1) >= 50.0);
    assert!((t - 30 * DAY).abs() < DAY / 1000);
}

#[test]
fn inactivity_crossing_lands_on_the_step() {
    let mut s = spec(ENGAGEMENT);
    s.inactivity = Some(Inactivity {
        points: -10,
        every: TimeDelta::days(14),
    });
    let e = [Entry {
        points: 25,
        award_us: 0,
        decay: Decay::None,
    }];
    let t = next_crossing(&s, &e, Some(0), 10.0, DAY).expect("crosses");
    assert_eq!(t, 28 * DAY);
}

#[test]
fn clamp_applies() {
    let mut s = spec(FIT);
    s.floor = Some(0);
    s.ceiling = Some(100);
    let e = [Entry {
        points: 500,
        award_us: 0,
        decay: Decay::None,
    }];
    assert_eq!(score_at(&s, &e, None, 1), 100.0);
    let neg = [Entry {
        points: -500,
        award_us: 0,
        decay: Decay::None,
    }];
    assert_eq!(score_at(&s, &neg, None, 1), 0.0);
}

fn decay_strategy() -> impl Strategy<Value = Decay> {
    prop_oneof![
        Just(Decay::None),
        (1i64..100).prop_map(|d| Decay::Exponential {
            half_life: TimeDelta::days(d)
        }),
        (1i64..100).prop_map(|d| Decay::Linear {
            over: TimeDelta::days(d)
        }),
    ]
}

proptest! {
    /// The score is exactly what the ledger explains, caps hold in every
    /// period, once-only rules score at most once, and a crossing found is
    /// the first microsecond on the other side.
    #[test]
    fn score_equals_ledger(
        rules in prop::collection::vec(
            (-20i64..40, any::<bool>(), prop::option::of(0i64..60), 0usize..3, decay_strategy()),
            1..6),
        events in prop::collection::vec((0usize..3, 0i64..60 * DAY), 0..40),
        read in 0i64..200 * DAY,
        floor in prop::option::of(-50i64..0),
        ceiling in prop::option::of(50i64..200),
    ) {
        let kinds = [TouchpointKind::FeatureUse, TouchpointKind::Purchase, TouchpointKind::ProductAccess];
        let queries = ["feature_use", "purchase", "product_access"];
        let m = model(rules.iter().enumerate().map(|(i, (p, once, cap, q, d))| {
            let mut r = rule(&format!("r{i}"), queries[*q], *p);
            r.once_per_customer = *once;
            r.cap = cap.map(|c| Cap { points: c, period: if i % 2 == 0 { Period::Day } else { Period::Rolling(TimeDelta::days(3)) } });
            r.decay = *d;
            r
        }).collect());
        let mut events = events;
        events.sort_by_key(|(_, t)| *t);
        let mut h = RuleHistory::new();
        let mut ledger = Vec::new();
        for (n, (k, t)) in events.iter().enumerate() {
            ledger.extend(m.award_touchpoint(&tp(&format!("e{n}"), kinds[*k], *t), &mut h));
        }
        let mut s = spec(ENGAGEMENT);
        s.floor = floor;
        s.ceiling = ceiling;
        let entries: Vec<Entry> = ledger.iter().map(|a| Entry { points: a.points, award_us: a.award_us, decay: a.decay }).collect();
        let mut explained = 0.0;
        for a in &ledger {
            let age = read - a.award_us;
            let f = if age < 0 { 0.0 } else {
                match a.decay {
                    Decay::None => 1.0,
                    Decay::Exponential { half_life } => 0.5f64.powf(age as f64 / half_life.num_microseconds().unwrap_or(1) as f64),
                    Decay::Linear { over } => (1.0 - age as f64 / over.num_microseconds().unwrap_or(1) as f64).max(0.0),
                }
            };
            explained += a.points as f64 * f;
        }
        if let Some(f) = floor { explained = explained.max(f as f64); }
        if let Some(c) = ceiling { explained = explained.min(c as f64); }
        let got = score_at(&s, &entries, None, read);
        prop_assert!((got - explained).abs() < 1e-3, "score {got} vs ledger {explained}");
        for (i, r) in m.event_rules.iter().enumerate() {
            let mine: Vec<&Award> = ledger.iter().filter(|a| a.rule == r.id).collect();
            if r.once_per_customer { prop_assert!(mine.len() <= 1); }
            if let Some(cap) = r.cap {
                for a in &mine {
                    let (lo, hi) = cap.window(a.award_us);
                    let used: i64 = mine.iter().filter(|b| b.award_us >= lo && b.award_us < hi).map(|b| b.points.abs()).sum();
                    prop_assert!(used <= cap.points, "rule {i} cap {} used {used}", cap.points);
                }
            }
        }
        if let Some(t) = next_crossing(&s, &entries, None, 10.0, read) {
            let side = |x| score_at(&s, &entries, None, x) >= 10.0;
            prop_assert!(t > read);
            prop_assert_ne!(side(t), side(read));
            prop_assert_eq!(side(t - 1), side(read));
        }
    }
}

proptest! {
    /// Running sums, built in any order of the entries (out-of-order
    /// awards, anchors moved forward), give the score the entries give at
    /// every instant at or after the newest award; before it they say so.
    #[test]
    fn sums_give_the_ledger_score(
        entries in prop::collection::vec((-50i64..100, 0i64..5_000 * DAY, decay_strategy()), 0..60),
        shuffle in any::<u64>(),
        later in 0i64..400 * DAY,
        floor in prop::option::of(-50i64..0),
    ) {
        let entries: Vec<Entry> = entries.into_iter().map(|(points, award_us, decay)| Entry { points, award_us, decay }).collect();
        let mut s = spec(ENGAGEMENT);
        s.floor = floor;
        let mut order: Vec<&Entry> = entries.iter().collect();
        let n = order.len();
        if n > 1 {
            for i in 0..n {
                order.swap(i, (shuffle.wrapping_mul(i as u64 + 7) % n as u64) as usize);
            }
        }
        let mut sums: Vec<Sum> = Vec::new();
        for e in order {
            match sums.iter_mut().find(|x| x.decay == e.decay) {
                Some(x) => x.add(e.points, e.award_us),
                None => sums.push(Sum::of(e.decay, [(e.points, e.award_us)])),
            }
        }
        let newest = entries.iter().map(|e| e.award_us).max().unwrap_or(0);
        let t = newest + later;
        let linear: Vec<Entry> = entries.iter().filter(|e| matches!(e.decay, Decay::Linear { .. })).copied().collect();
        let from_sums = score_from_sums(&s, &sums, &linear, None, t);
        let exact = score_at(&s, &entries, None, t);
        prop_assert!(from_sums.is_some_and(|v| (v - exact).abs() <= 1e-4 + 1e-12 * exact.abs()), "sums {from_sums:?} vs entries {exact}");
        if n > 0 && newest > 0 {
            let nonlinear: Vec<Sum> = sums.iter().filter(|x| !matches!(x.decay, Decay::Linear { .. })).copied().collect();
            if !nonlinear.is_empty() && nonlinear.iter().any(|x| x.newest_us == newest) {
                prop_assert_eq!(score_from_sums(&s, &nonlinear, &[], None, newest - 1), None);
            }
        }
    }
}

#[test]
fn an_exponential_sum_is_exact_at_whole_half_lives() {
    // 8 points now, 8 one half-life later: at two half-lives 2 + 4 = 6.
    let d = Decay::Exponential {
        half_life: TimeDelta::days(10),
    };
    let s = Sum::of(d, [(8, 0), (8, 10 * DAY)]);
    assert_eq!(s.value_at(20 * DAY), Some(6.0));
    // An award 100 half-lives after the anchor moves the anchor.
    let mut far = s;
    far.add(1, 1_000 * DAY);
    assert_eq!(far.anchor_us, 1_000 * DAY);
    assert_eq!(far.value_at(1_010 * DAY), Some(0.5));
}
