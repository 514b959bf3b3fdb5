//! Facts from the loyalty and feedback streams can reach segmentation
//! before the customer's profile (each stream is followed on its own).
//! They are kept in a row that waits for the profile, invisible to rules
//! and evaluations until it arrives; then the customer is evaluated with
//! them. Before, they were dropped (an UPDATE of a row not there yet):
//! a new member's tier or first NPS answer was lost until it changed
//! again. A customer erased or merged away gets no such row. Runs on
//! SQLite, and on PostgreSQL too when `CLM_TEST_DATABASE_URL` is set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Utc};
use clm_domain::rules::{self, FieldCatalog};
use clm_platform::testing::TestBackend;
use clm_segmentation::lookback::Lookback;
use clm_segmentation::sql::Compiler;
use clm_segmentation::store::facts::{self, Profile};
use sea_orm::{ConnectionTrait, DatabaseConnection};
use sea_orm_migration::MigratorTrait;
use std::collections::BTreeSet;

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

/// Who the rule `text` selects in SQL (a backfill's query).
async fn selected(db: &DatabaseConnection, text: &str) -> BTreeSet<String> {
    let rule = rules::compile(text, &FieldCatalog::new()).unwrap();
    let select = Compiler {
        at: now(),
        postgres: db.get_database_backend() == sea_orm::DbBackend::Postgres,
    }
    .select(&rule);
    db.query_all(&select)
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get_by_index::<String>(0).unwrap())
        .collect()
}

async fn rows_of(db: &DatabaseConnection, id: &str) -> i64 {
    let sql = format!(
        "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM fact_customers WHERE customer_id = '{id}'"
    );
    db.query_one_raw(sea_orm::Statement::from_string(
        db.get_database_backend(),
        sql,
    ))
    .await
    .unwrap()
    .unwrap()
    .try_get("", "n")
    .unwrap()
}

#[tokio::test]
async fn loyalty_and_feedback_before_the_profile_wait_for_it() {
    let backend = TestBackend::new().await;
    let config = backend.config("segmentation");
    let db = clm_platform::db::connect(&config.database).await.unwrap();
    clm_segmentation::store::Migrator::up(&db, None)
        .await
        .unwrap();
    let c1 = vec!["c1".to_owned()];
    let gold = r#"loyalty.tier = "gold" and loyalty.balance >= 500 and nps.last >= 9"#;

    // Before the profile: kept, but nobody to evaluate and no rule sees it.
    let tier = facts::set_loyalty(&db, &[("c1".into(), Some("gold".into()), 500)])
        .await
        .unwrap();
    assert!(tier.is_empty(), "no profile yet: nothing to evaluate");
    let nps = facts::set_feedback(&db, &[("c1".into(), Some(9), None)])
        .await
        .unwrap();
    assert!(nps.is_empty());
    assert_eq!(rows_of(&db, "c1").await, 1);
    let lookback = Lookback::default();
    assert!(
        facts::load(&db, &c1, &lookback, now())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(selected(&db, gold).await.is_empty());

    // The profile arrives: the waiting facts are the customer's.
    facts::upsert_profiles(
        &db,
        &[Profile {
            id: "c1".into(),
            email: Some("c1@example.com".into()),
            ..Profile::default()
        }],
    )
    .await
    .unwrap();
    let loaded = facts::load(&db, &c1, &lookback, now()).await.unwrap();
    let fs = &loaded["c1"];
    assert_eq!(fs.loyalty_tier.as_deref(), Some("gold"));
    assert_eq!(fs.loyalty_balance, Some(500));
    assert_eq!(fs.nps_last, Some(9));
    assert_eq!(fs.email.as_deref(), Some("c1@example.com"));
    assert_eq!(selected(&db, gold).await, BTreeSet::from(["c1".to_owned()]));

    // From now on each fact is evaluated; a balance alone keeps the tier,
    // an empty tier clears it.
    let updated = facts::set_loyalty(&db, &[("c1".into(), None, 700)])
        .await
        .unwrap();
    assert_eq!(updated, c1);
    let fs = facts::load(&db, &c1, &lookback, now()).await.unwrap()["c1"].clone();
    assert_eq!(
        (fs.loyalty_tier.as_deref(), fs.loyalty_balance),
        (Some("gold"), Some(700))
    );
    facts::set_loyalty(&db, &[("c1".into(), Some(String::new()), 0)])
        .await
        .unwrap();
    let fs = facts::load(&db, &c1, &lookback, now()).await.unwrap()["c1"].clone();
    assert_eq!((fs.loyalty_tier, fs.loyalty_balance), (None, Some(0)));
    assert_eq!(
        facts::set_feedback(&db, &[("c1".into(), None, Some(4.0))])
            .await
            .unwrap(),
        c1
    );
    let fs = facts::load(&db, &c1, &lookback, now()).await.unwrap()["c1"].clone();
    assert_eq!((fs.nps_last, fs.csat_last), (Some(9), Some(4.0)));

    // An erased customer's late facts leave nothing behind.
    facts::erase(&db, &["c2".to_owned()], 1).await.unwrap();
    facts::set_loyalty(&db, &[("c2".into(), Some("gold".into()), 10)])
        .await
        .unwrap();
    facts::set_feedback(&db, &[("c2".into(), Some(3), Some(1.0))])
        .await
        .unwrap();
    assert_eq!(rows_of(&db, "c2").await, 0);
}
