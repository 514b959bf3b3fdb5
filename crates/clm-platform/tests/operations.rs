//! Long-running operations under leases: an operation whose replica died is
//! resumed by exactly one of two others once the lease lapses by the
//! service clock; cancel, wait and list through `google.longrunning.Operations`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_domain::{Clock, ManualClock};
use clm_platform::Runtime;
use clm_platform::operations::{self, Runner};
use clm_platform::service::{Parts, ServiceDescriptor, migrate_with};
use clm_platform::testing::{TestBackend, eventually, operation_done, start_with_clock};
use clm_proto::google::longrunning::operations_client::OperationsClient;
use clm_proto::google::longrunning::{
    CancelOperationRequest, ListOperationsRequest, Operation, WaitOperationRequest, operation,
};
use sea_orm::Database;
use sea_orm_migration::prelude::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct PlatformOnly;

impl MigratorTrait for PlatformOnly {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        clm_platform::migration::platform_migrations()
    }
}

/// Which replica ran which operation, and whether runs finish or hang.
static RUNS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
static FINISH: Mutex<bool> = Mutex::new(false);

static WORKER: ServiceDescriptor = ServiceDescriptor {
    name: "optest",
    about: "runs test operations",
    migrate: migrate_with::<PlatformOnly>,
    policy: &clm_platform::auth::Policy::PLATFORM_ONLY,
    build,
};

fn runner() -> Runner {
    Arc::new(|rt: Runtime, mut op: Operation, cancel| {
        Box::pin(async move {
            RUNS.lock()
                .unwrap()
                .push((op.name.clone(), rt.operations.replica.to_string()));
            loop {
                if cancel.is_cancelled() {
                    return Err(clm_platform::Error::Cancelled("stopped".into()));
                }
                if *FINISH.lock().unwrap() {
                    let any = clm_proto::pack_any(&clm_proto::common::Date::default());
                    return operations::succeed(
                        &rt.db,
                        &rt.operations,
                        &mut op,
                        any.clone(),
                        any,
                        rt.clock.now(),
                    )
                    .await;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    })
}

/// Holds a transaction that wrote its progress across several lease
/// renewals, then finishes.
fn slow_runner() -> Runner {
    Arc::new(|rt: Runtime, mut op: Operation, _| {
        Box::pin(async move {
            use sea_orm::TransactionTrait;
            let any = clm_proto::pack_any(&clm_proto::common::Date::default());
            let txn = rt.db.begin().await?;
            operations::progress(&txn, &rt.operations, &mut op, any.clone(), rt.clock.now())
                .await?;
            tokio::time::sleep(rt.operations.lease).await;
            txn.commit().await?;
            operations::succeed(
                &rt.db,
                &rt.operations,
                &mut op,
                any.clone(),
                any,
                rt.clock.now(),
            )
            .await
        })
    })
}

fn build(_: &Runtime) -> anyhow::Result<Parts> {
    Ok(Parts::new()
        .operation("test.work", runner())
        .operation("test.slow", slow_runner()))
}

fn runs_of(name: &str) -> Vec<String> {
    RUNS.lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, r)| r.clone())
        .collect()
}

#[tokio::test]
async fn an_interrupted_operation_is_resumed_by_exactly_one_replica_and_can_be_cancelled() {
    let backend = TestBackend::new().await;
    let clock = ManualClock::new(chrono::Utc::now());
    let config = || {
        let mut c = backend.config("optest");
        c.operation_lease_ms = 300;
        c
    };
    let first = start_with_clock(&WORKER, config(), Arc::new(clock.clone())).await;
    let db = Database::connect(&backend.database_url).await.unwrap();
    let any = clm_proto::pack_any(&clm_proto::common::Date::default());
    operations::start(&db, "op-1", "test.work", any.clone(), clock.now())
        .await
        .unwrap();
    // The first replica claims it (its poller looks every lease / 3) and hangs in it.
    eventually(Duration::from_secs(10), || async {
        (runs_of("operations/op-1").len() == 1).then_some(())
    })
    .await;
    // It dies: nobody renews the lease any more.
    first.stop().await;
    let second = start_with_clock(&WORKER, config(), Arc::new(clock.clone())).await;
    let third = start_with_clock(&WORKER, config(), Arc::new(clock.clone())).await;
    // While the lease holds by the clock, nobody takes it over.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(runs_of("operations/op-1").len(), 1);
    *FINISH.lock().unwrap() = true;
    clock.advance(chrono::Duration::seconds(1));
    let mut ops = OperationsClient::new(second.channel());
    let done = eventually(Duration::from_secs(10), || {
        let mut ops = ops.clone();
        async move {
            let op = ops
                .wait_operation(WaitOperationRequest {
                    name: "operations/op-1".into(),
                    timeout: Some(prost_types::Duration {
                        seconds: 1,
                        nanos: 0,
                    }),
                })
                .await
                .unwrap()
                .into_inner();
            op.done.then_some(op)
        }
    })
    .await;
    assert!(matches!(done.result, Some(operation::Result::Response(_))));
    let runs = runs_of("operations/op-1");
    assert_eq!(runs.len(), 2, "resumed exactly once: {runs:?}");
    assert_ne!(runs[0], runs[1], "by another replica");

    // Cancel: one nobody runs ends at once with CANCELLED.
    *FINISH.lock().unwrap() = false;
    let mut third_ops = OperationsClient::new(third.channel());
    // A running one stops at its next renewal.
    operations::start(&db, "op-2", "test.work", any.clone(), clock.now())
        .await
        .unwrap();
    eventually(Duration::from_secs(10), || async {
        (runs_of("operations/op-2").len() == 1).then_some(())
    })
    .await;
    // Waiting on a running one ends at the call's own deadline with its
    // latest state, not DEADLINE_EXCEEDED.
    let mut wait = tonic::Request::new(WaitOperationRequest {
        name: "operations/op-2".into(),
        timeout: Some(prost_types::Duration {
            seconds: 30,
            nanos: 0,
        }),
    });
    wait.set_timeout(Duration::from_millis(500));
    let running = third_ops.wait_operation(wait).await.unwrap().into_inner();
    assert!(!running.done);
    third_ops
        .cancel_operation(CancelOperationRequest {
            name: "operations/op-2".into(),
        })
        .await
        .unwrap();
    let cancelled = operation_done(second.channel(), "operations/op-2").await;
    match cancelled.result {
        Some(operation::Result::Error(s)) => assert_eq!(s.code, tonic::Code::Cancelled as i32),
        other => panic!("{other:?}"),
    }
    // List by state, paged.
    let list = |filter: &str, token: String| {
        let mut ops = ops.clone();
        let filter = filter.to_owned();
        async move {
            ops.list_operations(ListOperationsRequest {
                filter,
                page_size: 1,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let page = list("kind = \"test.work\" AND done = true", String::new()).await;
    assert_eq!(page.operations.len(), 1);
    assert!(!page.next_page_token.is_empty());
    let rest = list("kind = \"test.work\" AND done = true", page.next_page_token).await;
    assert_eq!(rest.operations.len(), 1);
    assert_ne!(rest.operations[0].name, page.operations[0].name);
    assert!(
        list("done = false", String::new())
            .await
            .operations
            .is_empty()
    );
    let e = ops
        .list_operations(ListOperationsRequest {
            filter: "state = 1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    clm_platform::testing::assert_bad_field(&e, "filter");
    second.stop().await;
    third.stop().await;
}

#[tokio::test]
async fn renewals_never_wait_on_the_work_s_own_open_transaction() {
    let backend = TestBackend::new().await;
    let clock = ManualClock::new(chrono::Utc::now());
    let mut config = backend.config("optest");
    config.operation_lease_ms = 300;
    let running = start_with_clock(&WORKER, config, Arc::new(clock.clone())).await;
    let db = Database::connect(&backend.database_url).await.unwrap();
    let any = clm_proto::pack_any(&clm_proto::common::Date::default());
    operations::start(&db, "slow-1", "test.slow", any, clock.now())
        .await
        .unwrap();
    let done = operation_done(running.channel(), "operations/slow-1").await;
    assert!(
        matches!(done.result, Some(operation::Result::Response(_))),
        "{done:?}"
    );
    running.stop().await;
}
