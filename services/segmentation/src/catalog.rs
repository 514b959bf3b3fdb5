//! What segment rules may name: the field catalog of the segmentation
//! service, and the consent vocabulary shared by the projection, the
//! evaluator's facts and the SQL compiler.

use clm_domain::consent::{Channel, Purpose};
use clm_domain::rules::FieldCatalog;
use std::collections::BTreeSet;

/// Consent purposes by their rule-language name.
pub const PURPOSES: [(&str, Purpose); 4] = [
    ("marketing", Purpose::Marketing),
    ("profiling", Purpose::Profiling),
    ("surveys", Purpose::Surveys),
    ("personalisation", Purpose::Personalisation),
];

/// Consent channels by their rule-language name.
pub const CHANNELS: [(&str, Channel); 5] = [
    ("email", Channel::Email),
    ("sms", Channel::Sms),
    ("push", Channel::Push),
    ("phone", Channel::Phone),
    ("in_app", Channel::InApp),
];

/// The rule-language name of a purpose.
pub fn purpose_name(p: Purpose) -> &'static str {
    PURPOSES
        .iter()
        .find(|(_, q)| *q == p)
        .map_or("marketing", |(n, _)| n)
}

/// The rule-language name of a channel.
pub fn channel_name(c: Channel) -> &'static str {
    CHANNELS
        .iter()
        .find(|(_, d)| *d == c)
        .map_or("email", |(n, _)| n)
}

/// Whether an unset consent for `purpose` counts as granted (profiling and
/// personalisation are opt-out, the others opt-in).
pub fn granted_by_default(purpose: &str) -> bool {
    PURPOSES
        .iter()
        .any(|(n, p)| *n == purpose && p.granted_by_default())
}

/// The catalog rules are checked against: consents from the customer
/// service's vocabulary, the given segment names, custom attributes typed
/// by their literal (customer attributes are schemaless), any custom
/// touchpoint type.
pub fn catalog(segments: BTreeSet<String>) -> FieldCatalog {
    FieldCatalog {
        infer_unknown_attributes: true,
        consent_purposes: Some(PURPOSES.iter().map(|(n, _)| (*n).to_owned()).collect()),
        consent_channels: Some(CHANNELS.iter().map(|(n, _)| (*n).to_owned()).collect()),
        segments: Some(segments),
        ..FieldCatalog::default()
    }
}
