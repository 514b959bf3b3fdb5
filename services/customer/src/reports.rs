//! KPI report rpcs: funnel, acquisition (attribution + CAC), CLV,
//! retention cohorts, journey paths and pain points. Each validates its
//! request into a [`Scope`], runs the set-based SQL of
//! [`store::reports`](crate::store::reports) and turns the aggregated rows
//! into the answer with the formulas of [`clm_domain::kpi`]. `api.rs`
//! delegates here after authorizing.

use crate::convert;
use crate::store::reports::{self as sql, AttributeMatch, Model, Scope};
use clm_domain::ids::CampaignId;
use clm_domain::kpi;
use clm_domain::lifecycle::Stage;
use clm_domain::touchpoint::TouchpointKind;
use clm_domain::{Violation, Violations};
use clm_platform::convert::from_timestamp;
use clm_platform::db::to_micros;
use clm_platform::{Error, Result, Runtime};
use clm_proto::common as cpb;
use clm_proto::customer as pb;
use std::collections::BTreeMap;

const DAY_US: i64 = 86_400_000_000;

/// Checks a report scope (`field` is its request field).
pub fn scope(field: &str, s: Option<&pb::ReportScope>) -> Result<Scope> {
    let s = s.ok_or_else(|| Error::invalid(field, "is required: give the report's period"))?;
    let mut v = Violations::new();
    let f = |name: &str| format!("{field}.{name}");
    let start = match &s.start_time {
        Some(t) => v.check("", from_timestamp(&f("start_time"), t)),
        None => {
            v.push(Violation::new(f("start_time"), "is required"));
            None
        }
    };
    let end = match &s.end_time {
        Some(t) => v.check("", from_timestamp(&f("end_time"), t)),
        None => {
            v.push(Violation::new(f("end_time"), "is required"));
            None
        }
    };
    let period = match (start, end) {
        (Some(a), Some(b)) => v.check("", kpi::period(field, a, b)),
        _ => None,
    };
    let campaign = if s.campaign.is_empty() {
        None
    } else {
        v.check("", CampaignId::parse_name(&f("campaign"), &s.campaign))
            .map(|c| c.name())
    };
    let channel = v
        .check(
            "",
            crate::campaigns::channel_filter(&f("channel"), s.channel),
        )
        .flatten();
    let cohort = if s.cohort_month.is_empty() {
        None
    } else {
        v.check("", kpi::parse_month(&f("cohort_month"), &s.cohort_month))
            .map(|m| (kpi::month_start_us(m), kpi::month_start_us(m + 1)))
    };
    let attribute = match (s.attribute_key.is_empty(), s.attribute_value.is_empty()) {
        (true, true) => None,
        (true, false) => {
            v.push(Violation::new(
                f("attribute_key"),
                "is required with attribute_value",
            ));
            None
        }
        (false, true) => {
            v.push(Violation::new(
                f("attribute_value"),
                "is required with attribute_key",
            ));
            None
        }
        (false, false) => {
            let key = v.check(
                "",
                clm_domain::attributes::key(&f("attribute_key"), &s.attribute_key),
            );
            key.map(|key| AttributeMatch {
                key,
                text: s.attribute_value.clone(),
                number: s
                    .attribute_value
                    .parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite()),
                boolean: match s.attribute_value.as_str() {
                    "true" => Some(true),
                    "false" => Some(false),
                    _ => None,
                },
            })
        }
    };
    v.into_result()?;
    let (start, end) = period.ok_or_else(|| Error::internal("validated period missing"))?;
    Ok(Scope {
        start_us: to_micros(start),
        end_us: to_micros(end),
        campaign,
        channel,
        cohort,
        attribute,
    })
}

/// INVALID_ARGUMENT on `{field}.campaign` if the scope names a campaign
/// that does not exist.
async fn check_campaign(rt: &Runtime, field: &str, s: &Scope) -> Result<()> {
    if let Some(c) = &s.campaign {
        crate::campaigns::check_exist(rt, &[(format!("{field}.campaign"), c.clone())]).await?;
    }
    Ok(())
}

fn duration(us: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: us.div_euclid(1_000_000),
        nanos: (us.rem_euclid(1_000_000) * 1000) as i32,
    }
}

fn money(currency: &str, amount_minor: i64) -> cpb::Money {
    cpb::Money {
        currency_code: currency.to_owned(),
        amount_minor,
    }
}

/// GetFunnelReport.
pub async fn funnel(rt: &Runtime, req: pb::GetFunnelReportRequest) -> Result<pb::FunnelReport> {
    let scope = scope("scope", req.scope.as_ref())?;
    check_campaign(rt, "scope", &scope).await?;
    let freshness = crate::projection::freshness(rt, req.min_position).await?;
    // The moves and the stays' percentiles read the period's history
    // each in one pass: two read transactions, side by side.
    let moves = async {
        let txn = sql::begin(&rt.reports).await?;
        let out = sql::funnel_moves(&txn, &scope).await?;
        txn.commit().await?;
        Ok::<_, Error>(out)
    };
    let stays = async {
        let txn = sql::begin(&rt.reports).await?;
        let mut out = std::collections::BTreeMap::new();
        sql::funnel_stays(&txn, &scope, &mut out).await?;
        txn.commit().await?;
        Ok::<_, Error>(out)
    };
    let (mut rows, stays) = tokio::try_join!(moves, stays)?;
    for (stage, s) in stays {
        let r = rows.entry(stage).or_default();
        (r.stays, r.p50_us, r.p90_us) = (s.stays, s.p50_us, s.p90_us);
    }
    let stages = clm_domain::lifecycle::ALL_STAGES
        .into_iter()
        .map(|st| {
            let r = rows.get(&st.code()).cloned().unwrap_or_default();
            let funnel_next = st.code() < 5;
            pb::FunnelStage {
                stage: convert::stage_to_proto(st) as i32,
                entered_count: r.entered,
                advanced_count: if funnel_next { r.advanced } else { 0 },
                conversion_rate: if funnel_next {
                    kpi::ratio(r.advanced as f64, r.entered as f64)
                } else {
                    0.0
                },
                completed_stays: r.stays,
                median_time_in_stage: r.p50_us.map(duration),
                p90_time_in_stage: r.p90_us.map(duration),
                backward_moves: r.backward,
                churned_count: r.churned,
            }
        })
        .collect();
    Ok(pb::FunnelReport {
        stages,
        freshness: Some(freshness.to_proto()),
    })
}

fn model(field: &str, v: i32) -> Result<Model, Violation> {
    match pb::AttributionModel::try_from(v) {
        Ok(pb::AttributionModel::FirstTouch) => Ok(Model::FirstTouch),
        Ok(pb::AttributionModel::LastTouch) => Ok(Model::LastTouch),
        Ok(pb::AttributionModel::Linear) => Ok(Model::Linear),
        Ok(pb::AttributionModel::Unspecified) => Err(Violation::new(
            field,
            "is required: FIRST_TOUCH, LAST_TOUCH or LINEAR",
        )),
        Err(_) => Err(Violation::new(
            field,
            format!("{v} is not an attribution model (FIRST_TOUCH, LAST_TOUCH or LINEAR)"),
        )),
    }
}

/// GetAcquisitionReport.
pub async fn acquisition(
    rt: &Runtime,
    req: pb::GetAcquisitionReportRequest,
) -> Result<pb::AcquisitionReport> {
    let mut v = Violations::new();
    let scope = match scope("scope", req.scope.as_ref()) {
        Ok(s) => Some(s),
        Err(Error::InvalidArgument(e)) => {
            v.0.extend(e.0);
            None
        }
        Err(e) => return Err(e),
    };
    let m = v.check("", model("model", req.model));
    v.into_result()?;
    let (Some(scope), Some(m)) = (scope, m) else {
        return Err(Error::internal("validated fields missing"));
    };
    check_campaign(rt, "scope", &scope).await?;
    let freshness = crate::projection::freshness(rt, req.min_position).await?;
    let txn = sql::begin(&rt.reports).await?;
    let a = sql::acquisition(&txn, &scope, m).await?;
    txn.commit().await?;
    let campaigns = a
        .campaigns
        .iter()
        .map(|c| pb::CampaignAcquisition {
            campaign: c.campaign.clone(),
            display_name: c.display_name.clone(),
            channel: i32::from(c.channel),
            spend: Some(money(&c.currency, c.spend_minor)),
            acquired_customers: c.credited,
            cac: kpi::per_customer(c.spend_minor, c.credited).map(|x| money(&c.currency, x)),
        })
        .collect();
    // Per channel and currency: a sum over at most one line per campaign.
    let mut by: BTreeMap<(i16, String), (i64, f64)> = BTreeMap::new();
    for c in &a.campaigns {
        let e = by.entry((c.channel, c.currency.clone())).or_default();
        e.0 += c.spend_minor;
        e.1 += c.credited;
    }
    let channels = by
        .into_iter()
        .map(|((ch, cur), (spend, credited))| pb::ChannelAcquisition {
            channel: i32::from(ch),
            spend: Some(money(&cur, spend)),
            acquired_customers: credited,
            cac: kpi::per_customer(spend, credited).map(|x| money(&cur, x)),
        })
        .collect();
    Ok(pb::AcquisitionReport {
        model: req.model,
        acquired_customers: a.acquired,
        unattributed_customers: a.acquired - a.attributed,
        campaigns,
        channels,
        freshness: Some(freshness.to_proto()),
    })
}

/// GetClvReport.
pub async fn clv(rt: &Runtime, req: pb::GetClvReportRequest) -> Result<pb::ClvReport> {
    let mut v = Violations::new();
    let scope = match scope("scope", req.scope.as_ref()) {
        Ok(s) => Some(s),
        Err(Error::InvalidArgument(e)) => {
            v.0.extend(e.0);
            None
        }
        Err(e) => return Err(e),
    };
    if !(0..=10_000).contains(&req.gross_margin_bps) {
        v.push(Violation::new(
            "gross_margin_bps",
            "must be 0..10,000 basis points (2,500 = 25 %)",
        ));
    }
    let top = match req.top_customers {
        0 => 10,
        n @ 1..=1000 => n as u64,
        _ => {
            v.push(Violation::new("top_customers", "must be 0..1,000"));
            0
        }
    };
    v.into_result()?;
    let scope = scope.ok_or_else(|| Error::internal("validated scope missing"))?;
    check_campaign(rt, "scope", &scope).await?;
    let freshness = crate::projection::freshness(rt, req.min_position).await?;
    let txn = sql::begin(&rt.reports).await?;
    let (rows, top_rows) = sql::clv(&txn, &scope, top).await?;
    txn.commit().await?;
    let cohorts = rows
        .iter()
        .filter_map(|r| {
            // A cohort without purchases has no currency to express money
            // in: it still shows, with zero orders, in each reported currency
            // it has none of; here it is left out of the money lines.
            let currency = r.currency.clone()?;
            let customer_months = r.exposure_us as f64 / kpi::MONTH_US;
            let c = kpi::predictive_clv(kpi::ClvInputs {
                revenue_minor: r.revenue_minor,
                orders: r.orders,
                customer_months,
                churned: r.churned,
                margin_bps: req.gross_margin_bps,
            });
            Some(pb::CohortClv {
                cohort_month: kpi::month_label(r.month),
                customers: r.customers,
                currency_code: currency.clone(),
                revenue: Some(money(&currency, r.revenue_minor)),
                average_revenue_per_customer: kpi::per_customer(
                    r.revenue_minor,
                    r.customers as f64,
                )
                .map(|x| money(&currency, x)),
                orders: r.orders,
                customer_months,
                churned_customers: r.churned,
                average_order_value_minor: c.average_order_value,
                purchase_frequency: c.purchase_frequency,
                monthly_churn_rate: c.monthly_churn_rate,
                expected_lifetime_months: c.expected_lifetime_months,
                gross_margin_bps: req.gross_margin_bps,
                predicted_clv: c.predicted_minor.map(|x| money(&currency, x)),
            })
        })
        .collect();
    let top_customers = top_rows
        .iter()
        .map(|r| pb::CustomerValue {
            customer: format!("customers/{}", r.customer_id),
            revenue: Some(money(&r.currency, r.revenue_minor)),
            orders: r.orders,
        })
        .collect();
    Ok(pb::ClvReport {
        cohorts,
        top_customers,
        freshness: Some(freshness.to_proto()),
    })
}

/// GetRetentionReport.
pub async fn retention(
    rt: &Runtime,
    req: pb::GetRetentionReportRequest,
) -> Result<pb::RetentionReport> {
    let mut v = Violations::new();
    let scope = match scope("scope", req.scope.as_ref()) {
        Ok(s) => Some(s),
        Err(Error::InvalidArgument(e)) => {
            v.0.extend(e.0);
            None
        }
        Err(e) => return Err(e),
    };
    let months = match req.months {
        0 => 12,
        n @ 1..=36 => n,
        _ => {
            v.push(Violation::new("months", "must be 1..36"));
            0
        }
    };
    let mut kinds = Vec::new();
    for (i, t) in req.active_types.iter().enumerate() {
        if let Some(k) = v.check(
            "",
            convert::touchpoint_kind(&format!("active_types[{i}]"), *t),
        ) {
            kinds.push(k.code());
        }
    }
    if kinds.is_empty() {
        kinds.push(TouchpointKind::Purchase.code());
    }
    kinds.sort_unstable();
    kinds.dedup();
    v.into_result()?;
    let scope = scope.ok_or_else(|| Error::internal("validated scope missing"))?;
    check_campaign(rt, "scope", &scope).await?;
    let freshness = crate::projection::freshness(rt, req.min_position).await?;
    let txn = sql::begin(&rt.reports).await?;
    let r = sql::retention(&txn, &scope, &kinds, months).await?;
    txn.commit().await?;
    let current = kpi::month_of(rt.clock.now());
    let cohorts = r
        .sizes
        .iter()
        .map(|&(cm, size)| {
            let active: BTreeMap<i32, i64> = r
                .active
                .iter()
                .filter(|a| a.0 == cm)
                .map(|a| (a.1, a.2))
                .collect();
            let churned: BTreeMap<i32, i64> = r
                .churned
                .iter()
                .filter(|c| c.0 == cm)
                .map(|c| (c.1, c.2))
                .collect();
            let mut gone_before = churned.get(&0).copied().unwrap_or(0);
            let months = (1..=months)
                .take_while(|k| cm + k <= current)
                .map(|k| {
                    let a = active.get(&k).copied().unwrap_or(0);
                    let c = churned.get(&k).copied().unwrap_or(0);
                    let at_risk = size - gone_before;
                    gone_before += c;
                    pb::RetentionMonth {
                        month_offset: k,
                        active_customers: a,
                        active_share: kpi::ratio(a as f64, size as f64),
                        churned_customers: c,
                        churn_rate: kpi::ratio(c as f64, at_risk as f64),
                    }
                })
                .collect();
            pb::RetentionCohort {
                cohort_month: kpi::month_label(cm),
                customers: size,
                months,
            }
        })
        .collect();
    Ok(pb::RetentionReport {
        cohorts,
        freshness: Some(freshness.to_proto()),
    })
}

/// A path step (`4`, `c:trial`) as the API names it.
fn step_name(step: &str) -> String {
    if let Some(custom) = step.strip_prefix("c:") {
        return custom.to_owned();
    }
    step.parse::<i16>()
        .ok()
        .and_then(TouchpointKind::from_code)
        .map_or_else(|| step.to_owned(), |k| k.as_str().to_owned())
}

/// GetJourneyReport.
pub async fn journey(rt: &Runtime, req: pb::GetJourneyReportRequest) -> Result<pb::JourneyReport> {
    let mut v = Violations::new();
    let scope = match scope("scope", req.scope.as_ref()) {
        Ok(s) => Some(s),
        Err(Error::InvalidArgument(e)) => {
            v.0.extend(e.0);
            None
        }
        Err(e) => return Err(e),
    };
    let stage: Option<Stage> = v.check("", convert::stage("to_stage", req.to_stage));
    let mut range = |field: &str, value: i32, default: i32, max: i32| match value {
        0 => default,
        n if (1..=max).contains(&n) => n,
        _ => {
            v.push(Violation::new(field, format!("must be 1..{max}")));
            default
        }
    };
    let window_days = range("window_days", req.window_days, 30, 365);
    let max_len = range("max_path_length", req.max_path_length, 5, 10);
    let top = range("top", req.top, 10, 100);
    v.into_result()?;
    let (Some(scope), Some(stage)) = (scope, stage) else {
        return Err(Error::internal("validated fields missing"));
    };
    check_campaign(rt, "scope", &scope).await?;
    let freshness = crate::projection::freshness(rt, req.min_position).await?;
    let window_us = i64::from(window_days) * DAY_US;
    // Paths and pain points read different rows: two read transactions
    // on two connections, run side by side.
    let paths_of = async {
        let txn = sql::begin(&rt.reports).await?;
        let out = sql::journey_paths(
            &txn,
            &scope,
            stage.code(),
            window_us,
            i64::from(max_len),
            i64::from(top),
        )
        .await?;
        txn.commit().await?;
        Ok::<_, Error>(out)
    };
    let pain_of = async {
        let txn = sql::begin(&rt.reports).await?;
        let out = sql::pain_points(&txn, &scope, window_us).await?;
        txn.commit().await?;
        Ok::<_, Error>(out)
    };
    let ((entered, rows), pain) = tokio::try_join!(paths_of, pain_of)?;
    let paths = rows
        .iter()
        .map(|p| pb::JourneyPath {
            steps: p.path.split('>').map(step_name).collect(),
            customers: p.customers,
            median_time_to_stage: Some(duration(p.p50_us)),
        })
        .collect();
    let mut pain_points: Vec<pb::PainPoint> = pain
        .types
        .iter()
        .map(|(step, l, s)| pb::PainPoint {
            touchpoint_type: step_name(step),
            leaving_with_type: *l,
            leaving_share: kpi::ratio(*l as f64, pain.leaving as f64),
            staying_with_type: *s,
            staying_share: kpi::ratio(*s as f64, pain.staying as f64),
            lift: kpi::lift(*l, pain.leaving, *s, pain.staying),
        })
        .filter(|p| p.lift > 1.0)
        .collect();
    pain_points.sort_by(|a, b| {
        b.lift
            .total_cmp(&a.lift)
            .then_with(|| a.touchpoint_type.cmp(&b.touchpoint_type))
    });
    pain_points.truncate(top as usize);
    Ok(pb::JourneyReport {
        entered_customers: entered,
        paths,
        leaving_customers: pain.leaving,
        staying_customers: pain.staying,
        pain_points,
        freshness: Some(freshness.to_proto()),
    })
}
