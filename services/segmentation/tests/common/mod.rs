//! The harness of the segmentation tests: a customer service and a
//! segmentation service following it, on one fresh backend each, sharing
//! one controlled clock.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use chrono::{DateTime, Duration, Utc};
use clm_domain::ManualClock;
use clm_platform::config::Config;
use clm_platform::testing::{Running, TestBackend, eventually, start_with_clock};
use clm_proto::customer::customer_service_client::CustomerServiceClient;
use clm_proto::customer::{self as cpb};
use clm_proto::segmentation::segmentation_service_client::SegmentationServiceClient;
use clm_proto::segmentation::{self as pb};
use std::sync::Arc;
use tonic::transport::Channel;

pub type Customers = CustomerServiceClient<Channel>;
pub type Segments = SegmentationServiceClient<Channel>;

pub struct Harness {
    pub customer: Running,
    pub segmentation: Option<Running>,
    pub clock: ManualClock,
    pub seg_backend: TestBackend,
    pub _cust_backend: TestBackend,
}

pub fn t0() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

pub fn seg_config(backend: &TestBackend, customer_url: &str) -> Config {
    let mut c = backend.config("segmentation");
    c.peers.insert("customer".into(), customer_url.to_owned());
    // Tests read objective values right after the facts change.
    c.segmentation.objective_cache_secs = 0;
    c
}

pub async fn start_with(edit: impl FnOnce(&mut Config)) -> Harness {
    let cust_backend = TestBackend::migrated::<clm_customer::store::Migrator>().await;
    let seg_backend = TestBackend::migrated::<clm_segmentation::store::Migrator>().await;
    let clock = ManualClock::new(t0());
    let customer = start_with_clock(
        &clm_customer::DESCRIPTOR,
        cust_backend.config("customer"),
        Arc::new(clock.clone()),
    )
    .await;
    let mut config = seg_config(&seg_backend, &customer.url());
    edit(&mut config);
    let segmentation = start_with_clock(
        &clm_segmentation::DESCRIPTOR,
        config,
        Arc::new(clock.clone()),
    )
    .await;
    Harness {
        customer,
        segmentation: Some(segmentation),
        clock,
        seg_backend,
        _cust_backend: cust_backend,
    }
}

pub async fn start() -> Harness {
    start_with(|_| {}).await
}

impl Harness {
    pub fn customers(&self) -> Customers {
        CustomerServiceClient::new(self.customer.channel())
    }

    pub fn segments(&self) -> Segments {
        SegmentationServiceClient::new(self.segmentation.as_ref().unwrap().channel())
    }

    /// Stops the segmentation service and starts it again on the same backend.
    pub async fn restart_segmentation(&mut self) {
        self.segmentation.take().unwrap().stop().await;
        let config = seg_config(&self.seg_backend, &self.customer.url());
        self.segmentation = Some(
            start_with_clock(
                &clm_segmentation::DESCRIPTOR,
                config,
                Arc::new(self.clock.clone()),
            )
            .await,
        );
    }

    pub fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
}

pub async fn create_customer(
    c: &mut Customers,
    email: &str,
    edit: impl FnOnce(&mut cpb::Customer),
) -> String {
    let mut customer = cpb::Customer {
        email: email.into(),
        display_name: format!("Customer {email}"),
        ..Default::default()
    };
    edit(&mut customer);
    c.create_customer(cpb::CreateCustomerRequest {
        customer: Some(customer),
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .name
}

/// A `plan` attribute of `value`.
pub fn plan(value: &str) -> std::collections::BTreeMap<String, cpb::AttributeValue> {
    std::collections::BTreeMap::from([(
        "plan".to_owned(),
        cpb::AttributeValue {
            value: Some(cpb::attribute_value::Value::StringValue(value.into())),
        },
    )])
}

/// Sets the customer's `plan` attribute to `value` (UpdateCustomer).
pub async fn set_plan(cust: &mut Customers, name: &str, value: &str) {
    let got = cust
        .get_customer(cpb::GetCustomerRequest {
            name: name.to_owned(),
        })
        .await
        .unwrap()
        .into_inner();
    cust.update_customer(cpb::UpdateCustomerRequest {
        customer: Some(cpb::Customer {
            attributes: plan(value),
            ..got
        }),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["attributes".into()],
        }),
        request_id: String::new(),
    })
    .await
    .unwrap();
}

pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap(),
    }
}

pub async fn feature_use(c: &mut Customers, customer: &str, feature: &str, at: DateTime<Utc>) {
    let tp = cpb::Touchpoint {
        customer: customer.into(),
        event_id: uuid::Uuid::new_v4().to_string(),
        r#type: cpb::TouchpointType::FeatureUse as i32,
        occurred_time: Some(ts(at)),
        feature: feature.into(),
        ..Default::default()
    };
    c.record_touchpoints(cpb::RecordTouchpointsRequest {
        touchpoints: vec![tp],
    })
    .await
    .unwrap();
}

pub async fn create_segment(s: &mut Segments, text: &str) -> pb::Segment {
    s.create_segment(pb::CreateSegmentRequest {
        segment: Some(pb::Segment {
            display_name: "test".into(),
            owner: "ada".into(),
            rule_text: text.into(),
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
}

pub async fn wait_ready(s: &mut Segments, name: &str) -> pb::Segment {
    eventually(std::time::Duration::from_secs(30), || {
        let mut s = s.clone();
        let name = name.to_owned();
        async move {
            let seg = s
                .get_segment(pb::GetSegmentRequest { name })
                .await
                .unwrap()
                .into_inner();
            (seg.state != pb::SegmentState::Backfilling as i32).then_some(seg)
        }
    })
    .await
}

pub async fn is_member(s: &mut Segments, segment: &str, customer: &str) -> bool {
    s.is_member(pb::IsMemberRequest {
        segment: segment.into(),
        customer: customer.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .member
}

/// Waits until `customer`'s membership of `segment` is `want`.
pub async fn wait_member(s: &mut Segments, segment: &str, customer: &str, want: bool) {
    eventually(std::time::Duration::from_secs(30), || {
        let mut s = s.clone();
        async move { is_member(&mut s, segment, customer).await == want }
    })
    .await;
}

/// Waits until `segment` has `n` members (facts reach segmentation through
/// the customer stream, a moment after the customer service answers).
pub async fn wait_count(s: &mut Segments, segment: &str, n: i64) -> pb::Segment {
    eventually(std::time::Duration::from_secs(30), || {
        let mut s = s.clone();
        let name = segment.to_owned();
        async move {
            let seg = s
                .get_segment(pb::GetSegmentRequest { name })
                .await
                .unwrap()
                .into_inner();
            (seg.member_count == n && seg.state == pb::SegmentState::Ready as i32).then_some(seg)
        }
    })
    .await
}
