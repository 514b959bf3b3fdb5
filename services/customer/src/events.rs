//! Events the customer service writes to its outbox (served by
//! `clm.common.v1.ChangeStreamService/WatchChanges`), and the handlers of
//! the streams it follows: every peer's erasure receipts
//! ([`ReceiptHandler`]) and loyalty's tier changes ([`LoyalTier`]: a member
//! reaching its program's loyalty tier moves into LOYALTY). Scoring's
//! (threshold → stage move) handlers plug in here when needed.

use crate::store::erasure::{self, ErasureRequestId, Receipt};
use clm_platform::Error;
use clm_platform::changes::{Apply, Handlers, OnBatch};
use clm_platform::outbox::NewEvent;
use clm_proto::common::{ChangeEvent, CustomerDataErased};
use clm_proto::customer as pb;
use std::sync::Arc;

/// Records the erasure receipts (`clm.common.v1.CustomerDataErased`) on
/// one peer's change stream on their erasure requests, a batch of them in
/// a few set-based statements in the subscriber's transaction, and
/// completes the requests whose expected receipts are then all in.
///
/// The receipt is recorded for the service whose stream it came on: a
/// payload naming another service is logged and recorded for the stream's
/// service. A receipt for an unknown request (made by another
/// installation, or never made) is logged and skipped, not retried: it can
/// never succeed, so it must not park the stream as a dead letter.
#[derive(Debug, Clone)]
pub struct ReceiptHandler {
    /// The peer whose stream this handler reads.
    pub peer: &'static str,
}

/// The handlers of `peer`'s change stream. A peer's stream is followed
/// once (one cursor per source): handlers of its other events (scoring's
/// thresholds, loyalty's tiers) are added here, not in a second `follow`.
pub fn peer_handlers(peer: &'static str) -> Handlers {
    let handlers =
        Handlers::new().on_batch::<CustomerDataErased, _>(Arc::new(ReceiptHandler { peer }));
    match peer {
        "loyalty" => handlers.on::<clm_proto::loyalty::TierChanged, _>(Arc::new(LoyalTier)),
        _ => handlers,
    }
}

/// Moves a member who reached its program's loyalty tier
/// (`TierChanged.loyal`) into the LOYALTY stage, as `system:loyalty`, in
/// the subscriber's transaction. A customer already in LOYALTY, churned
/// (which only reactivation leaves), unknown or erased is left as it is.
#[derive(Debug, Clone, Copy)]
pub struct LoyalTier;

#[async_trait::async_trait]
impl clm_platform::changes::On<clm_proto::loyalty::TierChanged> for LoyalTier {
    async fn on(
        &self,
        cx: &mut Apply,
        _event: &ChangeEvent,
        m: clm_proto::loyalty::TierChanged,
    ) -> Result<(), Error> {
        use crate::store::customers;
        use crate::store::stages::{self, StageChangeRecord};
        use clm_domain::lifecycle::{Stage, Transition};
        if !m.loyal {
            return Ok(());
        }
        let Ok(id) = clm_domain::ids::CustomerId::parse_name("customer", &m.customer) else {
            return Ok(());
        };
        let now = clm_domain::clock::micros(cx.now());
        let txn = cx.txn();
        let mut rec = match customers::get(txn, id).await {
            Ok(rec) => rec,
            Err(Error::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let reason = format!("reached loyalty tier {} of {}", m.new_tier, m.program);
        let Ok(t) = Transition::new(rec.stage, Stage::Loyalty, reason, "system:loyalty".into())
        else {
            tracing::debug!(customer = %m.customer, "loyalty tier reached; stage not moved");
            return Ok(());
        };
        let expected = rec.version;
        rec.stage = t.to;
        rec.stage_change_time = now;
        rec.update_time = now;
        rec.version += 1;
        if !customers::update(txn, &rec, expected, false).await? {
            return Err(Error::Aborted(
                "the customer changed meanwhile; retry".into(),
            ));
        }
        let change = StageChangeRecord {
            id: 0,
            customer: id,
            from: Some(t.from),
            to: t.to,
            reason: t.reason,
            actor: t.actor,
            change_time: now,
        };
        stages::insert_many(txn, std::slice::from_ref(&change)).await?;
        let change = crate::convert::stage_change_to_proto(&change, now);
        cx.emit(stage_changed(&id.name(), change));
        Ok(())
    }
}

#[async_trait::async_trait]
impl OnBatch<CustomerDataErased> for ReceiptHandler {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, CustomerDataErased)>,
    ) -> Result<(), Error> {
        let now = clm_domain::clock::micros(cx.now());
        let mut receipts = Vec::with_capacity(messages.len());
        for (event, m) in messages {
            let Ok(erasure) = ErasureRequestId::parse_name("erasure_request", &m.erasure_request)
            else {
                tracing::warn!(
                    peer = self.peer,
                    sequence = event.sequence,
                    "erasure receipt without a valid erasure_request; skipped"
                );
                continue;
            };
            if !m.service.is_empty() && m.service != self.peer {
                tracing::warn!(
                    peer = self.peer,
                    named = %clm_domain::validation::echo(&m.service),
                    erasure_request = %m.erasure_request,
                    "erasure receipt names another service; recorded for the stream's service"
                );
            }
            receipts.push(Receipt {
                erasure,
                service: self.peer.to_owned(),
                erase_time: m
                    .erase_time
                    .and_then(|t| clm_platform::convert::from_timestamp("erase_time", &t).ok())
                    .map_or(now, clm_domain::clock::micros),
            });
        }
        for r in erasure::record_receipts(cx.txn(), &receipts, now).await? {
            tracing::info!(
                peer = self.peer,
                erasure_request = %r.erasure.name(),
                "erasure receipt for an unknown request; skipped"
            );
        }
        Ok(())
    }
}

/// `clm.customer.v1.CustomerCreated`.
pub fn customer_created(c: &pb::Customer) -> NewEvent {
    NewEvent::new(
        c.name.clone(),
        &pb::CustomerCreated {
            customer: Some(c.clone()),
        },
    )
}

/// `clm.customer.v1.CustomerUpdated`.
pub fn customer_updated(c: &pb::Customer, changed_fields: Vec<String>) -> NewEvent {
    NewEvent::new(
        c.name.clone(),
        &pb::CustomerUpdated {
            customer: Some(c.clone()),
            changed_fields,
        },
    )
}

/// `clm.customer.v1.TouchpointRecorded`.
pub fn touchpoint_recorded(t: pb::Touchpoint) -> NewEvent {
    NewEvent::new(
        t.customer.clone(),
        &pb::TouchpointRecorded {
            touchpoint: Some(t),
        },
    )
}

/// `clm.customer.v1.StageChanged`.
pub fn stage_changed(customer: &str, change: pb::StageChange) -> NewEvent {
    NewEvent::new(
        customer.to_owned(),
        &pb::StageChanged {
            customer: customer.to_owned(),
            change: Some(change),
        },
    )
}

/// `clm.customer.v1.ConsentChanged`.
pub fn consent_changed(customer: &str, changes: Vec<pb::ConsentChange>) -> NewEvent {
    NewEvent::new(
        customer.to_owned(),
        &pb::ConsentChanged {
            customer: customer.to_owned(),
            changes,
        },
    )
}

/// `clm.customer.v1.CustomerIdentifierAdded`.
pub fn identifier_added(customer: &str, identifier: pb::CustomerIdentifier) -> NewEvent {
    NewEvent::new(
        customer.to_owned(),
        &pb::CustomerIdentifierAdded {
            customer: customer.to_owned(),
            identifier: Some(identifier),
        },
    )
}

/// `clm.customer.v1.CustomerIdentifierRemoved`.
pub fn identifier_removed(customer: &str, identifier: pb::CustomerIdentifier) -> NewEvent {
    NewEvent::new(
        customer.to_owned(),
        &pb::CustomerIdentifierRemoved {
            customer: customer.to_owned(),
            identifier: Some(identifier),
        },
    )
}

/// `clm.customer.v1.CustomersMerged`.
pub fn customers_merged(survivor: &pb::Customer, merged: Vec<String>) -> NewEvent {
    NewEvent::new(
        survivor.name.clone(),
        &pb::CustomersMerged {
            survivor: survivor.name.clone(),
            merged,
            customer: Some(survivor.clone()),
        },
    )
}

/// `clm.customer.v1.CustomerErased`.
pub fn customer_erased(
    customer: &str,
    erasure_request: &str,
    merged_from: Vec<String>,
) -> NewEvent {
    NewEvent::new(
        customer.to_owned(),
        &pb::CustomerErased {
            customer: customer.to_owned(),
            erasure_request: erasure_request.to_owned(),
            merged_from,
        },
    )
}

/// Event types whose payload [`scrubbed`] rewrites (any other event of an
/// erased customer keeps an empty payload).
pub const SCRUBBED_TYPES: &[&str] = &[
    "clm.customer.v1.CustomerCreated",
    "clm.customer.v1.CustomerUpdated",
    "clm.customer.v1.TouchpointRecorded",
    "clm.customer.v1.StageChanged",
    "clm.customer.v1.ConsentChanged",
    "clm.customer.v1.CustomerIdentifierAdded",
    "clm.customer.v1.CustomerIdentifierRemoved",
    "clm.customer.v1.CustomersMerged",
];

/// The payload an event of `event_type` about `subject` (an erased
/// customer's name) keeps: the same message type, naming only the customer.
pub fn scrubbed(event_type: &str, subject: &str) -> Vec<u8> {
    use prost::Message;
    let s = subject.to_owned();
    let named = pb::Customer {
        name: s.clone(),
        ..Default::default()
    };
    match event_type.rsplit('.').next().unwrap_or_default() {
        "CustomerCreated" => pb::CustomerCreated {
            customer: Some(named),
        }
        .encode_to_vec(),
        "CustomerUpdated" => pb::CustomerUpdated {
            customer: Some(named),
            changed_fields: vec![],
        }
        .encode_to_vec(),
        "TouchpointRecorded" => pb::TouchpointRecorded {
            touchpoint: Some(pb::Touchpoint {
                customer: s,
                ..Default::default()
            }),
        }
        .encode_to_vec(),
        "StageChanged" => pb::StageChanged {
            customer: s,
            change: None,
        }
        .encode_to_vec(),
        "ConsentChanged" => pb::ConsentChanged {
            customer: s,
            changes: vec![],
        }
        .encode_to_vec(),
        "CustomerIdentifierAdded" => pb::CustomerIdentifierAdded {
            customer: s,
            identifier: None,
        }
        .encode_to_vec(),
        "CustomerIdentifierRemoved" => pb::CustomerIdentifierRemoved {
            customer: s,
            identifier: None,
        }
        .encode_to_vec(),
        "CustomersMerged" => pb::CustomersMerged {
            survivor: s,
            merged: vec![],
            customer: None,
        }
        .encode_to_vec(),
        _ => Vec::new(),
    }
}
