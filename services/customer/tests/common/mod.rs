//! The harness both customer test suites share: a customer service on a
//! fresh backend with a controlled clock, and a client to it.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Utc};
use clm_domain::ManualClock;
use clm_platform::testing::{Running, TestBackend, start_with_clock};
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::customer::{self as pb, Customer};
use std::sync::Arc;
use tonic::transport::Channel;

pub type Client = CustomerServiceClient<Channel>;

pub struct Harness {
    pub server: Running,
    pub clock: ManualClock,
    pub _backend: TestBackend,
}

pub fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

pub async fn start_with(edit: impl FnOnce(&mut clm_platform::config::Config)) -> Harness {
    let backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let mut config = backend.config("customer");
    edit(&mut config);
    let clock = ManualClock::new(t0());
    let c = clock.clone();
    let server = start_with_clock(&clm_customer::DESCRIPTOR, config, Arc::new(c)).await;
    Harness {
        server,
        clock,
        _backend: backend,
    }
}

pub async fn start() -> Harness {
    start_with(|_| {}).await
}

impl Harness {
    pub fn client(&self) -> Client {
        CustomerServiceClient::new(self.server.channel())
    }
}

pub fn customer(email: &str) -> Customer {
    Customer {
        email: email.into(),
        display_name: format!("Customer {email}"),
        ..Default::default()
    }
}

pub async fn create(c: &mut Client, email: &str) -> Customer {
    c.create_customer(pb::CreateCustomerRequest {
        customer: Some(customer(email)),
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

/// A CreateCustomer request for `customer` (`request_id` may be empty).
pub fn create_req(customer: Customer, request_id: &str) -> pb::CreateCustomerRequest {
    pb::CreateCustomerRequest {
        customer: Some(customer),
        request_id: request_id.into(),
    }
}

/// BatchCreateCustomers of `requests` without a request id, which must
/// succeed; the customers made, in order.
pub async fn batch_create(
    c: &mut Client,
    requests: Vec<pb::CreateCustomerRequest>,
) -> Vec<Customer> {
    c.batch_create_customers(pb::BatchCreateCustomersRequest {
        requests,
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .customers
}

/// A GetCustomer request.
pub fn by_name(name: impl Into<String>) -> pb::GetCustomerRequest {
    pb::GetCustomerRequest { name: name.into() }
}

/// GetCustomer, which must succeed.
pub async fn get(c: &mut Client, name: impl Into<String>) -> Customer {
    c.get_customer(by_name(name)).await.unwrap().into_inner()
}

/// An update mask of `paths`.
pub fn mask(paths: &[&str]) -> Option<prost_types::FieldMask> {
    Some(prost_types::FieldMask {
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
    })
}

/// An EraseCustomer request without a `request_id`.
pub fn erase_req(name: impl Into<String>) -> pb::EraseCustomerRequest {
    pb::EraseCustomerRequest {
        name: name.into(),
        request_id: String::new(),
    }
}

/// EraseCustomer, which must succeed.
pub async fn erase(c: &mut Client, name: impl Into<String>) -> pb::ErasureRequest {
    c.erase_customer(erase_req(name))
        .await
        .unwrap()
        .into_inner()
}

/// GetErasureRequest, which must succeed.
pub async fn erasure(c: &mut Client, name: impl Into<String>) -> pb::ErasureRequest {
    c.get_erasure_request(pb::GetErasureRequestRequest { name: name.into() })
        .await
        .unwrap()
        .into_inner()
}

/// One consent cell to set.
pub fn setting(
    purpose: pb::ConsentPurpose,
    channel: pb::ConsentChannel,
    state: pb::ConsentState,
) -> pb::ConsentSetting {
    pb::ConsentSetting {
        purpose: purpose as i32,
        channel: channel as i32,
        state: state as i32,
    }
}

/// The entry of one consent cell (it must be there: GetConsent answers all).
pub fn entry(
    c: &pb::Consent,
    purpose: pb::ConsentPurpose,
    channel: pb::ConsentChannel,
) -> &pb::ConsentEntry {
    c.entries
        .iter()
        .find(|e| e.purpose == purpose as i32 && e.channel == channel as i32)
        .unwrap()
}

/// A SetConsent request.
pub fn set(
    name: &str,
    settings: Vec<pb::ConsentSetting>,
    source: pb::ConsentSource,
    request_id: &str,
) -> pb::SetConsentRequest {
    pb::SetConsentRequest {
        name: name.into(),
        settings,
        source: source as i32,
        request_id: request_id.into(),
    }
}

/// An identifier of `kind`.
pub fn ident(kind: pb::IdentifierType, value: &str) -> Option<pb::CustomerIdentifier> {
    Some(pb::CustomerIdentifier {
        r#type: kind as i32,
        value: value.into(),
        ..Default::default()
    })
}

/// An AddCustomerIdentifier request without a `request_id`.
pub fn add(
    parent: &str,
    kind: pb::IdentifierType,
    value: &str,
) -> pb::AddCustomerIdentifierRequest {
    pb::AddCustomerIdentifierRequest {
        parent: parent.into(),
        identifier: ident(kind, value),
        request_id: String::new(),
    }
}

/// LookupCustomer: the holder's name, or the error code.
pub async fn lookup(
    c: &mut Client,
    kind: pb::IdentifierType,
    value: &str,
) -> Result<String, tonic::Code> {
    c.lookup_customer(pb::LookupCustomerRequest {
        identifier: ident(kind, value),
    })
    .await
    .map(|r| r.into_inner().name)
    .map_err(|e| e.code())
}

// ---------------------------------------------- journeys (KPI test suites)

/// A timestamp of `t`.
pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// The time written in RFC 3339.
pub fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

/// A touchpoint `id` of type `t` of `customer` at `when`.
pub fn tp(customer: &str, id: &str, t: pb::TouchpointType, when: DateTime<Utc>) -> pb::Touchpoint {
    pb::Touchpoint {
        customer: customer.into(),
        event_id: id.into(),
        r#type: t as i32,
        occurred_time: Some(ts(when)),
        ..Default::default()
    }
}

/// A touch of `campaign`.
pub fn touch(customer: &str, id: &str, campaign: &str, when: DateTime<Utc>) -> pb::Touchpoint {
    pb::Touchpoint {
        campaign: campaign.into(),
        ..tp(customer, id, pb::TouchpointType::CampaignTouch, when)
    }
}

/// Moves `customer` to stage `to` (now, by the service clock).
pub async fn move_to(c: &mut Client, customer: &str, to: pb::Stage) {
    c.transition_stage(pb::TransitionStageRequest {
        name: customer.into(),
        to_stage: to as i32,
        reason: "test".into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// A report scope that is cheap to read (one day before the test clock's
/// start): asked only for its freshness.
fn freshness_scope() -> pb::ReportScope {
    pb::ReportScope {
        start_time: Some(clm_platform::convert::timestamp(
            t0() - chrono::Duration::days(1),
        )),
        end_time: Some(clm_platform::convert::timestamp(t0())),
        ..Default::default()
    }
}

/// A report's freshness (GetFunnelReport), waiting for `min_position`.
pub async fn freshness(c: &mut Client, min_position: i64) -> pb::ReportFreshness {
    c.get_funnel_report(pb::GetFunnelReportRequest {
        scope: Some(freshness_scope()),
        min_position,
    })
    .await
    .unwrap()
    .into_inner()
    .freshness
    .expect("a report states its freshness")
}

/// Waits until the reports reflect every write made so far (the report
/// projection has applied the stream head): returns that position.
pub async fn settle(c: &mut Client) -> i64 {
    let head = freshness(c, 0).await.head_position;
    let f = freshness(c, head).await;
    assert!(f.fresh_position >= head, "{f:?} after waiting for {head}");
    head
}

/// Rebuilds the report projection (KPI rollups and journey rows) from the
/// raw tables, as the rollup migrations do: what a test compares the kept
/// projection with.
pub async fn rebuild_projection(db: &sea_orm::DatabaseConnection) {
    use sea_orm::ConnectionTrait;
    for t in clm_customer::store::activity::TABLES {
        db.execute_unprepared(&format!("DELETE FROM {t}"))
            .await
            .unwrap();
    }
    for sql in clm_customer::store::activity::rebuild_sql(None) {
        db.execute_unprepared(&sql).await.unwrap();
    }
    db.execute_unprepared("DELETE FROM move_paths")
        .await
        .unwrap();
    db.execute_unprepared(&clm_customer::store::journeys::fill_sql(None))
        .await
        .unwrap();
}
