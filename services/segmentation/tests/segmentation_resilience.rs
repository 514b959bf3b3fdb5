//! Membership stays right when things go wrong: Redis stopped mid-test
//! (answers keep coming from the database, then the cache is rebuilt), a
//! segment whose evaluation fails shows the failure and recovers on
//! refresh, merges re-key and erasures delete with a receipt.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use chrono::Duration;
use clm_platform::testing::eventually;
use clm_proto::common::change_stream_service_client::ChangeStreamServiceClient;
use clm_proto::common::{CustomerDataErased, WatchChangesRequest};
use clm_proto::customer as cpb;
use clm_proto::segmentation as pb;
use common::*;
use sea_orm::ConnectionTrait;
use tokio_stream::StreamExt;

/// A `redis-server` of this test's own, on a free port, without persistence.
struct Redis {
    port: u16,
    child: Option<std::process::Child>,
}

impl Redis {
    fn start_on(port: u16) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        Self {
            port,
            child: Some(child),
        }
    }

    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Self::start_on(port)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    async fn exists(&self, key: &str) -> bool {
        let client = redis::Client::open(self.url()).unwrap();
        let mut con = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("EXISTS")
            .arg(key)
            .query_async::<i64>(&mut con)
            .await
            .unwrap()
            == 1
    }

    async fn wait_up(&self) {
        eventually(std::time::Duration::from_secs(10), || async {
            match redis::Client::open(self.url()) {
                Ok(c) => c.get_multiplexed_async_connection().await.is_ok(),
                Err(_) => false,
            }
        })
        .await;
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test]
async fn redis_stopped_mid_test_answers_from_the_database_then_rebuilds() {
    let mut redis = Redis::start();
    redis.wait_up().await;
    let url = redis.url();
    let h = start_with(|c| {
        c.cache.redis_url = Some(url);
        c.cache.cluster = false;
    })
    .await;
    let prefix = h.seg_backend.key_prefix.clone();
    let mut cust = h.customers();
    let ada = create_customer(&mut cust, "ada@example.com", |_| {}).await;
    let mut seg = h.segments();
    let approach = create_segment(&mut seg, "stage = APPROACH").await;
    wait_count(&mut seg, &approach.name, 1).await;
    let users = create_segment(
        &mut seg,
        r#"count(feature_use where feature = "export") >= 1"#,
    )
    .await;
    wait_ready(&mut seg, &users.name).await;
    assert!(is_member(&mut seg, &approach.name, &ada).await);
    assert!(!is_member(&mut seg, &users.name, &ada).await);
    let key = format!("{prefix}{{cust:{}}}", ada.trim_start_matches("customers/"));
    assert!(redis.exists(&key).await, "the customer's set is cached");

    // Redis goes away: answers keep coming, from the database.
    redis.stop();
    for _ in 0..3 {
        assert!(is_member(&mut seg, &approach.name, &ada).await);
        assert!(!is_member(&mut seg, &users.name, &ada).await);
    }
    // A membership change while Redis is down is answered right too.
    feature_use(&mut cust, &ada, "export", t0()).await;
    wait_member(&mut seg, &users.name, &ada, true).await;
    let mine = seg
        .get_customer_segments(pb::GetCustomerSegmentsRequest {
            customer: ada.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.segments.len(), 2);

    // Redis is back, empty: the cache repairs itself and is loaded again.
    let redis = Redis::start_on(redis.port);
    redis.wait_up().await;
    eventually(std::time::Duration::from_secs(30), || {
        let mut seg = seg.clone();
        let (users, ada, key) = (users.name.clone(), ada.clone(), key.clone());
        let redis = &redis;
        async move { is_member(&mut seg, &users, &ada).await && redis.exists(&key).await }
    })
    .await;
    assert!(is_member(&mut seg, &approach.name, &ada).await);
}

#[tokio::test]
async fn a_failing_segment_shows_the_failure_and_recovers_on_refresh() {
    let h = start().await;
    let mut cust = h.customers();
    let ada = create_customer(&mut cust, "ada@example.com", |_| {}).await;
    let mut seg = h.segments();
    let all = create_segment(&mut seg, "stage = APPROACH").await;
    wait_count(&mut seg, &all.name, 1).await;
    // The projection's property table disappears underneath the service.
    let db = sea_orm::Database::connect(&h.seg_backend.database_url)
        .await
        .unwrap();
    db.execute_unprepared("ALTER TABLE fact_touch_props RENAME TO fact_touch_props_gone")
        .await
        .unwrap();
    let s = create_segment(
        &mut seg,
        r#"count(custom("survey") where properties.score <= "6", 30d) > 0 or stage = APPROACH"#,
    )
    .await;
    let failed = wait_ready(&mut seg, &s.name).await;
    assert_eq!(failed.state, pb::SegmentState::Failed as i32, "{failed:?}");
    assert!(
        failed.failure_reason.contains("evaluation failed"),
        "{failed:?}"
    );
    assert!(
        !failed.failure_reason.to_lowercase().contains("select"),
        "no SQL: {failed:?}"
    );
    db.execute_unprepared("ALTER TABLE fact_touch_props_gone RENAME TO fact_touch_props")
        .await
        .unwrap();
    let refreshed = seg
        .refresh_segment(pb::RefreshSegmentRequest {
            name: s.name.clone(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(refreshed.state, pb::SegmentState::Backfilling as i32);
    let ready = wait_count(&mut seg, &s.name, 1).await;
    assert!(ready.failure_reason.is_empty());
    assert!(is_member(&mut seg, &s.name, &ada).await);
}

#[tokio::test]
async fn merges_rekey_and_erasures_delete_with_a_receipt() {
    let h = start().await;
    let mut cust = h.customers();
    let a = create_customer(&mut cust, "a@example.com", |_| {}).await;
    let b = create_customer(&mut cust, "b@example.com", |_| {}).await;
    feature_use(&mut cust, &a, "export", t0() - Duration::hours(2)).await;
    feature_use(&mut cust, &b, "export", t0() - Duration::hours(1)).await;
    let mut seg = h.segments();
    let twice = create_segment(
        &mut seg,
        r#"count(feature_use where feature = "export", 1d) >= 2"#,
    )
    .await;
    let once = create_segment(&mut seg, r#"count(feature_use, 1d) >= 1"#).await;
    wait_count(&mut seg, &once.name, 2).await;
    wait_count(&mut seg, &twice.name, 0).await;
    // Merging b into a: b leaves, a now has both exports.
    cust.merge_customers(cpb::MergeCustomersRequest {
        survivor: a.clone(),
        duplicates: vec![b.clone()],
        policy: None,
        request_id: String::new(),
    })
    .await
    .unwrap();
    wait_member(&mut seg, &twice.name, &a, true).await;
    wait_count(&mut seg, &once.name, 1).await;
    wait_member(&mut seg, &once.name, &b, false).await;

    // Erasure: memberships and facts go, the receipt is on the stream.
    cust.erase_customer(cpb::EraseCustomerRequest {
        name: a.clone(),
        request_id: "erase-a".into(),
    })
    .await
    .unwrap();
    wait_count(&mut seg, &once.name, 0).await;
    // The cache is written after the commit the count reads: wait for it.
    wait_member(&mut seg, &twice.name, &a, false).await;
    let mut changes = ChangeStreamServiceClient::new(h.segmentation.as_ref().unwrap().channel());
    // Every event type: `CustomerDataErased` lives in erasure.proto, which
    // the platform's event-type filter does not list (see the report).
    let mut stream = changes
        .watch_changes(WatchChangesRequest {
            after_sequence: 0,
            event_types: Vec::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let event = loop {
        let e = stream.next().await.unwrap().unwrap().event.unwrap();
        if e.event_type == "clm.common.v1.CustomerDataErased" {
            break e;
        }
    };
    let receipt: CustomerDataErased =
        prost::Message::decode(event.payload.unwrap().value.as_slice()).unwrap();
    assert_eq!(receipt.customer, a);
    assert_eq!(receipt.service, "segmentation");
    // Nothing about the customer is left in the projection or membership.
    let db = sea_orm::Database::connect(&h.seg_backend.database_url)
        .await
        .unwrap();
    let id = a.trim_start_matches("customers/");
    for (table, column) in [
        ("fact_customers", "customer_id"),
        ("fact_touchpoints", "customer_id"),
        ("members", "customer_id"),
        ("member_history", "customer_id"),
        ("timer_queue", "subject"),
    ] {
        let row = db
            .query_one_raw(sea_orm::Statement::from_string(
                db.get_database_backend(),
                format!("SELECT COUNT(*) AS n FROM {table} WHERE {column} = '{id}'"),
            ))
            .await
            .unwrap()
            .unwrap();
        let n: i64 = row.try_get("", "n").unwrap();
        assert_eq!(n, 0, "{table} still holds the erased customer");
    }
}
