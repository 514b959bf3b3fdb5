//! The audit trail: recorded with the caller from the call context, read
//! back through `ListAuditEntries` with filters and pages, append-only on
//! both backends, redacted only by the erasure path.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clm_platform::Runtime;
use clm_platform::audit::{self, Change};
use clm_platform::auth::{Principal, Role, RpcName};
use clm_platform::call::{self, Call};
use clm_platform::service::{Parts, ServiceDescriptor, migrate_with};
use clm_platform::testing::{TestBackend, start};
use clm_proto::common::audit_service_client::AuditServiceClient;
use clm_proto::common::{Date, ListAuditEntriesRequest};
use sea_orm::{ConnectionTrait, Database, TransactionTrait};
use sea_orm_migration::prelude::*;

struct PlatformOnly;

impl MigratorTrait for PlatformOnly {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        clm_platform::migration::platform_migrations()
    }
}

static AUDITED: ServiceDescriptor = ServiceDescriptor {
    name: "audittest",
    about: "serves only the platform services",
    migrate: migrate_with::<PlatformOnly>,
    policy: &clm_platform::auth::Policy::PLATFORM_ONLY,
    build,
};

fn build(_: &Runtime) -> anyhow::Result<Parts> {
    Ok(Parts::new())
}

fn date(day: i32) -> Date {
    Date {
        year: 2026,
        month: 1,
        day,
    }
}

fn as_caller(subject: &str, method: &str) -> Call {
    Call {
        principal: Principal::new(subject, vec![Role::Marketer, Role::Analyst]),
        rpc: Some(RpcName {
            service: "clm.test.v1.TestService".into(),
            method: method.to_owned().into(),
        }),
    }
}

#[tokio::test]
async fn entries_name_the_caller_and_page_newest_first_and_cannot_be_changed() {
    let backend = TestBackend::new().await;
    let running = start(&AUDITED, backend.config("audittest")).await;
    let db = Database::connect(&backend.database_url).await.unwrap();
    let now = clm_domain::clock::micros(chrono::Utc::now());

    // Three changes by two callers, one of them a request with a request id.
    for (who, method, resource, rid) in [
        ("ada", "CreateThing", "things/1", Some("r-1")),
        ("bob", "Update_Thing", "things/1", None),
        ("ada", "CreateThing", "things/2", None),
    ] {
        let txn = db.begin().await.unwrap();
        let change = if method == "CreateThing" {
            let personal = ListAuditEntriesRequest {
                actor: "c1@example.com".into(),
                ..Default::default()
            };
            Change::create(resource, &personal).customer("customers/c1")
        } else {
            Change::update(resource, &date(1), &date(2)).mask(Some(&prost_types::FieldMask {
                paths: vec!["day".into()],
            }))
        };
        call::scope(
            as_caller(who, method),
            call::with_request_id(rid.map(str::to_owned), async {
                audit::record(&txn, "audittest", now, change).await.unwrap();
            }),
        )
        .await;
        txn.commit().await.unwrap();
    }
    // Outside a call: the service itself.
    audit::record(
        &db,
        "audittest",
        now,
        Change::action("things/3", &date(3)).by("timer"),
    )
    .await
    .unwrap();

    let mut client = AuditServiceClient::new(running.channel());
    let all = client
        .list_audit_entries(ListAuditEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .audit_entries;
    assert_eq!(all.len(), 4);
    assert_eq!(all[0].actor, "system:audittest");
    assert_eq!(all[0].rpc, "timer");
    let update = &all[2];
    assert_eq!(update.actor, "bob");
    assert_eq!(update.roles, vec!["marketer", "analyst"]);
    assert_eq!(update.rpc, "clm.test.v1.TestService/Update_Thing");
    assert_eq!(update.update_mask.as_ref().unwrap().paths, vec!["day"]);
    let day = |s: &Option<prost_types::Struct>| match s.as_ref().unwrap().fields["day"].kind {
        Some(prost_types::value::Kind::NumberValue(d)) => d,
        ref other => panic!("{other:?}"),
    };
    assert_eq!(day(&update.before), 1.0);
    assert_eq!(day(&update.after), 2.0);
    assert_eq!(all[3].request_id, "r-1");
    assert!(all[3].before.is_none());

    // Filters: resource, actor, rpc by method name; pages of one.
    let list = |req: ListAuditEntriesRequest| {
        let mut client = client.clone();
        async move { client.list_audit_entries(req).await.unwrap().into_inner() }
    };
    let of_thing_1 = list(ListAuditEntriesRequest {
        resource: "things/1".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(of_thing_1.audit_entries.len(), 2);
    let by_ada = list(ListAuditEntriesRequest {
        actor: "ada".into(),
        rpc: "CreateThing".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(by_ada.audit_entries.len(), 2);
    // A filter's wildcard characters match only themselves, on both backends.
    let underscore = list(ListAuditEntriesRequest {
        rpc: "Update_Thing".into(),
        ..Default::default()
    })
    .await;
    assert_eq!(underscore.audit_entries.len(), 1);
    let wild = list(ListAuditEntriesRequest {
        rpc: "%".into(),
        ..Default::default()
    })
    .await;
    assert!(wild.audit_entries.is_empty());
    let mut token = String::new();
    let mut paged = Vec::new();
    loop {
        let page = list(ListAuditEntriesRequest {
            page_size: 1,
            page_token: token.clone(),
            ..Default::default()
        })
        .await;
        paged.extend(page.audit_entries);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(paged, all);
    // A token of another query is refused.
    let other = list(ListAuditEntriesRequest {
        page_size: 1,
        ..Default::default()
    })
    .await
    .next_page_token;
    let e = client
        .clone()
        .list_audit_entries(ListAuditEntriesRequest {
            page_size: 1,
            page_token: other,
            actor: "ada".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    clm_platform::testing::assert_bad_field(&e, "page_token");

    // Append-only: a plain UPDATE or DELETE is refused by the database.
    for sql in [
        "UPDATE audit_entries SET actor = 'mallory'",
        "UPDATE audit_entries SET actor = 'mallory', redacted_us = 1",
        "DELETE FROM audit_entries",
    ] {
        assert!(
            db.execute_unprepared(sql).await.is_err(),
            "{sql} was allowed"
        );
    }
    if backend.is_postgres() {
        assert!(
            db.execute_unprepared("TRUNCATE audit_entries")
                .await
                .is_err()
        );
    }

    // Erasure: the one allowed change, recorded.
    let txn = db.begin().await.unwrap();
    let n = audit::redact_customer(&txn, "audittest", "customers/c1", now)
        .await
        .unwrap();
    txn.commit().await.unwrap();
    assert_eq!(n, 2);
    let all = list(ListAuditEntriesRequest::default()).await.audit_entries;
    assert_eq!(all.len(), 5);
    assert_eq!(all[0].rpc, audit::ERASURE_RPC);
    let redacted: Vec<_> = all.iter().filter(|e| e.redact_time.is_some()).collect();
    assert_eq!(redacted.len(), 2);
    for e in redacted {
        let email = match &e.after.as_ref().unwrap().fields["actor"].kind {
            Some(prost_types::value::Kind::StringValue(s)) => s.clone(),
            other => panic!("{other:?}"),
        };
        assert!(email.starts_with("erased:"), "{email}");
        assert!(e.resource.starts_with("things/"), "names no customer: kept");
        assert_eq!(e.actor, "ada", "who acted is not the erased customer");
    }
    // Redacted entries stay append-only.
    assert!(
        db.execute_unprepared("UPDATE audit_entries SET actor = 'x' WHERE redacted_us IS NOT NULL")
            .await
            .is_err()
    );
    running.stop().await;
}
