//! Events the customer service writes to its outbox (served by
//! `clm.common.v1.ChangeStreamService/WatchChanges`). It follows no other
//! stream yet; scoring (threshold → stage move) and loyalty (tier → LOYALTY)
//! handlers plug in here when those services exist.

use clm_platform::outbox::NewEvent;
use clm_proto::customer as pb;

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
