//! A connection going back to the pool (vendor/sqlx-core's one change: it
//! is pinged only when it has something to flush): a transaction dropped
//! without commit is rolled back at once, not at the connection's next
//! checkout, and a statement abandoned mid-flight leaves nothing for the
//! next one to read. One pooled connection, so the next statement runs on
//! the same connection.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::db;
use clm_platform::testing::{TestBackend, eventually, scalar};
use sea_orm::{
    ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement, TransactionTrait,
};
use std::time::Duration;

async fn one_connection_pool(backend: &TestBackend) -> DatabaseConnection {
    let mut config = backend.config("pool-release").database;
    config.max_connections = 1;
    config.min_connections = 1;
    db::connect(&config).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_transaction_is_rolled_back_when_its_connection_is_released() {
    let backend = TestBackend::new().await;
    let pool = one_connection_pool(&backend).await;
    pool.execute_unprepared("CREATE TABLE kept (id BIGINT PRIMARY KEY)")
        .await
        .unwrap();
    {
        let txn = pool.begin().await.unwrap();
        txn.execute_unprepared("INSERT INTO kept (id) VALUES (1)")
            .await
            .unwrap();
        if backend.is_postgres() {
            txn.execute_unprepared("SELECT pg_advisory_xact_lock(4242)")
                .await
                .unwrap();
        }
        // dropped here without commit
    }
    if backend.is_postgres() {
        // Another session takes the transaction's lock without the pool's
        // one connection being used again: its ROLLBACK was sent on release.
        let other = Database::connect(&backend.database_url).await.unwrap();
        eventually(Duration::from_secs(5), || {
            let other = other.clone();
            async move {
                let row = other
                    .query_one_raw(Statement::from_string(
                        DbBackend::Postgres,
                        "SELECT pg_try_advisory_lock(4242) AS taken",
                    ))
                    .await
                    .unwrap()
                    .unwrap();
                row.try_get::<bool>("", "taken").unwrap().then_some(())
            }
        })
        .await;
        assert_eq!(
            scalar(&other, "SELECT count(*) FROM kept").await,
            0,
            "the dropped transaction's row is gone"
        );
    }
    assert_eq!(scalar(&pool, "SELECT count(*) FROM kept").await, 0);
    assert_eq!(scalar(&pool, "SELECT CAST(7 AS BIGINT)").await, 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_abandoned_mid_flight_leaves_the_connection_clean() {
    let backend = TestBackend::new().await;
    let pool = one_connection_pool(&backend).await;
    let slow = if backend.is_postgres() {
        "SELECT 1::bigint FROM pg_sleep(0.4)"
    } else {
        // SQLite has no sleep: a query long enough to be interrupted.
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000000) \
         SELECT max(i) FROM n"
    };
    let abandoned = tokio::time::timeout(Duration::from_millis(50), scalar(&pool, slow)).await;
    assert!(abandoned.is_err(), "the slow statement was abandoned");
    // The next statements on the one connection read their own results,
    // never the abandoned statement's.
    for n in [7_i64, 8, 9] {
        assert_eq!(
            scalar(&pool, &format!("SELECT CAST({n} AS BIGINT)")).await,
            n
        );
    }
}
