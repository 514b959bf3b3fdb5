//! The customer service through its real gRPC API on a real socket, on
//! SQLite + in-process cache, or PostgreSQL + Redis when
//! `CLM_TEST_DATABASE_URL` / `CLM_TEST_REDIS_URL` are set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Duration, Utc};
use clm_platform::auth::{Role, mint_hs256};
use clm_platform::client::ClientInterceptor;
use clm_platform::testing::{self, Running, TestBackend, assert_bad_field};
use clm_proto::common::change_stream_service_client::ChangeStreamServiceClient;
use clm_proto::common::{Date, Money, WatchChangesRequest};
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::customer::{
    self as pb, AttributeValue, Customer, Stage, TouchpointType, attribute_value::Value,
};
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic_types::StatusExt;

mod common;
use common::*;

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: 0,
    }
}

/// The change stream of `server` from its start, of `types` (all when
/// empty).
async fn watch_from_start(
    server: &Running,
    types: &[&str],
) -> tonic::Streaming<clm_proto::common::WatchChangesResponse> {
    ChangeStreamServiceClient::new(server.channel())
        .watch_changes(WatchChangesRequest {
            after_sequence: 0,
            event_types: types.iter().map(|t| (*t).to_owned()).collect(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn feature_use(customer: &str, event_id: &str, at: DateTime<Utc>) -> pb::Touchpoint {
    pb::Touchpoint {
        customer: customer.into(),
        event_id: event_id.into(),
        r#type: TouchpointType::FeatureUse as i32,
        feature: "reports".into(),
        occurred_time: Some(ts(at)),
        ..Default::default()
    }
}

#[tokio::test]
async fn create_get_update_with_etag() {
    let h = start().await;
    let mut c = h.client();
    let mut attrs = BTreeMap::new();
    attrs.insert(
        "plan".to_owned(),
        AttributeValue {
            value: Some(Value::StringValue("pro".into())),
        },
    );
    attrs.insert(
        "seats".to_owned(),
        AttributeValue {
            value: Some(Value::NumberValue(12.0)),
        },
    );
    let created = c
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(Customer {
                external_id: "crm-1".into(),
                email: "Ada@Example.com".into(),
                display_name: "Ada".into(),
                demographics: Some(pb::Demographics {
                    birth_date: Some(Date {
                        year: 1990,
                        month: 12,
                        day: 10,
                    }),
                    gender: pb::Gender::Female as i32,
                    annual_income: Some(Money {
                        currency_code: "EUR".into(),
                        amount_minor: 5_000_000,
                    }),
                    occupation: "Engineer".into(),
                    age: 0,
                }),
                attributes: attrs,
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.name.starts_with("customers/"));
    assert_eq!(created.email, "ada@example.com");
    assert_eq!(created.stage, Stage::Approach as i32);
    assert_eq!(created.demographics.as_ref().unwrap().age, 35);
    assert_eq!(created.attributes.len(), 2);

    let got = get(&mut c, created.name.clone()).await;
    assert_eq!(got, created);

    let mut change = created.clone();
    change.display_name = "Ada L.".into();
    change.attributes.clear();
    change.attributes.insert(
        "plan".into(),
        AttributeValue {
            value: Some(Value::StringValue("enterprise".into())),
        },
    );
    let updated = c
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(change.clone()),
            update_mask: mask(&["display_name", "attributes.plan"]),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.display_name, "Ada L.");
    assert_eq!(
        updated.attributes["plan"].value,
        Some(Value::StringValue("enterprise".into()))
    );
    assert_eq!(
        updated.attributes["seats"].value,
        Some(Value::NumberValue(12.0)),
        "unmasked keys are kept"
    );
    assert_ne!(updated.etag, created.etag);

    // The old etag is stale now.
    let stale = c
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(change),
            update_mask: mask(&["display_name"]),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);

    let missing = c
        .get_customer(pb::GetCustomerRequest {
            name: format!("customers/{}", uuid::Uuid::now_v7()),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    h.server.stop().await;
}

#[tokio::test]
async fn create_is_idempotent_and_unique() {
    let h = start().await;
    let mut c = h.client();
    let req = create_req(customer("bob@example.com"), "req-1");
    let first = c.create_customer(req.clone()).await.unwrap().into_inner();
    let again = c.create_customer(req.clone()).await.unwrap().into_inner();
    assert_eq!(first, again, "a retry returns the first result");

    let mut other = req.clone();
    other.customer.as_mut().unwrap().display_name = "someone else".into();
    let reused = c.create_customer(other).await.unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists);

    let dup = c
        .create_customer(create_req(customer("BOB@example.com"), "req-2"))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    assert!(dup.message().contains("email"), "{}", dup.message());

    let list = c
        .list_customers(pb::ListCustomersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.customers.len(), 1, "nothing was doubled");
    h.server.stop().await;
}

#[tokio::test]
async fn concurrent_creates_of_one_identifier_make_one_customer() {
    let h = start().await;
    // Eight callers create customers with the same e-mail (and eight with
    // the same external id) at once: on PostgreSQL they race past the
    // identifier check of the one-statement create and meet at the unique
    // indexes, which must answer ALREADY_EXISTS, never INTERNAL.
    let mut calls = Vec::new();
    for i in 0..16 {
        let mut c = h.client();
        let mut new = if i % 2 == 0 {
            customer("race@example.com")
        } else {
            customer(&format!("race-{i}@example.com"))
        };
        if i % 2 == 1 {
            new.external_id = "race-external".into();
        }
        calls.push(tokio::spawn(async move {
            c.create_customer(create_req(new, "")).await
        }));
    }
    let mut created = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => created += 1,
            Err(e) => assert_eq!(e.code(), Code::AlreadyExists, "{e:?}"),
        }
    }
    assert_eq!(created, 2, "one per identifier");
    let list = h
        .client()
        .list_customers(pb::ListCustomersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.customers.len(), 2, "nothing doubled");
    h.server.stop().await;
}

#[tokio::test]
async fn concurrent_retries_of_one_create_answer_one_customer() {
    let h = start().await;
    // Eight copies of one request at once: on PostgreSQL each tries the
    // one-statement create, whose key claim makes the others wait and then
    // write nothing; they answer the stored response.
    let req = create_req(customer("retry@example.com"), "req-retry");
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut c = h.client();
        let r = req.clone();
        calls.push(tokio::spawn(async move { c.create_customer(r).await }));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(
            call.await
                .unwrap()
                .expect("every copy answers")
                .into_inner(),
        );
    }
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "every copy answers the first result"
    );
    let mut c = h.client();
    let list = c
        .list_customers(pb::ListCustomersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.customers.len(), 1, "nothing was doubled");

    // A create that failed claimed no key: its request id still serves
    // another request.
    let held = c
        .create_customer(create_req(customer("retry@example.com"), "req-failed"))
        .await
        .unwrap_err();
    assert_eq!(held.code(), Code::AlreadyExists);
    let later = c
        .create_customer(create_req(customer("later@example.com"), "req-failed"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(later.email, "later@example.com");
    let replayed = c
        .create_customer(create_req(customer("later@example.com"), "req-failed"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed, later, "and is replayed from then on");
    h.server.stop().await;
}

#[tokio::test]
async fn concurrent_creates_each_answer_their_own_customer_and_event() {
    let h = start().await;
    let mut c = h.client();
    let held = create(&mut c, "held@example.com").await;
    let first = c
        .create_customer(create_req(customer("first@example.com"), "req-first"))
        .await
        .unwrap()
        .into_inner();
    // 240 creates at once from 8 channels (on PostgreSQL, gathered into
    // shared statements): most new, with and without request ids; among
    // them creates of a held e-mail, retries of an earlier request and
    // pairs of new creates with one e-mail. One bad call must not cost the
    // others their customer, nor give any call another call's answer.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..240usize {
        let mut c = if i % 30 == 0 { h.client() } else { c.clone() };
        let (email, rid) = match i % 40 {
            7 => ("held@example.com".to_owned(), String::new()),
            13 => ("first@example.com".to_owned(), "req-first".to_owned()),
            21 | 22 => (format!("pair{}@example.com", i / 40), String::new()),
            _ if i % 2 == 0 => (format!("new{i}@example.com"), format!("req-{i}")),
            _ => (format!("new{i}@example.com"), String::new()),
        };
        calls.spawn(async move {
            let got = c.create_customer(create_req(customer(&email), &rid)).await;
            (i, email, got)
        });
    }
    let mut names = HashSet::new();
    let mut pairs: HashMap<String, usize> = HashMap::new();
    while let Some(done) = calls.join_next().await {
        let (i, email, got) = done.unwrap();
        match i % 40 {
            7 => assert_eq!(got.unwrap_err().code(), Code::AlreadyExists, "call {i}"),
            13 => assert_eq!(got.unwrap().into_inner(), first, "call {i} replays"),
            21 | 22 => match got {
                Ok(made) => {
                    let made = made.into_inner();
                    assert_eq!(made.email, email);
                    assert!(names.insert(made.name));
                    *pairs.entry(email).or_default() += 1;
                }
                Err(e) => assert_eq!(e.code(), Code::AlreadyExists, "call {i}: {e:?}"),
            },
            _ => {
                let made = got.unwrap().into_inner();
                assert_eq!(made.email, email, "call {i} answers its own customer");
                assert_eq!(made.display_name, format!("Customer {email}"));
                assert!(names.insert(made.name.clone()), "one name per customer");
                let read = c.get_customer(by_name(made.name.clone())).await.unwrap();
                assert_eq!(read.into_inner(), made, "stored as answered");
            }
        }
    }
    assert_eq!(pairs.len(), 6, "each pair's e-mail made one customer");
    assert!(pairs.values().all(|n| *n == 1), "{pairs:?}");
    // 6 calls of each 40 failed or replayed; the rest made one customer.
    assert_eq!(names.len(), 240 - 6 * 4 + 6);

    // Every customer made has exactly one CustomerCreated event.
    let mut typed = watch_from_start(&h.server, &["clm.customer.v1.CustomerCreated"]).await;
    let mut subjects = HashSet::new();
    while subjects.len() < names.len() + 2 {
        let ev = tokio::time::timeout(std::time::Duration::from_secs(10), typed.next())
            .await
            .expect("an event for every customer")
            .unwrap()
            .unwrap()
            .event
            .unwrap();
        assert!(subjects.insert(ev.subject), "one event per customer");
    }
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), typed.next())
            .await
            .is_err(),
        "no extra events"
    );
    assert!(subjects.contains(&held.name) && subjects.contains(&first.name));
    assert!(names.iter().all(|n| subjects.contains(n)));
    h.server.stop().await;
}

#[tokio::test]
async fn bad_input_names_the_field() {
    let h = start().await;
    let mut c = h.client();
    let bad_email = c
        .create_customer(create_req(customer("not-an-email"), ""))
        .await
        .unwrap_err();
    assert_bad_field(&bad_email, "customer.email");

    let mut future = customer("f@example.com");
    future.demographics = Some(pb::Demographics {
        birth_date: Some(Date {
            year: 2027,
            month: 1,
            day: 1,
        }),
        ..Default::default()
    });
    let e = c.create_customer(create_req(future, "")).await.unwrap_err();
    assert_bad_field(&e, "customer.demographics.birth_date");

    let e = c
        .list_customers(pb::ListCustomersRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "page_size");

    let e = c
        .list_customers(pb::ListCustomersRequest {
            filter: "stage = GOLD".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "filter");

    let a = create(&mut c, "a@example.com").await;
    let e = c
        .transition_stage(pb::TransitionStageRequest {
            name: a.name.clone(),
            to_stage: 99,
            reason: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "to_stage");

    let too_many: Vec<_> = (0..1001)
        .map(|i| feature_use(&a.name, &format!("e{i}"), t0()))
        .collect();
    let e = c
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: too_many,
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "touchpoints");

    let mut purchase = feature_use(&a.name, "p1", t0());
    purchase.r#type = TouchpointType::Purchase as i32;
    let e = c
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: vec![feature_use(&a.name, "ok", t0()), purchase],
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "touchpoints[1].revenue");

    let e = c.get_customer(by_name("users/1")).await.unwrap_err();
    assert_bad_field(&e, "name");

    // NUL bytes would be refused by PostgreSQL with an SQL error: they are bad input.
    let mut with_nul = feature_use(&a.name, "nul", t0());
    with_nul.properties.insert("k".into(), "a\0b".into());
    let e = c
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: vec![with_nul],
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "touchpoints[0].properties[\"k\"]");
    let mut nul_attr = customer("nul@example.com");
    nul_attr.attributes.insert(
        "note".into(),
        AttributeValue {
            value: Some(Value::StringValue("x\0y".into())),
        },
    );
    let e = c
        .create_customer(create_req(nul_attr, ""))
        .await
        .unwrap_err();
    assert_bad_field(&e, "customer.attributes[\"note\"]");
    h.server.stop().await;
}

#[tokio::test]
async fn list_filters_orders_and_pages() {
    let h = start().await;
    let mut c = h.client();
    let requests = (0..25)
        .map(|i| {
            let mut cu = customer(&format!("u{i:02}@example.com"));
            cu.display_name = format!("User {:02}", 24 - i);
            cu.attributes.insert(
                "seats".into(),
                AttributeValue {
                    value: Some(Value::NumberValue(f64::from(i))),
                },
            );
            cu.attributes.insert(
                "plan".into(),
                AttributeValue {
                    value: Some(Value::StringValue(
                        if i % 2 == 0 { "pro" } else { "free" }.into(),
                    )),
                },
            );
            if i < 5 {
                cu.stage = Stage::Retention as i32;
            }
            create_req(cu, "")
        })
        .collect();
    let batch = c
        .batch_create_customers(pb::BatchCreateCustomersRequest {
            requests,
            request_id: "batch-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(batch.customers.len(), 25);

    // Page through everything, 7 at a time, by display name descending.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_customers(pb::ListCustomersRequest {
                page_size: 7,
                page_token: token.clone(),
                filter: String::new(),
                order_by: "display_name desc".into(),
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(page.customers.iter().map(|x| x.display_name.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut expected: Vec<String> = (0..25).map(|i| format!("User {:02}", 24 - i)).collect();
    expected.sort();
    expected.reverse();
    assert_eq!(seen, expected);

    let retained = c
        .list_customers(pb::ListCustomersRequest {
            filter: "stage = RETENTION".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retained.customers.len(), 5);
    let pro_big = c
        .list_customers(pb::ListCustomersRequest {
            filter: r#"attributes.plan = "pro" AND attributes.seats >= 10"#.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pro_big.customers.len(), 8, "10,12,...,24");

    // A token from another query is refused.
    let first = c
        .list_customers(pb::ListCustomersRequest {
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = c
        .list_customers(pb::ListCustomersRequest {
            page_size: 2,
            page_token: first.next_page_token,
            filter: "stage = RETENTION".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "page_token");

    // In-batch duplicates are refused before anything is written.
    let dup = c
        .batch_create_customers(pb::BatchCreateCustomersRequest {
            requests: vec![
                create_req(customer("d@example.com"), ""),
                create_req(customer("d@example.com"), ""),
            ],
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_bad_field(&dup, "requests[1].customer.email");
    h.server.stop().await;
}

#[tokio::test]
async fn touchpoints_are_idempotent_and_paged_newest_first() {
    let h = start().await;
    let mut c = h.client();
    let a = create(&mut c, "t@example.com").await;
    let batch: Vec<_> = (0..30)
        .map(|i| feature_use(&a.name, &format!("evt-{i:02}"), t0() - Duration::hours(i)))
        .collect();
    let r = c
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: batch.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.recorded_count, r.duplicate_count), (30, 0));
    let again = c
        .record_touchpoints(pb::RecordTouchpointsRequest { touchpoints: batch })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.recorded_count, again.duplicate_count),
        (0, 30),
        "re-sending changes nothing"
    );

    let mut purchase = feature_use(&a.name, "buy-1", t0() - Duration::days(400));
    purchase.r#type = TouchpointType::Purchase as i32;
    purchase.revenue = Some(Money {
        currency_code: "EUR".into(),
        amount_minor: 4999,
    });
    c.record_touchpoints(pb::RecordTouchpointsRequest {
        touchpoints: vec![purchase],
    })
    .await
    .unwrap();

    let mut ids = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_touchpoints(pb::ListTouchpointsRequest {
                parent: a.name.clone(),
                page_size: 8,
                page_token: token.clone(),
                filter: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        ids.extend(page.touchpoints.iter().map(|t| t.event_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut expected: Vec<String> = (0..30).map(|i| format!("evt-{i:02}")).collect();
    expected.push("buy-1".into());
    assert_eq!(ids, expected, "newest first, nothing doubled or lost");

    let purchases = c
        .list_touchpoints(pb::ListTouchpointsRequest {
            parent: a.name.clone(),
            filter: "type = PURCHASE".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purchases.touchpoints.len(), 1);
    assert_eq!(
        purchases.touchpoints[0]
            .revenue
            .as_ref()
            .unwrap()
            .amount_minor,
        4999
    );

    let ghost = format!("customers/{}", uuid::Uuid::now_v7());
    let e = c
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: vec![feature_use(&ghost, "g", t0())],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    h.server.stop().await;
}

#[tokio::test]
async fn lifecycle_moves_and_history_with_time_in_stage() {
    let h = start().await;
    let mut c = h.client();
    let a = create(&mut c, "l@example.com").await;
    let mut moves = vec![
        (Stage::Acquisition, 2),
        (Stage::Conversion, 5),
        (Stage::Retention, 30),
        (Stage::Loyalty, 90),
        (Stage::Retention, 10),
    ];
    for (i, (to, days)) in moves.iter().enumerate() {
        h.clock.advance(Duration::days(*days));
        let r = c
            .transition_stage(pb::TransitionStageRequest {
                name: a.name.clone(),
                to_stage: *to as i32,
                reason: format!("step {i}"),
                request_id: format!("move-{i}"),
                etag: String::new(),
                forward_only: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.customer.unwrap().stage, *to as i32);
    }
    // A retried move is a no-op returning the first result.
    let retry = c
        .transition_stage(pb::TransitionStageRequest {
            name: a.name.clone(),
            to_stage: Stage::Retention as i32,
            reason: "step 4".into(),
            request_id: "move-4".into(),
            etag: String::new(),
            forward_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry.change.unwrap().reason, "step 4");

    let e = c
        .transition_stage(pb::TransitionStageRequest {
            name: a.name.clone(),
            to_stage: Stage::Approach as i32,
            reason: "oops".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .transition_stage(pb::TransitionStageRequest {
            name: a.name.clone(),
            to_stage: Stage::Retention as i32,
            reason: "same".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    // forward_only (a promotion by an automation): a move back down the
    // funnel is refused, NOT_FORWARD; the same move without it is allowed.
    let e = c
        .transition_stage(pb::TransitionStageRequest {
            name: a.name.clone(),
            to_stage: Stage::Conversion as i32,
            reason: "late promotion".into(),
            forward_only: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(
        e.get_error_details().error_info().unwrap().reason,
        "NOT_FORWARD"
    );

    h.clock.advance(Duration::days(3));
    let history = c
        .list_stage_history(pb::ListStageHistoryRequest {
            parent: a.name.clone(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        history.changes.len(),
        6,
        "creation + 5 moves, the retry not doubled"
    );
    moves.push((Stage::Retention, 3));
    let days: Vec<i64> = history
        .changes
        .iter()
        .map(|c| c.time_in_stage.unwrap().seconds / 86_400)
        .collect();
    assert_eq!(days, vec![2, 5, 30, 90, 10, 3]);
    assert_eq!(history.changes[0].from_stage, Stage::Unspecified as i32);
    assert_eq!(history.changes[5].from_stage, Stage::Loyalty as i32);
    assert_eq!(history.changes[5].actor, "local");

    // Paging the history gives the same moves.
    let p1 = c
        .list_stage_history(pb::ListStageHistoryRequest {
            parent: a.name.clone(),
            page_size: 4,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let p2 = c
        .list_stage_history(pb::ListStageHistoryRequest {
            parent: a.name.clone(),
            page_size: 4,
            page_token: p1.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!([p1.changes, p2.changes].concat(), history.changes);
    h.server.stop().await;
}

#[tokio::test]
async fn roles_are_enforced_and_the_actor_recorded() {
    const SECRET: &str = "test-secret-test-secret-test-secret!";
    let h = start_with(|c| c.auth.hs256_secret = Some(SECRET.into())).await;
    let token = |roles: &[Role]| {
        mint_hs256(
            SECRET,
            "marketer-mia",
            roles,
            std::time::Duration::from_secs(300),
        )
        .unwrap()
    };
    let client = |t: Option<String>| {
        CustomerServiceClient::with_interceptor(
            h.server.channel(),
            ClientInterceptor::new(t.as_deref()),
        )
    };

    let e = client(None)
        .list_customers(pb::ListCustomersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let mut analyst = client(Some(token(&[Role::Analyst])));
    analyst
        .list_customers(pb::ListCustomersRequest::default())
        .await
        .unwrap();
    let e = analyst
        .create_customer(create_req(customer("r@example.com"), ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let mut marketer: CustomerServiceClient<InterceptedService<Channel, ClientInterceptor>> =
        client(Some(token(&[Role::Marketer])));
    let a = marketer
        .create_customer(create_req(customer("r@example.com"), ""))
        .await
        .unwrap()
        .into_inner();
    let history = marketer
        .list_stage_history(pb::ListStageHistoryRequest {
            parent: a.name,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.changes[0].actor, "marketer-mia");
    h.server.stop().await;
}

#[tokio::test]
async fn concurrent_writers_and_a_live_watcher_see_every_event_once_in_order() {
    let h = start().await;
    let mut c = h.client();
    let a = create(&mut c, "w@example.com").await;
    let mut watch = watch_from_start(&h.server, &[]).await;

    const WRITERS: usize = 8;
    const BATCHES: usize = 10;
    const PER_BATCH: usize = 50;
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let mut c = h.client();
        let name = a.name.clone();
        tasks.push(tokio::spawn(async move {
            for b in 0..BATCHES {
                let batch = (0..PER_BATCH)
                    .map(|i| feature_use(&name, &format!("w{w}-b{b}-{i}"), t0()))
                    .collect();
                c.record_touchpoints(pb::RecordTouchpointsRequest { touchpoints: batch })
                    .await
                    .unwrap();
            }
        }));
    }
    let total = 1 + WRITERS * BATCHES * PER_BATCH;
    let mut last = 0;
    let mut ids = HashSet::new();
    while ids.len() < total {
        let ev = tokio::time::timeout(std::time::Duration::from_secs(30), watch.next())
            .await
            .expect("watcher stalled")
            .unwrap()
            .unwrap()
            .event
            .unwrap();
        assert!(
            ev.sequence > last,
            "sequence went from {last} to {}",
            ev.sequence
        );
        last = ev.sequence;
        assert!(ids.insert(ev.event_id.clone()), "event delivered twice");
    }
    for t in tasks {
        t.await.unwrap();
    }
    // A fresh read from the start holds exactly the events the live watcher saw: no gap.
    let mut replay = watch_from_start(&h.server, &[]).await;
    let mut replayed = HashSet::new();
    while replayed.len() < total {
        let ev = tokio::time::timeout(std::time::Duration::from_secs(10), replay.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
            .event
            .unwrap();
        replayed.insert(ev.event_id);
    }
    assert_eq!(replayed, ids);
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(300), replay.next())
            .await
            .is_err(),
        "no extra events"
    );

    // Resuming after a sequence gives exactly the rest, and type filters apply.
    let mut typed = watch_from_start(&h.server, &["clm.customer.v1.CustomerCreated"]).await;
    let first = typed.next().await.unwrap().unwrap().event.unwrap();
    assert_eq!(first.subject, a.name);
    let payload = first.payload.unwrap();
    assert_eq!(
        payload.type_url,
        "type.googleapis.com/clm.customer.v1.CustomerCreated"
    );
    let e = ChangeStreamServiceClient::new(h.server.channel())
        .watch_changes(WatchChangesRequest {
            after_sequence: -1,
            event_types: vec![],
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "after_sequence");
    h.server.stop().await;
}

#[tokio::test]
async fn batch_create_with_many_attributes_stays_under_bind_limits() {
    // 200 customers × 50 attributes × 7 columns = 70,000 values: more than
    // PostgreSQL's 65,535 and SQLite's 32,766 bind parameters in one statement.
    let h = start().await;
    let mut c = h.client();
    let requests = (0..200)
        .map(|i| {
            let mut cu = customer(&format!("many{i}@example.com"));
            for k in 0..50 {
                cu.attributes.insert(
                    format!("attr_{k}"),
                    AttributeValue {
                        value: Some(Value::NumberValue(f64::from(k))),
                    },
                );
            }
            create_req(cu, "")
        })
        .collect();
    let created = batch_create(&mut c, requests).await;
    assert_eq!(created.len(), 200);
    let got = get(&mut c, created[199].name.clone()).await;
    assert_eq!(got.attributes.len(), 50);
    let filtered = c
        .list_customers(pb::ListCustomersRequest {
            filter: "attributes.attr_49 = 49".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(filtered.customers.len(), 200);
    h.server.stop().await;
}

/// GetCustomer calls arriving together are read in shared statements
/// (`clm_platform::coalesce`): each must still answer its own customer,
/// with its own attributes, NOT_FOUND for an unknown id, and every write
/// committed before the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_each_answer_their_own_customer_and_every_earlier_write() {
    let h = start().await;
    let mut c = h.client();
    let requests = (0..60)
        .map(|i| {
            let mut cu = customer(&format!("read{i}@example.com"));
            for k in 0..i % 4 {
                cu.attributes.insert(
                    format!("a{k}"),
                    AttributeValue {
                        value: Some(Value::NumberValue(f64::from(i * 10 + k))),
                    },
                );
            }
            create_req(cu, "")
        })
        .collect();
    let created = batch_create(&mut c, requests).await;
    let unknown = format!("customers/{}", uuid::Uuid::now_v7());

    // 600 calls at once over 60 customers and an unknown id, from 8 channels.
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..600usize {
        let mut c = if i % 8 == 0 { h.client() } else { c.clone() };
        let want = created.get(i % 61).cloned();
        let name = want.as_ref().map_or(unknown.clone(), |w| w.name.clone());
        calls.spawn(async move { (want, c.get_customer(by_name(name)).await) });
    }
    while let Some(done) = calls.join_next().await {
        match done.unwrap() {
            (Some(want), got) => assert_eq!(got.unwrap().into_inner(), want),
            (None, got) => assert_eq!(got.unwrap_err().code(), Code::NotFound),
        }
    }

    // Under the same load, a read after an update answers the update.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for i in 0..16usize {
        let (mut c, names, stop) = (h.client(), created.clone(), stop.clone());
        load.spawn(async move {
            let mut n = i;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.get_customer(by_name(names[n % names.len()].name.clone()))
                    .await
                    .unwrap();
                n += 7;
            }
        });
    }
    let mut current = created[5].clone();
    for round in 0..30 {
        let mut change = current.clone();
        change.display_name = format!("Renamed {round}");
        current = c
            .update_customer(pb::UpdateCustomerRequest {
                customer: Some(change),
                update_mask: mask(&["display_name"]),
                request_id: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            get(&mut c, current.name.clone()).await,
            current,
            "round {round}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    while let Some(done) = load.join_next().await {
        done.unwrap();
    }
    h.server.stop().await;
}

#[tokio::test]
async fn coalesced_reads_use_the_indexes_before_any_statistics() {
    use sea_orm::ConnectionTrait as _;
    let h = start().await;
    if !h._backend.is_postgres() {
        return; // the plan below is PostgreSQL's
    }
    let url = h._backend.config("customer").database.url;
    let db = sea_orm::Database::connect(url.as_str()).await.unwrap();
    // No statistics, as just after an import: autovacuum kept away.
    for t in ["customers", "customer_attributes"] {
        db.execute_unprepared(&format!(
            "ALTER TABLE {t} SET (autovacuum_enabled = false, toast.autovacuum_enabled = false)"
        ))
        .await
        .unwrap();
    }
    let mut c = h.client();
    let mut names = Vec::new();
    for b in 0..4 {
        let requests = (0..500)
            .map(|i| {
                let mut cu = customer(&format!("plan{b}-{i}@example.com"));
                for k in 0..3 {
                    cu.attributes.insert(
                        format!("a{k}"),
                        AttributeValue {
                            value: Some(Value::NumberValue(f64::from(i + k))),
                        },
                    );
                }
                create_req(cu, "")
            })
            .collect();
        names.extend(
            batch_create(&mut c, requests)
                .await
                .into_iter()
                .map(|c| c.name),
        );
    }
    let ids: Vec<&str> = names[..32]
        .iter()
        .map(|n| n.trim_start_matches("customers/"))
        .collect();
    let (sql, _) =
        clm_customer::store::customers::get_found_sql(sea_orm::DbBackend::Postgres, &ids);
    // The plan a pooled connection caches once it goes generic.
    let txn = sea_orm::TransactionTrait::begin(&db).await.unwrap();
    txn.execute_unprepared("SET LOCAL plan_cache_mode = force_generic_plan")
        .await
        .unwrap();
    txn.execute_unprepared(&format!("PREPARE found AS {sql}"))
        .await
        .unwrap();
    let plan: Vec<String> = txn
        .query_all_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::Postgres,
            format!("EXPLAIN EXECUTE found('{{{}}}')", ids.join(",")),
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String>("", "QUERY PLAN").unwrap())
        .collect();
    assert!(
        !plan.iter().any(|l| l.contains("Seq Scan")),
        "32 of 2,000 customers read by their indexes:\n{}",
        plan.join("\n")
    );
    txn.rollback().await.unwrap();
    h.server.stop().await;
}

#[tokio::test]
async fn request_ids_are_echoed_and_generated() {
    let h = start().await;
    let mut c = h.client();
    let mut req = tonic::Request::new(pb::ListCustomersRequest::default());
    req.metadata_mut()
        .insert("x-request-id", "trace-me-123".parse().unwrap());
    req.metadata_mut().insert(
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            .parse()
            .unwrap(),
    );
    let resp = c.list_customers(req).await.unwrap();
    assert_eq!(resp.metadata().get("x-request-id").unwrap(), "trace-me-123");
    let resp = c
        .list_customers(pb::ListCustomersRequest::default())
        .await
        .unwrap();
    let generated = resp
        .metadata()
        .get("x-request-id")
        .unwrap()
        .to_str()
        .unwrap();
    assert_eq!(
        uuid::Uuid::parse_str(generated).unwrap().get_version_num(),
        4
    );
    h.server.stop().await;
}

#[tokio::test]
async fn a_watcher_on_one_replica_wakes_for_writes_on_another() {
    let backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    if !backend.is_postgres() {
        // Replicas share a PostgreSQL database; the embedded SQLite mode is one process.
        return;
    }
    let mut slow_poll = backend.config("customer");
    slow_poll.change_poll_interval_ms = 600_000;
    let replica_a = testing::start(&clm_customer::DESCRIPTOR, slow_poll.clone()).await;
    let replica_b = testing::start(&clm_customer::DESCRIPTOR, slow_poll).await;

    let mut watch = watch_from_start(&replica_a, &[]).await;
    // Let the watcher reach its idle wait before the other replica writes.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let created = CustomerServiceClient::new(replica_b.channel())
        .create_customer(create_req(customer("replica@example.com"), ""))
        .await
        .unwrap()
        .into_inner();
    // With a 10-minute poll, only PostgreSQL NOTIFY can deliver this in time.
    let ev = tokio::time::timeout(std::time::Duration::from_secs(20), watch.next())
        .await
        .expect("the watcher on replica A was not woken by the write on replica B")
        .unwrap()
        .unwrap()
        .event
        .unwrap();
    assert_eq!(ev.subject, created.name);
    replica_a.stop().await;
    replica_b.stop().await;
}

#[tokio::test]
async fn list_pages_stay_under_the_default_4mb_receive_limit() {
    let h = start().await;
    let mut c = h.client();
    let big = "x".repeat(4000);
    for b in 0..3 {
        let requests = (0..20)
            .map(|i| {
                let mut cu = customer(&format!("big{b}-{i}@example.com"));
                for k in 0..20 {
                    cu.attributes.insert(
                        format!("note_{k}"),
                        AttributeValue {
                            value: Some(Value::StringValue(big.clone())),
                        },
                    );
                }
                create_req(cu, "")
            })
            .collect();
        batch_create(&mut c, requests).await;
    }
    // 60 customers of ~80 KB: one page of 1,000 would be ~4.8 MB.
    let mut seen = HashSet::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_customers(pb::ListCustomersRequest {
                page_size: 1000,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .expect("every page fits the client's default 4 MB limit")
            .into_inner();
        pages += 1;
        seen.extend(page.customers.into_iter().map(|x| x.name));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 60);
    assert!(pages >= 2);
    h.server.stop().await;
}

/// Bytes a status takes in the response headers (`grpc-status`, the
/// percent-encoded `grpc-message`, the base64 `grpc-status-details-bin`).
fn status_wire_bytes(status: &tonic::Status) -> usize {
    let mut headers = tonic::codegen::http::HeaderMap::new();
    status.add_header(&mut headers).unwrap();
    headers
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("grpc-"))
        .map(|(k, v)| k.as_str().len() + v.len())
        .sum()
}

#[tokio::test]
async fn errors_stay_small_whatever_the_input() {
    let h = start().await;
    let mut c = h.client();
    // A 20 KB malformed e-mail is named, not echoed whole.
    let huge = format!("{}@", "x".repeat(20_000));
    let e = c
        .create_customer(create_req(customer(&huge), ""))
        .await
        .unwrap_err();
    assert_bad_field(&e, "customer.email");
    assert!(
        status_wire_bytes(&e) < 2048,
        "{} bytes",
        status_wire_bytes(&e)
    );
    assert!(e.message().len() < 300, "{}", e.message());

    // 1,000 bad touchpoints: 20 violations and a count of the rest.
    let a = create(&mut c, "small@example.com").await;
    let bad: Vec<_> = (0..1000)
        .map(|i| {
            let mut t = feature_use(&a.name, &format!("bad-{i}"), t0());
            t.r#type = TouchpointType::Purchase as i32;
            t.properties.insert("k".repeat(100 + i), "v\0".repeat(600));
            t
        })
        .collect();
    let e = c
        .record_touchpoints(pb::RecordTouchpointsRequest { touchpoints: bad })
        .await
        .unwrap_err();
    assert_bad_field(&e, "touchpoints[0].revenue");
    let wire = status_wire_bytes(&e);
    assert!(wire < 8 * 1024, "{wire} bytes");
    let violations = e
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .clone();
    assert!(violations.len() <= 21, "{}", violations.len());
    let last = violations.last().unwrap();
    assert_eq!(
        last.description,
        format!("... and {} more violations", 2000 - (violations.len() - 1)),
        "each touchpoint has two violations"
    );
    assert!(
        e.message().contains("(and 1999 more violations)"),
        "{}",
        e.message()
    );
    h.server.stop().await;
}

/// A server on the real (nanosecond) system clock.
async fn start_on_system_clock() -> (Running, TestBackend) {
    let backend = TestBackend::new().await;
    let server = testing::start(&clm_customer::DESCRIPTOR, backend.config("customer")).await;
    (server, backend)
}

#[tokio::test]
async fn writes_answer_the_times_reads_and_events_answer() {
    let (server, _backend) = start_on_system_clock().await;
    let mut c = CustomerServiceClient::new(server.channel());
    let mut cu = customer("time@example.com");
    cu.attributes.insert(
        "seen".into(),
        AttributeValue {
            value: Some(Value::TimestampValue(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 123_456_789,
            })),
        },
    );
    let created = c
        .create_customer(create_req(cu, "time-1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(get(&mut c, created.name.clone()).await, created);
    assert_eq!(
        created.attributes["seen"].value,
        Some(Value::TimestampValue(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 123_456_000,
        }))
    );
    // Several writes, so a nanosecond clock would show in at least one.
    let batch = c
        .batch_create_customers(pb::BatchCreateCustomersRequest {
            requests: (0..5)
                .map(|i| pb::CreateCustomerRequest {
                    customer: Some(customer(&format!("time{i}@example.com"))),
                    request_id: String::new(),
                })
                .collect(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    for b in &batch.customers {
        assert_eq!(&get(&mut c, b.name.clone()).await, b);
    }
    let mut change = created.clone();
    change.display_name = "Timely".into();
    let updated = c
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(change),
            update_mask: mask(&["display_name"]),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(get(&mut c, created.name.clone()).await, updated);
    let moved = c
        .transition_stage(pb::TransitionStageRequest {
            name: created.name.clone(),
            to_stage: Stage::Acquisition as i32,
            reason: "demo".into(),
            request_id: "time-move".into(),
            etag: updated.etag.clone(),
            forward_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        get(&mut c, created.name.clone()).await,
        moved.customer.clone().unwrap()
    );
    let history = c
        .list_stage_history(pb::ListStageHistoryRequest {
            parent: created.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        history.changes[1].change_time,
        moved.change.as_ref().unwrap().change_time
    );

    let mut tp = feature_use(&created.name, "nano", Utc::now() - Duration::hours(1));
    tp.occurred_time.as_mut().unwrap().nanos = 987_654_321;
    c.record_touchpoints(pb::RecordTouchpointsRequest {
        touchpoints: vec![tp],
    })
    .await
    .unwrap();
    let listed = c
        .list_touchpoints(pb::ListTouchpointsRequest {
            parent: created.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .touchpoints;
    assert_eq!(listed[0].occurred_time.unwrap().nanos, 987_654_000);

    // The events carry the same times as the reads.
    let mut watch = watch_from_start(
        &server,
        &[
            "clm.customer.v1.CustomerCreated",
            "clm.customer.v1.TouchpointRecorded",
        ],
    )
    .await;
    let first = watch.next().await.unwrap().unwrap().event.unwrap();
    let ev =
        <pb::CustomerCreated as prost::Message>::decode(first.payload.unwrap().value.as_slice())
            .unwrap();
    assert_eq!(ev.customer.unwrap(), created);
    let mut recorded = None;
    while recorded.is_none() {
        let e = watch.next().await.unwrap().unwrap().event.unwrap();
        let p = e.payload.unwrap();
        if p.type_url.ends_with("TouchpointRecorded") {
            recorded = Some(
                <pb::TouchpointRecorded as prost::Message>::decode(p.value.as_slice())
                    .unwrap()
                    .touchpoint
                    .unwrap(),
            );
        }
    }
    assert_eq!(recorded.unwrap(), listed[0]);

    // An idempotent replay answers the stored times too.
    let replay = c
        .transition_stage(pb::TransitionStageRequest {
            name: created.name.clone(),
            to_stage: Stage::Acquisition as i32,
            reason: "demo".into(),
            request_id: "time-move".into(),
            etag: updated.etag.clone(),
            forward_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replay, moved);
    server.stop().await;
}

#[tokio::test]
async fn times_outside_a_timestamp_and_unknown_currencies_are_refused() {
    let h = start().await;
    let mut c = h.client();
    let mut cu = customer("range@example.com");
    cu.attributes.insert(
        "when".into(),
        AttributeValue {
            value: Some(Value::TimestampValue(prost_types::Timestamp {
                seconds: 253_402_300_800, // 10000-01-01
                nanos: 0,
            })),
        },
    );
    let e = c.create_customer(create_req(cu, "")).await.unwrap_err();
    assert_bad_field(&e, "customer.attributes[\"when\"]");

    let a = create(&mut c, "range2@example.com").await;
    let mut ancient = feature_use(&a.name, "ancient", t0());
    ancient.occurred_time = Some(prost_types::Timestamp {
        seconds: -62_135_596_801, // 0000-12-31T23:59:59Z
        nanos: 0,
    });
    let e = c
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: vec![ancient],
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "touchpoints[0].occurred_time");

    let e = c
        .list_customers(pb::ListCustomersRequest {
            filter: r#"create_time > "0000-01-01T00:00:00Z""#.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "filter");

    let mut zzz = feature_use(&a.name, "zzz", t0());
    zzz.r#type = TouchpointType::Purchase as i32;
    zzz.revenue = Some(Money {
        currency_code: "ZZZ".into(),
        amount_minor: 100,
    });
    let e = c
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: vec![zzz],
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "touchpoints[0].revenue.currency_code");
    let mut rich = customer("rich@example.com");
    rich.demographics = Some(pb::Demographics {
        annual_income: Some(Money {
            currency_code: "XXX".into(),
            amount_minor: 1,
        }),
        ..Default::default()
    });
    let e = c.create_customer(create_req(rich, "")).await.unwrap_err();
    assert_bad_field(&e, "customer.demographics.annual_income.currency_code");
    h.server.stop().await;
}

#[tokio::test]
async fn a_field_too_long_gets_one_violation() {
    let h = start().await;
    let mut c = h.client();
    let a = create(&mut c, "long@example.com").await;
    let mut t = feature_use(&a.name, "long", t0());
    t.feature = "f".repeat(201);
    let e = c
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: vec![t],
        })
        .await
        .unwrap_err();
    let violations = e
        .get_error_details()
        .bad_request()
        .unwrap()
        .field_violations
        .clone();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].field, "touchpoints[0].feature");
    assert!(
        violations[0].description.contains("at most 200"),
        "{violations:?}"
    );
    h.server.stop().await;
}

#[tokio::test]
async fn a_taken_event_id_is_a_conflict_not_a_duplicate() {
    let h = start().await;
    let mut c = h.client();
    let a = create(&mut c, "ca@example.com").await;
    let b = create(&mut c, "cb@example.com").await;
    let first = c
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: vec![feature_use(&a.name, "e1", t0())],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.recorded_count, 1);
    let mut other_feature = feature_use(&a.name, "e1", t0());
    other_feature.feature = "exports".into();
    let mut e3_changed = feature_use(&a.name, "e3", t0());
    e3_changed.occurred_time.as_mut().unwrap().seconds -= 60;
    let r = c
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: vec![
                feature_use(&a.name, "e1", t0()), // a true duplicate
                feature_use(&b.name, "e1", t0()), // another customer
                feature_use(&a.name, "e2", t0()), // new
                other_feature,                    // another payload
                feature_use(&a.name, "e2", t0()), // repeated in the batch
                feature_use(&a.name, "e3", t0()), // new
                e3_changed,                       // repeated with another payload
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.recorded_count, r.duplicate_count, r.conflict_count),
        (2, 2, 3)
    );
    let conflicts: Vec<(i32, &str, pb::TouchpointConflictReason)> = r
        .conflicts
        .iter()
        .map(|c| (c.index, c.event_id.as_str(), c.reason()))
        .collect();
    assert_eq!(
        conflicts,
        vec![
            (1, "e1", pb::TouchpointConflictReason::OtherCustomer),
            (3, "e1", pb::TouchpointConflictReason::DifferentPayload),
            (6, "e3", pb::TouchpointConflictReason::DifferentPayload),
        ]
    );
    assert!(r.conflicts[0].description.contains("another customer"));

    // Nothing of the conflicting touchpoints was recorded.
    let of_b = c
        .list_touchpoints(pb::ListTouchpointsRequest {
            parent: b.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(of_b.touchpoints.is_empty());
    let of_a = c
        .list_touchpoints(pb::ListTouchpointsRequest {
            parent: a.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut stored: Vec<(String, String, i64)> = of_a
        .touchpoints
        .iter()
        .map(|t| {
            (
                t.event_id.clone(),
                t.feature.clone(),
                t.occurred_time.unwrap().seconds,
            )
        })
        .collect();
    stored.sort();
    let at = t0().timestamp();
    assert_eq!(
        stored,
        vec![
            ("e1".into(), "reports".into(), at),
            ("e2".into(), "reports".into(), at),
            ("e3".into(), "reports".into(), at),
        ]
    );
    h.server.stop().await;
}

/// Minimal URL-safe unpadded base64, to tamper with page tokens.
mod b64 {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

    pub fn encode(bytes: &[u8]) -> String {
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = String::new();
        for &b in bytes {
            bits = (bits << 8) | u32::from(b);
            n += 8;
            while n >= 6 {
                n -= 6;
                out.push(ALPHABET[((bits >> n) & 63) as usize] as char);
            }
        }
        if n > 0 {
            out.push(ALPHABET[((bits << (6 - n)) & 63) as usize] as char);
        }
        out
    }

    pub fn decode(s: &str) -> Vec<u8> {
        let mut bits = 0u32;
        let mut n = 0;
        let mut out = Vec::new();
        for c in s.bytes() {
            let v = ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
            bits = (bits << 6) | v;
            n += 6;
            if n >= 8 {
                n -= 8;
                out.push(((bits >> n) & 255) as u8);
            }
        }
        out
    }
}

/// `token` with its sort value replaced by `v`.
fn tamper(token: &str, v: serde_json::Value) -> String {
    let mut json: serde_json::Value = serde_json::from_slice(&b64::decode(token)).unwrap();
    json["v"] = v;
    b64::encode(&serde_json::to_vec(&json).unwrap())
}

#[tokio::test]
async fn a_tampered_page_token_is_bad_input_never_internal() {
    let h = start().await;
    let mut c = h.client();
    let a = create(&mut c, "p1@example.com").await;
    create(&mut c, "p2@example.com").await;
    let page = c
        .list_customers(pb::ListCustomersRequest {
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!page.next_page_token.is_empty());
    // The untouched token works.
    let rest = c
        .list_customers(pb::ListCustomersRequest {
            page_size: 1,
            page_token: tamper(
                &page.next_page_token,
                serde_json::json!(t0().timestamp_micros()),
            ),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.customers.len(), 1);
    for v in [
        serde_json::json!("abc"),
        serde_json::json!(1.5),
        serde_json::json!(null),
    ] {
        let e = c
            .list_customers(pb::ListCustomersRequest {
                page_size: 1,
                page_token: tamper(&page.next_page_token, v.clone()),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_bad_field(&e, "page_token");
    }
    let by_name = c
        .list_customers(pb::ListCustomersRequest {
            page_size: 1,
            order_by: "display_name".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = c
        .list_customers(pb::ListCustomersRequest {
            page_size: 1,
            order_by: "display_name".into(),
            page_token: tamper(&by_name.next_page_token, serde_json::json!(42)),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "page_token");

    c.record_touchpoints(pb::RecordTouchpointsRequest {
        touchpoints: (0..3)
            .map(|i| feature_use(&a.name, &format!("pt{i}"), t0() - Duration::hours(i)))
            .collect(),
    })
    .await
    .unwrap();
    let tps = c
        .list_touchpoints(pb::ListTouchpointsRequest {
            parent: a.name.clone(),
            page_size: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = c
        .list_touchpoints(pb::ListTouchpointsRequest {
            parent: a.name.clone(),
            page_size: 1,
            page_token: tamper(&tps.next_page_token, serde_json::json!("later")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "page_token");
    h.server.stop().await;
}

/// With `database.read_url` the reports read the replica it names, as stale
/// as that replica (here a second database standing for a replica that has
/// not caught up), while every other read and write goes to the primary.
#[tokio::test]
async fn reports_read_the_replica_named_by_read_url() {
    use clm_proto::customer as cpb;
    let primary = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    if !primary.is_postgres() {
        // A read replica is PostgreSQL's; the config refuses it elsewhere.
        return;
    }
    let replica = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let mut with_replica = primary.config("customer");
    with_replica.database.read_url = Some(replica.database_url.clone());
    let server = testing::start(&clm_customer::DESCRIPTOR, with_replica).await;
    let direct = testing::start(&clm_customer::DESCRIPTOR, primary.config("customer")).await;
    let mut c = CustomerServiceClient::new(server.channel());
    let created = c
        .create_customer(cpb::CreateCustomerRequest {
            customer: Some(cpb::Customer {
                email: "replica@example.com".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // Reads other than reports see the write at once.
    c.get_customer(cpb::GetCustomerRequest {
        name: created.name.clone(),
    })
    .await
    .unwrap();
    let now = chrono::Utc::now();
    let funnel = |ch: Channel| async move {
        let r = CustomerServiceClient::new(ch)
            .get_funnel_report(cpb::GetFunnelReportRequest {
                scope: Some(cpb::ReportScope {
                    start_time: Some(clm_platform::convert::timestamp(now - Duration::days(1))),
                    end_time: Some(clm_platform::convert::timestamp(now + Duration::days(1))),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        r.stages
            .iter()
            .find(|s| s.stage == cpb::Stage::Approach as i32)
            .map_or(0, |s| s.entered_count)
    };
    assert_eq!(
        funnel(server.channel()).await,
        0,
        "the replica has not caught up"
    );
    assert_eq!(
        funnel(direct.channel()).await,
        1,
        "the primary has the entry"
    );
    server.stop().await;
    direct.stop().await;
}
