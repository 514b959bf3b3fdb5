//! Campaign rpcs: CreateCampaign, GetCampaign, ListCampaigns,
//! UpdateCampaign, AddCampaignSpend, and the check that campaign touches
//! and acquisition campaigns name a stored campaign. `api.rs` delegates
//! here after authorizing.

use crate::store::campaigns::{self, CHANNELS, CampaignRecord, SpendRecord};
use chrono::{DateTime, Utc};
use clm_domain::ids::CampaignId;
use clm_domain::money::Money;
use clm_domain::validation::{optional_text, page_size, request_id, required_text};
use clm_domain::{Violation, Violations};
use clm_platform::convert::{etag, from_timestamp, required_timestamp, timestamp};
use clm_platform::db::to_micros;
use clm_platform::idempotency;
use clm_platform::page::Pager;
use clm_platform::{Error, Result, Runtime};
use clm_proto::common as cpb;
use clm_proto::customer as pb;

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 1000;

fn now(rt: &Runtime) -> DateTime<Utc> {
    clm_domain::clock::micros(rt.clock.now())
}

/// A `CampaignChannel` number of a campaign (UNSPECIFIED refused).
pub fn channel(field: &str, v: i32) -> Result<i16, Violation> {
    match i16::try_from(v) {
        Ok(c) if CHANNELS.contains(&c) => Ok(c),
        _ if v == 0 => Err(Violation::new(field, "is required")),
        _ => Err(Violation::new(
            field,
            format!("{v} is not a campaign channel"),
        )),
    }
}

/// A channel filter: UNSPECIFIED = any.
pub fn channel_filter(field: &str, v: i32) -> Result<Option<i16>, Violation> {
    if v == 0 {
        Ok(None)
    } else {
        channel(field, v).map(Some)
    }
}

/// Stored campaign → proto.
pub fn to_proto(r: &CampaignRecord) -> pb::Campaign {
    pb::Campaign {
        name: r.id.name(),
        display_name: r.display_name.clone(),
        channel: i32::from(r.channel),
        start_time: Some(timestamp(r.start_time)),
        end_time: r.end_time.map(timestamp),
        currency_code: r.currency.clone(),
        total_spend: Some(cpb::Money {
            currency_code: r.currency.clone(),
            amount_minor: r.total_spend_minor,
        }),
        create_time: Some(timestamp(r.create_time)),
        update_time: Some(timestamp(r.update_time)),
        etag: etag(r.version),
    }
}

fn check_period(
    v: &mut Violations,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    prefix: &str,
) {
    if let (Some(s), Some(e)) = (start, end)
        && e <= s
    {
        v.push(Violation::new(
            format!("{prefix}end_time"),
            "must be after start_time",
        ));
    }
}

/// CreateCampaign.
pub async fn create(rt: &Runtime, req: pb::CreateCampaignRequest) -> Result<pb::Campaign> {
    let now = now(rt);
    let rid = request_id("request_id", &req.request_id)?;
    let c = req
        .campaign
        .as_ref()
        .ok_or_else(|| Error::invalid("campaign", "is required"))?;
    let mut v = Violations::new();
    let display_name = v.check(
        "",
        required_text("campaign.display_name", &c.display_name, 200),
    );
    let ch = v.check("", channel("campaign.channel", c.channel));
    let start = v.check(
        "",
        required_timestamp("campaign.start_time", c.start_time.as_ref()),
    );
    let end = c
        .end_time
        .as_ref()
        .and_then(|t| v.check("", from_timestamp("campaign.end_time", t)));
    check_period(&mut v, start, end, "campaign.");
    let currency = if c.currency_code.is_empty() {
        v.push(Violation::new("campaign.currency_code", "is required"));
        None
    } else {
        v.check("", Money::new("campaign", &c.currency_code, 0, true))
            .map(|m| m.currency)
    };
    v.into_result()?;
    let (Some(display_name), Some(ch), Some(start), Some(currency)) =
        (display_name, ch, start, currency)
    else {
        return Err(Error::internal("validated fields missing"));
    };
    let rec = CampaignRecord {
        id: CampaignId::new(),
        display_name,
        channel: ch,
        start_time: start,
        end_time: end,
        currency,
        total_spend_minor: 0,
        create_time: now,
        update_time: now,
        version: 1,
    };
    idempotency::write(rt, "CreateCampaign", rid, &req, now, async move |txn| {
        campaigns::insert(txn, &rec).await?;
        Ok((to_proto(&rec), Vec::new()))
    })
    .await
}

/// GetCampaign.
pub async fn get(rt: &Runtime, req: pb::GetCampaignRequest) -> Result<pb::Campaign> {
    let id = CampaignId::parse_name("name", &req.name)?;
    Ok(to_proto(&campaigns::get(&rt.read, id).await?))
}

/// ListCampaigns.
pub async fn list(
    rt: &Runtime,
    req: pb::ListCampaignsRequest,
) -> Result<pb::ListCampaignsResponse> {
    let mut v = Violations::new();
    let size = v.check(
        "",
        page_size("page_size", req.page_size, DEFAULT_PAGE, MAX_PAGE),
    );
    let ch = v
        .check("", channel_filter("channel", req.channel))
        .flatten();
    let start = req
        .start_time
        .as_ref()
        .and_then(|t| v.check("", from_timestamp("start_time", t)));
    let end = req
        .end_time
        .as_ref()
        .and_then(|t| v.check("", from_timestamp("end_time", t)));
    check_period(&mut v, start, end, "");
    let period = match (start, end) {
        (Some(s), Some(e)) => Some((to_micros(s), to_micros(e))),
        (None, None) => None,
        (Some(_), None) => {
            v.push(Violation::new("end_time", "is required with start_time"));
            None
        }
        (None, Some(_)) => {
            v.push(Violation::new("start_time", "is required with end_time"));
            None
        }
    };
    v.into_result()?;
    let size = size.unwrap_or(DEFAULT_PAGE) as usize;
    let key = format!("{}|{:?}", req.channel, period);
    let pager = Pager::new(&[&key]);
    let after = pager.after::<i64>(&req.page_token)?;
    let rows = campaigns::list(&rt.read, ch, period, after, size as u64 + 1).await?;
    let (campaigns, next_page_token) = pager.page(&rows, size, to_proto, |r| {
        (to_micros(r.start_time), r.id.to_string())
    });
    Ok(pb::ListCampaignsResponse {
        campaigns,
        next_page_token,
    })
}

/// UpdateCampaign.
pub async fn update(rt: &Runtime, req: pb::UpdateCampaignRequest) -> Result<pb::Campaign> {
    let now = now(rt);
    let rid = request_id("request_id", &req.request_id)?;
    let c = req
        .campaign
        .as_ref()
        .ok_or_else(|| Error::invalid("campaign", "is required"))?;
    let id = CampaignId::parse_name("campaign.name", &c.name)?;
    let paths: Vec<String> = req
        .update_mask
        .as_ref()
        .map(|m| m.paths.clone())
        .unwrap_or_default();
    if paths.is_empty() {
        return Err(Error::invalid(
            "update_mask",
            "is required: name the fields to change",
        ));
    }
    let mut v = Violations::new();
    for p in &paths {
        if !["display_name", "channel", "start_time", "end_time"].contains(&p.as_str()) {
            v.push(Violation::new(
                "update_mask",
                format!(
                    "{} cannot be changed (display_name, channel, start_time, end_time can)",
                    clm_domain::validation::echo(p)
                ),
            ));
        }
    }
    v.into_result()?;
    idempotency::write(rt, "UpdateCampaign", rid, &req, now, async move |txn| {
        let mut rec = campaigns::get(txn, id).await?;
        clm_platform::convert::check_etag(&c.etag, rec.version)?;
        let mut v = Violations::new();
        for p in &paths {
            match p.as_str() {
                "display_name" => {
                    if let Some(x) = v.check(
                        "",
                        required_text("campaign.display_name", &c.display_name, 200),
                    ) {
                        rec.display_name = x;
                    }
                }
                "channel" => {
                    if let Some(x) = v.check("", channel("campaign.channel", c.channel)) {
                        rec.channel = x;
                    }
                }
                "start_time" => {
                    if let Some(x) = v.check(
                        "",
                        required_timestamp("campaign.start_time", c.start_time.as_ref()),
                    ) {
                        rec.start_time = x;
                    }
                }
                _ => {
                    rec.end_time = c
                        .end_time
                        .as_ref()
                        .and_then(|t| v.check("", from_timestamp("campaign.end_time", t)));
                }
            }
        }
        check_period(&mut v, Some(rec.start_time), rec.end_time, "campaign.");
        v.into_result()?;
        let expected = rec.version;
        rec.version += 1;
        rec.update_time = now;
        if !campaigns::update(txn, &rec, expected).await? {
            return Err(Error::Aborted(
                "the campaign was changed concurrently; re-read and retry".into(),
            ));
        }
        Ok((to_proto(&rec), Vec::new()))
    })
    .await
}

/// AddCampaignSpend.
pub async fn add_spend(
    rt: &Runtime,
    req: pb::AddCampaignSpendRequest,
) -> Result<pb::AddCampaignSpendResponse> {
    let now = now(rt);
    let mut v = Violations::new();
    let rid = v
        .check("", request_id("request_id", &req.request_id))
        .flatten();
    if rid.is_none() && req.request_id.is_empty() {
        v.push(Violation::new(
            "request_id",
            "is required: a retry must never book twice",
        ));
    }
    let id = v.check("", CampaignId::parse_name("campaign", &req.campaign));
    let amount = match req.amount.as_ref() {
        None => {
            v.push(Violation::new("amount", "is required"));
            None
        }
        Some(m) => v.check(
            "",
            Money::new("amount", &m.currency_code, m.amount_minor, true),
        ),
    };
    let book = v.check("", required_timestamp("book_time", req.book_time.as_ref()));
    let description = v
        .check("", optional_text("description", &req.description, 500))
        .flatten()
        .unwrap_or_default();
    v.into_result()?;
    let (Some(id), Some(amount), Some(book)) = (id, amount, book) else {
        return Err(Error::internal("validated fields missing"));
    };
    idempotency::write(rt, "AddCampaignSpend", rid, &req, now, async move |txn| {
        let rec = campaigns::get(txn, id).await?;
        if amount.currency != rec.currency {
            return Err(Error::invalid(
                "amount.currency_code",
                format!(
                    "{} mixes currencies: the campaign books spend in {}",
                    amount.currency, rec.currency
                ),
            ));
        }
        let s = SpendRecord {
            campaign: id,
            amount_minor: amount.amount_minor,
            currency: amount.currency.clone(),
            book_time: book,
            description,
            create_time: now,
        };
        campaigns::add_spend(txn, &s).await?;
        let after = campaigns::get(txn, id).await?;
        let out = pb::AddCampaignSpendResponse {
            campaign: Some(to_proto(&after)),
            spend: Some(pb::CampaignSpend {
                campaign: id.name(),
                amount: Some(cpb::Money {
                    currency_code: s.currency.clone(),
                    amount_minor: s.amount_minor,
                }),
                book_time: Some(timestamp(s.book_time)),
                description: s.description.clone(),
                create_time: Some(timestamp(now)),
            }),
        };
        Ok((out, Vec::new()))
    })
    .await
}

/// INVALID_ARGUMENT naming each `(field, campaign name)` whose campaign
/// does not exist (one query for all of them). Campaigns are never
/// deleted, so a check before the write transaction stays true.
pub async fn check_exist(rt: &Runtime, refs: &[(String, String)]) -> Result<()> {
    if refs.is_empty() {
        return Ok(());
    }
    let mut v = Violations::new();
    let mut names: Vec<String> = Vec::new();
    for (field, name) in refs {
        match CampaignId::parse_name(field, name) {
            Ok(id) => names.push(id.name()),
            Err(e) => v.push(e),
        }
    }
    v.into_result()?;
    names.sort_unstable();
    names.dedup();
    let found = campaigns::existing_names(&rt.read, &names).await?;
    let mut v = Violations::new();
    for (field, name) in refs {
        let canonical = CampaignId::parse_name(field, name).map(|id| id.name());
        if let Ok(c) = canonical
            && !found.contains(&c)
        {
            v.push(Violation::new(
                field.clone(),
                format!("names no campaign: {c} does not exist"),
            ));
        }
    }
    v.into_result().map_err(Error::from)
}
