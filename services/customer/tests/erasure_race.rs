//! Two services' erasure receipts recorded at once, on PostgreSQL: the
//! request completes. Each receipt is recorded in its own transaction (as
//! two subscriptions do); without a lock on the request, each counts the
//! other's uncommitted receipt as missing and neither completes it (seen in
//! the journey tests as a request stuck IN_PROGRESS with every receipt in).
//! SQLite has one writer, so the race cannot happen there.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_customer::store::erasure::{self, ErasureRecord, ErasureRequestId, Receipt};
use clm_domain::ids::CustomerId;
use clm_platform::testing::TestBackend;
use sea_orm::{Database, TransactionTrait};
use sea_orm_migration::MigratorTrait;
use std::time::Duration;

#[tokio::test]
async fn receipts_recorded_at_once_complete_the_request() {
    let backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    if !backend.is_postgres() {
        return;
    }
    let db = Database::connect(&backend.database_url).await.unwrap();
    clm_customer::store::Migrator::up(&db, None).await.unwrap();
    let now = chrono::Utc::now();
    let request = ErasureRecord {
        id: ErasureRequestId::new(),
        customer: CustomerId::new(),
        requester: "test".into(),
        create_time: now,
        complete_time: None,
        expected: vec!["scoring".into(), "loyalty".into()],
        receipts: vec![],
    };
    erasure::insert(&db, &request).await.unwrap();
    let receipt = |service: &str| Receipt {
        erasure: request.id,
        service: service.into(),
        erase_time: now,
    };
    // The first receipt is recorded, not yet committed...
    let first = db.begin().await.unwrap();
    erasure::record_receipts(&first, &[receipt("scoring")], now)
        .await
        .unwrap();
    // ...when the second is recorded in a transaction of its own.
    let second = {
        let db = db.clone();
        let r = receipt("loyalty");
        tokio::spawn(async move {
            let txn = db.begin().await.unwrap();
            erasure::record_receipts(&txn, &[r], now).await.unwrap();
            txn.commit().await.unwrap();
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.commit().await.unwrap();
    second.await.unwrap();
    let done = erasure::get(&db, request.id).await.unwrap();
    assert_eq!(done.receipts.len(), 2, "{done:?}");
    assert!(
        done.complete_time.is_some(),
        "every expected receipt is in, so the request is complete: {done:?}"
    );
}
