//! The SQL of the KPI reports: each report is one or two set-based
//! statements over `stage_history`, `customers`, `campaigns`,
//! `campaign_spend`, `touchpoints` and the rollups kept at every write
//! ([`super::rollups`], [`super::activity`], [`super::journeys`]), never a
//! query per customer. The text is the same on PostgreSQL and SQLite (both
//! take `$n` parameters, window functions, CTEs) except the funnel's
//! nearest-rank percentiles (`percentile_disc` on PostgreSQL). Every
//! aggregate that PostgreSQL would widen to `numeric` is cast back to
//! `BIGINT`; rates, percentages and money rounding are done by
//! [`clm_domain::kpi`] on the aggregated rows.

use clm_platform::Error;
use clm_platform::db::is_postgres;
use sea_orm::{ConnectionTrait, QueryResult, Statement, Value};

/// Stage codes (`Stage::code`).
const CHURNED: i16 = 6;
/// Touchpoint kind codes (`TouchpointKind::code`).
const PURCHASE: i16 = 4;
const CAMPAIGN_TOUCH: i16 = 5;
const CUSTOM: i16 = 7;

/// Which customers a report looks at, beyond its period.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scope {
    /// Period start (µs, inclusive).
    pub start_us: i64,
    /// Period end (µs, exclusive).
    pub end_us: i64,
    /// Only customers of this campaign (`campaigns/{id}`).
    pub campaign: Option<String>,
    /// Only customers of campaigns of this channel.
    pub channel: Option<i16>,
    /// Only customers whose first CONVERSION is in `[lo, hi)` (µs).
    pub cohort: Option<(i64, i64)>,
    /// Only customers with this attribute value.
    pub attribute: Option<AttributeMatch>,
}

/// An attribute value to match, in every column it could be stored in.
#[derive(Debug, Clone, PartialEq)]
pub struct AttributeMatch {
    /// Key.
    pub key: String,
    /// The value as text (matches a string attribute).
    pub text: String,
    /// The value as a number, when it reads as one.
    pub number: Option<f64>,
    /// The value as a boolean, when it is `true` or `false`.
    pub boolean: Option<bool>,
}

/// A statement being written: SQL text plus its bound values.
struct Sql {
    pg: bool,
    text: String,
    values: Vec<Value>,
}

impl Sql {
    fn new(db: &impl ConnectionTrait) -> Self {
        Self {
            pg: is_postgres(db),
            text: String::new(),
            values: Vec::new(),
        }
    }

    /// Binds `v` and returns its placeholder.
    fn p(&mut self, v: impl Into<Value>) -> String {
        self.values.push(v.into());
        format!("${}", self.values.len())
    }

    fn push(&mut self, s: &str) {
        self.text.push_str(s);
    }

    /// The calendar month of a µs column: [`month_sql`].
    fn month(&self, col: &str) -> String {
        month_sql(col)
    }

    /// ` AND {col} IN (...)` for each filter of `scope` that is set.
    fn scope(&mut self, col: &str, scope: &Scope) -> String {
        let mut out = String::new();
        if let Some(c) = &scope.campaign {
            let c1 = self.p(c.clone());
            out.push_str(&format!(
                " AND {col} IN (SELECT id FROM customers WHERE acquisition_campaign = {c1} \
                 UNION SELECT customer_id FROM touchpoints WHERE kind = {CAMPAIGN_TOUCH} AND campaign = {c1})"
            ));
        }
        if let Some(ch) = scope.channel {
            let c1 = self.p(ch);
            out.push_str(&format!(
                " AND {col} IN (SELECT cu.id FROM customers cu JOIN campaigns ca ON ca.name = cu.acquisition_campaign \
                 WHERE ca.channel = {c1} \
                 UNION SELECT t.customer_id FROM touchpoints t JOIN campaigns ca ON ca.name = t.campaign \
                 WHERE t.kind = {CAMPAIGN_TOUCH} AND ca.channel = {c1})"
            ));
        }
        if let Some((lo, hi)) = scope.cohort {
            let (lo, hi) = (self.p(lo), self.p(hi));
            out.push_str(&format!(
                " AND {col} IN (SELECT id FROM customers \
                 WHERE first_conversion_us >= {lo} AND first_conversion_us < {hi})"
            ));
        }
        if let Some(a) = &scope.attribute {
            let key = self.p(a.key.clone());
            let mut alts = vec![format!("string_value = {}", self.p(a.text.clone()))];
            if let Some(n) = a.number {
                alts.push(format!("number_value = {}", self.p(n)));
            }
            if let Some(b) = a.boolean {
                alts.push(format!("bool_value = {}", self.p(b)));
            }
            out.push_str(&format!(
                " AND {col} IN (SELECT customer_id FROM customer_attributes WHERE key = {key} AND ({}))",
                alts.join(" OR ")
            ));
        }
        out
    }

    async fn all(self, db: &impl ConnectionTrait) -> Result<Vec<QueryResult>, Error> {
        let backend = db.get_database_backend();
        Ok(db
            .query_all_raw(Statement::from_sql_and_values(
                backend,
                self.text,
                self.values,
            ))
            .await?)
    }
}

/// `month_index` (year × 12 + month − 1, UTC) of a µs column (a time
/// from 1970 on), in integer arithmetic only: the civil-from-days
/// algorithm (H. Hinnant), the same text on both backends (on
/// PostgreSQL about as fast as `EXTRACT` on `to_timestamp`). With
/// `z = days + 719468`, `era = z / 146097`, `doe = z − 146097 era`,
/// `yoe = (doe − doe/1460 + doe/36524 − doe/146096) / 365`,
/// `doy = doe − (365 yoe + yoe/4 − yoe/100)`, `mp = (5 doy + 2) / 153`
/// (months from March), the month index is `12 (yoe + 400 era) + mp + 2`.
pub fn month_sql(col: &str) -> String {
    let z = format!("(({col}) / 86400000000 + 719468)");
    let era = format!("({z} / 146097)");
    let doe = format!("({z} - {era} * 146097)");
    let yoe = format!("(({doe} - {doe} / 1460 + {doe} / 36524 - {doe} / 146096) / 365)");
    let doy = format!("({doe} - (365 * {yoe} + {yoe} / 4 - {yoe} / 100))");
    let mp = format!("((5 * {doy} + 2) / 153)");
    format!("CAST(12 * ({yoe} + 400 * {era}) + {mp} + 2 AS BIGINT)")
}

/// Memory a report's sorts and hashes may use on PostgreSQL before they
/// spill to disk (per sort or hash node); the default 4 MB makes a report
/// over a million customers write temporary files.
const REPORT_WORK_MEM: &str = "128MB";

/// A read transaction for one report: on PostgreSQL with
/// [`REPORT_WORK_MEM`] and JIT off for it alone (`SET LOCAL`).
pub async fn begin(
    db: &sea_orm::DatabaseConnection,
) -> Result<sea_orm::DatabaseTransaction, Error> {
    let txn = sea_orm::TransactionTrait::begin(db).await?;
    if is_postgres(&txn) {
        txn.execute_unprepared(&format!("SET LOCAL work_mem = '{REPORT_WORK_MEM}'"))
            .await?;
        // JIT compiling a report's expressions costs about a second per
        // statement and wins nothing back on these plans.
        txn.execute_unprepared("SET LOCAL jit = off").await?;
    }
    Ok(txn)
}

fn get<T: sea_orm::TryGetable>(r: &QueryResult, col: &str) -> Result<T, Error> {
    Ok(r.try_get::<T>("", col)?)
}

/// The CTE `conv(customer_id, conv_us, conv_month, explicit, churn_us)`: customers in
/// scope whose first move into CONVERSION is in the period, with its time,
/// their explicit acquisition campaign and their first churn after it (an
/// index range on the [rollup](super::rollups) column).
fn conv_cte(q: &mut Sql, scope: &Scope) -> String {
    let (s, e) = (q.p(scope.start_us), q.p(scope.end_us));
    let filter = q.scope("id", scope);
    format!(
        "conv AS (SELECT id AS customer_id, first_conversion_us AS conv_us, \
         first_conversion_month AS conv_month, \
         acquisition_campaign AS explicit, first_churn_us AS churn_us FROM customers \
         WHERE first_conversion_us >= {s} AND first_conversion_us < {e}{filter})"
    )
}

// ---------------------------------------------------------------- funnel

/// One stage's figures of the funnel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunnelRow {
    /// Entries into the stage in the period.
    pub entered: i64,
    /// Of those stays, the ones that ended in the period by a move to a
    /// later funnel stage.
    pub advanced: i64,
    /// Stays begun and ended in the period.
    pub stays: i64,
    /// Nearest-rank median of those stays (µs).
    pub p50_us: Option<i64>,
    /// Nearest-rank p90 (µs).
    pub p90_us: Option<i64>,
    /// Moves from the stage back to an earlier funnel stage.
    pub backward: i64,
    /// Moves from the stage to CHURNED.
    pub churned: i64,
}

/// The funnel of the period, by stage code (1..=6), in two statements:
/// the moves of the period counted by (from, to, where the stay went next),
/// and the nearest-rank percentiles of the stays that ended in the period.
/// Both read only the period's rows of `stage_history` with its
/// [rollup](super::rollups) columns: no per-customer window or grouping.
pub async fn funnel(
    db: &impl ConnectionTrait,
    scope: &Scope,
) -> Result<std::collections::BTreeMap<i16, FunnelRow>, Error> {
    let mut out = funnel_moves(db, scope).await?;
    funnel_stays(db, scope, &mut out).await?;
    Ok(out)
}

/// The funnel's counts of the period's moves by (from, to, where the stay
/// went next): the first statement of [`funnel`].
pub async fn funnel_moves(
    db: &impl ConnectionTrait,
    scope: &Scope,
) -> Result<std::collections::BTreeMap<i16, FunnelRow>, Error> {
    let mut q = Sql::new(db);
    let (s, e) = (q.p(scope.start_us), q.p(scope.end_us));
    let filter = q.scope("customer_id", scope);
    q.push(&format!(
        "SELECT CAST(COALESCE(from_stage, 0) AS BIGINT) AS f, CAST(to_stage AS BIGINT) AS t, \
           CAST(COALESCE(CASE WHEN left_us < {e} THEN next_stage END, 0) AS BIGINT) AS nx, \
           CAST(COUNT(*) AS BIGINT) AS n \
         FROM stage_history WHERE change_us >= {s} AND change_us < {e}{filter} \
         GROUP BY COALESCE(from_stage, 0), to_stage, COALESCE(CASE WHEN left_us < {e} THEN next_stage END, 0)"
    ));
    let mut out = std::collections::BTreeMap::<i16, FunnelRow>::new();
    for r in q.all(db).await? {
        let f = i16::try_from(get::<i64>(&r, "f")?).map_err(Error::internal)?;
        let t = i16::try_from(get::<i64>(&r, "t")?).map_err(Error::internal)?;
        let nx = i16::try_from(get::<i64>(&r, "nx")?).map_err(Error::internal)?;
        let n: i64 = get(&r, "n")?;
        let into = out.entry(t).or_default();
        into.entered += n;
        if t <= 5 && nx > t && nx <= 5 {
            into.advanced += n;
        }
        if (1..=5).contains(&f) {
            let from = out.entry(f).or_default();
            if t < f {
                from.backward += n;
            } else if t == CHURNED {
                from.churned += n;
            }
        }
    }
    Ok(out)
}

/// The funnel's nearest-rank percentiles of the stays begun and ended in
/// the period, written into `out` (the second statement of [`funnel`]).
pub async fn funnel_stays(
    db: &impl ConnectionTrait,
    scope: &Scope,
    out: &mut std::collections::BTreeMap<i16, FunnelRow>,
) -> Result<(), Error> {
    let mut q = Sql::new(db);
    let (s, e) = (q.p(scope.start_us), q.p(scope.end_us));
    let filter = q.scope("customer_id", scope);
    let stays = format!(
        "stays AS (SELECT to_stage AS stage, left_us - change_us AS dur FROM stage_history \
           WHERE change_us >= {s} AND change_us < {e} AND left_us < {e}{filter})"
    );
    // Nearest rank both ways: PostgreSQL's percentile_disc(p) is the first
    // value whose cumulative share reaches p, i.e. rank ceil(p × n); it
    // sorts once per stage, three times faster than the window variant.
    q.push(&if q.pg {
        format!(
            "WITH {stays} SELECT CAST(stage AS BIGINT) AS stage, CAST(COUNT(*) AS BIGINT) AS n, \
             CAST(percentile_disc(0.5) WITHIN GROUP (ORDER BY dur) AS BIGINT) AS p50, \
             CAST(percentile_disc(0.9) WITHIN GROUP (ORDER BY dur) AS BIGINT) AS p90 \
             FROM stays GROUP BY stage"
        )
    } else {
        format!(
            "WITH {stays}, \
         ranked AS (SELECT stage, dur, ROW_NUMBER() OVER (PARTITION BY stage ORDER BY dur) AS rn, \
           COUNT(*) OVER (PARTITION BY stage) AS n FROM stays) \
         SELECT CAST(stage AS BIGINT) AS stage, CAST(MAX(n) AS BIGINT) AS n, \
           CAST(MAX(CASE WHEN rn = (n * 50 + 99) / 100 THEN dur END) AS BIGINT) AS p50, \
           CAST(MAX(CASE WHEN rn = (n * 90 + 99) / 100 THEN dur END) AS BIGINT) AS p90 \
         FROM ranked GROUP BY stage"
        )
    });
    for r in q.all(db).await? {
        let stage = i16::try_from(get::<i64>(&r, "stage")?).map_err(Error::internal)?;
        let row = out.entry(stage).or_default();
        row.stays = get(&r, "n")?;
        row.p50_us = get(&r, "p50")?;
        row.p90_us = get(&r, "p90")?;
    }
    Ok(())
}

// ----------------------------------------------------------- attribution

/// Attribution models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Model {
    /// Earliest touch.
    FirstTouch,
    /// Latest touch.
    LastTouch,
    /// Equal shares.
    Linear,
}

/// One campaign's line of the acquisition report.
#[derive(Debug, Clone, PartialEq)]
pub struct CampaignLine {
    /// `campaigns/{id}`.
    pub campaign: String,
    /// Display name.
    pub display_name: String,
    /// Channel code.
    pub channel: i16,
    /// Currency.
    pub currency: String,
    /// Spend booked in the period (minor units).
    pub spend_minor: i64,
    /// Customers credited (sum of shares).
    pub credited: f64,
}

/// Acquisition totals.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Acquisition {
    /// Customers acquired in the period.
    pub acquired: i64,
    /// Of those, with some campaign credited.
    pub attributed: i64,
    /// Per campaign with spend or credit, by name.
    pub campaigns: Vec<CampaignLine>,
}

/// The CTEs `acq(customer_id)` (customers first converted in the period,
/// from the index on `first_conversion_us` alone) and
/// `credit(campaign, w, customer_id)` of `model`; the campaign touches come
/// from the rollup `attribution_touches` ([`super::activity`]: every touch
/// at or before the first conversion), with the one window the model needs.
fn credit_ctes(q: &mut Sql, scope: &Scope, model: Model) -> String {
    let period = |q: &mut Sql, col: &str| {
        let (s, e) = (q.p(scope.start_us), q.p(scope.end_us));
        let filter = q.scope(col, scope);
        format!("a.first_conversion_us >= {s} AND a.first_conversion_us < {e}{filter}")
    };
    let (p1, p2, p3) = (period(q, "a.id"), period(q, "a.id"), period(q, "a.id"));
    let (window, pick, weight) = match model {
        Model::FirstTouch => (
            "ROW_NUMBER() OVER (PARTITION BY t.customer_id ORDER BY t.occurred_us, t.event_id)",
            "WHERE r = 1",
            "CAST(1 AS DOUBLE PRECISION)",
        ),
        Model::LastTouch => (
            "ROW_NUMBER() OVER (PARTITION BY t.customer_id ORDER BY t.occurred_us DESC, t.event_id DESC)",
            "WHERE r = 1",
            "CAST(1 AS DOUBLE PRECISION)",
        ),
        Model::Linear => (
            "COUNT(*) OVER (PARTITION BY t.customer_id)",
            "",
            "CAST(1 AS DOUBLE PRECISION) / r",
        ),
    };
    format!(
        "WITH acq AS (SELECT a.id AS customer_id FROM customers a WHERE {p1}), \
         touches AS (SELECT t.customer_id, t.campaign, {window} AS r \
           FROM customers a JOIN attribution_touches t ON t.customer_id = a.id \
           AND t.occurred_us <= a.first_conversion_us JOIN campaigns ca ON ca.name = t.campaign \
           WHERE a.acquisition_campaign IS NULL AND {p2}), \
         credit AS (SELECT a.acquisition_campaign AS campaign, CAST(1 AS DOUBLE PRECISION) AS w, \
           a.id AS customer_id FROM customers a WHERE a.acquisition_campaign IS NOT NULL AND {p3} \
           UNION ALL SELECT campaign, {weight} AS w, customer_id FROM touches {pick})"
    )
}

/// Attribution and spend of the period under `model`, with the totals, in
/// one statement.
pub async fn acquisition(
    db: &impl ConnectionTrait,
    scope: &Scope,
    model: Model,
) -> Result<Acquisition, Error> {
    let mut q = Sql::new(db);
    let ctes = credit_ctes(&mut q, scope, model);
    let (s, e) = (q.p(scope.start_us), q.p(scope.end_us));
    let mut only = String::new();
    if let Some(c) = &scope.campaign {
        only.push_str(&format!(" AND ca.name = {}", q.p(c.clone())));
    }
    if let Some(ch) = scope.channel {
        only.push_str(&format!(" AND ca.channel = {}", q.p(ch)));
    }
    q.push(&format!(
        "{ctes}, \
         per_campaign AS (SELECT campaign, SUM(w) AS credited FROM credit GROUP BY campaign), \
         spend AS (SELECT campaign_id, CAST(SUM(amount_minor) AS BIGINT) AS spend FROM campaign_spend \
           WHERE book_us >= {s} AND book_us < {e} GROUP BY campaign_id) \
         SELECT 'c' AS k, ca.name, ca.display_name, CAST(ca.channel AS BIGINT) AS channel, ca.currency, \
           CAST(COALESCE(sp.spend, 0) AS BIGINT) AS spend, \
           CAST(COALESCE(pc.credited, 0) AS DOUBLE PRECISION) AS credited \
         FROM campaigns ca LEFT JOIN per_campaign pc ON pc.campaign = ca.name \
         LEFT JOIN spend sp ON sp.campaign_id = ca.id \
         WHERE (pc.campaign IS NOT NULL OR sp.campaign_id IS NOT NULL){only} \
         UNION ALL SELECT 't', '', '', CAST(0 AS BIGINT), '', \
           CAST((SELECT COUNT(*) FROM acq) AS BIGINT), \
           CAST((SELECT COUNT(DISTINCT customer_id) FROM credit) AS DOUBLE PRECISION) \
         ORDER BY 1, 2"
    ));
    let mut out = Acquisition::default();
    for r in q.all(db).await? {
        let k: String = get(&r, "k")?;
        if k == "t" {
            // The totals row: acquired customers, and how many have credit.
            out.acquired = get(&r, "spend")?;
            out.attributed = get::<f64>(&r, "credited")? as i64;
            continue;
        }
        out.campaigns.push(CampaignLine {
            campaign: get(&r, "name")?,
            display_name: get(&r, "display_name")?,
            channel: i16::try_from(get::<i64>(&r, "channel")?).map_err(Error::internal)?,
            currency: get(&r, "currency")?,
            spend_minor: get(&r, "spend")?,
            credited: get(&r, "credited")?,
        });
    }
    Ok(out)
}

// ------------------------------------------------------------------- CLV

/// One cohort month and currency of the CLV report.
#[derive(Debug, Clone, PartialEq)]
pub struct CohortValue {
    /// Month index of the cohort.
    pub month: i32,
    /// Customers in the cohort.
    pub customers: i64,
    /// Σ (min(churn, end) − conversion) over the cohort, µs.
    pub exposure_us: i64,
    /// Customers who churned after converting, before the end.
    pub churned: i64,
    /// Currency of the purchases (none: the cohort bought nothing).
    pub currency: Option<String>,
    /// Purchases.
    pub orders: i64,
    /// Revenue (minor units).
    pub revenue_minor: i64,
}

/// One customer's revenue in one currency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomerRevenue {
    /// Customer id.
    pub customer_id: String,
    /// Currency.
    pub currency: String,
    /// Purchases.
    pub orders: i64,
    /// Revenue (minor units).
    pub revenue_minor: i64,
}

/// The rows `(customer_id, month, currency, orders, revenue)` of the
/// purchases before the period's end of the customers first converted in
/// the period (`month`: the cohort month): the whole months before the
/// end's from the rollup `purchase_months` ([`super::activity`], selected
/// by its copy of the conversion time, no join), the part of the end's
/// month before it (none when the end starts a month) from `touchpoints`
/// joined with CTE `cohort` (columns `customer_id`, `month`).
fn purchases(q: &mut Sql, cohort: &str, scope: &Scope) -> String {
    let end_us = scope.end_us;
    let end_month = clm_domain::kpi::month_of(clm_platform::db::from_micros(end_us));
    let month_start = clm_domain::kpi::month_start_us(end_month);
    let (s, e) = (q.p(scope.start_us), q.p(end_us));
    let me = q.p(end_month);
    let filter = q.scope("customer_id", scope);
    let mut out = format!(
        "SELECT customer_id, conv_month AS month, currency, orders, revenue_minor AS revenue \
         FROM purchase_months WHERE conv_us >= {s} AND conv_us < {e} AND month < {me}{filter}"
    );
    if month_start < end_us {
        let (ms, e) = (q.p(month_start), q.p(end_us));
        out.push_str(&format!(
            " UNION ALL SELECT c.customer_id, c.month, t.currency, 1, t.revenue_minor \
             FROM {cohort} c JOIN touchpoints t ON t.customer_id = c.customer_id AND t.kind = {PURCHASE} \
             AND t.occurred_us >= {ms} AND t.occurred_us < {e}"
        ));
    }
    out
}

/// CLV inputs per cohort month and currency, and the `top` customers by
/// revenue (two statements), purchases read through [`purchases`].
pub async fn clv(
    db: &impl ConnectionTrait,
    scope: &Scope,
    top: u64,
) -> Result<(Vec<CohortValue>, Vec<CustomerRevenue>), Error> {
    let mut q = Sql::new(db);
    let conv = conv_cte(&mut q, scope);
    let e = q.p(scope.end_us);
    let month = "conv_month";
    let bought = purchases(&mut q, "coh", scope);
    q.push(&format!(
        "WITH {conv}, \
         coh AS (SELECT customer_id, conv_us, {month} AS month, \
           CASE WHEN churn_us < {e} THEN churn_us END AS churn_us FROM conv), \
         buys AS (SELECT month, currency, SUM(orders) AS orders, \
           CAST(SUM(revenue) AS BIGINT) AS revenue FROM ({bought}) AS b GROUP BY month, currency), \
         sizes AS (SELECT month, COUNT(*) AS customers, \
           CAST(SUM(COALESCE(churn_us, {e}) - conv_us) AS BIGINT) AS exposure, \
           SUM(CASE WHEN churn_us IS NULL THEN 0 ELSE 1 END) AS churned \
           FROM coh GROUP BY month) \
         SELECT CAST(s.month AS BIGINT) AS month, CAST(s.customers AS BIGINT) AS customers, \
           s.exposure, CAST(s.churned AS BIGINT) AS churned, b.currency, \
           CAST(COALESCE(b.orders, 0) AS BIGINT) AS orders, CAST(COALESCE(b.revenue, 0) AS BIGINT) AS revenue \
         FROM sizes s LEFT JOIN buys b ON b.month = s.month ORDER BY s.month, b.currency"
    ));
    let mut cohorts = Vec::new();
    for r in q.all(db).await? {
        cohorts.push(CohortValue {
            month: i32::try_from(get::<i64>(&r, "month")?).map_err(Error::internal)?,
            customers: get(&r, "customers")?,
            exposure_us: get(&r, "exposure")?,
            churned: get(&r, "churned")?,
            currency: get(&r, "currency")?,
            orders: get(&r, "orders")?,
            revenue_minor: get(&r, "revenue")?,
        });
    }
    let mut top_customers = Vec::new();
    if top > 0 {
        let mut q = Sql::new(db);
        let conv = conv_cte(&mut q, scope);
        let bought = purchases(&mut q, "coh", scope);
        let limit = q.p(i64::try_from(top).unwrap_or(i64::MAX));
        q.push(&format!(
            "WITH {conv}, coh AS (SELECT customer_id, 0 AS month FROM conv) \
             SELECT customer_id, currency, CAST(SUM(orders) AS BIGINT) AS orders, \
             CAST(SUM(revenue) AS BIGINT) AS revenue FROM ({bought}) AS b GROUP BY customer_id, currency \
             ORDER BY revenue DESC, customer_id LIMIT {limit}"
        ));
        for r in q.all(db).await? {
            top_customers.push(CustomerRevenue {
                customer_id: get(&r, "customer_id")?,
                currency: get(&r, "currency")?,
                orders: get(&r, "orders")?,
                revenue_minor: get(&r, "revenue")?,
            });
        }
    }
    Ok((cohorts, top_customers))
}

// ------------------------------------------------------------- retention

/// Retention counts: cohort sizes, active and churned customers per
/// (cohort month, offset).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Retention {
    /// (cohort month, customers).
    pub sizes: Vec<(i32, i64)>,
    /// (cohort month, months after, active customers), offsets 1..=months.
    pub active: Vec<(i32, i32, i64)>,
    /// (cohort month, months after, churned customers), offsets 0..=months.
    pub churned: Vec<(i32, i32, i64)>,
}

/// Retention of the cohorts converted in the period (one statement): the
/// cohort by the indexed first conversion, activity from the monthly
/// rollup `touch_months` ([`super::activity`]) selected by its copy of the
/// conversion time (no join).
pub async fn retention(
    db: &impl ConnectionTrait,
    scope: &Scope,
    active_kinds: &[i16],
    months: i32,
) -> Result<Retention, Error> {
    let mut q = Sql::new(db);
    let conv = conv_cte(&mut q, scope);
    let mask = q.p(active_kinds
        .iter()
        .fold(0i32, |m, k| m | (1i32 << (*k).clamp(0, 30))));
    let n = q.p(months);
    let cm = "conv_month";
    let chm = q.month("churn_us");
    let (s, e) = (q.p(scope.start_us), q.p(scope.end_us));
    let filter = q.scope("customer_id", scope);
    // Activity in a month after the cohort month is always at or after
    // t_conv, so the monthly rollup answers it exactly.
    q.push(&format!(
        "WITH {conv}, \
         coh AS (SELECT customer_id, {cm} AS cm FROM conv), \
         churn AS (SELECT customer_id, {cm} AS cm, {chm} AS chm FROM conv WHERE churn_us IS NOT NULL) \
         SELECT 's' AS k, CAST(cm AS BIGINT) AS cm, CAST(0 AS BIGINT) AS off, CAST(COUNT(*) AS BIGINT) AS n \
           FROM coh GROUP BY cm \
         UNION ALL SELECT 'a', CAST(conv_month AS BIGINT), CAST(month - conv_month AS BIGINT), CAST(COUNT(*) AS BIGINT) \
           FROM touch_months WHERE conv_us >= {s} AND conv_us < {e}{filter} AND month > conv_month \
           AND month <= conv_month + {n} AND (kinds & {mask}) <> 0 GROUP BY conv_month, month \
         UNION ALL SELECT 'c', CAST(cm AS BIGINT), CAST(chm - cm AS BIGINT), CAST(COUNT(*) AS BIGINT) FROM churn \
           WHERE chm <= cm + {n} GROUP BY cm, chm"
    ));
    let mut out = Retention::default();
    for r in q.all(db).await? {
        let k: String = get(&r, "k")?;
        let cm = i32::try_from(get::<i64>(&r, "cm")?).map_err(Error::internal)?;
        let off = i32::try_from(get::<i64>(&r, "off")?).map_err(Error::internal)?;
        let n: i64 = get(&r, "n")?;
        match k.as_str() {
            "s" => out.sizes.push((cm, n)),
            "a" => out.active.push((cm, off, n)),
            _ => out.churned.push((cm, off, n)),
        }
    }
    out.sizes.sort_unstable();
    Ok(out)
}

// ---------------------------------------------------------------- journey

/// One path of the journey report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRow {
    /// Steps joined by `>`: a kind code, or `c:{custom type}`.
    pub path: String,
    /// Customers.
    pub customers: i64,
    /// Nearest-rank median time from the first step to the move (µs).
    pub p50_us: i64,
}

/// Customers entering `stage` in the period (first entry each) and the
/// `top` most common paths of their last `max_len` touchpoints in the
/// `window_us` before the entry (one statement over the journey rollup
/// `move_paths`, [`super::journeys`]: one row per entry, no touchpoint
/// join).
pub async fn journey_paths(
    db: &impl ConnectionTrait,
    scope: &Scope,
    stage: i16,
    window_us: i64,
    max_len: i64,
    top: i64,
) -> Result<(i64, Vec<PathRow>), Error> {
    let steps = super::journeys::STEPS;
    let mut q = Sql::new(db);
    let (s, e) = (q.p(scope.start_us), q.p(scope.end_us));
    let st = q.p(stage);
    let filter = q.scope("customer_id", scope);
    let (w, l, t) = (q.p(window_us), q.p(max_len), q.p(top));
    // m: the kept touchpoints inside the window (a prefix: newest first).
    let m: Vec<String> = (1..=steps)
        .map(|i| format!("CASE WHEN u{i} >= change_us - {w} THEN 1 ELSE 0 END"))
        .collect();
    // The path of the k newest, oldest first, and the time from its first.
    let path: Vec<String> = (1..=steps)
        .map(|k| {
            let parts: Vec<String> = (1..=k).rev().map(|i| format!("s{i}")).collect();
            format!("WHEN {k} THEN {}", parts.join(" || '>' || "))
        })
        .collect();
    let first: Vec<String> = (1..=steps).map(|k| format!("WHEN {k} THEN u{k}")).collect();
    q.push(&format!(
        "WITH entries AS (SELECT p.*, {m} AS m FROM move_paths p \
           WHERE to_stage = {st} AND change_us >= {s} AND change_us < {e} \
           AND (prev_same_us IS NULL OR prev_same_us < {s}){filter}), \
         sized AS (SELECT entries.*, CASE WHEN m < {l} THEN m ELSE {l} END AS k FROM entries), \
         paths AS (SELECT CASE k {path} END AS path, change_us - CASE k {first} END AS dur \
           FROM sized WHERE k > 0), \
         ranked AS (SELECT path, dur, ROW_NUMBER() OVER (PARTITION BY path ORDER BY dur) AS rn, \
           COUNT(*) OVER (PARTITION BY path) AS n FROM paths) \
         SELECT 'p' AS k, path, n, p50 FROM (SELECT path, CAST(MAX(n) AS BIGINT) AS n, \
           CAST(MAX(CASE WHEN rn = (n * 50 + 99) / 100 THEN dur END) AS BIGINT) AS p50 \
           FROM ranked GROUP BY path ORDER BY n DESC, path LIMIT {t}) AS top_paths \
         UNION ALL SELECT 'e', '', CAST(COUNT(*) AS BIGINT), CAST(0 AS BIGINT) FROM entries",
        m = m.join(" + "),
        path = path.join(" "),
        first = first.join(" "),
    ));
    let mut paths = Vec::new();
    let mut entered = 0;
    for r in q.all(db).await? {
        let k: String = get(&r, "k")?;
        if k == "e" {
            entered = get(&r, "n")?;
            continue;
        }
        paths.push(PathRow {
            path: get(&r, "path")?,
            customers: get(&r, "n")?,
            p50_us: get(&r, "p50")?,
        });
    }
    // A union keeps no order: most customers first, then by path.
    paths.sort_by(|a, b| {
        b.customers
            .cmp(&a.customers)
            .then_with(|| a.path.cmp(&b.path))
    });
    Ok((entered, paths))
}

/// Counts behind the pain points: customers who left the funnel
/// (backward move or churn) in the period and who stayed, and per
/// touchpoint type how many of each had it in the window before their
/// first such move (leavers) or before the period's end (stayers).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PainCounts {
    /// Customers who left.
    pub leaving: i64,
    /// Customers who stayed.
    pub staying: i64,
    /// (step as in [`PathRow::path`], leavers with it, stayers with it).
    pub types: Vec<(String, i64, i64)>,
}

/// Pain-point counts (one statement): leavers and their types from the
/// journey rollup `move_paths` ([`super::journeys`]), stayers' types from
/// the touchpoints of the last window before the period's end (the index
/// `touchpoints_time`).
pub async fn pain_points(
    db: &impl ConnectionTrait,
    scope: &Scope,
    window_us: i64,
) -> Result<PainCounts, Error> {
    let mut q = Sql::new(db);
    let (s, e) = (q.p(scope.start_us), q.p(scope.end_us));
    let w = q.p(window_us);
    let f1 = q.scope("customer_id", scope);
    let f2 = q.scope("t.customer_id", scope);
    let f3 = q.scope("c.id", scope);
    let step = format!(
        "CASE WHEN t.kind = {CUSTOM} THEN 'c:' || COALESCE(t.custom_type, '') ELSE CAST(t.kind AS TEXT) END"
    );
    let steps = super::journeys::STEPS;
    let pos: Vec<String> = (1..=steps).map(|i| format!("({i})")).collect();
    let pick = |c: &str| -> String {
        let arms: Vec<String> = (1..=steps)
            .map(|i| format!("WHEN {i} THEN lp.{c}{i}"))
            .collect();
        format!("CASE pos.i {} END", arms.join(" "))
    };
    let (ps, pu) = (pick("s"), pick("u"));
    // A leaver's first leaving move and its types come from the journey
    // rollup (its last {steps} touchpoints); only when all of them are
    // inside the window could older ones be too, and those leavers read
    // the touchpoints themselves. Stayers: every customer with a type in
    // the last window, less those who are not stayers (few).
    let leaving = super::journeys::LEAVING;
    q.push(&format!(
        "WITH lv AS (SELECT p.*, ROW_NUMBER() OVER (PARTITION BY customer_id ORDER BY change_us, history_id) AS rn \
           FROM move_paths p WHERE {leaving} AND change_us >= {s} AND change_us < {e}{f1}), \
         lp AS (SELECT * FROM lv WHERE rn = 1), \
         pos (i) AS (VALUES {pos}), \
         lsteps AS (SELECT lp.customer_id, {ps} AS step FROM lp CROSS JOIN pos \
           WHERE {pu} >= lp.change_us - {w} \
           UNION SELECT l.customer_id, {step} FROM \
           (SELECT customer_id, change_us FROM lp WHERE u{steps} >= change_us - {w}) AS l \
           JOIN touchpoints t ON t.customer_id = l.customer_id AND t.occurred_us <= l.change_us \
           AND t.occurred_us >= l.change_us - {w}), \
         lt AS (SELECT step, COUNT(*) AS n FROM lsteps GROUP BY step), \
         recent AS (SELECT t.customer_id, {step} AS step FROM touchpoints t \
           WHERE t.occurred_us < {e} AND t.occurred_us >= {e} - {w}{f2} GROUP BY t.customer_id, {step}), \
         other AS (SELECT customer_id FROM lp UNION SELECT id FROM customers \
           WHERE stage = {CHURNED} OR create_us >= {e}), \
         st AS (SELECT r.step, COUNT(*) - COUNT(o.customer_id) AS n FROM recent r \
           LEFT JOIN other o ON o.customer_id = r.customer_id GROUP BY r.step) \
         SELECT 'l' AS k, step, CAST(n AS BIGINT) AS n FROM lt \
         UNION ALL SELECT 's', step, CAST(n AS BIGINT) FROM st \
         UNION ALL SELECT 'L', '', CAST(COUNT(*) AS BIGINT) FROM lp \
         UNION ALL SELECT 'S', '', CAST(COUNT(*) AS BIGINT) FROM customers c \
           WHERE c.create_us < {e} AND c.stage <> {CHURNED} AND c.id NOT IN (SELECT customer_id FROM lp){f3}",
        pos = pos.join(", "),
    ));
    let mut out = PainCounts::default();
    let mut by: std::collections::BTreeMap<String, (i64, i64)> = Default::default();
    for r in q.all(db).await? {
        let k: String = get(&r, "k")?;
        let step: String = get(&r, "step")?;
        let n: i64 = get(&r, "n")?;
        match k.as_str() {
            "l" => by.entry(step).or_default().0 = n,
            "s" => by.entry(step).or_default().1 = n,
            "L" => out.leaving = n,
            _ => out.staying = n,
        }
    }
    out.types = by.into_iter().map(|(k, (l, s))| (k, l, s)).collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use sea_orm::DatabaseConnection;
    use sea_orm_migration::MigratorTrait;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// `n` customers, each created, converted and with a campaign touch and
    /// a purchase, inserted set-based; one campaign.
    async fn seeded(n: i64) -> (tempfile::TempDir, DatabaseConnection, Arc<AtomicUsize>) {
        let dir = tempfile::tempdir().unwrap();
        let config = clm_platform::config::Config::defaults("customer", dir.path());
        let mut db = clm_platform::db::connect(&config.database).await.unwrap();
        crate::store::Migrator::up(&db, None).await.unwrap();
        let cid = "0190a0a0-0000-7000-8000-000000000001";
        for sql in [
            format!(
                "INSERT INTO campaigns VALUES ('{cid}', 'campaigns/{cid}', 'A', 1, 0, NULL, 'EUR', 0, 0, 0, 1)"
            ),
            format!(
                "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) \
                 INSERT INTO customers (id, display_name, stage, stage_change_us, create_us, update_us, version) \
                 SELECT 'c' || i, 'c', 3, 2000, 1000, 1000, 1 FROM s"
            ),
            "INSERT INTO stage_history (customer_id, from_stage, to_stage, reason, actor, change_us) \
             SELECT id, NULL, 1, 'r', 'a', 1000 FROM customers UNION ALL \
             SELECT id, 1, 3, 'r', 'a', 2000 + length(id) FROM customers"
                .into(),
            format!(
                "INSERT INTO touchpoints (event_id, customer_id, kind, occurred_us, record_us, campaign, \
                 revenue_minor, currency) \
                 SELECT 't' || id, id, 5, 1500, 1500, 'campaigns/{cid}', NULL, NULL FROM customers UNION ALL \
                 SELECT 'p' || id, id, 4, 2500, 2500, NULL, 100, 'EUR' FROM customers"
            ),
            "UPDATE customers SET first_conversion_us = 2000 + length(id), \
             first_conversion_month = 1970 * 12"
                .into(),
        ] {
            db.execute_unprepared(&sql).await.unwrap();
        }
        for sql in crate::store::activity::rebuild_sql(None) {
            db.execute_unprepared(&sql).await.unwrap();
        }
        db.execute_unprepared(&crate::store::journeys::fill_sql(None))
            .await
            .unwrap();
        let statements = Arc::new(AtomicUsize::new(0));
        let counter = statements.clone();
        db.set_metric_callback(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        (dir, db, statements)
    }

    /// Statements each report runs, whatever the number of customers: a
    /// report never loops over customers.
    async fn statements_per_report(n: i64) -> Vec<usize> {
        let (_dir, db, count) = seeded(n).await;
        let scope = Scope {
            start_us: 0,
            end_us: 1_000_000,
            ..Default::default()
        };
        let mut out = Vec::new();
        let mark = |out: &mut Vec<usize>| {
            out.push(count.swap(0, Ordering::SeqCst));
        };
        let f = funnel(&db, &scope).await.unwrap();
        assert_eq!(f[&3].entered, n);
        mark(&mut out);
        let a = acquisition(&db, &scope, Model::Linear).await.unwrap();
        assert_eq!((a.acquired, a.attributed), (n, n));
        mark(&mut out);
        let (cohorts, _) = clv(&db, &scope, 10).await.unwrap();
        assert_eq!(cohorts[0].orders, n);
        mark(&mut out);
        retention(&db, &scope, &[PURCHASE], 12).await.unwrap();
        mark(&mut out);
        let (entered, _) = journey_paths(&db, &scope, 3, 1_000_000, 5, 10)
            .await
            .unwrap();
        assert_eq!(entered, n);
        mark(&mut out);
        pain_points(&db, &scope, 1_000_000).await.unwrap();
        mark(&mut out);
        out
    }

    #[tokio::test]
    async fn the_sql_month_is_the_calendar_month() {
        let (_dir, db, _) = seeded(1).await;
        let q = Sql::new(&db);
        let mut times: Vec<i64> = vec![0, 951_868_799_999_999, 951_868_800_000_000];
        // Every month end and start from 1970 to 2100, and a day inside.
        for m in (1970 * 12)..(2100 * 12) {
            let start = clm_domain::kpi::month_start_us(m);
            times.extend([start - 1, start, start + 15 * 86_400_000_000]);
        }
        times.retain(|t| *t >= 0);
        for chunk in times.chunks(500) {
            let values: Vec<String> = chunk.iter().map(|t| format!("({t})")).collect();
            let sql = format!(
                "WITH x(us) AS (VALUES {}) SELECT us, {} AS m FROM x",
                values.join(", "),
                q.month("us")
            );
            for r in db
                .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
                .await
                .unwrap()
            {
                let us: i64 = r.try_get("", "us").unwrap();
                let m: i64 = r.try_get("", "m").unwrap();
                let t = clm_platform::db::from_micros(us);
                assert_eq!(m, i64::from(clm_domain::kpi::month_of(t)), "{t}");
            }
        }
    }

    #[tokio::test]
    async fn each_report_is_a_fixed_number_of_statements() {
        let small = statements_per_report(3).await;
        let large = statements_per_report(300).await;
        assert_eq!(small, vec![2, 1, 2, 1, 1, 1]);
        assert_eq!(small, large);
    }
}
