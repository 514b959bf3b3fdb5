//! Proto ↔ domain conversions. Every error names the request field.

use crate::store::consent::{ConsentChangeRecord, ConsentRecord};
use crate::store::customers::{CustomerRecord, NewCustomer};
use crate::store::identifiers::IdentifierRecord;
use crate::store::stages::StageChangeRecord;
use crate::store::touchpoints::TouchpointRecord;
use chrono::{DateTime, NaiveDate, Utc};
use clm_domain::attributes::{self, AttributeValue, Attributes};
use clm_domain::consent::{
    self, ALL_CHANNELS, ALL_PURPOSES, Channel, ConsentSetting, ConsentSource, ConsentState, Purpose,
};
use clm_domain::contact::{Identifier, IdentifierKind};
use clm_domain::demographics::{self, Demographics, Gender};
use clm_domain::ids::{self, CustomerId};
use clm_domain::lifecycle::Stage;
use clm_domain::money::Money;
use clm_domain::touchpoint::{Touchpoint, TouchpointKind};
use clm_domain::validation::optional_text;
use clm_domain::{Violation, Violations, contact};
use clm_platform::convert::{
    duration_from_millis, duration_millis, from_timestamp, required_timestamp, timestamp,
};
pub use clm_platform::customer_events::{stage, stage_to_proto};
use clm_proto::common as cpb;
use clm_proto::customer as pb;
use std::collections::BTreeMap;

fn field(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_owned()
    } else {
        format!("{prefix}.{name}")
    }
}

fn gender(field: &str, value: i32) -> Result<Option<Gender>, Violation> {
    match pb::Gender::try_from(value) {
        Ok(pb::Gender::Unspecified) => Ok(None),
        Ok(pb::Gender::Female) => Ok(Some(Gender::Female)),
        Ok(pb::Gender::Male) => Ok(Some(Gender::Male)),
        Ok(pb::Gender::NonBinary) => Ok(Some(Gender::NonBinary)),
        Ok(pb::Gender::Other) => Ok(Some(Gender::Other)),
        Ok(pb::Gender::Undisclosed) => Ok(Some(Gender::Undisclosed)),
        Err(_) => Err(Violation::new(field, format!("unknown gender {value}"))),
    }
}

fn gender_to_proto(g: Option<Gender>) -> pb::Gender {
    match g {
        None => pb::Gender::Unspecified,
        Some(Gender::Female) => pb::Gender::Female,
        Some(Gender::Male) => pb::Gender::Male,
        Some(Gender::NonBinary) => pb::Gender::NonBinary,
        Some(Gender::Other) => pb::Gender::Other,
        Some(Gender::Undisclosed) => pb::Gender::Undisclosed,
    }
}

/// Optional money (absent = None).
pub fn money(
    field: &str,
    m: Option<&cpb::Money>,
    non_negative: bool,
) -> Result<Option<Money>, Violation> {
    m.map(|m| Money::new(field, &m.currency_code, m.amount_minor, non_negative))
        .transpose()
}

fn money_to_proto(m: &Money) -> cpb::Money {
    cpb::Money {
        currency_code: m.currency.clone(),
        amount_minor: m.amount_minor,
    }
}

/// Demographics, checked against `today`.
pub fn demographics(
    prefix: &str,
    d: &pb::Demographics,
    today: NaiveDate,
) -> Result<Demographics, Violations> {
    let mut v = Violations::new();
    let birth_date = d.birth_date.as_ref().and_then(|b| {
        v.check(
            "",
            demographics::birth_date(&field(prefix, "birth_date"), b.year, b.month, b.day, today),
        )
    });
    let out = Demographics {
        birth_date,
        gender: v
            .check("", gender(&field(prefix, "gender"), d.gender))
            .flatten(),
        annual_income: v
            .check(
                "",
                money(
                    &field(prefix, "annual_income"),
                    d.annual_income.as_ref(),
                    true,
                ),
            )
            .flatten(),
        occupation: v
            .check(
                "",
                demographics::occupation(&field(prefix, "occupation"), &d.occupation),
            )
            .flatten(),
    };
    v.into_result().map(|()| out)
}

/// One attribute value.
pub fn attribute_value(field: &str, a: &pb::AttributeValue) -> Result<AttributeValue, Violation> {
    use pb::attribute_value::Value;
    let v = match a.value.as_ref() {
        None => {
            return Err(Violation::new(
                field,
                "must set one of string_value, number_value, bool_value, timestamp_value",
            ));
        }
        Some(Value::StringValue(s)) => AttributeValue::String(s.clone()),
        Some(Value::NumberValue(x)) => AttributeValue::Number(*x),
        Some(Value::BoolValue(b)) => AttributeValue::Bool(*b),
        Some(Value::TimestampValue(t)) => AttributeValue::Timestamp(from_timestamp(field, t)?),
    };
    attributes::value(field, v)
}

/// A whole attribute map.
pub fn attribute_map(
    prefix: &str,
    map: &BTreeMap<String, pb::AttributeValue>,
) -> Result<Attributes, Violations> {
    let mut v = Violations::new();
    v.check("", attributes::count(prefix, map.len()));
    let mut out = Attributes::new();
    for (k, a) in map {
        let f = format!("{prefix}[{}]", clm_domain::validation::echo(k));
        if let (Some(k), Some(val)) = (
            v.check("", attributes::key(&f, k)),
            v.check("", attribute_value(&f, a)),
        ) {
            out.insert(k, val);
        }
    }
    v.into_result().map(|()| out)
}

fn attribute_to_proto(a: &AttributeValue) -> pb::AttributeValue {
    use pb::attribute_value::Value;
    pb::AttributeValue {
        value: Some(match a {
            AttributeValue::String(s) => Value::StringValue(s.clone()),
            AttributeValue::Number(x) => Value::NumberValue(*x),
            AttributeValue::Bool(b) => Value::BoolValue(*b),
            AttributeValue::Timestamp(t) => Value::TimestampValue(timestamp(*t)),
        }),
    }
}

/// A customer to create (fields under `prefix`).
pub fn new_customer(
    prefix: &str,
    c: &pb::Customer,
    today: NaiveDate,
) -> Result<NewCustomer, Violations> {
    let mut v = Violations::new();
    let external_id = v
        .check(
            "",
            contact::external_id(&field(prefix, "external_id"), &c.external_id),
        )
        .flatten();
    let email = v
        .check("", contact::email(&field(prefix, "email"), &c.email))
        .flatten();
    let display_name = v
        .check(
            "",
            optional_text(&field(prefix, "display_name"), &c.display_name, 200),
        )
        .flatten();
    let demographics = match demographics(
        &field(prefix, "demographics"),
        &c.demographics.clone().unwrap_or_default(),
        today,
    ) {
        Ok(d) => d,
        Err(e) => {
            v.0.extend(e.0);
            Demographics::default()
        }
    };
    let attributes = match attribute_map(&field(prefix, "attributes"), &c.attributes) {
        Ok(a) => a,
        Err(e) => {
            v.0.extend(e.0);
            Attributes::new()
        }
    };
    let stage = if c.stage == 0 {
        Some(Stage::Approach)
    } else {
        v.check("", stage(&field(prefix, "stage"), c.stage))
    };
    let acquisition_campaign = if c.acquisition_campaign.is_empty() {
        None
    } else {
        v.check(
            "",
            clm_domain::ids::CampaignId::parse_name(
                &field(prefix, "acquisition_campaign"),
                &c.acquisition_campaign,
            ),
        )
        .map(|id| id.name())
    };
    v.into_result()?;
    Ok(NewCustomer {
        display_name: display_name
            .or_else(|| email.clone())
            .or_else(|| external_id.clone())
            .unwrap_or_default(),
        external_id,
        email,
        demographics,
        attributes,
        stage: stage.unwrap_or(Stage::Approach),
        acquisition_campaign,
    })
}

/// Stored customer → proto (age computed on `today`).
pub fn customer_to_proto(r: &CustomerRecord, today: NaiveDate) -> pb::Customer {
    let d = &r.demographics;
    pb::Customer {
        name: r.id.name(),
        external_id: r.external_id.clone().unwrap_or_default(),
        email: r.email.clone().unwrap_or_default(),
        display_name: r.display_name.clone(),
        demographics: Some(pb::Demographics {
            birth_date: d.birth_date.map(|b| {
                use chrono::Datelike;
                cpb::Date {
                    year: b.year(),
                    month: b.month() as i32,
                    day: b.day() as i32,
                }
            }),
            gender: gender_to_proto(d.gender) as i32,
            annual_income: d.annual_income.as_ref().map(money_to_proto),
            occupation: d.occupation.clone().unwrap_or_default(),
            age: d.birth_date.map_or(0, |b| demographics::age_on(b, today)),
        }),
        attributes: r
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), attribute_to_proto(v)))
            .collect(),
        stage: stage_to_proto(r.stage) as i32,
        stage_change_time: Some(timestamp(r.stage_change_time)),
        create_time: Some(timestamp(r.create_time)),
        update_time: Some(timestamp(r.update_time)),
        etag: clm_platform::convert::etag(r.version),
        merged_from: r.merged_from.iter().map(CustomerId::name).collect(),
        reimported_after_erasure: r.reimported_after_erasure,
        acquisition_campaign: r.acquisition_campaign.clone().unwrap_or_default(),
    }
}

pub(crate) fn touchpoint_kind(field: &str, value: i32) -> Result<TouchpointKind, Violation> {
    match pb::TouchpointType::try_from(value) {
        Ok(pb::TouchpointType::UsageTime) => Ok(TouchpointKind::UsageTime),
        Ok(pb::TouchpointType::ProductAccess) => Ok(TouchpointKind::ProductAccess),
        Ok(pb::TouchpointType::FeatureUse) => Ok(TouchpointKind::FeatureUse),
        Ok(pb::TouchpointType::Purchase) => Ok(TouchpointKind::Purchase),
        Ok(pb::TouchpointType::CampaignTouch) => Ok(TouchpointKind::CampaignTouch),
        Ok(pb::TouchpointType::SupportContact) => Ok(TouchpointKind::SupportContact),
        Ok(pb::TouchpointType::Custom) => Ok(TouchpointKind::Custom),
        Ok(pb::TouchpointType::SurveyAnswer) => Err(Violation::new(
            field,
            "SURVEY_ANSWER touchpoints come from the feedback service's responses",
        )),
        Ok(pb::TouchpointType::Unspecified) => Err(Violation::new(field, "is required")),
        Err(_) => Err(Violation::new(
            field,
            format!("unknown touchpoint type {value}"),
        )),
    }
}

fn kind_to_proto(k: TouchpointKind) -> pb::TouchpointType {
    match k {
        TouchpointKind::UsageTime => pb::TouchpointType::UsageTime,
        TouchpointKind::ProductAccess => pb::TouchpointType::ProductAccess,
        TouchpointKind::FeatureUse => pb::TouchpointType::FeatureUse,
        TouchpointKind::Purchase => pb::TouchpointType::Purchase,
        TouchpointKind::CampaignTouch => pb::TouchpointType::CampaignTouch,
        TouchpointKind::SupportContact => pb::TouchpointType::SupportContact,
        TouchpointKind::Custom => pb::TouchpointType::Custom,
        TouchpointKind::SurveyAnswer => pb::TouchpointType::SurveyAnswer,
    }
}

/// A touchpoint to record (fields under `prefix`), checked against `now`.
pub fn touchpoint(
    prefix: &str,
    t: &pb::Touchpoint,
    now: DateTime<Utc>,
) -> Result<(CustomerId, Touchpoint), Violations> {
    let mut v = Violations::new();
    let customer = v.check(
        "",
        CustomerId::parse_name(&field(prefix, "customer"), &t.customer),
    );
    let event_id = v.check("", ids::event_id(&field(prefix, "event_id"), &t.event_id));
    let kind = v.check("", touchpoint_kind(&field(prefix, "type"), t.r#type));
    let occurred = v.check(
        "",
        required_timestamp(&field(prefix, "occurred_time"), t.occurred_time.as_ref()),
    );
    let usage = t
        .usage_duration
        .as_ref()
        .and_then(|d| v.check("", duration_millis(&field(prefix, "usage_duration"), d)));
    let revenue = v
        .check(
            "",
            money(&field(prefix, "revenue"), t.revenue.as_ref(), true),
        )
        .flatten();
    let mut text = |name: &str, value: &str| {
        v.check("", optional_text(&field(prefix, name), value, 200))
            .flatten()
    };
    let custom_type = text("custom_type", &t.custom_type);
    let product = text("product", &t.product);
    let feature = text("feature", &t.feature);
    let campaign = text("campaign", &t.campaign);
    let channel = text("channel", &t.channel);
    let (Some(customer), Some(event_id), Some(kind), Some(occurred_time)) =
        (customer, event_id, kind, occurred)
    else {
        return Err(v);
    };
    let tp = Touchpoint {
        event_id,
        kind,
        custom_type,
        occurred_time,
        usage_millis: usage,
        product,
        feature,
        revenue,
        campaign,
        channel,
        properties: t.properties.clone(),
    };
    if let Err(e) = tp.check(now) {
        // A field already refused (too long, say) was dropped: the kind
        // rules would only add a wrong "is required" for it.
        for x in e.0 {
            let x = x.under(prefix);
            if !v.0.iter().any(|seen| seen.field == x.field) {
                v.push(x);
            }
        }
    }
    v.into_result().map(|()| (customer, tp))
}

/// Stored touchpoint → proto.
pub fn touchpoint_to_proto(r: &TouchpointRecord) -> pb::Touchpoint {
    let t = &r.touchpoint;
    pb::Touchpoint {
        name: format!("{}/touchpoints/{}", r.customer.name(), t.event_id),
        customer: r.customer.name(),
        event_id: t.event_id.clone(),
        r#type: kind_to_proto(t.kind) as i32,
        custom_type: t.custom_type.clone().unwrap_or_default(),
        occurred_time: Some(timestamp(t.occurred_time)),
        record_time: Some(timestamp(r.record_time)),
        usage_duration: t.usage_millis.map(duration_from_millis),
        product: t.product.clone().unwrap_or_default(),
        feature: t.feature.clone().unwrap_or_default(),
        revenue: t.revenue.as_ref().map(money_to_proto),
        campaign: t.campaign.clone().unwrap_or_default(),
        channel: t.channel.clone().unwrap_or_default(),
        properties: t.properties.clone(),
    }
}

/// Stored move → proto, with the time spent in `to` until `until`.
pub fn stage_change_to_proto(c: &StageChangeRecord, until: DateTime<Utc>) -> pb::StageChange {
    pb::StageChange {
        from_stage: c.from.map_or(pb::Stage::Unspecified, stage_to_proto) as i32,
        to_stage: stage_to_proto(c.to) as i32,
        reason: c.reason.clone(),
        actor: c.actor.clone(),
        change_time: Some(timestamp(c.change_time)),
        time_in_stage: Some(duration_from_millis(
            (until - c.change_time).num_milliseconds().max(0),
        )),
    }
}

/// The customer of a consent name: `customers/{id}/consent` or `customers/{id}`.
pub fn consent_owner(field: &str, name: &str) -> Result<CustomerId, Violation> {
    CustomerId::parse_name(field, name.strip_suffix("/consent").unwrap_or(name))
}

/// A proto consent purpose → domain (UNSPECIFIED and unknown numbers refused).
pub fn consent_purpose(field: &str, value: i32) -> Result<Purpose, Violation> {
    match pb::ConsentPurpose::try_from(value) {
        Ok(pb::ConsentPurpose::Marketing) => Ok(Purpose::Marketing),
        Ok(pb::ConsentPurpose::Profiling) => Ok(Purpose::Profiling),
        Ok(pb::ConsentPurpose::Surveys) => Ok(Purpose::Surveys),
        Ok(pb::ConsentPurpose::Personalisation) => Ok(Purpose::Personalisation),
        Ok(pb::ConsentPurpose::Unspecified) => Err(Violation::new(field, "is required")),
        Err(_) => Err(Violation::new(field, format!("unknown purpose {value}"))),
    }
}

fn purpose_to_proto(p: Purpose) -> pb::ConsentPurpose {
    match p {
        Purpose::Marketing => pb::ConsentPurpose::Marketing,
        Purpose::Profiling => pb::ConsentPurpose::Profiling,
        Purpose::Surveys => pb::ConsentPurpose::Surveys,
        Purpose::Personalisation => pb::ConsentPurpose::Personalisation,
    }
}

/// A proto consent channel → domain (UNSPECIFIED and unknown numbers refused).
pub fn consent_channel(field: &str, value: i32) -> Result<Channel, Violation> {
    match pb::ConsentChannel::try_from(value) {
        Ok(pb::ConsentChannel::Email) => Ok(Channel::Email),
        Ok(pb::ConsentChannel::Sms) => Ok(Channel::Sms),
        Ok(pb::ConsentChannel::Push) => Ok(Channel::Push),
        Ok(pb::ConsentChannel::Phone) => Ok(Channel::Phone),
        Ok(pb::ConsentChannel::InApp) => Ok(Channel::InApp),
        Ok(pb::ConsentChannel::Unspecified) => Err(Violation::new(field, "is required")),
        Err(_) => Err(Violation::new(field, format!("unknown channel {value}"))),
    }
}

fn channel_to_proto(c: Channel) -> pb::ConsentChannel {
    match c {
        Channel::Email => pb::ConsentChannel::Email,
        Channel::Sms => pb::ConsentChannel::Sms,
        Channel::Push => pb::ConsentChannel::Push,
        Channel::Phone => pb::ConsentChannel::Phone,
        Channel::InApp => pb::ConsentChannel::InApp,
    }
}

/// A proto consent state → domain (UNSPECIFIED and unknown numbers refused).
pub fn consent_state(field: &str, value: i32) -> Result<ConsentState, Violation> {
    match pb::ConsentState::try_from(value) {
        Ok(pb::ConsentState::Unset) => Ok(ConsentState::Unset),
        Ok(pb::ConsentState::Granted) => Ok(ConsentState::Granted),
        Ok(pb::ConsentState::Denied) => Ok(ConsentState::Denied),
        Ok(pb::ConsentState::Unspecified) => Err(Violation::new(field, "is required")),
        Err(_) => Err(Violation::new(field, format!("unknown state {value}"))),
    }
}

fn consent_state_to_proto(s: ConsentState) -> pb::ConsentState {
    match s {
        ConsentState::Unset => pb::ConsentState::Unset,
        ConsentState::Granted => pb::ConsentState::Granted,
        ConsentState::Denied => pb::ConsentState::Denied,
    }
}

/// A proto consent source → domain (UNSPECIFIED and unknown numbers refused).
pub fn consent_source(field: &str, value: i32) -> Result<ConsentSource, Violation> {
    match pb::ConsentSource::try_from(value) {
        Ok(pb::ConsentSource::Form) => Ok(ConsentSource::Form),
        Ok(pb::ConsentSource::Import) => Ok(ConsentSource::Import),
        Ok(pb::ConsentSource::Api) => Ok(ConsentSource::Api),
        Ok(pb::ConsentSource::Support) => Ok(ConsentSource::Support),
        Ok(pb::ConsentSource::Merge) => Err(Violation::new(
            field,
            "MERGE is output only: set by MergeCustomers",
        )),
        Ok(pb::ConsentSource::Unspecified) => Err(Violation::new(field, "is required")),
        Err(_) => Err(Violation::new(field, format!("unknown source {value}"))),
    }
}

fn consent_source_to_proto(s: ConsentSource) -> pb::ConsentSource {
    match s {
        ConsentSource::Form => pb::ConsentSource::Form,
        ConsentSource::Import => pb::ConsentSource::Import,
        ConsentSource::Api => pb::ConsentSource::Api,
        ConsentSource::Support => pb::ConsentSource::Support,
        ConsentSource::Merge => pb::ConsentSource::Merge,
    }
}

/// The settings of a SetConsent request (each under `field[i]`), distinct
/// per purpose and channel.
pub fn consent_settings(
    field: &str,
    settings: &[pb::ConsentSetting],
) -> Result<Vec<ConsentSetting>, Violations> {
    let max = ALL_PURPOSES.len() * ALL_CHANNELS.len();
    if settings.is_empty() || settings.len() > max {
        return Err(Violation::new(
            field,
            format!("must hold 1..{max} settings, got {}", settings.len()),
        )
        .into());
    }
    let mut v = Violations::new();
    let mut out = Vec::with_capacity(settings.len());
    for (i, s) in settings.iter().enumerate() {
        let p = format!("{field}[{i}]");
        let purpose = v.check("", consent_purpose(&format!("{p}.purpose"), s.purpose));
        let channel = v.check("", consent_channel(&format!("{p}.channel"), s.channel));
        let state = v.check("", consent_state(&format!("{p}.state"), s.state));
        if let (Some(purpose), Some(channel), Some(state)) = (purpose, channel, state) {
            out.push(ConsentSetting {
                purpose,
                channel,
                state,
            });
        }
    }
    v.into_result()?;
    consent::distinct(field, &out)?;
    Ok(out)
}

/// The consent of `customer`: every purpose and channel, from the stated
/// rows (`stated`, any order), with `history` if given.
pub fn consent_to_proto(
    customer: CustomerId,
    stated: &[ConsentRecord],
    history: &[ConsentChangeRecord],
) -> pb::Consent {
    let mut entries = Vec::with_capacity(ALL_PURPOSES.len() * ALL_CHANNELS.len());
    for purpose in ALL_PURPOSES {
        for channel in ALL_CHANNELS {
            let row = stated
                .iter()
                .find(|r| r.purpose == purpose && r.channel == channel);
            let state = row.map_or(ConsentState::Unset, |r| r.state);
            entries.push(pb::ConsentEntry {
                purpose: purpose_to_proto(purpose) as i32,
                channel: channel_to_proto(channel) as i32,
                state: consent_state_to_proto(state) as i32,
                granted: state.is_granted(purpose),
                source: row.map_or(0, |r| consent_source_to_proto(r.source) as i32),
                actor: row.map(|r| r.actor.clone()).unwrap_or_default(),
                update_time: row.map(|r| timestamp(r.update_time)),
            });
        }
    }
    pb::Consent {
        name: format!("{}/consent", customer.name()),
        entries,
        history: history.iter().map(consent_change_to_proto).collect(),
    }
}

/// One consent change → proto.
pub fn consent_change_to_proto(c: &ConsentChangeRecord) -> pb::ConsentChange {
    pb::ConsentChange {
        purpose: purpose_to_proto(c.purpose) as i32,
        channel: channel_to_proto(c.channel) as i32,
        from_state: consent_state_to_proto(c.from) as i32,
        to_state: consent_state_to_proto(c.to) as i32,
        source: consent_source_to_proto(c.source) as i32,
        actor: c.actor.clone(),
        change_time: Some(timestamp(c.change_time)),
    }
}

fn identifier_kind(field: &str, value: i32) -> Result<IdentifierKind, Violation> {
    match pb::IdentifierType::try_from(value) {
        Ok(pb::IdentifierType::Email) => Ok(IdentifierKind::Email),
        Ok(pb::IdentifierType::Phone) => Ok(IdentifierKind::Phone),
        Ok(pb::IdentifierType::ExternalId) => Ok(IdentifierKind::External),
        Ok(pb::IdentifierType::Unspecified) => Err(Violation::new(field, "is required")),
        Err(_) => Err(Violation::new(
            field,
            format!("unknown identifier type {value}"),
        )),
    }
}

fn identifier_kind_to_proto(k: IdentifierKind) -> pb::IdentifierType {
    match k {
        IdentifierKind::Email => pb::IdentifierType::Email,
        IdentifierKind::Phone => pb::IdentifierType::Phone,
        IdentifierKind::External => pb::IdentifierType::ExternalId,
    }
}

/// An identifier to give a customer (fields under `prefix`), normalised;
/// an external id must be `source:id`.
pub fn identifier(
    prefix: &str,
    i: Option<&pb::CustomerIdentifier>,
) -> Result<Identifier, Violation> {
    let i = i.ok_or_else(|| Violation::new(prefix, "is required"))?;
    let kind = identifier_kind(&field(prefix, "type"), i.r#type)?;
    contact::identifier(&field(prefix, "value"), kind, &i.value)
}

/// An identifier to look up (fields under `prefix`), normalised as stored:
/// an external id may also be a profile's `external_id` without a source.
pub fn lookup_identifier(
    prefix: &str,
    i: Option<&pb::CustomerIdentifier>,
) -> Result<Identifier, Violation> {
    let i = i.ok_or_else(|| Violation::new(prefix, "is required"))?;
    let kind = identifier_kind(&field(prefix, "type"), i.r#type)?;
    if kind == IdentifierKind::External {
        let v = optional_text(&field(prefix, "value"), &i.value, 240)?
            .ok_or_else(|| Violation::new(field(prefix, "value"), "is required"))?;
        return Ok(Identifier {
            kind,
            value: contact::external_key(&v),
        });
    }
    contact::identifier(&field(prefix, "value"), kind, &i.value)
}

/// An identifier (without holder details) → proto.
pub fn bare_identifier_to_proto(i: &Identifier) -> pb::CustomerIdentifier {
    pb::CustomerIdentifier {
        r#type: identifier_kind_to_proto(i.kind) as i32,
        value: i.value.clone(),
        profile: false,
        create_time: None,
    }
}

/// A held identifier → proto.
pub fn identifier_to_proto(r: &IdentifierRecord) -> pb::CustomerIdentifier {
    pb::CustomerIdentifier {
        profile: r.profile,
        create_time: Some(timestamp(r.create_time)),
        ..bare_identifier_to_proto(&r.identifier)
    }
}

/// A proto attribute merge policy → domain (UNSPECIFIED = survivor wins).
pub fn merge_policy(field: &str, value: i32) -> Result<attributes::MergePolicy, Violation> {
    match pb::AttributeMergePolicy::try_from(value) {
        Ok(pb::AttributeMergePolicy::Unspecified | pb::AttributeMergePolicy::SurvivorWins) => {
            Ok(attributes::MergePolicy::SurvivorWins)
        }
        Ok(pb::AttributeMergePolicy::NewestWins) => Ok(attributes::MergePolicy::NewestWins),
        Ok(pb::AttributeMergePolicy::KeepNonEmpty) => Ok(attributes::MergePolicy::KeepNonEmpty),
        Err(_) => Err(Violation::new(
            field,
            format!("unknown merge policy {value}"),
        )),
    }
}
