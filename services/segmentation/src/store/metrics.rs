//! What objectives and performance reports measure over a segment's
//! current members, read set-based from the projections this service keeps
//! (`members` joined to `fact_customers` and `fact_touchpoints`): one
//! grouped query per batch of segments, never a query per customer.

use super::entity::fact_customers::{Column as FC, Entity as FactCustomers};
use super::entity::fact_touchpoints::{Column as FT, Entity as FactTouchpoints};
use super::entity::members::{Column as M, Entity as Members};
use super::{chunks, n};
use clm_domain::touchpoint::TouchpointKind;
use sea_orm::sea_query::{Alias, CaseStatement, Expr, ExprTrait, Func, Query};
use sea_orm::{ConnectionTrait, DbErr};
use std::collections::HashMap;

/// The lifecycle stage codes (`clm.customer.v1.Stage`), funnel order.
pub const STAGES: [i16; 6] = [1, 2, 3, 4, 5, 6];
/// The code of CHURNED.
pub const CHURNED: i16 = 6;

/// A segment's members as the projections see them now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemberFacts {
    /// Current members.
    pub size: i64,
    /// Members per lifecycle stage code (1..6).
    pub stages: HashMap<i16, i64>,
    /// Members whose last NPS answer is 9 or 10.
    pub promoters: i64,
    /// Members whose last NPS answer is 0..6.
    pub detractors: i64,
    /// Members with an NPS answer.
    pub nps_answers: i64,
    /// Sum of the members' last CSAT answers.
    pub csat_sum: f64,
    /// Members with a CSAT answer.
    pub csat_answers: i64,
}

fn sum_when(cond: Expr) -> Expr {
    let case = CaseStatement::new()
        .case(cond, Expr::val(1i64))
        .finally(Expr::val(0i64));
    Func::cast_as(
        Func::coalesce([
            Func::sum(Expr::Case(Box::new(case))).into(),
            Expr::val(0i64),
        ]),
        Alias::new("BIGINT"),
    )
    .into()
}

/// [`MemberFacts`] of each of `segments` (absent: no members).
pub async fn member_facts(
    db: &impl ConnectionTrait,
    segments: &[String],
) -> Result<HashMap<String, MemberFacts>, DbErr> {
    let mut out = HashMap::new();
    let m = n("m");
    for chunk in chunks(segments) {
        let mut q = Query::select();
        q.expr_as(Expr::col((m.clone(), M::SegmentId)), n("seg"))
            .expr_as(Func::count(Expr::val(1)), n("size"))
            .from_as(Members, m.clone())
            .left_join(
                FactCustomers,
                Expr::col((FactCustomers, FC::CustomerId)).equals((m.clone(), M::CustomerId)),
            )
            .and_where(Expr::col((m.clone(), M::SegmentId)).is_in(chunk.iter().cloned()))
            .group_by_col((m.clone(), M::SegmentId));
        for s in STAGES {
            q.expr_as(
                sum_when(Expr::col((FactCustomers, FC::Stage)).eq(s)),
                n(&format!("s{s}")),
            );
        }
        q.expr_as(
            sum_when(Expr::col((FactCustomers, FC::NpsLast)).gte(9)),
            n("promoters"),
        )
        .expr_as(
            sum_when(Expr::col((FactCustomers, FC::NpsLast)).lte(6)),
            n("detractors"),
        )
        .expr_as(
            Func::count(Expr::col((FactCustomers, FC::NpsLast))),
            n("nps_n"),
        )
        .expr_as(
            Func::cast_as(
                Func::coalesce([
                    Func::sum(Expr::col((FactCustomers, FC::CsatLast))).into(),
                    Expr::val(0.0f64),
                ]),
                Alias::new("DOUBLE PRECISION"),
            ),
            n("csat_sum"),
        )
        .expr_as(
            Func::count(Expr::col((FactCustomers, FC::CsatLast))),
            n("csat_n"),
        );
        for r in db.query_all(&q).await? {
            let mut facts = MemberFacts {
                size: r.try_get("", "size")?,
                promoters: r.try_get("", "promoters")?,
                detractors: r.try_get("", "detractors")?,
                nps_answers: r.try_get("", "nps_n")?,
                csat_sum: r.try_get("", "csat_sum")?,
                csat_answers: r.try_get("", "csat_n")?,
                ..MemberFacts::default()
            };
            for s in STAGES {
                facts.stages.insert(s, r.try_get("", &format!("s{s}"))?);
            }
            out.insert(r.try_get("", "seg")?, facts);
        }
    }
    Ok(out)
}

/// Revenue of the purchases of each segment's current members by
/// currency, in minor units: all of it (`since_us` None: lifetime) or of
/// purchases at or after `since_us`. Keyed (segment, currency).
pub async fn revenue(
    db: &impl ConnectionTrait,
    segments: &[String],
    since_us: Option<i64>,
) -> Result<HashMap<(String, String), i64>, DbErr> {
    let mut out = HashMap::new();
    let m = n("m");
    for chunk in chunks(segments) {
        let mut q = Query::select();
        q.expr_as(Expr::col((m.clone(), M::SegmentId)), n("seg"))
            .expr_as(
                Expr::col((FactTouchpoints, FT::RevenueCurrency)),
                n("currency"),
            )
            .expr_as(
                Func::cast_as(
                    Func::sum(Expr::col((FactTouchpoints, FT::RevenueMinor))),
                    Alias::new("BIGINT"),
                ),
                n("total"),
            )
            .from_as(Members, m.clone())
            .inner_join(
                FactTouchpoints,
                Expr::col((FactTouchpoints, FT::CustomerId)).equals((m.clone(), M::CustomerId)),
            )
            .and_where(Expr::col((m.clone(), M::SegmentId)).is_in(chunk.iter().cloned()))
            .and_where(Expr::col((FactTouchpoints, FT::Kind)).eq(TouchpointKind::Purchase.code()))
            .and_where(Expr::col((FactTouchpoints, FT::RevenueMinor)).is_not_null())
            .and_where(Expr::col((FactTouchpoints, FT::RevenueCurrency)).is_not_null())
            .group_by_col((m.clone(), M::SegmentId))
            .group_by_col((FactTouchpoints, FT::RevenueCurrency));
        if let Some(since) = since_us {
            q.and_where(Expr::col((FactTouchpoints, FT::OccurredUs)).gte(since));
        }
        for r in db.query_all(&q).await? {
            let total: Option<i64> = r.try_get("", "total")?;
            out.insert(
                (r.try_get("", "seg")?, r.try_get("", "currency")?),
                total.unwrap_or(0),
            );
        }
    }
    Ok(out)
}
