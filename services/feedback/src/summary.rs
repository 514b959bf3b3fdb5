//! `GetSurveySummary`: the database computes the aggregates (see
//! `store::summary`, four grouped queries run side by side on the read
//! pool); this module only turns them into the formulas below.
//!
//! # Formulas, exactly as computed
//!
//! Over the responses the filters select (survey, version, period of the
//! last submission, stage and segment at the time, completed only):
//!
//! * **NPS** = 100 × (promoters − detractors) / (promoters + passives +
//!   detractors), counting answers to NPS-kind questions only: 9–10
//!   promoter, 7–8 passive, 0–6 detractor. A response that skipped the
//!   question or was never shown it is not in the denominator. 0 when
//!   nobody answered.
//! * **CSAT** = 100 × (answers 4–5) / (answers) over CSAT-kind questions.
//! * **CES** = the mean of the answers to CES-kind questions.
//! * Per question: *shown* (the responses it was shown to, see
//!   `clm_domain::survey`), *answered*, *skipped* = shown − answered,
//!   *dropped* (the responses that stopped at it), **drop-off rate** =
//!   dropped / shown, the mean of numeric answers and the count of each
//!   value or choice.
//! * **Response rate** = responses with at least one answer / invitations
//!   made in the period (invitations have no stage or segment, so those
//!   filters do not apply to them); **completion rate** = completed /
//!   responses.
//! * **Trend**: the same NPS, CSAT and CES per bucket of the last
//!   submission time, buckets aligned to the Unix epoch.

use crate::convert;
use crate::store::summary::{self, Filter, QuestionRow};
use clm_domain::survey::Kind;
use clm_platform::Result;
use clm_platform::convert::timestamp;
use clm_platform::db::from_micros;
use clm_proto::feedback as pb;
use std::collections::BTreeMap;

fn ratio(a: i64, b: i64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

#[derive(Default, Clone, Copy)]
struct Totals {
    promoters: i64,
    passives: i64,
    detractors: i64,
    csat_answered: i64,
    satisfied: i64,
    ces_answered: i64,
    ces_sum: i64,
}

impl Totals {
    fn add(&mut self, r: &QuestionRow) {
        match Kind::from_code(r.kind) {
            Some(Kind::Nps) => {
                self.promoters += r.promoters;
                self.passives += r.passives;
                self.detractors += r.detractors;
            }
            Some(Kind::Csat) => {
                self.csat_answered += r.num_count;
                self.satisfied += r.satisfied;
            }
            Some(Kind::Ces) => {
                self.ces_answered += r.num_count;
                self.ces_sum += r.num_sum;
            }
            _ => {}
        }
    }

    fn nps(&self) -> pb::NpsSummary {
        let n = self.promoters + self.passives + self.detractors;
        pb::NpsSummary {
            promoters: self.promoters,
            passives: self.passives,
            detractors: self.detractors,
            score: 100.0 * ratio(self.promoters - self.detractors, n),
        }
    }

    fn csat(&self) -> pb::CsatSummary {
        pb::CsatSummary {
            satisfied: self.satisfied,
            answered: self.csat_answered,
            score: 100.0 * ratio(self.satisfied, self.csat_answered),
        }
    }

    fn ces(&self) -> pb::CesSummary {
        pb::CesSummary {
            answered: self.ces_answered,
            mean: ratio(self.ces_sum, self.ces_answered),
        }
    }
}

/// The summary of the responses `f` selects; `order` is the question ids
/// of the latest version, in order; `bucket_us` the trend's width.
pub async fn summarise(
    db: &sea_orm::DatabaseConnection,
    f: &Filter,
    order: &[String],
    bucket_us: Option<i64>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<pb::SurveySummary> {
    let trend_rows = async {
        match bucket_us {
            Some(b) => summary::trend(db, f, b).await,
            None => Ok(Vec::new()),
        }
    };
    let (questions, values, totals, invitations, trend_rows, per_bucket) = tokio::try_join!(
        summary::questions(db, f),
        summary::distribution(db, f),
        summary::responses(db, f, None),
        summary::invitations(db, f),
        trend_rows,
        async {
            match bucket_us {
                Some(b) => summary::responses(db, f, Some(b)).await,
                None => Ok(Vec::new()),
            }
        },
    )?;
    let (responses, completed) = totals
        .first()
        .map_or((0, 0), |t| (t.responses, t.completed));
    let mut all = Totals::default();
    let mut values_of: BTreeMap<&str, Vec<&summary::ValueRow>> = BTreeMap::new();
    for v in &values {
        values_of.entry(v.question.as_str()).or_default().push(v);
    }
    let rank = |q: &QuestionRow| {
        order
            .iter()
            .position(|id| *id == q.question)
            .map_or((1, q.position), |p| {
                (0, i32::try_from(p).unwrap_or(i32::MAX))
            })
    };
    let mut rows: Vec<&QuestionRow> = questions.iter().collect();
    rows.sort_by_key(|q| (rank(q), q.question.clone()));
    let mut out_questions = Vec::with_capacity(rows.len());
    for q in rows {
        all.add(q);
        let kind = Kind::from_code(q.kind);
        let mut one = Totals::default();
        one.add(q);
        let mut distribution: Vec<pb::ValueCount> = values_of
            .get(q.question.as_str())
            .into_iter()
            .flatten()
            .map(|v| pb::ValueCount {
                value: v.value.clone(),
                count: v.n,
            })
            .collect();
        // Numbers in numeric order, choices by id.
        distribution.sort_by(
            |a, b| match (a.value.parse::<i64>(), b.value.parse::<i64>()) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => a.value.cmp(&b.value),
            },
        );
        out_questions.push(pb::QuestionSummary {
            question: q.question.clone(),
            kind: kind.map_or(0, |k| convert::kind_to_proto(k) as i32),
            shown: q.shown,
            answered: q.answered,
            skipped: q.shown - q.answered,
            dropped: q.dropped,
            drop_off_rate: ratio(q.dropped, q.shown),
            mean: ratio(q.num_sum, q.num_count),
            distribution,
            nps: (kind == Some(Kind::Nps)).then(|| one.nps()),
            csat: (kind == Some(Kind::Csat)).then(|| one.csat()),
            ces: (kind == Some(Kind::Ces)).then(|| one.ces()),
        });
    }
    let mut buckets: BTreeMap<i64, (Totals, i64, i64)> = BTreeMap::new();
    for r in &trend_rows {
        buckets.entry(r.bucket).or_default().0.add(r);
    }
    for r in &per_bucket {
        let b = buckets.entry(r.bucket).or_default();
        b.1 = r.responses;
        b.2 = r.completed;
    }
    Ok(pb::SurveySummary {
        survey: format!("surveys/{}", f.survey),
        invitations,
        responses,
        completed_responses: completed,
        response_rate: ratio(responses, invitations),
        completion_rate: ratio(completed, responses),
        nps: Some(all.nps()),
        csat: Some(all.csat()),
        ces: Some(all.ces()),
        questions: out_questions,
        trend: buckets
            .into_iter()
            .map(|(start, (t, responses, completed))| pb::TrendBucket {
                start_time: Some(timestamp(from_micros(start))),
                responses,
                completed_responses: completed,
                nps: Some(t.nps()),
                csat: Some(t.csat()),
                ces: Some(t.ces()),
            })
            .collect(),
        read_time: Some(timestamp(now)),
    })
}
