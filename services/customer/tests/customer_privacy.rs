//! Consent and identities through the real gRPC API on a real socket, on
//! SQLite + in-process cache, or PostgreSQL + Redis when
//! `CLM_TEST_DATABASE_URL` / `CLM_TEST_REDIS_URL` are set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::Duration;
use clm_domain::ManualClock;
use clm_platform::testing::{TestBackend, assert_bad_field, start_with_clock};
use clm_proto::common::WatchChangesRequest;
use clm_proto::common::change_stream_service_client::ChangeStreamServiceClient;
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::customer::{
    self as pb, ConsentChannel as Ch, ConsentPurpose as Pu, ConsentSource as Src,
    ConsentState as St, Customer,
};
use std::sync::Arc;
use tokio_stream::StreamExt;
use tonic::Code;

mod common;
use common::*;

#[tokio::test]
async fn consent_defaults_changes_history_and_events() {
    let h = start().await;
    let mut c = h.client();
    let ada = create(&mut c, "ada@example.com").await;
    let consent_name = format!("{}/consent", ada.name);

    // Unset everywhere; marketing and surveys not granted, the rest granted.
    let initial = c
        .get_consent(pb::GetConsentRequest {
            name: ada.name.clone(),
            include_history: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(initial.name, consent_name);
    assert_eq!(initial.entries.len(), 20);
    assert!(initial.history.is_empty());
    for e in &initial.entries {
        assert_eq!(e.state, St::Unset as i32);
        let opt_in = e.purpose == Pu::Marketing as i32 || e.purpose == Pu::Surveys as i32;
        assert_eq!(e.granted, !opt_in, "{e:?}");
        assert!(e.update_time.is_none());
    }

    // Several purposes and channels at once, idempotent by request_id.
    let first = set(
        &consent_name,
        vec![
            setting(Pu::Marketing, Ch::Email, St::Granted),
            setting(Pu::Profiling, Ch::Sms, St::Denied),
        ],
        Src::Form,
        "consent-1",
    );
    let after = c.set_consent(first.clone()).await.unwrap().into_inner();
    let me = entry(&after, Pu::Marketing, Ch::Email);
    assert_eq!((me.state, me.granted), (St::Granted as i32, true));
    assert_eq!(me.source, Src::Form as i32);
    assert_eq!(me.actor, "local");
    assert_eq!(me.update_time.unwrap().seconds, t0().timestamp());
    let ps = entry(&after, Pu::Profiling, Ch::Sms);
    assert_eq!((ps.state, ps.granted), (St::Denied as i32, false));
    let untouched = entry(&after, Pu::Marketing, Ch::Sms);
    assert_eq!(
        (untouched.state, untouched.granted),
        (St::Unset as i32, false)
    );

    h.clock.advance(Duration::minutes(5));
    let replay = c.set_consent(first.clone()).await.unwrap().into_inner();
    assert_eq!(replay, after, "a retry answers the first result");
    let mut reused = first.clone();
    reused.settings[0].state = St::Denied as i32;
    let e = c.set_consent(reused).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);

    // Restating the current state changes nothing.
    let same = c
        .set_consent(set(
            &ada.name,
            vec![setting(Pu::Marketing, Ch::Email, St::Granted)],
            Src::Api,
            "",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same, after);

    // A withdrawal, then a reset to the default.
    c.set_consent(set(
        &ada.name,
        vec![setting(Pu::Marketing, Ch::Email, St::Denied)],
        Src::Support,
        "",
    ))
    .await
    .unwrap();
    h.clock.advance(Duration::minutes(5));
    let reset = c
        .set_consent(set(
            &ada.name,
            vec![setting(Pu::Profiling, Ch::Sms, St::Unset)],
            Src::Api,
            "",
        ))
        .await
        .unwrap()
        .into_inner();
    let ps = entry(&reset, Pu::Profiling, Ch::Sms);
    assert_eq!((ps.state, ps.granted), (St::Unset as i32, true));

    let got = c
        .get_consent(pb::GetConsentRequest {
            name: consent_name.clone(),
            include_history: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.entries, reset.entries);
    let steps: Vec<(i32, i32, i32, i32, i32)> = got
        .history
        .iter()
        .map(|h| (h.purpose, h.channel, h.from_state, h.to_state, h.source))
        .collect();
    assert_eq!(
        steps,
        vec![
            (
                Pu::Marketing as i32,
                Ch::Email as i32,
                St::Unset as i32,
                St::Granted as i32,
                Src::Form as i32
            ),
            (
                Pu::Profiling as i32,
                Ch::Sms as i32,
                St::Unset as i32,
                St::Denied as i32,
                Src::Form as i32
            ),
            (
                Pu::Marketing as i32,
                Ch::Email as i32,
                St::Granted as i32,
                St::Denied as i32,
                Src::Support as i32
            ),
            (
                Pu::Profiling as i32,
                Ch::Sms as i32,
                St::Denied as i32,
                St::Unset as i32,
                Src::Api as i32
            ),
        ]
    );
    assert_eq!(
        got.history[3].change_time.unwrap().seconds,
        (t0() + Duration::minutes(10)).timestamp()
    );
    let without = c
        .get_consent(pb::GetConsentRequest {
            name: consent_name.clone(),
            include_history: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(without.history.is_empty());

    // One event per changing call, none for the retry or the restatement.
    let mut watch = ChangeStreamServiceClient::new(h.server.channel())
        .watch_changes(WatchChangesRequest {
            after_sequence: 0,
            event_types: vec!["clm.customer.v1.ConsentChanged".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let ev = watch.next().await.unwrap().unwrap().event.unwrap();
        let p = ev.payload.unwrap();
        let changed = <pb::ConsentChanged as prost::Message>::decode(p.value.as_slice()).unwrap();
        assert_eq!(changed.customer, ada.name);
        seen.push(changed.changes);
    }
    assert_eq!(seen[0], got.history[..2].to_vec());
    assert_eq!(seen[1], got.history[2..3].to_vec());
    assert_eq!(seen[2], got.history[3..].to_vec());
    h.server.stop().await;
}

#[tokio::test]
async fn consent_bad_input_names_the_field() {
    let h = start().await;
    let mut c = h.client();
    let ada = create(&mut c, "ada@example.com").await;
    let ok = setting(Pu::Marketing, Ch::Email, St::Granted);

    let mut unknown_purpose = ok;
    unknown_purpose.purpose = 99;
    let e = c
        .set_consent(set(&ada.name, vec![unknown_purpose], Src::Api, ""))
        .await
        .unwrap_err();
    assert_bad_field(&e, "settings[0].purpose");

    let mut no_channel = ok;
    no_channel.channel = 0;
    let e = c
        .set_consent(set(&ada.name, vec![ok, no_channel], Src::Api, ""))
        .await
        .unwrap_err();
    assert_bad_field(&e, "settings[1].channel");

    let mut no_state = ok;
    no_state.state = St::Unspecified as i32;
    let e = c
        .set_consent(set(&ada.name, vec![no_state], Src::Api, ""))
        .await
        .unwrap_err();
    assert_bad_field(&e, "settings[0].state");

    let e = c
        .set_consent(set(&ada.name, vec![ok, ok], Src::Api, ""))
        .await
        .unwrap_err();
    assert_bad_field(&e, "settings[1]");

    let e = c
        .set_consent(set(&ada.name, vec![], Src::Api, ""))
        .await
        .unwrap_err();
    assert_bad_field(&e, "settings");

    let e = c
        .set_consent(set(&ada.name, vec![ok], Src::Unspecified, ""))
        .await
        .unwrap_err();
    assert_bad_field(&e, "source");

    let e = c
        .set_consent(set("segments/1/consent", vec![ok], Src::Api, ""))
        .await
        .unwrap_err();
    assert_bad_field(&e, "name");

    let unknown = format!("customers/{}", uuid::Uuid::now_v7());
    let e = c
        .set_consent(set(&unknown, vec![ok], Src::Api, ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .get_consent(pb::GetConsentRequest {
            name: unknown,
            include_history: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // Nothing of the refused calls was recorded.
    let got = c
        .get_consent(pb::GetConsentRequest {
            name: ada.name.clone(),
            include_history: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(got.history.is_empty());
    h.server.stop().await;
}

use pb::IdentifierType as It;

#[tokio::test]
async fn identifiers_have_one_holder_and_find_their_customer() {
    let h = start().await;
    let mut c = h.client();
    let ada = c
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(Customer {
                email: "Ada@Example.com".into(),
                external_id: "CRM:123".into(),
                display_name: "Ada".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let bob = create(&mut c, "bob@example.com").await;

    // The profile's e-mail and external id are identifiers.
    let listed = c
        .list_customer_identifiers(pb::ListCustomerIdentifiersRequest {
            parent: ada.name.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .identifiers;
    let pairs: Vec<(i32, &str, bool)> = listed
        .iter()
        .map(|i| (i.r#type, i.value.as_str(), i.profile))
        .collect();
    assert_eq!(
        pairs,
        vec![
            (It::Email as i32, "ada@example.com", true),
            (It::ExternalId as i32, "crm:123", true),
        ]
    );

    // A phone is normalised to E.164; a retry and a re-add answer it again.
    let mut req = add(&ada.name, It::Phone, "0049 (30) 123-4567");
    req.request_id = "add-phone".into();
    let phone = c
        .add_customer_identifier(req.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(phone.value, "+49301234567");
    assert!(!phone.profile);
    assert_eq!(phone.create_time.unwrap().seconds, t0().timestamp());
    h.clock.advance(Duration::minutes(1));
    assert_eq!(
        c.add_customer_identifier(req).await.unwrap().into_inner(),
        phone
    );
    assert_eq!(
        c.add_customer_identifier(add(&ada.name, It::Phone, "+49 30 1234567"))
            .await
            .unwrap()
            .into_inner(),
        phone
    );
    c.add_customer_identifier(add(&ada.name, It::Email, "Ada.Work@Example.com"))
        .await
        .unwrap();
    c.add_customer_identifier(add(&ada.name, It::ExternalId, "Shop:abc"))
        .await
        .unwrap();

    // Held by Ada: refused for Bob, naming Ada, whichever way it comes in.
    for (kind, value, field) in [
        (It::Phone, "+49301234567", None),
        (It::Email, "ADA@example.com", None),
        (It::Email, "ada.work@example.com", None),
        (It::ExternalId, "crm:123", None),
        (It::ExternalId, "shop:abc", None),
        (It::Email, "ada.work@example.com", Some("create")),
        (It::Email, "ada.work@example.com", Some("update")),
    ] {
        let e = match field {
            None => c
                .add_customer_identifier(add(&bob.name, kind, value))
                .await
                .unwrap_err(),
            Some("create") => c
                .create_customer(pb::CreateCustomerRequest {
                    customer: Some(Customer {
                        email: value.to_uppercase(),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
                .await
                .unwrap_err(),
            Some(_) => c
                .update_customer(pb::UpdateCustomerRequest {
                    customer: Some(Customer {
                        name: bob.name.clone(),
                        email: value.into(),
                        ..Default::default()
                    }),
                    update_mask: mask(&["email"]),
                    request_id: String::new(),
                })
                .await
                .unwrap_err(),
        };
        assert_eq!(e.code(), Code::AlreadyExists, "{value}: {e:?}");
        assert!(e.message().contains(&ada.name), "{value}: {}", e.message());
    }

    // Lookup normalises before it compares.
    assert_eq!(
        lookup(&mut c, It::Email, " ADA@EXAMPLE.COM ").await,
        Ok(ada.name.clone())
    );
    assert_eq!(
        lookup(&mut c, It::Email, "ada.work@example.com").await,
        Ok(ada.name.clone())
    );
    assert_eq!(
        lookup(&mut c, It::Phone, "+49 30 123 45 67").await,
        Ok(ada.name.clone())
    );
    assert_eq!(
        lookup(&mut c, It::ExternalId, "CRM:123").await,
        Ok(ada.name.clone())
    );
    assert_eq!(
        lookup(&mut c, It::ExternalId, "shop:abc").await,
        Ok(ada.name.clone())
    );
    assert_eq!(
        lookup(&mut c, It::ExternalId, "shop:ABC").await,
        Err(Code::NotFound)
    );
    assert_eq!(
        lookup(&mut c, It::Email, "bob@example.com").await,
        Ok(bob.name.clone())
    );
    assert_eq!(
        lookup(&mut c, It::Email, "nobody@example.com").await,
        Err(Code::NotFound)
    );

    // The profile's identifiers follow an update of the profile.
    c.update_customer(pb::UpdateCustomerRequest {
        customer: Some(Customer {
            name: ada.name.clone(),
            email: "ada@new.example".into(),
            ..Default::default()
        }),
        update_mask: mask(&["email"]),
        request_id: String::new(),
    })
    .await
    .unwrap();
    assert_eq!(
        lookup(&mut c, It::Email, "ada@example.com").await,
        Err(Code::NotFound)
    );
    assert_eq!(
        lookup(&mut c, It::Email, "ada@new.example").await,
        Ok(ada.name.clone())
    );
    // The freed address can be Bob's now.
    c.add_customer_identifier(add(&bob.name, It::Email, "ada@example.com"))
        .await
        .unwrap();

    // Removal: the profile's own ones are refused; others go, once.
    let e = c
        .remove_customer_identifier(pb::RemoveCustomerIdentifierRequest {
            parent: ada.name.clone(),
            identifier: ident(It::Email, "ada@new.example"),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let remove = pb::RemoveCustomerIdentifierRequest {
        parent: ada.name.clone(),
        identifier: ident(It::Phone, "+49 30 1234567"),
        request_id: "remove-phone".into(),
    };
    let removed = c
        .remove_customer_identifier(remove.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed, phone);
    assert_eq!(
        c.remove_customer_identifier(remove)
            .await
            .unwrap()
            .into_inner(),
        removed,
        "a retry answers the first result"
    );
    assert_eq!(
        lookup(&mut c, It::Phone, "+49301234567").await,
        Err(Code::NotFound)
    );
    let e = c
        .remove_customer_identifier(pb::RemoveCustomerIdentifierRequest {
            parent: ada.name.clone(),
            identifier: ident(It::Phone, "+49301234567"),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    c.add_customer_identifier(add(&bob.name, It::Phone, "+49301234567"))
        .await
        .unwrap();

    // Added and removed identifiers are events, re-adds are not.
    let mut watch = ChangeStreamServiceClient::new(h.server.channel())
        .watch_changes(WatchChangesRequest {
            after_sequence: 0,
            event_types: vec![
                "clm.customer.v1.CustomerIdentifierAdded".into(),
                "clm.customer.v1.CustomerIdentifierRemoved".into(),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    for _ in 0..6 {
        let p = watch
            .next()
            .await
            .unwrap()
            .unwrap()
            .event
            .unwrap()
            .payload
            .unwrap();
        kinds.push(p.type_url.rsplit('.').next().unwrap().to_owned());
    }
    assert_eq!(
        kinds,
        [
            "CustomerIdentifierAdded",
            "CustomerIdentifierAdded",
            "CustomerIdentifierAdded",
            "CustomerIdentifierAdded",
            "CustomerIdentifierRemoved",
            "CustomerIdentifierAdded"
        ]
    );
    h.server.stop().await;
}

#[tokio::test]
async fn identifier_bad_input_names_the_field() {
    let h = start().await;
    let mut c = h.client();
    let ada = create(&mut c, "ada@example.com").await;
    for (kind, value, field) in [
        (It::Phone, "030 1234567", "identifier.value"),
        (It::Phone, "+49 30 CALL-ME", "identifier.value"),
        (It::Email, "ada@", "identifier.value"),
        (It::ExternalId, "no-source", "identifier.value"),
        (It::Unspecified, "x@example.com", "identifier.type"),
    ] {
        let e = c
            .add_customer_identifier(add(&ada.name, kind, value))
            .await
            .unwrap_err();
        assert_bad_field(&e, field);
    }
    let e = c
        .add_customer_identifier(add("ada", It::Phone, "+49301234567"))
        .await
        .unwrap_err();
    assert_bad_field(&e, "parent");
    let e = c
        .add_customer_identifier(pb::AddCustomerIdentifierRequest {
            parent: ada.name.clone(),
            identifier: None,
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "identifier");
    let unknown = format!("customers/{}", uuid::Uuid::now_v7());
    let e = c
        .add_customer_identifier(add(&unknown, It::Phone, "+49301234567"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c
        .lookup_customer(pb::LookupCustomerRequest {
            identifier: ident(It::Phone, "12"),
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "identifier.value");
    // Nothing was added by the refused calls.
    let listed = c
        .list_customer_identifiers(pb::ListCustomerIdentifiersRequest {
            parent: ada.name.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .identifiers;
    assert_eq!(listed.len(), 1);
    h.server.stop().await;
}

#[tokio::test]
async fn batch_lookup_answers_a_thousand_identifiers_in_order() {
    let h = start().await;
    let mut c = h.client();
    let created = c
        .batch_create_customers(pb::BatchCreateCustomersRequest {
            requests: (0..300)
                .map(|i| pb::CreateCustomerRequest {
                    customer: Some(Customer {
                        email: format!("p{i}@example.com"),
                        external_id: format!("crm:{i}"),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
                .collect(),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .customers;
    c.add_customer_identifier(add(&created[7].name, It::Phone, "+1 415 555 0100"))
        .await
        .unwrap();
    let mut wanted = Vec::new();
    let mut expect = Vec::new();
    for i in 0..1000usize {
        let (kind, value, holder) = match i % 4 {
            0 => (It::Email, format!("P{}@EXAMPLE.com", i / 4), i / 4),
            1 => (It::ExternalId, format!("CRM:{}", i / 4), i / 4),
            2 => (It::Email, format!("nobody{i}@example.com"), usize::MAX),
            _ => (It::Phone, "+14155550100".to_owned(), 7),
        };
        wanted.push(ident(kind, &value).unwrap());
        expect.push(
            created
                .get(holder)
                .map(|c| c.name.clone())
                .unwrap_or_default(),
        );
    }
    let results = c
        .batch_lookup_customers(pb::BatchLookupCustomersRequest {
            identifiers: wanted.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .results;
    let got: Vec<String> = results.iter().map(|r| r.customer.clone()).collect();
    assert_eq!(got, expect);
    assert_eq!(
        results[0].identifier.as_ref().unwrap().value,
        "p0@example.com"
    );
    assert_eq!(results[1].identifier.as_ref().unwrap().value, "crm:0");

    let mut too_many = wanted.clone();
    too_many.push(wanted[0].clone());
    let e = c
        .batch_lookup_customers(pb::BatchLookupCustomersRequest {
            identifiers: too_many,
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "identifiers");
    let mut bad = wanted[..5].to_vec();
    bad[3].value = "not a phone".into();
    let e = c
        .batch_lookup_customers(pb::BatchLookupCustomersRequest { identifiers: bad })
        .await
        .unwrap_err();
    assert_bad_field(&e, "identifiers[3].value");
    h.server.stop().await;
}

#[tokio::test]
async fn concurrent_claims_of_one_identifier_have_one_winner() {
    let h = start().await;
    let mut c = h.client();
    let mut names = Vec::new();
    for i in 0..8 {
        names.push(create(&mut c, &format!("c{i}@example.com")).await.name);
    }
    let calls = names.iter().map(|n| {
        let mut c = h.client();
        let req = add(n, It::Phone, "+44 20 7946 0000");
        async move {
            c.add_customer_identifier(req)
                .await
                .map(|r| r.into_inner().value)
                .map_err(|e| (e.code(), e.message().to_owned()))
        }
    });
    let outcomes = futures_join(calls).await;
    let won = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(won, 1, "{outcomes:?}");
    let holder = lookup(&mut c, It::Phone, "+442079460000").await.unwrap();
    let winner = names
        .iter()
        .zip(&outcomes)
        .find(|(_, o)| o.is_ok())
        .unwrap()
        .0;
    assert_eq!(&holder, winner);
    // Every loser is told who holds it.
    for o in &outcomes {
        if let Err((code, message)) = o {
            assert_eq!(*code, Code::AlreadyExists, "{message}");
            assert!(message.contains(&holder), "{message}");
        }
    }
    h.server.stop().await;
}

async fn futures_join<F>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

fn attr(v: &str) -> pb::AttributeValue {
    pb::AttributeValue {
        value: Some(pb::attribute_value::Value::StringValue(v.into())),
    }
}

async fn create_full(
    c: &mut Client,
    email: &str,
    stage: pb::Stage,
    attrs: &[(&str, &str)],
) -> Customer {
    c.create_customer(pb::CreateCustomerRequest {
        customer: Some(Customer {
            email: email.into(),
            display_name: email.into(),
            stage: stage as i32,
            attributes: attrs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), attr(v)))
                .collect(),
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

async fn touch(c: &mut Client, customer: &str, event_id: &str) {
    let r = c
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: vec![pb::Touchpoint {
                customer: customer.into(),
                event_id: event_id.into(),
                r#type: pb::TouchpointType::FeatureUse as i32,
                feature: "reports".into(),
                occurred_time: Some(prost_types::Timestamp {
                    seconds: t0().timestamp() - 60,
                    nanos: 0,
                }),
                ..Default::default()
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.recorded_count, 1);
}

async fn consent(c: &mut Client, name: &str, settings: Vec<pb::ConsentSetting>) {
    c.set_consent(set(name, settings, Src::Form, ""))
        .await
        .unwrap();
}

fn merge_req(survivor: &str, dups: &[&str]) -> pb::MergeCustomersRequest {
    pb::MergeCustomersRequest {
        survivor: survivor.into(),
        duplicates: dups.iter().map(|d| (*d).to_owned()).collect(),
        policy: None,
        request_id: String::new(),
    }
}

#[tokio::test]
async fn merge_moves_everything_to_the_survivor_and_leaves_redirects() {
    let h = start().await;
    let mut c = h.client();
    let a = create_full(
        &mut c,
        "a@example.com",
        pb::Stage::Approach,
        &[("plan", "free"), ("nick", "")],
    )
    .await;
    let b = create_full(
        &mut c,
        "b@example.com",
        pb::Stage::Retention,
        &[("plan", "pro"), ("nick", "Bee"), ("city", "Oslo")],
    )
    .await;
    let cc = create_full(&mut c, "c@example.com", pb::Stage::Acquisition, &[]).await;
    c.add_customer_identifier(add(&b.name, It::Phone, "+47 22 12 34 56"))
        .await
        .unwrap();
    consent(
        &mut c,
        &a.name,
        vec![setting(Pu::Surveys, Ch::Email, St::Granted)],
    )
    .await;
    consent(
        &mut c,
        &b.name,
        vec![
            setting(Pu::Marketing, Ch::Email, St::Granted),
            setting(Pu::Surveys, Ch::Email, St::Denied),
        ],
    )
    .await;
    consent(
        &mut c,
        &cc.name,
        vec![setting(Pu::Marketing, Ch::Email, St::Denied)],
    )
    .await;
    touch(&mut c, &a.name, "a-1").await;
    touch(&mut c, &b.name, "b-1").await;
    touch(&mut c, &cc.name, "c-1").await;
    touch(&mut c, &cc.name, "c-2").await;

    h.clock.advance(Duration::minutes(1));
    let mut req = merge_req(&a.name, &[&b.name, &cc.name]);
    req.request_id = "merge-1".into();
    req.policy = Some(pb::MergePolicy {
        default_attribute_policy: pb::AttributeMergePolicy::SurvivorWins as i32,
        attribute_policies: [(
            "nick".to_owned(),
            pb::AttributeMergePolicy::KeepNonEmpty as i32,
        )]
        .into(),
    });
    let merged = c
        .merge_customers(req.clone())
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    assert_eq!(merged.name, a.name);
    assert_eq!(
        merged.stage,
        pb::Stage::Retention as i32,
        "the furthest stage"
    );
    let mut want_from = vec![b.name.clone(), cc.name.clone()];
    want_from.sort();
    assert_eq!(merged.merged_from, want_from);
    assert_eq!(merged.attributes["plan"], attr("free"));
    assert_eq!(merged.attributes["nick"], attr("Bee"));
    assert_eq!(merged.attributes["city"], attr("Oslo"));
    assert_eq!(merged.email, "a@example.com");
    // A retry answers the first result.
    assert_eq!(
        c.merge_customers(req)
            .await
            .unwrap()
            .into_inner()
            .customer
            .unwrap(),
        merged
    );

    // Merged ids redirect reads and refuse writes, naming the survivor.
    let got = get(&mut c, b.name.clone()).await;
    assert_eq!(got, merged);
    let e = c
        .transition_stage(pb::TransitionStageRequest {
            name: cc.name.clone(),
            to_stage: pb::Stage::Churned as i32,
            reason: "gone".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains(&a.name), "{}", e.message());
    let e = c
        .set_consent(set(
            &b.name,
            vec![setting(Pu::Marketing, Ch::Sms, St::Granted)],
            Src::Api,
            "",
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .record_touchpoints(pb::RecordTouchpointsRequest {
            touchpoints: vec![pb::Touchpoint {
                customer: b.name.clone(),
                event_id: "b-2".into(),
                r#type: pb::TouchpointType::SupportContact as i32,
                occurred_time: Some(prost_types::Timestamp {
                    seconds: t0().timestamp(),
                    nanos: 0,
                }),
                ..Default::default()
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains(&a.name), "{}", e.message());

    // Touchpoints, identifiers, consent and stage history moved.
    let tps = c
        .list_touchpoints(pb::ListTouchpointsRequest {
            parent: a.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .touchpoints;
    let mut ids: Vec<&str> = tps.iter().map(|t| t.event_id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["a-1", "b-1", "c-1", "c-2"]);
    assert!(tps.iter().all(|t| t.customer == a.name));
    for (kind, value) in [
        (It::Email, "b@example.com"),
        (It::Email, "c@example.com"),
        (It::Phone, "+4722123456"),
    ] {
        assert_eq!(
            lookup(&mut c, kind, value).await,
            Ok(a.name.clone()),
            "{value}"
        );
    }
    let got = c
        .get_consent(pb::GetConsentRequest {
            name: a.name.clone(),
            include_history: true,
        })
        .await
        .unwrap()
        .into_inner();
    let me = entry(&got, Pu::Marketing, Ch::Email);
    assert_eq!(
        me.state,
        St::Denied as i32,
        "a denial on either side stays denied"
    );
    assert_eq!(me.source, Src::Merge as i32);
    assert_eq!(entry(&got, Pu::Surveys, Ch::Email).state, St::Denied as i32);
    let history = c
        .list_stage_history(pb::ListStageHistoryRequest {
            parent: a.name.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .changes;
    let last = history.last().unwrap();
    assert_eq!(
        (last.from_stage, last.to_stage),
        (pb::Stage::Approach as i32, pb::Stage::Retention as i32)
    );
    assert!(
        last.reason.contains(&b.name) && last.reason.contains(&cc.name),
        "{}",
        last.reason
    );

    // The event names the survivor and the merged.
    let mut watch = ChangeStreamServiceClient::new(h.server.channel())
        .watch_changes(WatchChangesRequest {
            after_sequence: 0,
            event_types: vec!["clm.customer.v1.CustomersMerged".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let p = watch
        .next()
        .await
        .unwrap()
        .unwrap()
        .event
        .unwrap()
        .payload
        .unwrap();
    let ev = <pb::CustomersMerged as prost::Message>::decode(p.value.as_slice()).unwrap();
    assert_eq!(ev.survivor, a.name);
    assert_eq!(ev.merged, vec![b.name.clone(), cc.name.clone()]);
    assert_eq!(ev.customer.unwrap(), merged);

    // Refused: itself, a repeat, an already merged one, an unknown one.
    let e = c
        .merge_customers(merge_req(&a.name, &[&a.name]))
        .await
        .unwrap_err();
    assert_bad_field(&e, "duplicates[0]");
    let d = create(&mut c, "d@example.com").await;
    let e = c
        .merge_customers(merge_req(&a.name, &[&d.name, &d.name]))
        .await
        .unwrap_err();
    assert_bad_field(&e, "duplicates[1]");
    let e = c
        .merge_customers(merge_req(&a.name, &[&b.name]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .merge_customers(merge_req(&b.name, &[&d.name]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let unknown = format!("customers/{}", uuid::Uuid::now_v7());
    let e = c
        .merge_customers(merge_req(&a.name, &[&unknown]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);

    // A survivor merged later takes its redirects along.
    let z = c
        .merge_customers(merge_req(&d.name, &[&a.name]))
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    assert_eq!(z.merged_from.len(), 3);
    let got = get(&mut c, b.name.clone()).await;
    assert_eq!(got.name, d.name);
    h.server.stop().await;
}

#[tokio::test]
async fn concurrent_overlapping_merges_lose_and_duplicate_nothing() {
    let h = start().await;
    let mut c = h.client();
    let mut names = Vec::new();
    for i in 0..5 {
        let n = create(&mut c, &format!("m{i}@example.com")).await.name;
        touch(&mut c, &n, &format!("tp-{i}")).await;
        names.push(n);
    }
    let plans: Vec<(usize, Vec<usize>)> = vec![
        (0, vec![1]),
        (1, vec![2]),
        (2, vec![0]),
        (3, vec![1, 2]),
        (4, vec![0, 3]),
        (2, vec![4]),
    ];
    let calls = plans.iter().map(|(s, ds)| {
        let mut c = h.client();
        let ds: Vec<&str> = ds.iter().map(|d| names[*d].as_str()).collect();
        let req = merge_req(&names[*s], &ds);
        async move {
            c.merge_customers(req)
                .await
                .map(|_| ())
                .map_err(|e| e.code())
        }
    });
    let outcomes = futures_join(calls).await;
    assert!(outcomes.iter().any(Result::is_ok), "{outcomes:?}");
    for o in &outcomes {
        assert!(
            matches!(o, Ok(()) | Err(Code::FailedPrecondition | Code::Aborted)),
            "{outcomes:?}"
        );
    }
    // Every name resolves to a live customer; the live ones hold every
    // touchpoint and e-mail exactly once.
    let mut live = std::collections::BTreeSet::new();
    for n in &names {
        let got = get(&mut c, n.clone()).await;
        live.insert(got.name);
    }
    let mut tps = Vec::new();
    for n in &live {
        let page = c
            .list_touchpoints(pb::ListTouchpointsRequest {
                parent: n.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .touchpoints;
        tps.extend(page.into_iter().map(|t| t.event_id));
    }
    tps.sort();
    assert_eq!(tps, ["tp-0", "tp-1", "tp-2", "tp-3", "tp-4"]);
    for i in 0..5 {
        let holder = lookup(&mut c, It::Email, &format!("m{i}@example.com"))
            .await
            .unwrap();
        assert!(live.contains(&holder));
    }
    let merged_total: usize = {
        let mut n = 0;
        for l in &live {
            n += get(&mut c, l.clone()).await.merged_from.len();
        }
        n
    };
    assert_eq!(merged_total + live.len(), 5);
    h.server.stop().await;
}

/// Every row of every table of the service's database, one text per row
/// (blobs as hex), by table: found by listing the tables, not from a list.
async fn dump_every_table(database_url: &str) -> Vec<(String, String)> {
    use sea_orm::{ConnectionTrait, Database, Statement};
    let db = Database::connect(database_url).await.unwrap();
    let pg = db.get_database_backend() == sea_orm::DbBackend::Postgres;
    let q = |sql: String| Statement::from_string(db.get_database_backend(), sql);
    let tables: Vec<String> = db
        .query_all_raw(q(if pg {
            "SELECT table_name AS t FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
                .into()
        } else {
            "SELECT name AS t FROM sqlite_master WHERE type = 'table'".into()
        }))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String>("", "t").unwrap())
        .collect();
    assert!(tables.iter().any(|t| t == "customers"), "{tables:?}");
    let mut rows = Vec::new();
    for t in tables {
        let sql = if pg {
            format!("SELECT \"{t}\"::text AS r FROM \"{t}\"")
        } else {
            let cols: Vec<String> = db
                .query_all_raw(q(format!("SELECT name FROM pragma_table_info('{t}')")))
                .await
                .unwrap()
                .iter()
                .map(|r| format!("quote(\"{}\")", r.try_get::<String>("", "name").unwrap()))
                .collect();
            format!("SELECT {} AS r FROM \"{t}\"", cols.join(" || ',' || "))
        };
        for r in db.query_all_raw(q(sql)).await.unwrap() {
            let text: Option<String> = r.try_get("", "r").unwrap();
            rows.push((t.clone(), text.unwrap_or_default().to_lowercase()));
        }
    }
    rows
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn erasure_forgets_everything_but_the_receipt_and_hashes() {
    let h = start().await;
    let mut c = h.client();
    let ada = c
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(Customer {
                email: "ada.lovelace@example.com".into(),
                external_id: "crm:ada-77".into(),
                display_name: "Ada Lovelace".into(),
                attributes: [("motto".to_owned(), attr("poetical-science"))].into(),
                ..Default::default()
            }),
            request_id: "create-ada".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let dup = create(&mut c, "countess.of.lovelace@example.com").await;
    let bob = create(&mut c, "bob@example.com").await;
    c.add_customer_identifier(add(&ada.name, It::Phone, "+44 20 7000 1815"))
        .await
        .unwrap();
    consent(
        &mut c,
        &ada.name,
        vec![setting(Pu::Marketing, Ch::Email, St::Granted)],
    )
    .await;
    touch(&mut c, &ada.name, "ada-analytical-engine").await;
    touch(&mut c, &dup.name, "dup-difference-engine").await;
    touch(&mut c, &bob.name, "bob-1").await;
    c.transition_stage(pb::TransitionStageRequest {
        name: ada.name.clone(),
        to_stage: pb::Stage::Conversion as i32,
        reason: "bought the engine".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    c.merge_customers(merge_req(&ada.name, &[&dup.name]))
        .await
        .unwrap();

    h.clock.advance(Duration::minutes(1));
    let req = pb::EraseCustomerRequest {
        name: ada.name.clone(),
        request_id: "erase-ada".into(),
    };
    let erased = c.erase_customer(req.clone()).await.unwrap().into_inner();
    assert!(erased.name.starts_with("erasureRequests/"));
    assert_eq!(erased.customer, ada.name);
    // No peer is configured, so no other receipt is expected: complete at once.
    assert_eq!(erased.expected_services, vec!["customer".to_owned()]);
    assert_eq!(erased.state, pb::ErasureState::Completed as i32);
    assert_eq!(erased.complete_time, erased.create_time);
    assert_eq!(erased.receipts.len(), 1);
    assert_eq!(erased.receipts[0].service, "customer");
    assert_eq!(c.erase_customer(req).await.unwrap().into_inner(), erased);
    // Erasing twice returns the existing request.
    let again = erase(&mut c, ada.name.clone()).await;
    assert_eq!(again, erased);
    assert_eq!(
        c.get_erasure_request(pb::GetErasureRequestRequest {
            name: erased.name.clone()
        })
        .await
        .unwrap()
        .into_inner(),
        erased
    );
    let listed = c
        .list_erasure_requests(pb::ListErasureRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.erasure_requests, vec![erased.clone()]);

    // Gone through the API, and Bob untouched.
    for name in [&ada.name, &dup.name] {
        let e = c.get_customer(by_name(name.clone())).await.unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{name}");
    }
    let e = c
        .lookup_customer(pb::LookupCustomerRequest {
            identifier: ident(It::Email, "ada.lovelace@example.com"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    assert!(
        !e.message().to_lowercase().contains("lovelace"),
        "an erased value is never echoed: {}",
        e.message()
    );
    assert_eq!(
        lookup(&mut c, It::Email, "bob@example.com").await,
        Ok(bob.name.clone())
    );

    // Gone from every table: only the receipt (request, receipts, the
    // CustomerErased event and the scrubbed events, the erase's own stored
    // answer) names the id, and no erased value is anywhere.
    let rows = dump_every_table(&h._backend.database_url).await;
    let ada_id = ada.name.trim_start_matches("customers/");
    let dup_id = dup.name.trim_start_matches("customers/");
    let values = [
        "ada.lovelace@example.com",
        "countess.of.lovelace@example.com",
        "crm:ada-77",
        "+442070001815",
        "ada lovelace",
        "poetical-science",
        "ada-analytical-engine",
        "dup-difference-engine",
        "bought the engine",
    ];
    let receipts = [
        "erasure_requests",
        "erasure_receipts",
        "outbox",
        "idempotency_keys",
    ];
    for (table, row) in &rows {
        for v in values {
            assert!(
                !row.contains(v) && !row.contains(&hex(v)),
                "{v} left in {table}: {row}"
            );
        }
        for id in [ada_id, dup_id] {
            if row.contains(id) || row.contains(&hex(id)) {
                assert!(
                    receipts.contains(&table.as_str()),
                    "{id} left in {table}: {row}"
                );
            }
        }
    }
    let hashes = rows
        .iter()
        .filter(|(t, _)| t == "erased_identifiers")
        .count();
    assert_eq!(hashes, 4, "email, dup email, external id and phone hashed");
    assert!(rows.iter().any(|(_, r)| r.contains("bob@example.com")));

    // The change stream says so, naming only the id.
    let mut watch = ChangeStreamServiceClient::new(h.server.channel())
        .watch_changes(WatchChangesRequest {
            after_sequence: 0,
            event_types: vec!["clm.customer.v1.CustomerErased".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let p = watch
        .next()
        .await
        .unwrap()
        .unwrap()
        .event
        .unwrap()
        .payload
        .unwrap();
    let ev = <pb::CustomerErased as prost::Message>::decode(p.value.as_slice()).unwrap();
    assert_eq!(ev.customer, ada.name);
    assert_eq!(ev.erasure_request, erased.name);
    assert_eq!(ev.merged_from, vec![dup.name.clone()]);

    // A re-import of an erased identifier is refused, naming a hash, not the value.
    let e = c
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(Customer {
                email: "Ada.Lovelace@example.com".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("customer.email") && e.message().contains("hash"));
    assert!(
        !e.message().to_lowercase().contains("lovelace"),
        "{}",
        e.message()
    );
    let e = c
        .add_customer_identifier(add(&bob.name, It::Phone, "+44 20 7000 1815"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(!e.message().contains("1815"), "{}", e.message());
    c.add_customer_identifier(add(&bob.name, It::Phone, "+44 20 7000 1816"))
        .await
        .unwrap();

    // Bad input.
    let e = c
        .erase_customer(pb::EraseCustomerRequest {
            name: format!("customers/{}", uuid::Uuid::now_v7()),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = c.erase_customer(erase_req("ada")).await.unwrap_err();
    assert_bad_field(&e, "name");
    let e = c
        .get_erasure_request(pb::GetErasureRequestRequest {
            name: format!("erasureRequests/{}", uuid::Uuid::now_v7()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    h.server.stop().await;
}

#[tokio::test]
async fn only_data_stewards_and_admins_erase() {
    use clm_platform::auth::{Role, mint_hs256};
    use clm_platform::client::ClientInterceptor;
    const SECRET: &str = "test-secret-test-secret-test-secret!";
    let backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let mut config = backend.config("customer");
    config.auth.hs256_secret = Some(SECRET.into());
    let server = start_with_clock(
        &clm_customer::DESCRIPTOR,
        config,
        Arc::new(ManualClock::new(t0())),
    )
    .await;
    let client = |roles: &[Role]| {
        let t = mint_hs256(
            SECRET,
            "someone",
            roles,
            std::time::Duration::from_secs(300),
        )
        .unwrap();
        CustomerServiceClient::with_interceptor(server.channel(), ClientInterceptor::new(Some(&t)))
    };
    let mut marketer = client(&[Role::Marketer]);
    let ada = marketer
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(Customer {
                email: "ada@example.com".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let erase = erase_req(ada.name.clone());
    for roles in [&[Role::Marketer][..], &[Role::Analyst], &[Role::Service]] {
        let e = client(roles)
            .erase_customer(erase.clone())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{roles:?}");
        let e = client(roles)
            .list_erasure_requests(pb::ListErasureRequestsRequest::default())
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{roles:?}");
    }
    let done = client(&[Role::DataSteward])
        .erase_customer(erase.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.requester, "someone");
    let listed = client(&[Role::Admin])
        .list_erasure_requests(pb::ListErasureRequestsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.erasure_requests, vec![done]);
    server.stop().await;
}

#[tokio::test]
async fn customers_from_before_identifiers_get_their_profile_identifiers() {
    use clm_customer::store::Migrator;
    use sea_orm::{ConnectionTrait, Database, Statement};
    use sea_orm_migration::MigratorTrait;
    let backend = TestBackend::new().await;
    let url = if backend.is_postgres() {
        backend.database_url.clone()
    } else {
        format!("{}?mode=rwc", backend.database_url)
    };
    let db = Database::connect(&url).await.unwrap();
    let before = Migrator::migrations()
        .iter()
        .position(|m| m.name() == "m0004_customer_identifiers")
        .unwrap();
    Migrator::up(&db, Some(before as u32)).await.unwrap();
    let id = uuid::Uuid::now_v7().to_string();
    db.execute_raw(Statement::from_sql_and_values(
        db.get_database_backend(),
        "INSERT INTO customers (id, external_id, email, display_name, stage, \
         stage_change_us, create_us, update_us, version) \
         VALUES ($1, 'CRM:Old-1', 'old@example.com', 'Old', 1, 0, 0, 0, 1)"
            .replace("$1", if backend.is_postgres() { "$1" } else { "?" }),
        [id.clone().into()],
    ))
    .await
    .unwrap();
    Migrator::up(&db, None).await.unwrap();
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT value, customer_id, profile FROM customer_identifiers ORDER BY kind",
        ))
        .await
        .unwrap();
    let got: Vec<(String, String, bool)> = rows
        .iter()
        .map(|r| {
            (
                r.try_get("", "value").unwrap(),
                r.try_get("", "customer_id").unwrap(),
                r.try_get("", "profile").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("old@example.com".to_owned(), id.clone(), true),
            ("crm:Old-1".to_owned(), id, true),
        ]
    );
}

async fn list_filtered(c: &mut Client, filter: &str) -> Vec<String> {
    c.list_customers(pb::ListCustomersRequest {
        filter: filter.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .customers
    .into_iter()
    .map(|x| x.name)
    .collect()
}

#[tokio::test]
async fn flag_policy_accepts_erased_identifiers_and_marks_the_customer() {
    use clm_platform::config::ErasedIdentifierPolicy;
    let h =
        start_with(|c| c.customer.erased_identifier_policy = ErasedIdentifierPolicy::Flag).await;
    let mut c = h.client();
    let ada = c
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(Customer {
                email: "ada@example.com".into(),
                external_id: "crm:ada-1".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ada.reimported_after_erasure);
    c.add_customer_identifier(add(&ada.name, It::Phone, "+44 20 7000 1815"))
        .await
        .unwrap();
    erase(&mut c, ada.name.clone()).await;

    // Create with an erased e-mail (another spelling of it): accepted, flagged.
    let back = c
        .create_customer(create_req(customer("ADA@example.com"), "reimport-ada"))
        .await
        .unwrap()
        .into_inner();
    assert!(back.reimported_after_erasure);
    let got = get(&mut c, back.name.clone()).await;
    assert_eq!(got, back, "Get shows the mark as stored");
    let fresh = create(&mut c, "grace@example.com").await;
    assert!(!fresh.reimported_after_erasure);

    // A batch: only the customer carrying an erased identifier is flagged.
    let batch = c
        .batch_create_customers(pb::BatchCreateCustomersRequest {
            requests: vec![
                pb::CreateCustomerRequest {
                    customer: Some(Customer {
                        external_id: "crm:ada-1".into(),
                        display_name: "Ada from the CRM".into(),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                },
                create_req(customer("alan@example.com"), ""),
            ],
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .customers;
    assert!(batch[0].reimported_after_erasure);
    assert!(!batch[1].reimported_after_erasure);

    // Adding an erased phone to a customer flags it (a new version).
    c.add_customer_identifier(add(&fresh.name, It::Phone, "+442070001815"))
        .await
        .unwrap();
    let grace = get(&mut c, fresh.name.clone()).await;
    assert!(grace.reimported_after_erasure);
    assert_ne!(grace.etag, fresh.etag);

    // A data steward finds them with a filter.
    let mut flagged = list_filtered(&mut c, "reimported_after_erasure = true").await;
    flagged.sort();
    let mut want = vec![back.name.clone(), batch[0].name.clone(), grace.name.clone()];
    want.sort();
    assert_eq!(flagged, want);
    assert_eq!(
        list_filtered(&mut c, "reimported_after_erasure = false").await,
        vec![batch[1].name.clone()]
    );
    assert_eq!(
        list_filtered(&mut c, "reimported_after_erasure != true").await,
        vec![batch[1].name.clone()]
    );
    let e = c
        .list_customers(pb::ListCustomersRequest {
            filter: "reimported_after_erasure = \"yes\"".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "filter");

    // The mark survives a merge into an unmarked survivor.
    let merged = c
        .merge_customers(merge_req(&batch[1].name, &[&back.name]))
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    assert!(merged.reimported_after_erasure);

    // An update to an erased e-mail flags too; the output-only field
    // cannot be set by a client.
    let turing = create(&mut c, "turing@example.com").await;
    erase(&mut c, turing.name.clone()).await;
    let hopper = create(&mut c, "hopper@example.com").await;
    let updated = c
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(Customer {
                name: hopper.name.clone(),
                email: "turing@example.com".into(),
                ..Default::default()
            }),
            update_mask: mask(&["email"]),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.reimported_after_erasure);
    let e = c
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(Customer {
                name: hopper.name.clone(),
                reimported_after_erasure: false,
                ..Default::default()
            }),
            update_mask: mask(&["reimported_after_erasure"]),
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_bad_field(&e, "update_mask");
    h.server.stop().await;
}

#[tokio::test]
async fn two_merges_of_one_overlapping_set_have_one_winner_and_every_row_once() {
    let h = start().await;
    let mut c = h.client();
    for round in 0..3 {
        // Four customers, each with a touchpoint, a phone and a consent change.
        let mut names = Vec::new();
        for i in 0..4 {
            let n = create(&mut c, &format!("r{round}c{i}@example.com"))
                .await
                .name;
            touch(&mut c, &n, &format!("r{round}-tp-{i}")).await;
            c.add_customer_identifier(add(&n, It::Phone, &format!("+4930{round}00000{i}")))
                .await
                .unwrap();
            consent(
                &mut c,
                &n,
                vec![setting(Pu::Marketing, Ch::Email, St::Granted)],
            )
            .await;
            names.push(n);
        }
        // a <- [b, c] and d <- [c, b] at once: they share b and c.
        let plans = [(0, [1, 2]), (3, [2, 1])];
        let calls = plans.iter().map(|(s, ds)| {
            let mut c = h.client();
            let ds: Vec<&str> = ds.iter().map(|d| names[*d].as_str()).collect();
            let req = merge_req(&names[*s], &ds);
            async move {
                c.merge_customers(req)
                    .await
                    .map(|r| r.into_inner().customer.unwrap().name)
                    .map_err(|e| e.code())
            }
        });
        let outcomes = futures_join(calls).await;
        let won: Vec<&String> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(won.len(), 1, "exactly one merge wins: {outcomes:?}");
        for o in &outcomes {
            assert!(
                matches!(o, Ok(_) | Err(Code::FailedPrecondition | Code::Aborted)),
                "{outcomes:?}"
            );
        }
        let survivor = won[0].clone();
        let other = if survivor == names[0] {
            names[3].clone()
        } else {
            names[0].clone()
        };
        let folded: Vec<usize> = if survivor == names[0] {
            vec![0, 1, 2]
        } else {
            vec![3, 2, 1]
        };
        for i in [1, 2] {
            assert_eq!(get(&mut c, names[i].clone()).await.name, survivor);
        }

        // The survivor holds the three customers' rows, each once; the
        // loser's survivor only its own.
        for (who, from) in [
            (&survivor, folded.clone()),
            (&other, vec![if survivor == names[0] { 3 } else { 0 }]),
        ] {
            let mut tps: Vec<String> = c
                .list_touchpoints(pb::ListTouchpointsRequest {
                    parent: who.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .touchpoints
                .into_iter()
                .map(|t| t.event_id)
                .collect();
            tps.sort();
            let mut want: Vec<String> = from.iter().map(|i| format!("r{round}-tp-{i}")).collect();
            want.sort();
            assert_eq!(tps, want, "touchpoints of {who}");

            let mut held: Vec<String> = c
                .list_customer_identifiers(pb::ListCustomerIdentifiersRequest {
                    parent: who.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .identifiers
                .into_iter()
                .map(|i| i.value)
                .collect();
            held.sort();
            let mut want: Vec<String> = from
                .iter()
                .flat_map(|i| {
                    [
                        format!("r{round}c{i}@example.com"),
                        format!("+4930{round}00000{i}"),
                    ]
                })
                .collect();
            want.sort();
            assert_eq!(held, want, "identifiers of {who}");

            let created = c
                .list_stage_history(pb::ListStageHistoryRequest {
                    parent: who.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .changes
                .iter()
                .filter(|ch| ch.reason == "created")
                .count();
            assert_eq!(created, from.len(), "stage history of {who}");

            let stated = c
                .get_consent(pb::GetConsentRequest {
                    name: format!("{who}/consent"),
                    include_history: true,
                })
                .await
                .unwrap()
                .into_inner()
                .history
                .iter()
                .filter(|ch| ch.source == Src::Form as i32)
                .count();
            assert_eq!(stated, from.len(), "consent history of {who}");
        }
    }
    h.server.stop().await;
}

#[tokio::test]
async fn a_flagged_customer_keeps_working_after_the_policy_turns_to_refuse() {
    use clm_platform::config::ErasedIdentifierPolicy;
    let backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let start_on = |policy| {
        let mut config = backend.config("customer");
        config.customer.erased_identifier_policy = policy;
        start_with_clock(
            &clm_customer::DESCRIPTOR,
            config,
            Arc::new(ManualClock::new(t0())),
        )
    };
    let server = start_on(ErasedIdentifierPolicy::Flag).await;
    let mut c = CustomerServiceClient::new(server.channel());
    for email in ["ada@example.com", "alan@example.com"] {
        let gone = create(&mut c, email).await;
        erase(&mut c, gone.name).await;
    }
    let back = create(&mut c, "ada@example.com").await;
    assert!(back.reimported_after_erasure);
    server.stop().await;

    // Under "refuse", the flagged customer's own identifiers are its own:
    // changing its other fields, or its external id, is no re-import.
    let server = start_on(ErasedIdentifierPolicy::Refuse).await;
    let mut c = CustomerServiceClient::new(server.channel());
    let updated = c
        .update_customer(pb::UpdateCustomerRequest {
            customer: Some(Customer {
                name: back.name.clone(),
                external_id: "crm:ada-2".into(),
                email: "ada@example.com".into(),
                ..Default::default()
            }),
            update_mask: mask(&["external_id", "email"]),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(updated.reimported_after_erasure);
    assert_eq!(updated.external_id, "crm:ada-2");
    // Another erased identifier is still refused, to it as to anyone.
    let e = c
        .add_customer_identifier(add(&back.name, It::Email, "alan@example.com"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .create_customer(create_req(customer("alan@example.com"), ""))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    server.stop().await;
}
