//! Objectives: their validation (proto → row, errors naming the field),
//! the value of each metric from the projections ([`store::metrics`]), and
//! the status formula. docs/segment-owners.md states the same formulas.
//!
//! * **Value** (current members only; 0 when nothing is there to measure):
//!   SIZE = members; CONVERSION_RATE(S) = members in S or a later funnel
//!   stage (CHURNED excluded) / members; AVERAGE_CLV(c) = lifetime purchase
//!   revenue of the members in currency c / members; REVENUE(c, w) =
//!   purchase revenue of the members in c within the trailing window w;
//!   CHURN_RATE = members in CHURNED / members; NPS = (promoters −
//!   detractors) / answers × 100 over the members' last NPS answers;
//!   CSAT = average of the members' last CSAT answers.
//! * **Status**, with `met(v)` = `v ≥ target` (AT_LEAST) or `v ≤ target`
//!   (AT_MOST): after the deadline, MET if `met(value at the deadline)`
//!   else MISSED; before it, MET if `met(value)`; otherwise the trend is
//!   the slope from the oldest daily snapshot of the last
//!   `objective_trend_days` days to now, `projected = value + slope ×
//!   (deadline − now)` (no snapshot: `projected = value`), ON_TRACK if
//!   `met(projected)` else AT_RISK.

use crate::store::metrics::{self, MemberFacts};
use crate::store::objectives::{self, Objective};
use clm_domain::Violations;
use clm_platform::db::{from_micros, to_micros};
use clm_platform::{Error, Result};
use clm_proto::customer as cpb;
use clm_proto::segmentation as pb;
use sea_orm::ConnectionTrait;
use std::collections::{BTreeSet, HashMap};

/// Most objectives a segment carries.
pub const MAX_OBJECTIVES: usize = 20;
/// Default window of REVENUE.
pub const DEFAULT_WINDOW_US: i64 = 30 * crate::store::history::DAY_US;
const MIN_WINDOW_US: i64 = 3_600_000_000;
const MAX_WINDOW_US: i64 = 366 * crate::store::history::DAY_US;
/// Tolerance of `met` (values are sums and ratios of integers).
const EPSILON: f64 = 1e-9;

fn metric(code: i16) -> pb::ObjectiveMetric {
    pb::ObjectiveMetric::try_from(i32::from(code)).unwrap_or(pb::ObjectiveMetric::Unspecified)
}

/// The objectives of a segment message as rows (`prefix` is the path of
/// the list, `segment.objectives`).
pub fn from_proto(prefix: &str, segment: &str, list: &[pb::Objective]) -> Result<Vec<Objective>> {
    let mut v = Violations::new();
    if list.len() > MAX_OBJECTIVES {
        return Err(Error::invalid(
            prefix,
            format!("at most {MAX_OBJECTIVES} objectives, got {}", list.len()),
        ));
    }
    let mut seen = BTreeSet::new();
    let mut rows = Vec::with_capacity(list.len());
    for (i, o) in list.iter().enumerate() {
        let at = |f: &str| format!("{prefix}[{i}].{f}");
        let id = o.id.trim();
        let valid_id = !id.is_empty()
            && id.len() <= 63
            && id.starts_with(|c: char| c.is_ascii_lowercase())
            && id
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid_id {
            v.push(clm_domain::Violation::new(
                at("id"),
                "must be 1..63 characters of a-z, 0-9 and -, starting with a letter",
            ));
        } else if !seen.insert(id.to_owned()) {
            v.push(clm_domain::Violation::new(
                at("id"),
                "is used by another objective of this segment",
            ));
        }
        let m = pb::ObjectiveMetric::try_from(o.metric).unwrap_or(pb::ObjectiveMetric::Unspecified);
        if m == pb::ObjectiveMetric::Unspecified {
            v.push(clm_domain::Violation::new(at("metric"), "is required"));
        }
        let stage = cpb::Stage::try_from(o.stage).unwrap_or(cpb::Stage::Unspecified);
        if m == pb::ObjectiveMetric::ConversionRate {
            if matches!(stage, cpb::Stage::Unspecified | cpb::Stage::Churned) {
                v.push(clm_domain::Violation::new(
                    at("stage"),
                    "is required for CONVERSION_RATE: a funnel stage (not CHURNED)",
                ));
            }
        } else if stage != cpb::Stage::Unspecified {
            v.push(clm_domain::Violation::new(
                at("stage"),
                "is only for CONVERSION_RATE",
            ));
        }
        if !o.target.is_finite() {
            v.push(clm_domain::Violation::new(
                at("target"),
                "must be a finite number",
            ));
        }
        let direction = pb::ObjectiveDirection::try_from(o.direction)
            .unwrap_or(pb::ObjectiveDirection::Unspecified);
        if direction == pb::ObjectiveDirection::Unspecified {
            v.push(clm_domain::Violation::new(
                at("direction"),
                "is required: AT_LEAST or AT_MOST",
            ));
        }
        let deadline = match &o.deadline {
            None => {
                v.push(clm_domain::Violation::new(at("deadline"), "is required"));
                None
            }
            Some(t) => v.check(
                "",
                clm_platform::convert::from_timestamp(&at("deadline"), t),
            ),
        };
        let money = matches!(
            m,
            pb::ObjectiveMetric::AverageClv | pb::ObjectiveMetric::Revenue
        );
        let currency = o.currency.trim();
        if money {
            if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_uppercase()) {
                v.push(clm_domain::Violation::new(
                    at("currency"),
                    "is required for AVERAGE_CLV and REVENUE: an ISO 4217 code (EUR)",
                ));
            }
        } else if !currency.is_empty() {
            v.push(clm_domain::Violation::new(
                at("currency"),
                "is only for AVERAGE_CLV and REVENUE",
            ));
        }
        let window = match (&o.window, m) {
            (None, pb::ObjectiveMetric::Revenue) => Some(DEFAULT_WINDOW_US),
            (None, _) => None,
            (Some(w), pb::ObjectiveMetric::Revenue) => {
                let us = w.seconds.saturating_mul(1_000_000) + i64::from(w.nanos / 1000);
                if !(MIN_WINDOW_US..=MAX_WINDOW_US).contains(&us) || w.nanos < 0 {
                    v.push(clm_domain::Violation::new(
                        at("window"),
                        "must be 1 hour..366 days",
                    ));
                }
                Some(us)
            }
            (Some(_), _) => {
                v.push(clm_domain::Violation::new(
                    at("window"),
                    "is only for REVENUE",
                ));
                None
            }
        };
        rows.push(Objective {
            segment_id: segment.to_owned(),
            objective_id: id.to_owned(),
            position: i16::try_from(i).unwrap_or(i16::MAX),
            metric: m as i16,
            stage: (m == pb::ObjectiveMetric::ConversionRate).then_some(stage as i16),
            target: o.target,
            direction: direction as i16,
            deadline_us: deadline.map(to_micros).unwrap_or_default(),
            currency: money.then(|| currency.to_owned()),
            window_us: window,
            status: 0,
            final_value: None,
        });
    }
    v.into_result()?;
    Ok(rows)
}

/// An objective's value and status at an instant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluated {
    /// The metric's value.
    pub value: f64,
    /// The status.
    pub status: pb::ObjectiveStatus,
    /// The value projected to the deadline.
    pub projected: f64,
    /// When, µs.
    pub at_us: i64,
}

/// An objective as the API shows it, with its evaluation if there is one.
pub fn to_proto(o: &Objective, e: Option<&Evaluated>) -> pb::Objective {
    pb::Objective {
        id: o.objective_id.clone(),
        metric: i32::from(o.metric),
        stage: o.stage.map(i32::from).unwrap_or_default(),
        target: o.target,
        direction: i32::from(o.direction),
        deadline: Some(clm_platform::convert::timestamp(from_micros(o.deadline_us))),
        currency: o.currency.clone().unwrap_or_default(),
        window: o.window_us.map(|us| prost_types::Duration {
            seconds: us / 1_000_000,
            nanos: i32::try_from((us % 1_000_000) * 1000).unwrap_or(0),
        }),
        current_value: e.map(|e| e.value).unwrap_or_default(),
        status: e.map(|e| e.status as i32).unwrap_or_default(),
        projected_value: e.map(|e| e.projected).unwrap_or_default(),
        evaluate_time: e.map(|e| clm_platform::convert::timestamp(from_micros(e.at_us))),
    }
}

/// What the metrics of a batch of segments read, measured once.
#[derive(Debug, Default)]
pub struct Measures {
    /// Member facts per segment.
    pub facts: HashMap<String, MemberFacts>,
    /// Lifetime revenue per (segment, currency).
    pub lifetime: HashMap<(String, String), i64>,
    /// Revenue per window (µs), per (segment, currency).
    pub windows: HashMap<i64, HashMap<(String, String), i64>>,
}

/// Measures what `objectives` (of `segments`) need at `now_us`: one grouped
/// query for the member facts, one for lifetime revenue if an objective or
/// the report needs it, one per distinct REVENUE window.
pub async fn measure(
    db: &impl ConnectionTrait,
    segments: &[String],
    objectives: &[&Objective],
    lifetime: bool,
    now_us: i64,
) -> Result<Measures> {
    let mut m = Measures {
        facts: metrics::member_facts(db, segments).await?,
        ..Measures::default()
    };
    if lifetime
        || objectives
            .iter()
            .any(|o| metric(o.metric) == pb::ObjectiveMetric::AverageClv)
    {
        m.lifetime = metrics::revenue(db, segments, None).await?;
    }
    let windows: BTreeSet<i64> = objectives
        .iter()
        .filter(|o| metric(o.metric) == pb::ObjectiveMetric::Revenue)
        .filter_map(|o| o.window_us)
        .collect();
    for w in windows {
        m.windows
            .insert(w, metrics::revenue(db, segments, Some(now_us - w)).await?);
    }
    Ok(m)
}

fn ratio(a: i64, b: i64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// The NPS of member facts (0 without answers).
pub fn nps(f: &MemberFacts) -> f64 {
    ratio(f.promoters - f.detractors, f.nps_answers) * 100.0
}

/// An objective's value from `m`.
pub fn value(o: &Objective, m: &Measures) -> f64 {
    let empty = MemberFacts::default();
    let f = m.facts.get(&o.segment_id).unwrap_or(&empty);
    let key = (o.segment_id.clone(), o.currency.clone().unwrap_or_default());
    match metric(o.metric) {
        pb::ObjectiveMetric::Size => f.size as f64,
        pb::ObjectiveMetric::ConversionRate => {
            let from = o.stage.unwrap_or(metrics::CHURNED);
            let converted: i64 = f
                .stages
                .iter()
                .filter(|(s, _)| **s >= from && **s != metrics::CHURNED)
                .map(|(_, n)| n)
                .sum();
            ratio(converted, f.size)
        }
        pb::ObjectiveMetric::AverageClv => {
            ratio(m.lifetime.get(&key).copied().unwrap_or(0), f.size)
        }
        pb::ObjectiveMetric::Revenue => o
            .window_us
            .and_then(|w| m.windows.get(&w))
            .and_then(|r| r.get(&key))
            .copied()
            .unwrap_or(0) as f64,
        pb::ObjectiveMetric::ChurnRate => ratio(
            f.stages.get(&metrics::CHURNED).copied().unwrap_or(0),
            f.size,
        ),
        pb::ObjectiveMetric::Nps => nps(f),
        pb::ObjectiveMetric::Csat => {
            if f.csat_answers == 0 {
                0.0
            } else {
                f.csat_sum / f.csat_answers as f64
            }
        }
        pb::ObjectiveMetric::Unspecified => 0.0,
    }
}

/// Whether `v` meets `o`'s target.
pub fn met(o: &Objective, v: f64) -> bool {
    if o.direction == pb::ObjectiveDirection::AtMost as i16 {
        v <= o.target + EPSILON
    } else {
        v >= o.target - EPSILON
    }
}

/// The status of `o` with value `value` at `now_us`, given the oldest
/// snapshot of the trend window (`first`: taken at, value), per the module
/// docs.
pub fn status(o: &Objective, value: f64, now_us: i64, first: Option<(i64, f64)>) -> Evaluated {
    let done = |v: f64| Evaluated {
        value: v,
        status: if met(o, v) {
            pb::ObjectiveStatus::Met
        } else {
            pb::ObjectiveStatus::Missed
        },
        projected: v,
        at_us: now_us,
    };
    if let Some(v) = o.final_value {
        return done(v);
    }
    if now_us >= o.deadline_us {
        return done(value);
    }
    let slope = first
        .filter(|(t, _)| *t < now_us)
        .map(|(t, v0)| (value - v0) / (now_us - t) as f64)
        .unwrap_or(0.0);
    let projected = value + slope * (o.deadline_us - now_us) as f64;
    let status = if met(o, value) {
        pb::ObjectiveStatus::Met
    } else if met(o, projected) {
        pb::ObjectiveStatus::OnTrack
    } else {
        pb::ObjectiveStatus::AtRisk
    };
    Evaluated {
        value,
        status,
        projected,
        at_us: now_us,
    }
}

/// Evaluates every objective of `segments` now: the objectives, the
/// measures and the trend's snapshots each read set-based for the batch.
pub async fn evaluate(
    db: &impl ConnectionTrait,
    segments: &[String],
    now_us: i64,
    trend_days: u32,
) -> Result<HashMap<String, Vec<(Objective, Evaluated)>>> {
    let all = objectives::of_segments(db, segments).await?;
    if all.is_empty() {
        return Ok(HashMap::new());
    }
    let with: Vec<String> = all.keys().cloned().collect();
    let list: Vec<&Objective> = all.values().flatten().collect();
    let m = measure(db, &with, &list, false, now_us).await?;
    let firsts = trend_starts(db, &with, now_us, trend_days).await?;
    Ok(all
        .into_iter()
        .map(|(seg, objs)| {
            let evaluated = objs
                .into_iter()
                .map(|o| {
                    let v = value(&o, &m);
                    let first = firsts
                        .get(&(o.segment_id.clone(), o.objective_id.clone()))
                        .copied();
                    let e = status(&o, v, now_us, first);
                    (o, e)
                })
                .collect();
            (seg, evaluated)
        })
        .collect())
}

/// Which state of a segment an evaluation was made for: its revision (an
/// edit) and its last completed backfill.
pub type Stamp = (i64, Option<i64>);

/// Evaluations served to reads (GetSegment, ListSegments), per segment,
/// for `objective_cache_secs`: a hot segment's members are measured at
/// most once per that period per replica (`evaluate_time` says when). An
/// edit or a completed backfill is evaluated afresh.
#[derive(Debug, Default)]
pub struct ReadCache {
    entries: std::sync::Mutex<HashMap<String, Cached>>,
}

/// One cached evaluation: for which state, when, and what.
type Cached = (Stamp, std::time::Instant, Vec<pb::Objective>);

impl ReadCache {
    /// The cached evaluation of `segment` at `revision`, if younger than `ttl`.
    pub fn get(
        &self,
        segment: &str,
        revision: Stamp,
        ttl: std::time::Duration,
    ) -> Option<Vec<pb::Objective>> {
        let mut map = self.entries.lock().ok()?;
        match map.get(segment) {
            Some((r, at, list)) if *r == revision && at.elapsed() < ttl => Some(list.clone()),
            Some(_) => {
                map.remove(segment);
                None
            }
            None => None,
        }
    }

    /// Keeps `list` as `segment`'s evaluation at `revision`.
    pub fn put(&self, segment: &str, revision: Stamp, list: Vec<pb::Objective>) {
        if let Ok(mut map) = self.entries.lock() {
            map.insert(
                segment.to_owned(),
                (revision, std::time::Instant::now(), list),
            );
        }
    }
}

/// The oldest snapshot (taken at, value) of each objective of `segments`
/// within the trend window before `now_us`.
pub async fn trend_starts(
    db: &impl ConnectionTrait,
    segments: &[String],
    now_us: i64,
    trend_days: u32,
) -> Result<HashMap<(String, String), (i64, f64)>> {
    let from = now_us - i64::from(trend_days) * crate::store::history::DAY_US;
    let mut out = HashMap::new();
    for s in objectives::snapshots(db, segments, from, now_us).await? {
        out.entry((s.segment_id, s.objective_id))
            .or_insert((s.taken_us, s.value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objective(metric: pb::ObjectiveMetric, target: f64, at_most: bool) -> Objective {
        Objective {
            segment_id: "s".into(),
            objective_id: "o".into(),
            position: 0,
            metric: metric as i16,
            stage: None,
            target,
            direction: if at_most {
                pb::ObjectiveDirection::AtMost
            } else {
                pb::ObjectiveDirection::AtLeast
            } as i16,
            deadline_us: 10 * crate::store::history::DAY_US,
            currency: None,
            window_us: None,
            status: 0,
            final_value: None,
        }
    }

    #[test]
    fn nps_and_csat_follow_their_formulas() {
        // 10 members: 5 answered NPS: 3 promoters, 1 passive, 1 detractor:
        // (3 - 1) / 5 * 100 = 40. CSAT answers 4, 5, 3: 12 / 3 = 4.
        let facts = MemberFacts {
            size: 10,
            promoters: 3,
            detractors: 1,
            nps_answers: 5,
            csat_sum: 12.0,
            csat_answers: 3,
            ..MemberFacts::default()
        };
        let mut m = Measures::default();
        m.facts.insert("s".into(), facts);
        let nps_o = objective(pb::ObjectiveMetric::Nps, 30.0, false);
        assert!((value(&nps_o, &m) - 40.0).abs() < 1e-12);
        let csat_o = objective(pb::ObjectiveMetric::Csat, 4.5, false);
        assert!((value(&csat_o, &m) - 4.0).abs() < 1e-12);
        // No answers: 0, not a division by zero.
        assert_eq!(value(&nps_o, &Measures::default()), 0.0);
    }

    #[test]
    fn status_projects_the_trend_to_the_deadline() {
        let day = crate::store::history::DAY_US;
        let o = objective(pb::ObjectiveMetric::Size, 6.0, false);
        // Value 4 now (day 2); 2 at day 0: slope 1/day, 8 days left:
        // projected 12 >= 6: on track.
        let e = status(&o, 4.0, 2 * day, Some((0, 2.0)));
        assert_eq!(e.status, pb::ObjectiveStatus::OnTrack);
        assert!((e.projected - 12.0).abs() < 1e-9);
        // Flat trend: projected 4 < 6: at risk.
        let e = status(&o, 4.0, 2 * day, Some((0, 4.0)));
        assert_eq!(e.status, pb::ObjectiveStatus::AtRisk);
        // No snapshot: projected = value.
        assert_eq!(
            status(&o, 4.0, 2 * day, None).status,
            pb::ObjectiveStatus::AtRisk
        );
        // Met now, and at or after the deadline: met / missed.
        assert_eq!(
            status(&o, 6.0, 2 * day, None).status,
            pb::ObjectiveStatus::Met
        );
        assert_eq!(
            status(&o, 5.0, 10 * day, None).status,
            pb::ObjectiveStatus::Missed
        );
        // A frozen value decides after the deadline whatever the value now.
        let frozen = Objective {
            final_value: Some(7.0),
            ..o.clone()
        };
        assert_eq!(
            status(&frozen, 1.0, 11 * day, None).status,
            pb::ObjectiveStatus::Met
        );
        // At most: 0.25 > 0.2 and rising: at risk.
        let churn = objective(pb::ObjectiveMetric::ChurnRate, 0.2, true);
        assert_eq!(
            status(&churn, 0.25, 2 * day, Some((0, 0.1))).status,
            pb::ObjectiveStatus::AtRisk
        );
    }
}
