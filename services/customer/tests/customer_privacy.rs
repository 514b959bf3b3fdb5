//! Consent and identities through the real gRPC API on a real socket, on
//! SQLite + in-process cache, or PostgreSQL + Redis when
//! `CLM_TEST_DATABASE_URL` / `CLM_TEST_REDIS_URL` are set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Duration, Utc};
use clm_domain::ManualClock;
use clm_platform::testing::{Running, TestBackend, assert_bad_field, start_with_clock};
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
use tonic::transport::Channel;

type Client = CustomerServiceClient<Channel>;

struct Harness {
    server: Running,
    clock: ManualClock,
    _backend: TestBackend,
}

fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

async fn start() -> Harness {
    let backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let config = backend.config("customer");
    let clock = ManualClock::new(t0());
    let server = start_with_clock(&clm_customer::DESCRIPTOR, config, Arc::new(clock.clone())).await;
    Harness {
        server,
        clock,
        _backend: backend,
    }
}

impl Harness {
    fn client(&self) -> Client {
        CustomerServiceClient::new(self.server.channel())
    }
}

async fn create(c: &mut Client, email: &str) -> Customer {
    c.create_customer(pb::CreateCustomerRequest {
        customer: Some(Customer {
            email: email.into(),
            display_name: format!("Customer {email}"),
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

fn setting(purpose: Pu, channel: Ch, state: St) -> pb::ConsentSetting {
    pb::ConsentSetting {
        purpose: purpose as i32,
        channel: channel as i32,
        state: state as i32,
    }
}

fn entry(c: &pb::Consent, purpose: Pu, channel: Ch) -> &pb::ConsentEntry {
    c.entries
        .iter()
        .find(|e| e.purpose == purpose as i32 && e.channel == channel as i32)
        .unwrap()
}

fn set(
    name: &str,
    settings: Vec<pb::ConsentSetting>,
    source: Src,
    request_id: &str,
) -> pb::SetConsentRequest {
    pb::SetConsentRequest {
        name: name.into(),
        settings,
        source: source as i32,
        request_id: request_id.into(),
    }
}

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
