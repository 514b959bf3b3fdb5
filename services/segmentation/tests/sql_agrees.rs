//! Property test: a rule compiled to SQL over the facts projection selects
//! exactly the customers the in-memory evaluator accepts (the facts loaded
//! back from the same tables, only the touchpoints the rule can count), on
//! random rules and data; and a customer's facts load reads only the
//! touchpoints the rules can count at the evaluation instant
//! (`clm_segmentation::lookback`): kinds no rule reads are not read,
//! windowed kinds only from the longest window on, kinds read without a
//! window whole. Runs on SQLite, and on PostgreSQL too when
//! `CLM_TEST_DATABASE_URL` is set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Duration, NaiveDate, Utc};
use clm_domain::attributes::AttributeValue;
use clm_domain::demographics::Gender;
use clm_domain::lifecycle::Stage;
use clm_domain::money::Money;
use clm_domain::rules::{self, FieldCatalog, Rule};
use clm_domain::scoring::{Curve, Decay, Inactivity, Term};
use clm_domain::touchpoint::{Touchpoint, TouchpointKind};
use clm_platform::testing::TestBackend;
use clm_segmentation::lookback::Lookback;
use clm_segmentation::sql::Compiler;
use clm_segmentation::store::facts::{self, Profile, ScoreRow, TouchRow};
use proptest::prelude::*;
use sea_orm::{ConnectionTrait, DatabaseConnection};
use sea_orm_migration::MigratorTrait;
use std::collections::{BTreeMap, BTreeSet};

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

const OPS: [&str; 6] = ["=", "!=", "<", "<=", ">", ">="];

fn op() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&OPS[..])
}

/// One condition, as text.
fn condition() -> impl Strategy<Value = String> {
    prop_oneof![
        (op(), 0..90i32).prop_map(|(o, n)| format!("age {o} {n}")),
        (0..60i32, 0..60i32).prop_map(|(a, b)| format!("age between {a} and {b}")),
        (0..60i32, 0..60i32).prop_map(|(a, b)| format!("age in ({a}, {b}, 30.5)")),
        prop::sample::select(vec!["gender = FEMALE", "gender != MALE", "gender exists"])
            .prop_map(str::to_owned),
        (op(), 0..100_000i64, prop::bool::ANY).prop_map(|(o, n, eur)| format!(
            "income {o} {}.{:02} {}",
            n / 100,
            n % 100,
            if eur { "EUR" } else { "USD" }
        )),
        prop::sample::select(vec![
            r#"occupation starts_with "eng""#,
            r#"occupation contains "ur""#,
            r#"occupation = "nurse""#,
            r#"occupation > "f""#,
            "occupation exists",
            r#"email contains "@x""#,
        ])
        .prop_map(str::to_owned),
        prop::sample::select(vec![
            "stage = RETENTION",
            "stage in (APPROACH, LOYALTY)",
            "stage != CHURNED",
        ])
        .prop_map(str::to_owned),
        (op(), 0..20i32).prop_map(|(o, d)| format!("time_in_stage {o} {d}d")),
        prop::sample::select(vec![
            r#"attributes.plan = "pro""#,
            r#"attributes.plan in ("pro", "team")"#,
            "attributes.plan exists",
            "attributes.vip = true",
            "attributes.trial_end older_than 3d",
            "attributes.trial_end within 10d",
        ])
        .prop_map(str::to_owned),
        (op(), 0..10i32).prop_map(|(o, n)| format!("attributes.seats {o} {n}")),
        (op(), 1..20i32, 0..4i32).prop_map(|(o, w, n)| format!(
            r#"count(feature_use where feature = "export", {w}d) {o} {n}"#
        )),
        (op(), 1..300i32, 0..4i32)
            .prop_map(|(o, w, n)| format!("count(feature_use, {w}h) {o} {n}")),
        (op(), 1..30i32, 0..500i32)
            .prop_map(|(o, w, n)| format!("sum(purchase.revenue, {w}d) {o} {n}.00 EUR")),
        (op(), 1..30i32, 0..5i32)
            .prop_map(|(o, w, n)| format!("sum(usage_time.usage, {w}d) {o} {n}h")),
        (1..30i32).prop_map(|d| format!("last(purchase) within {d}d")),
        (1..30i32).prop_map(|d| format!("last(feature_use) older_than {d}d")),
        (op(), 1..28u32).prop_map(|(o, d)| format!("first(feature_use) {o} 2026-02-{d:02}")),
        (op(), 1..9i32).prop_map(|(o, n)| format!(
            r#"count(custom("survey") where properties.score {o} "{n}") > 0"#
        )),
        prop::sample::select(vec![
            "consent(marketing, email)",
            "consent(profiling, sms)",
            "not consent(surveys, push)",
        ])
        .prop_map(str::to_owned),
        score_condition(),
    ]
}

/// A condition on a decayed score, read at the evaluation instant: plain
/// (the customer's most recently changed of that name) and per model.
fn score_condition() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            prop::sample::select(vec![
                "score.engagement",
                "score.fit",
                r#"score("a").engagement"#,
                r#"score("b").engagement"#,
                r#"score("b").fit"#,
            ]),
            op(),
            -30..60i32,
        )
            .prop_map(|(s, o, n)| format!("{s} {o} {n}")),
        (-20..40i32, 0..30i32)
            .prop_map(|(a, w)| format!("score.engagement between {a} and {}", a + w)),
    ]
}

/// A score of customer `id`: up to three terms of every decay kind
/// (some dated after the evaluation instant), sometimes inactivity, a
/// floor or a ceiling.
fn score(id: String) -> impl Strategy<Value = ScoreRow> {
    let term =
        (-5000..5000i64, -200..40i64, 0..3i16, 1..30i64).prop_map(|(centi, hours, kind, days)| {
            Term {
                coef: centi as f64 / 100.0,
                since_us: (now() - Duration::hours(hours)).timestamp_micros(),
                decay: Decay::from_code(kind, days * 86_400_000_000 / 7),
            }
        });
    (
        prop::sample::select(vec!["a", "b"]),
        prop::sample::select(vec!["engagement", "fit"]),
        0..300i64,
        prop::collection::vec(term, 0..4),
        prop::option::of((-10..0i64, 1..14i64, 0..400i64)),
        prop::option::of(-20..10i64),
        prop::option::of(20..60i64),
    )
        .prop_map(
            move |(model, name, changed_h, terms, idle, floor, ceiling)| ScoreRow {
                customer: id.clone(),
                model: model.into(),
                name: name.into(),
                changed_us: (now() - Duration::hours(changed_h)).timestamp_micros(),
                value: 0.0,
                grade: String::new(),
                curve: Curve {
                    terms,
                    inactivity: idle.map(|(points, days, h)| {
                        (
                            Inactivity {
                                points,
                                every: chrono::TimeDelta::days(days),
                            },
                            (now() - Duration::hours(h * 2)).timestamp_micros(),
                        )
                    }),
                    floor,
                    ceiling,
                },
            },
        )
}

fn rule() -> impl Strategy<Value = String> {
    condition().prop_recursive(3, 12, 3, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) and ({b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) or ({b})")),
            inner.prop_map(|a| format!("not ({a})")),
        ]
    })
}

#[derive(Debug, Clone)]
struct Customer {
    profile: Profile,
    consents: Vec<(String, String, Option<bool>)>,
    touches: Vec<Touchpoint>,
    scores: Vec<ScoreRow>,
}

fn customer(i: usize) -> impl Strategy<Value = Customer> {
    let birth = prop::option::of(
        (1940..2020i32, 1..13u32, 1..29u32)
            .prop_map(|(y, m, d)| NaiveDate::from_ymd_opt(y, m, d).unwrap()),
    );
    let leap = Just(NaiveDate::from_ymd_opt(2000, 2, 29));
    let gender = prop::option::of(prop::sample::select(vec![Gender::Female, Gender::Male]));
    let income = prop::option::of((0..100_000i64, prop::bool::ANY).prop_map(|(n, eur)| Money {
        currency: if eur { "EUR" } else { "USD" }.into(),
        amount_minor: n,
    }));
    let occupation = prop::option::of(prop::sample::select(vec![
        "engineer", "nurse", "eng", "Engineer", "f",
    ]));
    let stage = prop::option::of((
        prop::sample::select(vec![
            Stage::Approach,
            Stage::Retention,
            Stage::Loyalty,
            Stage::Churned,
        ]),
        0..400i64,
    ));
    let attrs = (
        prop::option::of(prop::sample::select(vec!["pro", "team", "free"])),
        prop::option::of(prop::bool::ANY),
        prop::option::of(0..400i64),
        prop::option::of(0..10i32),
    );
    let consents = prop::collection::vec(
        (
            prop::sample::select(vec!["marketing", "profiling", "surveys"]),
            prop::sample::select(vec!["email", "sms", "push"]),
            prop::option::of(prop::bool::ANY),
        ),
        0..4,
    );
    let touches = prop::collection::vec(
        (
            0..4usize,
            0..500i64,
            prop::sample::select(vec!["export", "import"]),
            0..20_000i64,
            1..10i32,
        ),
        0..8,
    );
    let scores = prop::collection::vec(score(format!("c{i}")), 0..4);
    (
        (prop_oneof![birth, leap], gender, income, occupation, stage),
        attrs,
        consents,
        touches,
        scores,
    )
        .prop_map(
            move |(
                (birth, gender, income, occupation, stage),
                attrs,
                consents,
                touches,
                scores,
            )| {
                let id = format!("c{i}");
                let mut attributes = BTreeMap::new();
                if let Some(p) = attrs.0 {
                    attributes.insert("plan".into(), AttributeValue::String(p.into()));
                }
                if let Some(v) = attrs.1 {
                    attributes.insert("vip".into(), AttributeValue::Bool(v));
                }
                if let Some(h) = attrs.2 {
                    attributes.insert(
                        "trial_end".into(),
                        AttributeValue::Timestamp(now() - Duration::hours(h)),
                    );
                }
                if let Some(n) = attrs.3 {
                    attributes.insert("seats".into(), AttributeValue::Number(f64::from(n)));
                }
                let touches = touches
                    .into_iter()
                    .enumerate()
                    .map(|(j, (k, hours, feature, amount, score))| {
                        let (kind, custom) = match k {
                            0 => (TouchpointKind::FeatureUse, None),
                            1 => (TouchpointKind::Purchase, None),
                            2 => (TouchpointKind::UsageTime, None),
                            _ => (TouchpointKind::Custom, Some("survey".to_owned())),
                        };
                        Touchpoint {
                            event_id: format!("{id}-{j}"),
                            kind,
                            custom_type: custom,
                            occurred_time: now() - Duration::hours(hours),
                            usage_millis: (kind == TouchpointKind::UsageTime)
                                .then_some(amount * 1000),
                            product: None,
                            feature: (kind == TouchpointKind::FeatureUse)
                                .then(|| feature.to_owned()),
                            revenue: (kind == TouchpointKind::Purchase).then(|| Money {
                                currency: "EUR".into(),
                                amount_minor: amount,
                            }),
                            campaign: None,
                            channel: None,
                            properties: if kind == TouchpointKind::Custom {
                                [("score".to_owned(), score.to_string())].into()
                            } else {
                                BTreeMap::new()
                            },
                        }
                    })
                    .collect();
                Customer {
                    profile: Profile {
                        id: id.clone(),
                        email: Some(format!("{id}@x.example")),
                        display_name: None,
                        birth_date: birth,
                        gender,
                        income,
                        occupation: occupation.map(str::to_owned),
                        stage: stage.map(|(s, h)| (s, now() - Duration::hours(h))),
                        attributes,
                    },
                    consents: consents
                        .into_iter()
                        .map(|(p, c, g)| (p.to_owned(), c.to_owned(), g))
                        .collect(),
                    touches,
                    scores,
                }
            },
        )
}

fn population() -> impl Strategy<Value = Vec<Customer>> {
    (
        customer(0),
        customer(1),
        customer(2),
        customer(3),
        customer(4),
        customer(5),
    )
        .prop_map(|(a, b, c, d, e, f)| vec![a, b, c, d, e, f])
}

async fn load(db: &DatabaseConnection, people: &[Customer]) {
    for table in [
        "fact_customers",
        "fact_attributes",
        "fact_consents",
        "fact_touchpoints",
        "fact_touch_props",
        "fact_score_curves",
        "fact_score_terms",
    ] {
        db.execute_unprepared(&format!("DELETE FROM {table}"))
            .await
            .unwrap();
    }
    let profiles: Vec<Profile> = people.iter().map(|c| c.profile.clone()).collect();
    facts::upsert_profiles(db, &profiles).await.unwrap();
    let cells: Vec<_> = people
        .iter()
        .flat_map(|c| {
            c.consents
                .iter()
                .map(|(p, ch, g)| (c.profile.id.clone(), p.clone(), ch.clone(), *g))
        })
        .collect();
    facts::set_consents(db, &cells).await.unwrap();
    let touches: Vec<TouchRow> = people
        .iter()
        .flat_map(|c| {
            c.touches.iter().map(|t| TouchRow {
                customer: c.profile.id.clone(),
                touchpoint: t.clone(),
            })
        })
        .collect();
    facts::insert_touchpoints(db, &touches).await.unwrap();
    let scores: Vec<ScoreRow> = people.iter().flat_map(|c| c.scores.clone()).collect();
    facts::set_scores(db, &scores).await.unwrap();
}

async fn agree(
    db: &DatabaseConnection,
    postgres: bool,
    people: &[Customer],
    text: &str,
) -> (usize, usize) {
    let mut catalog = FieldCatalog::new();
    catalog.infer_unknown_attributes = true;
    let rule = rules::compile(text, &catalog).expect("generated rules are valid");
    load(db, people).await;
    let ids: Vec<String> = people.iter().map(|c| c.profile.id.clone()).collect();
    // Only the touchpoints the rule can count at `now()` are loaded: the
    // evaluator on that bounded load agrees with SQL over all of them.
    let loaded = facts::load(db, &ids, &Lookback::of([&rule]), now())
        .await
        .unwrap();
    let by_evaluator: BTreeSet<String> = loaded
        .iter()
        .filter(|(_, fs)| rules::evaluate(&rule, *fs, now()))
        .map(|(id, _)| id.clone())
        .collect();
    let select = Compiler {
        at: now(),
        postgres,
    }
    .select(&rule);
    let by_sql: BTreeSet<String> = db
        .query_all(&select)
        .await
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .iter()
        .map(|r| r.try_get_by_index::<String>(0).unwrap())
        .collect();
    assert_eq!(by_sql, by_evaluator, "rule: {text}\npeople: {people:#?}");
    (by_sql.len(), people.len())
}

#[test]
fn sql_and_evaluator_agree() {
    run(rule().boxed(), 200, (40, 160));
}

/// Rules of score conditions only: where decay, inactivity, floors and
/// ceilings decide.
#[test]
fn sql_and_evaluator_agree_on_decayed_scores() {
    let rules = score_condition().prop_recursive(2, 4, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) and ({b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("({a}) or ({b})")),
            inner.prop_map(|a| format!("not ({a})")),
        ]
    });
    run(rules.boxed(), 200, (40, 160));
}

fn run(rules: BoxedStrategy<String>, cases: u32, (min_some, max_all): (usize, usize)) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (backend, db) = rt.block_on(async {
        let backend = TestBackend::new().await;
        let config = backend.config("segmentation");
        let db = clm_platform::db::connect(&config.database).await.unwrap();
        clm_segmentation::store::Migrator::up(&db, None)
            .await
            .unwrap();
        (backend, db)
    });
    let postgres = backend.is_postgres();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let (some, all) = (
        std::sync::atomic::AtomicUsize::new(0),
        std::sync::atomic::AtomicUsize::new(0),
    );
    runner
        .run(&(population(), rules), |(people, text)| {
            let (matched, n) = rt.block_on(agree(&db, postgres, &people, &text));
            if matched > 0 {
                some.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            if matched == n {
                all.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        })
        .unwrap();
    // The generated rules are neither all empty nor all everything.
    let (some, all) = (some.into_inner(), all.into_inner());
    assert!(
        some > min_some && all < max_all,
        "matched some: {some}, matched all: {all}"
    );
}

fn lookback_touch(event: &str, kind: TouchpointKind, ago: Duration) -> TouchRow {
    let mut properties = BTreeMap::new();
    properties.insert("source".to_owned(), event.to_owned());
    TouchRow {
        customer: "c1".into(),
        touchpoint: Touchpoint {
            event_id: event.into(),
            kind,
            custom_type: None,
            occurred_time: now() - ago,
            usage_millis: None,
            product: None,
            feature: Some("export".into()),
            revenue: None,
            campaign: None,
            channel: None,
            properties,
        },
    }
}

async fn lookback_backend() -> (TestBackend, DatabaseConnection) {
    let backend = TestBackend::new().await;
    let config = backend.config("segmentation");
    let db = clm_platform::db::connect(&config.database).await.unwrap();
    clm_segmentation::store::Migrator::up(&db, None)
        .await
        .unwrap();
    let profile = Profile {
        id: "c1".into(),
        ..Profile::default()
    };
    facts::upsert_profiles(&db, &[profile]).await.unwrap();
    facts::insert_touchpoints(
        &db,
        &[
            lookback_touch("use-1d", TouchpointKind::FeatureUse, Duration::days(1)),
            lookback_touch("use-6d", TouchpointKind::FeatureUse, Duration::days(6)),
            lookback_touch("use-40d", TouchpointKind::FeatureUse, Duration::days(40)),
            // Recorded ahead of the evaluation instant (clock skew): counts.
            lookback_touch("use-ahead", TouchpointKind::FeatureUse, Duration::hours(-1)),
            lookback_touch("buy-400d", TouchpointKind::Purchase, Duration::days(400)),
            lookback_touch(
                "support-1d",
                TouchpointKind::SupportContact,
                Duration::days(1),
            ),
        ],
    )
    .await
    .unwrap();
    (backend, db)
}

/// The event ids loaded for `c1` for `texts`, and whether each touchpoint
/// came with its properties.
async fn lookback_loaded(db: &DatabaseConnection, texts: &[&str]) -> BTreeSet<String> {
    let rules: Vec<Rule> = texts.iter().map(|t| rules::parse(t).unwrap()).collect();
    let facts = facts::load(db, &["c1".to_owned()], &Lookback::of(&rules), now())
        .await
        .unwrap();
    let fs = &facts["c1"];
    for tp in &fs.touchpoints {
        assert_eq!(
            tp.properties.get("source"),
            Some(&tp.event_id),
            "properties of {}",
            tp.event_id
        );
    }
    fs.touchpoints.iter().map(|t| t.event_id.clone()).collect()
}

fn event_ids(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test]
async fn facts_load_reads_no_touchpoint_older_than_the_longest_window() {
    let (_backend, db) = lookback_backend().await;
    // One window: only feature use, only from 7 days back (and ahead).
    assert_eq!(
        lookback_loaded(&db, &["count(feature_use, 7d) > 1"]).await,
        event_ids(&["use-1d", "use-6d", "use-ahead"])
    );
    // The longest window of the kind bounds it.
    assert_eq!(
        lookback_loaded(
            &db,
            &[
                "count(feature_use, 2d) > 1",
                "last(feature_use, 3d) within 30d"
            ]
        )
        .await,
        event_ids(&["use-1d", "use-ahead"])
    );
    // A lifetime count reads its kind whole, and only its kind.
    assert_eq!(
        lookback_loaded(&db, &["count(feature_use, 7d) > 1 and count(purchase) > 0"]).await,
        event_ids(&["use-1d", "use-6d", "use-ahead", "buy-400d"])
    );
    assert_eq!(
        lookback_loaded(
            &db,
            &[
                "count(feature_use, 1d) > 0",
                "first(feature_use) < 2026-01-01"
            ]
        )
        .await,
        event_ids(&["use-1d", "use-6d", "use-40d", "use-ahead"])
    );
    // Rules reading no touchpoint read none.
    assert!(lookback_loaded(&db, &["age > 30"]).await.is_empty());
}
