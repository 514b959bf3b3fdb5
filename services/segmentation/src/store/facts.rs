//! The facts projection: what segment rules read about customers, fed by
//! the customer change stream (`fact_*` tables). Writes are set-based (one
//! statement per batch and table); [`load`] reads the facts of a batch of
//! customers into [`FactSet`]s for the in-memory evaluator.

use super::chunks;
use super::entity::fact_attributes::{Column as FA, Entity as FactAttributes};
use super::entity::fact_consents::{Column as FK, Entity as FactConsents};
use super::entity::fact_customers::{Column as FC, Entity as FactCustomers};
use super::entity::fact_score_curves::{Column as SC, Entity as FactScoreCurves};
use super::entity::fact_score_terms::{Column as ST, Entity as FactScoreTerms};
use super::entity::fact_touch_props::{Column as FP, Entity as FactTouchProps};
use super::entity::fact_touchpoints::{Column as FT, Entity as FactTouchpoints};
use super::entity::gone_customers::{Column as GC, Entity as GoneCustomers};
use super::entity::members::{Column as M, Entity as Members};
use super::entity::seg_meta::{Column as SM, Entity as SegMeta};
use crate::catalog::{CHANNELS, PURPOSES, granted_by_default};
use crate::lookback::Lookback;
use crate::sql::attr_kind;
use chrono::NaiveDate;
use clm_domain::attributes::AttributeValue;
use clm_domain::demographics::Gender;
use clm_domain::lifecycle::Stage;
use clm_domain::money::Money;
use clm_domain::rules::FactSet;
use clm_domain::scoring::{Curve, Decay, Inactivity, Term};
use clm_domain::touchpoint::{Touchpoint, TouchpointKind};
use clm_platform::db::{from_micros, rows_per_statement, to_micros};
use sea_orm::IdenStatic;
use sea_orm::sea_query::{Condition, Expr, ExprTrait, IntoColumnRef, OnConflict, Query};
use sea_orm::{ConnectionTrait, DbErr, EntityTrait};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A customer's profile facts (what the customer stream carries).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    /// Bare customer id.
    pub id: String,
    /// E-mail.
    pub email: Option<String>,
    /// Display name.
    pub display_name: Option<String>,
    /// Birth date.
    pub birth_date: Option<NaiveDate>,
    /// Gender.
    pub gender: Option<Gender>,
    /// Yearly income.
    pub income: Option<Money>,
    /// Occupation.
    pub occupation: Option<String>,
    /// Stage and when it was entered.
    pub stage: Option<(Stage, chrono::DateTime<chrono::Utc>)>,
    /// Custom attributes.
    pub attributes: BTreeMap<String, AttributeValue>,
}

/// A touchpoint of a customer.
#[derive(Debug, Clone, PartialEq)]
pub struct TouchRow {
    /// Bare customer id.
    pub customer: String,
    /// The touchpoint.
    pub touchpoint: Touchpoint,
}

const PROFILE_COLS: [FC; 10] = [
    FC::CustomerId,
    FC::Email,
    FC::DisplayName,
    FC::BirthDate,
    FC::Gender,
    FC::IncomeMinor,
    FC::IncomeCurrency,
    FC::Occupation,
    FC::Stage,
    FC::StageUs,
];

/// Writes profiles (the last of each customer wins) and replaces their attributes.
pub async fn upsert_profiles(db: &impl ConnectionTrait, profiles: &[Profile]) -> Result<(), DbErr> {
    let mut last: BTreeMap<&str, &Profile> = BTreeMap::new();
    for p in profiles {
        last.insert(p.id.as_str(), p);
    }
    let rows: Vec<&Profile> = last.into_values().collect();
    for chunk in rows.chunks(rows_per_statement(PROFILE_COLS.len())) {
        let mut insert = Query::insert();
        insert
            .into_table(FactCustomers)
            .columns(PROFILE_COLS.iter().copied().chain([FC::Profiled]))
            .on_conflict(
                OnConflict::column(FC::CustomerId)
                    .update_columns(PROFILE_COLS[1..].iter().copied().chain([FC::Profiled]))
                    .to_owned(),
            );
        for p in chunk {
            insert.values_panic([
                p.id.clone().into(),
                p.email.clone().into(),
                p.display_name.clone().into(),
                p.birth_date
                    .map(|d| d.format("%Y-%m-%d").to_string())
                    .into(),
                p.gender.map(Gender::code).into(),
                p.income.as_ref().map(|m| m.amount_minor).into(),
                p.income.as_ref().map(|m| m.currency.clone()).into(),
                p.occupation.clone().into(),
                p.stage.map(|(s, _)| s.code()).into(),
                p.stage.map(|(_, t)| to_micros(t)).into(),
                true.into(),
            ]);
        }
        db.execute(&insert).await?;
    }
    let ids: Vec<String> = rows.iter().map(|p| p.id.clone()).collect();
    adopt_pending_grades(db, &ids).await?;
    delete_where_customer(db, FactAttributes, FA::CustomerId, &ids).await?;
    let attrs: Vec<(&str, &str, &AttributeValue)> = rows
        .iter()
        .flat_map(|p| {
            p.attributes
                .iter()
                .map(|(k, v)| (p.id.as_str(), k.as_str(), v))
        })
        .collect();
    for chunk in attrs.chunks(rows_per_statement(7)) {
        let mut insert = Query::insert();
        insert.into_table(FactAttributes).columns([
            FA::CustomerId,
            FA::Key,
            FA::Kind,
            FA::StrValue,
            FA::NumValue,
            FA::BoolValue,
            FA::TimeUs,
        ]);
        for (id, key, v) in chunk {
            let (kind, s, num, b, time) = match v {
                AttributeValue::String(s) => (attr_kind::STRING, Some(s.clone()), None, None, None),
                AttributeValue::Number(x) => (attr_kind::NUMBER, None, Some(*x), None, None),
                AttributeValue::Bool(x) => (attr_kind::BOOL, None, None, Some(*x), None),
                AttributeValue::Timestamp(t) => {
                    (attr_kind::TIMESTAMP, None, None, None, Some(to_micros(*t)))
                }
            };
            insert.values_panic([
                (*id).into(),
                (*key).into(),
                kind.into(),
                s.into(),
                num.into(),
                b.into(),
                time.into(),
            ]);
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

/// Sets customers' stages (the last of each customer wins).
pub async fn set_stages(
    db: &impl ConnectionTrait,
    stages: &[(String, Stage, chrono::DateTime<chrono::Utc>)],
) -> Result<(), DbErr> {
    let mut last = BTreeMap::new();
    for (id, s, t) in stages {
        last.insert(id.as_str(), (*s, *t));
    }
    let rows: Vec<_> = last.into_iter().collect();
    for chunk in rows.chunks(rows_per_statement(3)) {
        let mut insert = Query::insert();
        insert
            .into_table(FactCustomers)
            .columns([FC::CustomerId, FC::Stage, FC::StageUs])
            .on_conflict(
                OnConflict::column(FC::CustomerId)
                    .update_columns([FC::Stage, FC::StageUs])
                    .to_owned(),
            );
        for (id, (s, t)) in chunk {
            insert.values_panic([(*id).into(), s.code().into(), to_micros(*t).into()]);
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

/// A customer's last answers: `(bare id, NPS, CSAT)`; `None` leaves the
/// fact as it was.
pub type FeedbackRow = (String, Option<i16>, Option<f64>);

/// Sets the last NPS and CSAT answers of customers (in order: a later
/// row wins; `None` keeps the stored answer), set-based. A customer whose
/// profile has not arrived yet gets a row that waits for it (never one
/// erased or merged away). The caller holds [`lock_customers`] for them.
/// Returns the customers with a profile, to evaluate.
pub async fn set_feedback(
    db: &impl ConnectionTrait,
    rows: &[FeedbackRow],
) -> Result<Vec<String>, DbErr> {
    let mut last: BTreeMap<&str, (Option<i16>, Option<f64>)> = BTreeMap::new();
    for (id, nps, csat) in rows {
        let e = last.entry(id.as_str()).or_default();
        if nps.is_some() {
            e.0 = *nps;
        }
        if csat.is_some() {
            e.1 = *csat;
        }
    }
    let ids: Vec<String> = last.keys().map(|id| (*id).to_owned()).collect();
    let gone = gone_among(db, &ids).await?;
    // By which answers a row carries: each group is one statement.
    let mut groups: BTreeMap<(bool, bool), Vec<Answers<'_>>> = BTreeMap::new();
    for (id, (nps, csat)) in last {
        if (nps.is_some() || csat.is_some()) && !gone.contains(id) {
            groups
                .entry((nps.is_some(), csat.is_some()))
                .or_default()
                .push((id, nps, csat));
        }
    }
    for ((has_nps, has_csat), rows) in &groups {
        let mut set = Vec::new();
        if *has_nps {
            set.push(FC::NpsLast);
        }
        if *has_csat {
            set.push(FC::CsatLast);
        }
        let rows = rows
            .iter()
            .map(|(id, nps, csat)| {
                let mut values = Vec::new();
                if *has_nps {
                    values.push((*nps).into());
                }
                if *has_csat {
                    values.push((*csat).into());
                }
                (*id, values)
            })
            .collect();
        upsert_facts(db, &set, rows).await?;
    }
    let written: Vec<String> = ids.into_iter().filter(|id| !gone.contains(id)).collect();
    profiled_among(db, &written).await
}

/// A customer's last answers to write: (id, NPS, CSAT).
type Answers<'a> = (&'a str, Option<i16>, Option<f64>);

/// Which of `ids` were erased or merged away (`gone_customers`).
async fn gone_among(db: &impl ConnectionTrait, ids: &[String]) -> Result<BTreeSet<String>, DbErr> {
    let mut gone = BTreeSet::new();
    for chunk in chunks(ids) {
        let hashes: BTreeMap<String, &String> =
            chunk.iter().map(|id| (gone_hash(id), id)).collect();
        let q = Query::select()
            .column(GC::CustomerHash)
            .from(GoneCustomers)
            .and_where(Expr::col(GC::CustomerHash).is_in(hashes.keys().cloned()))
            .to_owned();
        for row in db.query_all(&q).await? {
            let hash = row.try_get::<String>("", GC::CustomerHash.as_str())?;
            if let Some(id) = hashes.get(&hash) {
                gone.insert((*id).clone());
            }
        }
    }
    Ok(gone)
}

/// Writes columns `set` of customers' rows, each `(id, its values of
/// set)`; a customer without a row gets one that waits for the profile
/// (`profiled` false), set-based.
async fn upsert_facts(
    db: &impl ConnectionTrait,
    set: &[FC],
    rows: Vec<(&str, Vec<sea_orm::sea_query::SimpleExpr>)>,
) -> Result<(), DbErr> {
    let mut cols = vec![FC::CustomerId, FC::Profiled];
    cols.extend(set.iter().copied());
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let mut insert = Query::insert();
        insert
            .into_table(FactCustomers)
            .columns(cols.clone())
            .on_conflict(
                OnConflict::column(FC::CustomerId)
                    .update_columns(set.iter().copied())
                    .to_owned(),
            );
        for (id, values) in rows.by_ref().take(rows_per_statement(cols.len())) {
            insert.values_panic([id.into(), false.into()].into_iter().chain(values));
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

/// Which of `ids` have their profile (the customers rules see).
async fn profiled_among(db: &impl ConnectionTrait, ids: &[String]) -> Result<Vec<String>, DbErr> {
    let mut out = Vec::new();
    for chunk in chunks(ids) {
        let q = Query::select()
            .column(FC::CustomerId)
            .from(FactCustomers)
            .and_where(Expr::col(FC::CustomerId).is_in(chunk.iter().cloned()))
            .and_where(Expr::col(FC::Profiled).eq(true))
            .to_owned();
        for row in db.query_all(&q).await? {
            out.push(row.try_get::<String>("", FC::CustomerId.as_str())?);
        }
    }
    Ok(out)
}

/// A customer's score as the scoring stream states it: the curve from
/// `changed_us` on, the value then, the grade under the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreRow {
    /// Bare customer id.
    pub customer: String,
    /// Bare scoring model id.
    pub model: String,
    /// Score name.
    pub name: String,
    /// When it changed (µs).
    pub changed_us: i64,
    /// Its value then.
    pub value: f64,
    /// The customer's grade under the model then (may be empty).
    pub grade: String,
    /// The score from `changed_us` on.
    pub curve: Curve,
}

/// Serialises, per customer, the writers that could keep data of a
/// customer who is going (erasure, merge) or arriving without a profile
/// row yet (pending scores, loyalty and feedback facts): PostgreSQL
/// transaction-scoped advisory locks, taken in id order before any fact
/// row lock (SQLite has one writer). Callers take them right after the
/// membership lock every segmentation writer takes first
/// (`members::lock_membership`).
pub async fn lock_customers(db: &impl ConnectionTrait, ids: &[String]) -> Result<(), DbErr> {
    if ids.is_empty() || !clm_platform::db::is_postgres(db) {
        return Ok(());
    }
    let mut sorted: Vec<&str> = ids.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let list = serde_json::to_string(&sorted).map_err(|e| DbErr::Custom(e.to_string()))?;
    db.execute_raw(sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        "SELECT count(pg_advisory_xact_lock(hashtextextended(v, 2505))) \
         FROM (SELECT value AS v FROM json_array_elements_text($1::json) ORDER BY value) s",
        [list.into()],
    ))
    .await?;
    Ok(())
}

/// How `gone_customers` names a customer: a SHA-256 of its bare id, so
/// the table remembers that a customer went without keeping its id.
pub fn gone_hash(id: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(format!("clm-segmentation-gone:{id}"))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Records `ids` as gone (erased or merged away): a score for one that
/// arrives later is dropped.
async fn mark_gone(db: &impl ConnectionTrait, ids: &[String], now_us: i64) -> Result<(), DbErr> {
    for chunk in ids.chunks(rows_per_statement(2)) {
        let mut insert = Query::insert();
        insert
            .into_table(GoneCustomers)
            .columns([GC::CustomerHash, GC::GoneUs])
            .on_conflict(OnConflict::column(GC::CustomerHash).do_nothing().to_owned());
        for id in chunk {
            insert.values_panic([gone_hash(id).into(), now_us.into()]);
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

/// Applies scores in order (the last per customer, model and name wins),
/// set-based, and each known customer's latest grade. A score for a
/// customer the projection does not hold yet is kept and read once the
/// customer arrives (the scoring stream can run ahead of the customer
/// stream); one for a customer gone (erased or merged away) is dropped.
/// The caller holds [`lock_customers`] for the rows' customers. Returns the
/// known customers updated.
pub async fn set_scores(
    db: &impl ConnectionTrait,
    rows: &[ScoreRow],
) -> Result<Vec<String>, DbErr> {
    let ids: Vec<String> = rows
        .iter()
        .map(|r| r.customer.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // The known customers' rows are share-locked (PostgreSQL) until the
    // transaction ends, as are (by the caller's advisory locks) the
    // unknown ones: an erasure or merge of one waits, or committed first
    // and is seen in `gone_customers`.
    let mut known = BTreeSet::new();
    for chunk in chunks(&ids) {
        let mut q = Query::select()
            .column(FC::CustomerId)
            .from(FactCustomers)
            .and_where(Expr::col(FC::CustomerId).is_in(chunk.iter().cloned()))
            .and_where(Expr::col(FC::Profiled).eq(true))
            .order_by(FC::CustomerId, sea_orm::Order::Asc)
            .to_owned();
        if clm_platform::db::is_postgres(db) {
            q.lock(sea_orm::sea_query::LockType::Share);
        }
        for row in db.query_all(&q).await? {
            known.insert(row.try_get::<String>("", FC::CustomerId.as_str())?);
        }
    }
    let gone = gone_among(db, &ids).await?;
    let mut last: BTreeMap<(&str, &str, &str), &ScoreRow> = BTreeMap::new();
    let mut grades = BTreeMap::new();
    for r in rows.iter().filter(|r| !gone.contains(&r.customer)) {
        last.insert((&r.customer, &r.model, &r.name), r);
        if !r.grade.is_empty() && known.contains(&r.customer) {
            grades.insert(r.customer.as_str(), r.grade.as_str());
        }
    }
    // The old terms out, by (model, name): few pairs, many customers.
    let mut by_score: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
    for (c, m, n) in last.keys() {
        by_score.entry((m, n)).or_default().push((*c).to_owned());
    }
    for ((model, name), customers) in &by_score {
        for chunk in chunks(customers) {
            let delete = Query::delete()
                .from_table(FactScoreTerms)
                .and_where(Expr::col(ST::Model).eq(*model))
                .and_where(Expr::col(ST::Name).eq(*name))
                .and_where(Expr::col(ST::CustomerId).is_in(chunk.iter().cloned()))
                .to_owned();
            db.execute(&delete).await?;
        }
    }
    let curves: Vec<&ScoreRow> = last.into_values().collect();
    const CURVE_COLS: [SC; 11] = [
        SC::CustomerId,
        SC::Model,
        SC::Name,
        SC::ChangedUs,
        SC::Value,
        SC::Grade,
        SC::IdlePoints,
        SC::IdleEveryUs,
        SC::LastUs,
        SC::Floor,
        SC::Ceiling,
    ];
    for chunk in curves.chunks(rows_per_statement(CURVE_COLS.len())) {
        let mut insert = Query::insert();
        insert
            .into_table(FactScoreCurves)
            .columns(CURVE_COLS)
            .on_conflict(
                OnConflict::columns([SC::CustomerId, SC::Model, SC::Name])
                    .update_columns(CURVE_COLS[3..].iter().copied())
                    .to_owned(),
            );
        for r in chunk {
            let idle = r.curve.inactivity;
            insert.values_panic([
                r.customer.clone().into(),
                r.model.clone().into(),
                r.name.clone().into(),
                r.changed_us.into(),
                r.value.into(),
                r.grade.clone().into(),
                idle.map(|(i, _)| i.points).into(),
                idle.map(|(i, _)| clm_domain::scoring::micros(i.every))
                    .into(),
                idle.map(|(_, last)| last).into(),
                r.curve.floor.into(),
                r.curve.ceiling.into(),
            ]);
        }
        db.execute(&insert).await?;
    }
    let terms: Vec<(&ScoreRow, usize, &clm_domain::scoring::Term)> = curves
        .iter()
        .flat_map(|r| {
            r.curve
                .terms
                .iter()
                .enumerate()
                .map(move |(i, t)| (*r, i, t))
        })
        .collect();
    for chunk in terms.chunks(rows_per_statement(8)) {
        let mut insert = Query::insert();
        insert.into_table(FactScoreTerms).columns([
            ST::CustomerId,
            ST::Model,
            ST::Name,
            ST::Seq,
            ST::Coef,
            ST::SinceUs,
            ST::Kind,
            ST::ParamUs,
        ]);
        for (r, i, t) in chunk {
            let (kind, param) = t.decay.code();
            insert.values_panic([
                r.customer.clone().into(),
                r.model.clone().into(),
                r.name.clone().into(),
                i32::try_from(*i).unwrap_or(i32::MAX).into(),
                t.coef.into(),
                t.since_us.into(),
                kind.into(),
                param.into(),
            ]);
        }
        db.execute(&insert).await?;
    }
    let grades: Vec<_> = grades.into_iter().collect();
    for chunk in grades.chunks(rows_per_statement(2)) {
        let mut insert = Query::insert();
        insert
            .into_table(FactCustomers)
            .columns([FC::CustomerId, FC::Grade])
            .on_conflict(
                OnConflict::column(FC::CustomerId)
                    .update_column(FC::Grade)
                    .to_owned(),
            );
        for (id, grade) in chunk {
            insert.values_panic([(*id).into(), (*grade).into()]);
        }
        db.execute(&insert).await?;
    }
    Ok(known
        .into_iter()
        .filter(|c| curves.iter().any(|r| r.customer == *c))
        .collect())
}

/// Gives customers that just arrived the grade of their pending scores
/// (the most recently changed one), where they have none yet.
async fn adopt_pending_grades(db: &impl ConnectionTrait, ids: &[String]) -> Result<(), DbErr> {
    for chunk in chunks(ids) {
        let newest = Query::select()
            .column((FactScoreCurves, SC::Grade))
            .from(FactScoreCurves)
            .and_where(
                Expr::col((FactScoreCurves, SC::CustomerId))
                    .equals((FactCustomers, FC::CustomerId)),
            )
            .and_where(Expr::col((FactScoreCurves, SC::Grade)).ne(""))
            .order_by((FactScoreCurves, SC::ChangedUs), sea_orm::Order::Desc)
            .order_by((FactScoreCurves, SC::Model), sea_orm::Order::Asc)
            .limit(1)
            .to_owned();
        let update = Query::update()
            .table(FactCustomers)
            .value(FC::Grade, Expr::from(newest.clone()))
            .and_where(Expr::col(FC::CustomerId).is_in(chunk.iter().cloned()))
            .and_where(Expr::col(FC::Grade).is_null())
            .and_where(Expr::exists(newest))
            .to_owned();
        db.execute(&update).await?;
    }
    Ok(())
}

/// One loyalty fact of a customer: (customer, tier if it changed, balance).
pub type LoyaltyRow = (String, Option<String>, i64);

/// Applies loyalty facts in order (the last per customer wins; a row
/// without a tier keeps the stored one), set-based; a customer whose
/// profile has not arrived yet gets a row that waits for it (never one
/// erased or merged away), as [`set_feedback`]. The rows are the primary
/// loyalty program's (the handlers skip `secondary` events), so several
/// programs do not overwrite each other. The caller holds
/// [`lock_customers`] for them. Returns the customers with a profile, to
/// evaluate.
pub async fn set_loyalty(
    db: &impl ConnectionTrait,
    rows: &[LoyaltyRow],
) -> Result<Vec<String>, DbErr> {
    let mut last: BTreeMap<&str, (Option<&str>, i64)> = BTreeMap::new();
    for (id, tier, balance) in rows {
        let e = last.entry(id.as_str()).or_insert((None, *balance));
        if tier.is_some() {
            e.0 = tier.as_deref();
        }
        e.1 = *balance;
    }
    let ids: Vec<String> = last.keys().map(|id| (*id).to_owned()).collect();
    let gone = gone_among(db, &ids).await?;
    // Rows with a tier and rows without: one statement each.
    for with_tier in [true, false] {
        let mut set = vec![FC::LoyaltyBalance];
        if with_tier {
            set.push(FC::LoyaltyTier);
        }
        let rows = last
            .iter()
            .filter(|(id, (tier, _))| tier.is_some() == with_tier && !gone.contains(**id))
            .map(|(id, (tier, balance))| {
                let mut values = vec![(*balance).into()];
                if with_tier {
                    // An empty tier is none.
                    values.push(tier.filter(|t| !t.is_empty()).map(str::to_owned).into());
                }
                (*id, values)
            })
            .collect();
        upsert_facts(db, &set, rows).await?;
    }
    let written: Vec<String> = ids.into_iter().filter(|id| !gone.contains(id)).collect();
    profiled_among(db, &written).await
}

/// One consent cell: granted, denied, or unset (`None`, the row is removed).
pub type ConsentCell = (String, String, String, Option<bool>);

/// Applies consent cells (customer, purpose, channel, state) in order.
pub async fn set_consents(db: &impl ConnectionTrait, cells: &[ConsentCell]) -> Result<(), DbErr> {
    let mut last = BTreeMap::new();
    for (c, p, ch, g) in cells {
        last.insert((c.as_str(), p.as_str(), ch.as_str()), *g);
    }
    let (set, unset): (Vec<_>, Vec<_>) = last.into_iter().partition(|(_, g)| g.is_some());
    for chunk in set.chunks(rows_per_statement(4)) {
        let mut insert = Query::insert();
        insert
            .into_table(FactConsents)
            .columns([FK::CustomerId, FK::Purpose, FK::Channel, FK::Granted])
            .on_conflict(
                OnConflict::columns([FK::CustomerId, FK::Purpose, FK::Channel])
                    .update_column(FK::Granted)
                    .to_owned(),
            );
        for ((c, p, ch), g) in chunk {
            insert.values_panic([
                (*c).into(),
                (*p).into(),
                (*ch).into(),
                g.unwrap_or(false).into(),
            ]);
        }
        db.execute(&insert).await?;
    }
    for chunk in unset.chunks(rows_per_statement(3)) {
        let tuples = chunk
            .iter()
            .map(|((c, p, ch), _)| Expr::tuple([Expr::val(*c), Expr::val(*p), Expr::val(*ch)]));
        let delete = Query::delete()
            .from_table(FactConsents)
            .and_where(
                Expr::tuple([
                    Expr::col(FK::CustomerId),
                    Expr::col(FK::Purpose),
                    Expr::col(FK::Channel),
                ])
                .is_in(tuples),
            )
            .to_owned();
        db.execute(&delete).await?;
    }
    Ok(())
}

/// The columns of `fact_touchpoints`, as inserted and as loaded.
const TOUCH_COLS: [FT; 12] = [
    FT::EventId,
    FT::CustomerId,
    FT::Kind,
    FT::CustomType,
    FT::OccurredUs,
    FT::Product,
    FT::Feature,
    FT::Campaign,
    FT::Channel,
    FT::RevenueMinor,
    FT::RevenueCurrency,
    FT::UsageMs,
];

/// Inserts touchpoints (idempotent by event id) and their properties.
pub async fn insert_touchpoints(db: &impl ConnectionTrait, rows: &[TouchRow]) -> Result<(), DbErr> {
    if clm_platform::db::is_postgres(db) {
        insert_touchpoints_postgres(db, rows).await?;
    } else {
        insert_touchpoints_values(db, rows).await?;
    }
    let props: Vec<(&str, &str, &str)> = rows
        .iter()
        .flat_map(|r| {
            r.touchpoint
                .properties
                .iter()
                .map(|(k, v)| (r.touchpoint.event_id.as_str(), k.as_str(), v.as_str()))
        })
        .collect();
    for chunk in props.chunks(rows_per_statement(3)) {
        let mut insert = Query::insert();
        insert
            .into_table(FactTouchProps)
            .columns([FP::EventId, FP::Key, FP::Value])
            .on_conflict(
                OnConflict::columns([FP::EventId, FP::Key])
                    .do_nothing()
                    .to_owned(),
            );
        for (e, k, v) in chunk {
            insert.values_panic([(*e).into(), (*k).into(), (*v).into()]);
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

/// PostgreSQL: the batch as one JSON parameter expanded by
/// `json_to_recordset`, as the customer service's ingest does: one small
/// statement prepared once per connection, where a multi-row `VALUES`
/// of 12 bind parameters a row was parsed and planned anew for every
/// batch size (~40 ms of a 2,000-touchpoint batch).
async fn insert_touchpoints_postgres(
    db: &impl ConnectionTrait,
    rows: &[TouchRow],
) -> Result<(), DbErr> {
    #[derive(serde::Serialize)]
    struct Row<'a> {
        event_id: &'a str,
        customer_id: &'a str,
        kind: i16,
        custom_type: Option<&'a str>,
        occurred_us: i64,
        product: Option<&'a str>,
        feature: Option<&'a str>,
        campaign: Option<&'a str>,
        channel: Option<&'a str>,
        revenue_minor: Option<i64>,
        revenue_currency: Option<&'a str>,
        usage_ms: Option<i64>,
    }
    if rows.is_empty() {
        return Ok(());
    }
    let json: Vec<Row<'_>> = rows
        .iter()
        .map(|r| {
            let t = &r.touchpoint;
            Row {
                event_id: &t.event_id,
                customer_id: &r.customer,
                kind: t.kind.code(),
                custom_type: t.custom_type.as_deref(),
                occurred_us: to_micros(t.occurred_time),
                product: t.product.as_deref(),
                feature: t.feature.as_deref(),
                campaign: t.campaign.as_deref(),
                channel: t.channel.as_deref(),
                revenue_minor: t.revenue.as_ref().map(|m| m.amount_minor),
                revenue_currency: t.revenue.as_ref().map(|m| m.currency.as_str()),
                usage_ms: t.usage_millis,
            }
        })
        .collect();
    let json = serde_json::to_string(&json).map_err(|e| DbErr::Custom(e.to_string()))?;
    let cols = TOUCH_COLS.map(|c| c.as_str()).join(", ");
    let sql = format!(
        "INSERT INTO fact_touchpoints ({cols}) SELECT {cols} FROM json_to_recordset($1::json) AS x(\
         event_id text, customer_id text, kind int2, custom_type text, occurred_us int8, product text, \
         feature text, campaign text, channel text, revenue_minor int8, revenue_currency text, usage_ms int8) \
         ON CONFLICT (event_id) DO NOTHING"
    );
    db.execute_raw(sea_orm::Statement::from_sql_and_values(
        sea_orm::DbBackend::Postgres,
        sql,
        [json.into()],
    ))
    .await?;
    Ok(())
}

/// Elsewhere (SQLite): multi-row `VALUES`, a statement per full chunk.
async fn insert_touchpoints_values(
    db: &impl ConnectionTrait,
    rows: &[TouchRow],
) -> Result<(), DbErr> {
    for chunk in rows.chunks(rows_per_statement(TOUCH_COLS.len())) {
        let mut insert = Query::insert();
        insert
            .into_table(FactTouchpoints)
            .columns(TOUCH_COLS)
            .on_conflict(OnConflict::column(FT::EventId).do_nothing().to_owned());
        for r in chunk {
            let tp = &r.touchpoint;
            insert.values_panic([
                tp.event_id.clone().into(),
                r.customer.clone().into(),
                tp.kind.code().into(),
                tp.custom_type.clone().into(),
                to_micros(tp.occurred_time).into(),
                tp.product.clone().into(),
                tp.feature.clone().into(),
                tp.campaign.clone().into(),
                tp.channel.clone().into(),
                tp.revenue.as_ref().map(|m| m.amount_minor).into(),
                tp.revenue.as_ref().map(|m| m.currency.clone()).into(),
                tp.usage_millis.into(),
            ]);
        }
        db.execute(&insert).await?;
    }
    Ok(())
}

/// `customer IN (chunk)`.
fn customer_in<C: IntoColumnRef>(customer: C, chunk: &[String]) -> Expr {
    Expr::col(customer).is_in(chunk.iter().cloned())
}

async fn delete_where_customer<E: EntityTrait>(
    db: &impl ConnectionTrait,
    table: E,
    customer: E::Column,
    ids: &[String],
) -> Result<(), DbErr> {
    for chunk in chunks(ids) {
        let delete = Query::delete()
            .from_table(table)
            .and_where(customer_in(customer, chunk))
            .to_owned();
        db.execute(&delete).await?;
    }
    Ok(())
}

/// Moves the touchpoints of `merged` to `survivor` and forgets the merged
/// customers' other facts (the survivor's profile arrives with the merge).
pub async fn merge(
    db: &impl ConnectionTrait,
    survivor: &str,
    merged: &[String],
    now_us: i64,
) -> Result<(), DbErr> {
    for chunk in chunks(merged) {
        let update = Query::update()
            .table(FactTouchpoints)
            .value(FT::CustomerId, survivor)
            .and_where(Expr::col(FT::CustomerId).is_in(chunk.iter().cloned()))
            .to_owned();
        db.execute(&update).await?;
    }
    delete_where_customer(db, FactCustomers, FC::CustomerId, merged).await?;
    delete_where_customer(db, FactAttributes, FA::CustomerId, merged).await?;
    delete_where_customer(db, FactConsents, FK::CustomerId, merged).await?;
    delete_where_customer(db, FactScoreCurves, SC::CustomerId, merged).await?;
    delete_where_customer(db, FactScoreTerms, ST::CustomerId, merged).await?;
    mark_gone(db, merged, now_us).await?;
    Ok(())
}

/// Deletes every fact of `ids` (pending scores included) and records them
/// as gone.
pub async fn erase(db: &impl ConnectionTrait, ids: &[String], now_us: i64) -> Result<(), DbErr> {
    for chunk in chunks(ids) {
        let events = Query::select()
            .column(FT::EventId)
            .from(FactTouchpoints)
            .and_where(Expr::col(FT::CustomerId).is_in(chunk.iter().cloned()))
            .to_owned();
        let delete = Query::delete()
            .from_table(FactTouchProps)
            .and_where(Expr::col(FP::EventId).in_subquery(events))
            .to_owned();
        db.execute(&delete).await?;
    }
    delete_where_customer(db, FactTouchpoints, FT::CustomerId, ids).await?;
    delete_where_customer(db, FactCustomers, FC::CustomerId, ids).await?;
    delete_where_customer(db, FactAttributes, FA::CustomerId, ids).await?;
    delete_where_customer(db, FactConsents, FK::CustomerId, ids).await?;
    delete_where_customer(db, FactScoreCurves, SC::CustomerId, ids).await?;
    delete_where_customer(db, FactScoreTerms, ST::CustomerId, ids).await?;
    mark_gone(db, ids, now_us).await?;
    Ok(())
}

/// The facts of those of `ids` that have a profile row, including their
/// current segment memberships (`segments/{id}`), for an evaluation at `at`
/// of rules that read `touches`: only the touchpoints those rules can count
/// at `at` are read (see [`crate::lookback`]).
pub async fn load(
    db: &impl ConnectionTrait,
    ids: &[String],
    touches: &Lookback,
    at: chrono::DateTime<chrono::Utc>,
) -> Result<HashMap<String, FactSet>, DbErr> {
    // Only customers with a profile row: the backfill query starts there too.
    let mut out: HashMap<String, FactSet> = HashMap::with_capacity(ids.len());
    let since = touches.since(at);
    for chunk in chunks(ids) {
        let q = Query::select()
            .columns(PROFILE_COLS)
            .columns([
                FC::Grade,
                FC::NpsLast,
                FC::CsatLast,
                FC::LoyaltyTier,
                FC::LoyaltyBalance,
            ])
            .from(FactCustomers)
            .and_where(customer_in(FC::CustomerId, chunk))
            .and_where(Expr::col(FC::Profiled).eq(true))
            .to_owned();
        for row in db.query_all(&q).await? {
            let id: String = row.try_get("", FC::CustomerId.as_str())?;
            let fs = out.entry(id).or_insert_with(default_facts);
            fs.email = row.try_get("", FC::Email.as_str())?;
            fs.display_name = row.try_get("", FC::DisplayName.as_str())?;
            let birth: Option<String> = row.try_get("", FC::BirthDate.as_str())?;
            fs.demographics.birth_date =
                birth.and_then(|b| NaiveDate::parse_from_str(&b, "%Y-%m-%d").ok());
            let gender: Option<i16> = row.try_get("", FC::Gender.as_str())?;
            fs.demographics.gender = gender.and_then(Gender::from_code);
            let minor: Option<i64> = row.try_get("", FC::IncomeMinor.as_str())?;
            let currency: Option<String> = row.try_get("", FC::IncomeCurrency.as_str())?;
            fs.demographics.annual_income =
                minor.zip(currency).map(|(amount_minor, currency)| Money {
                    currency,
                    amount_minor,
                });
            fs.demographics.occupation = row.try_get("", FC::Occupation.as_str())?;
            let stage: Option<i16> = row.try_get("", FC::Stage.as_str())?;
            let stage_us: Option<i64> = row.try_get("", FC::StageUs.as_str())?;
            fs.stage = stage
                .and_then(Stage::from_code)
                .zip(stage_us.map(from_micros));
            fs.grade = row.try_get("", FC::Grade.as_str())?;
            let nps: Option<i16> = row.try_get("", FC::NpsLast.as_str())?;
            fs.nps_last = nps.and_then(|x| u8::try_from(x).ok());
            fs.csat_last = row.try_get("", FC::CsatLast.as_str())?;
            fs.loyalty_tier = row.try_get("", FC::LoyaltyTier.as_str())?;
            fs.loyalty_balance = row.try_get("", FC::LoyaltyBalance.as_str())?;
        }
        let q = Query::select()
            .columns([
                FA::CustomerId,
                FA::Key,
                FA::Kind,
                FA::StrValue,
                FA::NumValue,
                FA::BoolValue,
                FA::TimeUs,
            ])
            .from(FactAttributes)
            .and_where(customer_in(FA::CustomerId, chunk))
            .to_owned();
        for row in db.query_all(&q).await? {
            let id: String = row.try_get("", FA::CustomerId.as_str())?;
            let Some(fs) = out.get_mut(&id) else { continue };
            let key: String = row.try_get("", FA::Key.as_str())?;
            let kind: i16 = row.try_get("", FA::Kind.as_str())?;
            let v = match kind {
                attr_kind::STRING => row
                    .try_get::<Option<String>>("", FA::StrValue.as_str())?
                    .map(AttributeValue::String),
                attr_kind::NUMBER => row
                    .try_get::<Option<f64>>("", FA::NumValue.as_str())?
                    .map(AttributeValue::Number),
                attr_kind::BOOL => row
                    .try_get::<Option<bool>>("", FA::BoolValue.as_str())?
                    .map(AttributeValue::Bool),
                _ => row
                    .try_get::<Option<i64>>("", FA::TimeUs.as_str())?
                    .map(|t| AttributeValue::Timestamp(from_micros(t))),
            };
            if let Some(v) = v {
                fs.attributes.insert(key, v);
            }
        }
        let q = Query::select()
            .columns([FK::CustomerId, FK::Purpose, FK::Channel, FK::Granted])
            .from(FactConsents)
            .and_where(customer_in(FK::CustomerId, chunk))
            .to_owned();
        for row in db.query_all(&q).await? {
            let id: String = row.try_get("", FK::CustomerId.as_str())?;
            let Some(fs) = out.get_mut(&id) else { continue };
            let purpose: String = row.try_get("", FK::Purpose.as_str())?;
            let channel: String = row.try_get("", FK::Channel.as_str())?;
            let granted: bool = row.try_get("", FK::Granted.as_str())?;
            if granted {
                fs.grant(&purpose, &channel);
            } else if let Some(set) = fs.consents.get_mut(&purpose) {
                set.remove(&channel);
            }
        }
        load_curves(db, chunk, &mut out).await?;
        let mut by_event: HashMap<String, (String, usize)> = HashMap::new();
        let touched = touches_of(chunk, &since);
        let rows = match &touched {
            Some(cond) => {
                let q = Query::select()
                    .columns(TOUCH_COLS)
                    .from(FactTouchpoints)
                    .cond_where(cond.clone())
                    .to_owned();
                db.query_all(&q).await?
            }
            None => Vec::new(),
        };
        // By position in TOUCH_COLS: the most rows an evaluation reads,
        // where a lookup by name compares every column name per cell.
        for row in rows {
            let id: String = row.try_get_by_index(1)?;
            let Some(fs) = out.get_mut(&id) else { continue };
            let kind: i16 = row.try_get_by_index(2)?;
            let Some(kind) = TouchpointKind::from_code(kind) else {
                continue;
            };
            let minor: Option<i64> = row.try_get_by_index(9)?;
            let currency: Option<String> = row.try_get_by_index(10)?;
            let event_id: String = row.try_get_by_index(0)?;
            by_event.insert(event_id.clone(), (id, fs.touchpoints.len()));
            fs.touchpoints.push(Touchpoint {
                event_id,
                kind,
                custom_type: row.try_get_by_index(3)?,
                occurred_time: from_micros(row.try_get_by_index(4)?),
                usage_millis: row.try_get_by_index(11)?,
                product: row.try_get_by_index(5)?,
                feature: row.try_get_by_index(6)?,
                revenue: minor.zip(currency).map(|(amount_minor, currency)| Money {
                    currency,
                    amount_minor,
                }),
                campaign: row.try_get_by_index(7)?,
                channel: row.try_get_by_index(8)?,
                properties: BTreeMap::new(),
            });
        }
        if let Some(cond) = touched.filter(|_| !by_event.is_empty()) {
            let events = Query::select()
                .column(FT::EventId)
                .from(FactTouchpoints)
                .cond_where(cond)
                .to_owned();
            let q = Query::select()
                .columns([FP::EventId, FP::Key, FP::Value])
                .from(FactTouchProps)
                .and_where(Expr::col(FP::EventId).in_subquery(events))
                .to_owned();
            for row in db.query_all(&q).await? {
                let event: String = row.try_get("", FP::EventId.as_str())?;
                if let Some((id, i)) = by_event.get(&event)
                    && let Some(tp) = out.get_mut(id).and_then(|fs| fs.touchpoints.get_mut(*i))
                {
                    tp.properties.insert(
                        row.try_get("", FP::Key.as_str())?,
                        row.try_get("", FP::Value.as_str())?,
                    );
                }
            }
        }
        let q = Query::select()
            .columns([M::CustomerId, M::SegmentId])
            .from(Members)
            .and_where(customer_in(M::CustomerId, chunk))
            .to_owned();
        for row in db.query_all(&q).await? {
            let id: String = row.try_get("", M::CustomerId.as_str())?;
            let Some(fs) = out.get_mut(&id) else { continue };
            let seg: String = row.try_get("", M::SegmentId.as_str())?;
            fs.segments.insert(format!("segments/{seg}"));
        }
    }
    Ok(out)
}

/// The touchpoints of `chunk` an evaluation reads: per kind in `since`,
/// all of them (`None`) or those that occurred from its instant on; `None`
/// when it reads none (by the `(customer_id, kind, occurred_us)` index).
fn touches_of(chunk: &[String], since: &[(i16, Option<i64>)]) -> Option<Condition> {
    if since.is_empty() {
        return None;
    }
    let mut kinds = Condition::any();
    for (kind, from) in since {
        let mut c = Condition::all().add(Expr::col(FT::Kind).eq(*kind));
        if let Some(from) = from {
            c = c.add(Expr::col(FT::OccurredUs).gte(*from));
        }
        kinds = kinds.add(c);
    }
    Some(
        Condition::all()
            .add(customer_in(FT::CustomerId, chunk))
            .add(kinds),
    )
}

/// Adds the score curves of `chunk` to the facts in `out` (two statements).
async fn load_curves(
    db: &impl ConnectionTrait,
    chunk: &[String],
    out: &mut HashMap<String, FactSet>,
) -> Result<(), DbErr> {
    let q = Query::select()
        .columns([
            SC::CustomerId,
            SC::Model,
            SC::Name,
            SC::ChangedUs,
            SC::IdlePoints,
            SC::IdleEveryUs,
            SC::LastUs,
            SC::Floor,
            SC::Ceiling,
        ])
        .from(FactScoreCurves)
        .and_where(customer_in(SC::CustomerId, chunk))
        .to_owned();
    for row in db.query_all(&q).await? {
        let id: String = row.try_get("", SC::CustomerId.as_str())?;
        let Some(fs) = out.get_mut(&id) else { continue };
        let points: Option<i64> = row.try_get("", SC::IdlePoints.as_str())?;
        let every: Option<i64> = row.try_get("", SC::IdleEveryUs.as_str())?;
        let last: Option<i64> = row.try_get("", SC::LastUs.as_str())?;
        let inactivity = match (points, every, last) {
            (Some(points), Some(every), Some(last)) => Some((
                Inactivity {
                    points,
                    every: chrono::TimeDelta::microseconds(every),
                },
                last,
            )),
            _ => None,
        };
        fs.curves.insert(
            (
                row.try_get("", SC::Model.as_str())?,
                row.try_get("", SC::Name.as_str())?,
            ),
            (
                row.try_get("", SC::ChangedUs.as_str())?,
                Curve {
                    terms: Vec::new(),
                    inactivity,
                    floor: row.try_get("", SC::Floor.as_str())?,
                    ceiling: row.try_get("", SC::Ceiling.as_str())?,
                },
            ),
        );
    }
    let q = Query::select()
        .columns([
            ST::CustomerId,
            ST::Model,
            ST::Name,
            ST::Coef,
            ST::SinceUs,
            ST::Kind,
            ST::ParamUs,
        ])
        .from(FactScoreTerms)
        .and_where(customer_in(ST::CustomerId, chunk))
        .order_by(ST::CustomerId, sea_orm::Order::Asc)
        .order_by(ST::Model, sea_orm::Order::Asc)
        .order_by(ST::Name, sea_orm::Order::Asc)
        .order_by(ST::Seq, sea_orm::Order::Asc)
        .to_owned();
    for row in db.query_all(&q).await? {
        let id: String = row.try_get("", ST::CustomerId.as_str())?;
        let Some(fs) = out.get_mut(&id) else { continue };
        let key: (String, String) = (
            row.try_get("", ST::Model.as_str())?,
            row.try_get("", ST::Name.as_str())?,
        );
        let Some((_, curve)) = fs.curves.get_mut(&key) else {
            continue;
        };
        curve.terms.push(Term {
            coef: row.try_get("", ST::Coef.as_str())?,
            since_us: row.try_get("", ST::SinceUs.as_str())?,
            decay: Decay::from_code(
                row.try_get("", ST::Kind.as_str())?,
                row.try_get("", ST::ParamUs.as_str())?,
            ),
        });
    }
    Ok(())
}

/// The facts of a customer nobody told us anything about: the consents
/// granted by default (opt-out purposes) on every channel.
pub fn default_facts() -> FactSet {
    let mut fs = FactSet::default();
    for (p, _) in PURPOSES {
        if granted_by_default(p) {
            for (c, _) in CHANNELS {
                fs.grant(p, c);
            }
        }
    }
    fs
}

/// Records how fresh the facts are: the newest applied event's occurrence
/// and when it was applied.
pub async fn mark_fresh(
    db: &impl ConnectionTrait,
    event_us: i64,
    apply_us: i64,
) -> Result<(), DbErr> {
    let update = Query::update()
        .table(SegMeta)
        .value(SM::FreshEventUs, event_us)
        .value(SM::FreshApplyUs, apply_us)
        .and_where(Expr::col(SM::Id).eq(1))
        .to_owned();
    db.execute(&update).await?;
    Ok(())
}

/// Every score name some customer has.
pub async fn score_names(
    db: &impl ConnectionTrait,
) -> Result<std::collections::BTreeSet<String>, DbErr> {
    let q = Query::select()
        .distinct()
        .column(SC::Name)
        .from(FactScoreCurves)
        .to_owned();
    let mut names = std::collections::BTreeSet::new();
    for r in db.query_all(&q).await? {
        names.insert(r.try_get::<String>("", "name")?);
    }
    Ok(names)
}
