//! Proto ↔ domain for loyalty: resource names, program and reward
//! validation (each violation names its proto field path), and the stored
//! rows as API messages.

use crate::store::entity::{members, redemptions, rewards, transactions};
use clm_domain::loyalty::NEVER;
use clm_domain::{Violation, Violations};
use clm_platform::convert::timestamp;
use clm_platform::db::from_micros;
use clm_platform::{Error, Result};
use clm_proto::loyalty as pb;

/// Longest display name, reason or campaign.
pub const MAX_TEXT: usize = 200;
/// Most earning rules, tiers, benefits or budgets of a program.
pub const MAX_ITEMS: usize = 100;

/// Whether `id` is 1-63 of a-z, 0-9, `-` and `_`, starting with a letter.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id.starts_with(|c: char| c.is_ascii_lowercase())
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn id_of<'a>(field: &str, name: &'a str, prefix: &str) -> Result<&'a str> {
    name.strip_prefix(prefix)
        .filter(|id| valid_id(id))
        .ok_or_else(|| Error::invalid(field, format!("must be {prefix}{{id}}")))
}

/// `programs/{id}` → id.
pub fn program_id(field: &str, name: &str) -> Result<String> {
    Ok(id_of(field, name, "programs/")?.to_owned())
}

/// `customers/{id}`, checked.
pub fn customer(field: &str, name: &str) -> Result<String> {
    clm_domain::ids::CustomerId::parse_name(field, name)?;
    Ok(name.to_owned())
}

/// `programs/{p}/members/{customer_id}` → (program, `customers/{id}`).
pub fn member_name(field: &str, name: &str) -> Result<(String, String)> {
    let bad = || Error::invalid(field, "must be programs/{program_id}/members/{customer_id}");
    let rest = name.strip_prefix("programs/").ok_or_else(bad)?;
    let (p, c) = rest.split_once("/members/").ok_or_else(bad)?;
    if !valid_id(p) {
        return Err(bad());
    }
    let customer = customer(field, &format!("customers/{c}")).map_err(|_| bad())?;
    Ok((p.to_owned(), customer))
}

/// The member's name.
pub fn member_of(program: &str, customer: &str) -> String {
    format!(
        "programs/{program}/members/{}",
        customer.strip_prefix("customers/").unwrap_or(customer)
    )
}

/// `programs/{p}/rewards/{r}` → (program, reward).
pub fn reward_name(field: &str, name: &str) -> Result<(String, String)> {
    let bad = || Error::invalid(field, "must be programs/{program_id}/rewards/{reward_id}");
    let rest = name.strip_prefix("programs/").ok_or_else(bad)?;
    let (p, r) = rest.split_once("/rewards/").ok_or_else(bad)?;
    if !valid_id(p) || !valid_id(r) {
        return Err(bad());
    }
    Ok((p.to_owned(), r.to_owned()))
}

/// `programs/{p}/redemptions/{id}` → (program, id).
pub fn redemption_name(field: &str, name: &str) -> Result<(String, String)> {
    let bad = || {
        Error::invalid(
            field,
            "must be programs/{program_id}/redemptions/{redemption_id}",
        )
    };
    let rest = name.strip_prefix("programs/").ok_or_else(bad)?;
    let (p, r) = rest.split_once("/redemptions/").ok_or_else(bad)?;
    if !valid_id(p)
        || r.is_empty()
        || r.len() > 64
        || !r.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(bad());
    }
    Ok((p.to_owned(), r.to_owned()))
}

/// A code as given (bounded, printable).
pub fn code(field: &str, code: &str) -> Result<String> {
    if code.is_empty()
        || code.len() > 64
        || !code.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(Error::invalid(field, "must be 1-64 letters, digits and -"));
    }
    Ok(code.to_owned())
}

fn duration_us(field: &str, d: Option<&prost_types::Duration>, v: &mut Violations) -> i64 {
    match d {
        None => 0,
        Some(d) => match clm_platform::convert::duration_millis(field, d) {
            Ok(ms) if ms >= 0 => ms.saturating_mul(1000),
            Ok(_) => {
                v.push(Violation::new(field, "must not be negative"));
                0
            }
            Err(e) => {
                v.push(e);
                0
            }
        },
    }
}

/// Checks a program (`field` prefixes every path).
pub fn check_program(field: &str, p: &pb::Program) -> Result<()> {
    let mut v = Violations::new();
    let f = |s: &str| format!("{field}.{s}");
    if p.display_name.len() > MAX_TEXT {
        v.push(Violation::new(f("display_name"), "is too long"));
    }
    if p.points_currency.len() > MAX_TEXT {
        v.push(Violation::new(f("points_currency"), "is too long"));
    }
    if p.earning_rules.len() > MAX_ITEMS {
        v.push(Violation::new(f("earning_rules"), "has too many rules"));
    }
    let mut ids = std::collections::HashSet::new();
    for (i, r) in p.earning_rules.iter().take(MAX_ITEMS).enumerate() {
        let rf = |s: &str| format!("{field}.earning_rules[{i}].{s}");
        if !valid_id(&r.id) {
            v.push(Violation::new(
                rf("id"),
                "must be 1-63 of a-z, 0-9, - and _, starting with a letter",
            ));
        } else if !ids.insert(r.id.clone()) {
            v.push(Violation::new(rf("id"), "is used by another rule"));
        }
        match pb::EarningTrigger::try_from(r.trigger) {
            Ok(pb::EarningTrigger::Purchase) => {
                if !clm_domain::money::is_iso_4217(&r.currency_code) {
                    v.push(Violation::new(
                        rf("currency_code"),
                        "must be an ISO 4217 code",
                    ));
                }
                if r.points_per_unit <= 0 {
                    v.push(Violation::new(rf("points_per_unit"), "must be positive"));
                }
                if r.unit_minor <= 0 {
                    v.push(Violation::new(rf("unit_minor"), "must be positive"));
                }
            }
            Ok(pb::EarningTrigger::Touchpoint) => {
                if r.touchpoint_type <= 0
                    || clm_proto::customer::TouchpointType::try_from(r.touchpoint_type).is_err()
                {
                    v.push(Violation::new(rf("touchpoint_type"), "is required"));
                }
                if r.points <= 0 {
                    v.push(Violation::new(rf("points"), "must be positive"));
                }
            }
            Ok(pb::EarningTrigger::Unspecified) | Err(_) => {
                v.push(Violation::new(rf("trigger"), "is required"));
            }
            Ok(_) => {
                if r.points <= 0 {
                    v.push(Violation::new(rf("points"), "must be positive"));
                }
            }
        }
        if r.daily_cap < 0 {
            v.push(Violation::new(rf("daily_cap"), "must not be negative"));
        }
        if r.period_cap < 0 {
            v.push(Violation::new(rf("period_cap"), "must not be negative"));
        }
        let period = duration_us(&rf("cap_period"), r.cap_period.as_ref(), &mut v);
        if r.period_cap > 0 && period <= 0 {
            v.push(Violation::new(
                rf("cap_period"),
                "is required with period_cap",
            ));
        }
    }
    duration_us(&f("pending_period"), p.pending_period.as_ref(), &mut v);
    duration_us(&f("tier_window"), p.tier_window.as_ref(), &mut v);
    duration_us(&f("downgrade_grace"), p.downgrade_grace.as_ref(), &mut v);
    duration_us(&f("coupon_validity"), p.coupon_validity.as_ref(), &mut v);
    if let Some(e) = &p.expiry {
        match &e.policy {
            Some(pb::expiry_policy::Policy::MonthsAfterEarning(m)) if *m <= 0 || *m > 1200 => {
                v.push(Violation::new(
                    f("expiry.months_after_earning"),
                    "must be 1..1200",
                ));
            }
            Some(pb::expiry_policy::Policy::FixedTime(t)) => {
                if let Err(e) = clm_platform::convert::from_timestamp(&f("expiry.fixed_time"), t) {
                    v.push(e);
                }
            }
            _ => {}
        }
    }
    if p.tiers.len() > MAX_ITEMS {
        v.push(Violation::new(f("tiers"), "has too many tiers"));
    }
    let mut tids = std::collections::HashSet::new();
    let mut last = i64::MIN;
    for (i, t) in p.tiers.iter().take(MAX_ITEMS).enumerate() {
        let tf = |s: &str| format!("{field}.tiers[{i}].{s}");
        if !valid_id(&t.id) {
            v.push(Violation::new(
                tf("id"),
                "must be 1-63 of a-z, 0-9, - and _, starting with a letter",
            ));
        } else if !tids.insert(t.id.clone()) {
            v.push(Violation::new(tf("id"), "is used by another tier"));
        }
        if t.threshold < 0 {
            v.push(Violation::new(tf("threshold"), "must not be negative"));
        } else if t.threshold <= last {
            v.push(Violation::new(
                tf("threshold"),
                "must be above the previous tier's",
            ));
        }
        last = t.threshold;
        if t.earn_multiplier_percent < 0 || t.earn_multiplier_percent > 10_000 {
            v.push(Violation::new(
                tf("earn_multiplier_percent"),
                "must be 0..10000",
            ));
        }
        if t.display_name.len() > MAX_TEXT {
            v.push(Violation::new(tf("display_name"), "is too long"));
        }
        for (j, b) in t.benefits.iter().take(MAX_ITEMS).enumerate() {
            let bf = |s: &str| format!("{field}.tiers[{i}].benefits[{j}].{s}");
            match pb::BenefitKind::try_from(b.kind) {
                Ok(pb::BenefitKind::Discount) if !(1..=100).contains(&b.discount_percent) => {
                    v.push(Violation::new(bf("discount_percent"), "must be 1..100"));
                }
                Ok(pb::BenefitKind::Unspecified) | Err(_) => {
                    v.push(Violation::new(bf("kind"), "is required"));
                }
                _ => {}
            }
            if b.description.len() > MAX_TEXT {
                v.push(Violation::new(bf("description"), "is too long"));
            }
        }
    }
    if !p.loyalty_tier.is_empty() && !p.tiers.iter().any(|t| t.id == p.loyalty_tier) {
        v.push(Violation::new(
            f("loyalty_tier"),
            "must name one of the tiers",
        ));
    }
    for (i, b) in p.campaign_budgets.iter().take(MAX_ITEMS).enumerate() {
        let bf = |s: &str| format!("{field}.campaign_budgets[{i}].{s}");
        if !valid_id(&b.campaign) {
            v.push(Violation::new(
                bf("campaign"),
                "must be 1-63 of a-z, 0-9, - and _",
            ));
        }
        for (name, m) in [("total", &b.total), ("per_member", &b.per_member)] {
            if let Some(m) = m {
                if !clm_domain::money::is_iso_4217(&m.currency_code) {
                    v.push(Violation::new(
                        bf(&format!("{name}.currency_code")),
                        "must be an ISO 4217 code",
                    ));
                }
                if m.amount_minor < 0 {
                    v.push(Violation::new(
                        bf(&format!("{name}.amount_minor")),
                        "must not be negative",
                    ));
                }
            }
        }
    }
    Ok(v.into_result()?)
}

/// Checks a reward (`field` prefixes every path).
pub fn check_reward(field: &str, r: &pb::Reward) -> Result<()> {
    let mut v = Violations::new();
    let f = |s: &str| format!("{field}.{s}");
    if r.display_name.len() > MAX_TEXT {
        v.push(Violation::new(f("display_name"), "is too long"));
    }
    if r.cost <= 0 {
        v.push(Violation::new(f("cost"), "must be positive"));
    }
    if r.stock.is_some_and(|s| s < 0) {
        v.push(Violation::new(f("stock"), "must not be negative"));
    }
    if !(0..=MAX_STOCK_SLOTS).contains(&r.stock_slots) {
        v.push(Violation::new(
            f("stock_slots"),
            format!("must be 0 (the default, {DEFAULT_STOCK_SLOTS}) to {MAX_STOCK_SLOTS}"),
        ));
    }
    if r.per_member_limit < 0 {
        v.push(Violation::new(
            f("per_member_limit"),
            "must not be negative",
        ));
    }
    for (name, t) in [
        ("valid_from_time", &r.valid_from_time),
        ("valid_until_time", &r.valid_until_time),
    ] {
        if let Some(t) = t
            && let Err(e) = clm_platform::convert::from_timestamp(&f(name), t)
        {
            v.push(e);
        }
    }
    if r.eligible_tiers.len() > MAX_ITEMS {
        v.push(Violation::new(f("eligible_tiers"), "has too many tiers"));
    }
    if !r.eligible_segment.is_empty()
        && (!r.eligible_segment.starts_with("segments/") || r.eligible_segment.len() > 200)
    {
        v.push(Violation::new(
            f("eligible_segment"),
            "must be segments/{segment_id}",
        ));
    }
    if !r.campaign.is_empty() && !valid_id(&r.campaign) {
        v.push(Violation::new(
            f("campaign"),
            "must be 1-63 of a-z, 0-9, - and _",
        ));
    }
    if let Some(m) = &r.value {
        if !clm_domain::money::is_iso_4217(&m.currency_code) {
            v.push(Violation::new(
                f("value.currency_code"),
                "must be an ISO 4217 code",
            ));
        }
        if m.amount_minor < 0 {
            v.push(Violation::new(
                f("value.amount_minor"),
                "must not be negative",
            ));
        }
    }
    duration_us(&f("coupon_validity"), r.coupon_validity.as_ref(), &mut v);
    Ok(v.into_result()?)
}

/// A duration in µs (0 when unset or bad: validated on write).
pub fn us(d: Option<&prost_types::Duration>) -> i64 {
    d.and_then(|d| clm_platform::convert::duration_millis("", d).ok())
        .map_or(0, |ms| ms.max(0).saturating_mul(1000))
}

/// An optional instant as a timestamp (`NEVER` → unset).
pub fn ts(us: i64) -> Option<prost_types::Timestamp> {
    (us != NEVER).then(|| timestamp(from_micros(us)))
}

/// A stored transaction as proto.
pub fn transaction(t: &transactions::Model, draws: Vec<pb::LotDraw>) -> pb::Transaction {
    pb::Transaction {
        name: format!(
            "{}/transactions/{}",
            member_of(&t.program, &t.customer),
            t.id
        ),
        kind: i32::from(t.kind),
        points: t.points,
        rule: t.rule.clone(),
        reason: t.reason.clone(),
        actor: t.actor.clone(),
        request_id: t.request_id.clone(),
        source: t.source.clone(),
        create_time: Some(timestamp(from_micros(t.at_us))),
        draws,
        lot: t.lot,
    }
}

/// The most counter rows a reward's stock may be spread over.
pub const MAX_STOCK_SLOTS: i32 = 256;
/// The counter rows of a reward that names none.
pub const DEFAULT_STOCK_SLOTS: i32 = 16;

/// The slots in effect for a requested `Reward.stock_slots` (0: the default).
pub fn stock_slots(requested: i32) -> i32 {
    if requested <= 0 {
        DEFAULT_STOCK_SLOTS
    } else {
        requested.min(MAX_STOCK_SLOTS)
    }
}

/// A stored reward as proto (with its remaining stock and etag).
pub fn reward(r: &rewards::Model) -> Result<pb::Reward> {
    let mut out =
        <pb::Reward as prost::Message>::decode(r.body.as_slice()).map_err(Error::internal)?;
    out.name = format!("programs/{}/rewards/{}", r.program, r.id);
    out.stock = r.stock;
    out.stock_slots = stock_slots(out.stock_slots);
    out.etag = clm_platform::convert::etag(r.version);
    Ok(out)
}

/// A stored redemption's coupon.
pub fn coupon(r: &redemptions::Model) -> pb::Coupon {
    pb::Coupon {
        code: r.code.clone(),
        redemption: format!("programs/{}/redemptions/{}", r.program, r.id),
        reward: format!("programs/{}/rewards/{}", r.program, r.reward),
        customer: r.customer.clone(),
        state: i32::from(r.coupon_state),
        expire_time: ts(r.coupon_expire_us),
        use_time: r.use_us.map(|u| timestamp(from_micros(u))),
        kind: i32::from(r.code_kind),
    }
}

/// A stored redemption as proto.
pub fn redemption(
    r: &redemptions::Model,
    spend: Option<pb::Transaction>,
    balance: i64,
) -> pb::Redemption {
    pb::Redemption {
        name: format!("programs/{}/redemptions/{}", r.program, r.id),
        member: member_of(&r.program, &r.customer),
        reward: format!("programs/{}/rewards/{}", r.program, r.reward),
        cost: r.cost,
        state: i32::from(r.state),
        coupon: Some(coupon(r)),
        spend,
        create_time: Some(timestamp(from_micros(r.create_us))),
        cancel_time: r.cancel_us.map(|u| timestamp(from_micros(u))),
        balance,
    }
}

/// The member's stored fields as proto (the ledger figures are filled by
/// `ledger::member_view`).
pub fn member_base(m: &members::Model) -> pb::Member {
    pb::Member {
        name: member_of(&m.program, &m.customer),
        customer: m.customer.clone(),
        tier: m.tier.clone(),
        below_tier_time: m.below_us.map(|u| timestamp(from_micros(u))),
        tier_time: Some(timestamp(from_micros(m.tier_us))),
        enroll_time: Some(timestamp(from_micros(m.enroll_us))),
        referral_code: m.referral_code.clone().unwrap_or_default(),
        referred_by: m.referred_by.clone().unwrap_or_default(),
        ..Default::default()
    }
}
