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
