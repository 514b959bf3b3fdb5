//! `ledger::rule_usage` sums the cap windows in SQL: each bucket must be the
//! window `clm_domain::scoring::Cap::window` gives, and the room a cap has
//! left must be the same from the sums as from the awards one by one, on
//! both backends (times before 1970 and around week and day edges too).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::TimeDelta;
use clm_domain::scoring::{Award, Cap, Decay, Period};
use clm_platform::testing::TestBackend;
use clm_scoring::store::ledger::{self, NewRow, RuleWindows};
use sea_orm_migration::MigratorTrait;
use std::collections::BTreeMap;

const DAY: i64 = 86_400_000_000;

fn award(customer: &str, rule: &str, i: usize, at_us: i64, points: i64) -> NewRow {
    NewRow {
        customer: customer.into(),
        model: "m".into(),
        model_version: 1,
        award: Award {
            rule: rule.into(),
            score: "engagement".into(),
            points,
            source_event: format!("e{i}"),
            award_us: at_us,
            decay: Decay::None,
        },
        reason: String::new(),
        actor: String::new(),
    }
}

#[tokio::test]
async fn usage_sums_give_the_room_the_awards_give() {
    let backend = TestBackend::migrated::<clm_scoring::store::Migrator>().await;
    let db = clm_platform::db::connect(&backend.config("scoring").database)
        .await
        .unwrap();
    clm_scoring::store::Migrator::up(&db, None).await.unwrap();
    let caps = [
        (
            "daily",
            Cap {
                points: 1_000_000,
                period: Period::Day,
            },
        ),
        (
            "weekly",
            Cap {
                points: 1_000_000,
                period: Period::IsoWeek,
            },
        ),
        (
            "rolling",
            Cap {
                points: 1_000_000,
                period: Period::Rolling(TimeDelta::hours(36)),
            },
        ),
    ];
    // Awards every 7 hours over 5 weeks around 1970-01-01 and around
    // 2026-11-30 (a Monday), negative points among them, for two customers.
    let mut rows = Vec::new();
    let mut times = Vec::new();
    for base in [-14 * DAY, 1_764_460_800_000_000 - 14 * DAY] {
        for k in 0..120 {
            times.push(base + k * 7 * 3_600_000_000 + (k % 3) - 1);
        }
    }
    for (i, t) in times.iter().enumerate() {
        for (j, (rule, _)) in caps.iter().enumerate() {
            // A rule's awards share a sign (the rule's points); the rolling
            // rule is a negative one.
            let points = if j == 2 {
                -(2 + (i % 4) as i64)
            } else {
                2 + (i % 4) as i64
            };
            let customer = if i % 2 == 0 {
                "customers/a"
            } else {
                "customers/b"
            };
            rows.push(award(customer, rule, i * 10 + j, *t, points));
            // Some awards were later cut by a correction (a late earlier
            // touchpoint, crate::recap), some cancelled to nothing.
            if (i + j) % 5 == 0 {
                let mut c = award(customer, rule, i * 10 + j, *t, -points / 2);
                c.award.source_event = format!("e{} recap late", i * 10 + j);
                rows.push(c);
            } else if (i + j) % 7 == 0 {
                let mut c = award(customer, rule, i * 10 + j, *t, -points);
                c.award.source_event = format!("e{} recap late", i * 10 + j);
                rows.push(c);
            }
        }
    }
    rows.push(award("customers/a", "once", 9_999, 5, 7));
    ledger::insert(&db, &rows).await.unwrap();

    let rules = RuleWindows {
        once: vec!["once".into(), "never".into()],
        day: vec!["daily".into()],
        week: vec!["weekly".into()],
        rolling: vec!["rolling".into()],
    };
    let custs = vec!["customers/a".to_owned(), "customers/b".to_owned()];
    let usage = ledger::rule_usage(&db, "m", 1, &custs, &rules, (i64::MIN, i64::MAX))
        .await
        .unwrap();
    let mut from_sums: BTreeMap<(String, String), Vec<(i64, i64)>> = BTreeMap::new();
    for u in &usage {
        from_sums
            .entry((u.customer.clone(), u.rule.clone()))
            .or_default()
            .push((u.at_us, u.used));
    }
    // What each award nets to with its corrections.
    let mut net: BTreeMap<(String, String, String), (i64, i64)> = BTreeMap::new();
    for r in &rows {
        let event = clm_scoring::recap::event_of(&r.award.source_event).to_owned();
        let n = net
            .entry((r.customer.clone(), r.award.rule.clone(), event))
            .or_insert((r.award.award_us, 0));
        n.1 += r.award.points;
    }
    let mut from_awards: BTreeMap<(String, String), Vec<(i64, i64)>> = BTreeMap::new();
    for ((customer, rule, _), (at, points)) in net {
        if points != 0 {
            from_awards
                .entry((customer, rule))
                .or_default()
                .push((at, points));
        }
    }
    // A once-only rule that scored has a use; one that did not has none.
    assert!(from_sums.contains_key(&("customers/a".into(), "once".into())));
    assert!(!from_sums.keys().any(|(_, r)| r == "never"));
    for (rule, cap) in caps {
        for customer in &custs {
            let key = (customer.clone(), rule.to_owned());
            let sums = &from_sums[&key];
            let awards = &from_awards[&key];
            if cap.period != Period::Day && cap.period != Period::IsoWeek {
                assert_eq!(
                    sums.len(),
                    awards.len(),
                    "{rule}: one bucket per award time"
                );
            } else {
                for (at, _) in sums {
                    assert_eq!(
                        cap.window(*at).0,
                        *at,
                        "{rule}: a bucket is its window's start"
                    );
                }
                assert!(
                    sums.len() < awards.len(),
                    "{rule}: awards are summed per window"
                );
            }
            // Cap room at every award time and at the windows' edges.
            for t in awards
                .iter()
                .flat_map(|(t, _)| [*t, *t + 1, *t - DAY, *t + 6 * DAY])
            {
                assert_eq!(
                    cap.room(sums, t),
                    cap.room(awards, t),
                    "{rule} for {customer} at {t}"
                );
            }
        }
    }
}
