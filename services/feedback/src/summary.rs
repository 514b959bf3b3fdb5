//! `GetSurveySummary`: the database groups the answer rows (see
//! `store::summary`: one scan of the answer rows keyed by version,
//! position, kind and value, and small counts of responses, invitations
//! and choices, run side by side on the read pool); this module adds the
//! few resulting cells up into the formulas below.
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
use crate::store::summary::{self, Filter};
use clm_domain::survey::{self as domain, Kind};
use clm_platform::Result;
use clm_platform::convert::timestamp;
use clm_platform::db::from_micros;
use clm_proto::feedback as pb;
use std::collections::BTreeMap;

fn ratio(a: i64, b: i64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// NPS, CSAT and CES counts.
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
    /// Adds `n` answers of `kind` holding `number`.
    fn add(&mut self, kind: Option<Kind>, number: i64, n: i64) {
        match kind {
            Some(Kind::Nps) => match domain::nps_class(number) {
                domain::NpsClass::Promoter => self.promoters += n,
                domain::NpsClass::Passive => self.passives += n,
                domain::NpsClass::Detractor => self.detractors += n,
            },
            Some(Kind::Csat) => {
                self.csat_answered += n;
                if domain::satisfaction(number) == domain::Satisfaction::Satisfied {
                    self.satisfied += n;
                }
            }
            Some(Kind::Ces) => {
                self.ces_answered += n;
                self.ces_sum += number * n;
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

/// One question's cells added up.
#[derive(Default)]
struct Question {
    kind: Option<Kind>,
    rank: (u8, i32),
    shown: i64,
    answered: i64,
    dropped: i64,
    num_sum: i64,
    num_count: i64,
    totals: Totals,
    values: BTreeMap<i64, i64>,
}

/// The summary of the responses `f` selects. `versions` holds every
/// version's question ids in order (cells name questions by version and
/// position); the latest version orders the questions.
pub async fn summarise(
    db: &sea_orm::DatabaseConnection,
    f: &Filter,
    versions: &BTreeMap<i64, Vec<String>>,
    bucket_us: Option<i64>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<pb::SurveySummary> {
    let (cells, choices, totals, invitations, trend_cells, per_bucket) = tokio::try_join!(
        summary::cells(db, f),
        summary::choices(db, f),
        summary::responses(db, f, None),
        summary::invitations(db, f),
        async {
            match bucket_us {
                Some(b) => summary::trend(db, f, b).await,
                None => Ok(Vec::new()),
            }
        },
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
    let latest: &[String] = versions.values().next_back().map_or(&[], Vec::as_slice);
    let mut questions: BTreeMap<&str, Question> = BTreeMap::new();
    let mut all = Totals::default();
    for c in &cells {
        let Some(id) = versions
            .get(&c.survey_version)
            .and_then(|qs| qs.get(usize::try_from(c.position).ok()?))
        else {
            continue;
        };
        let q = questions.entry(id.as_str()).or_insert_with(|| Question {
            rank: latest
                .iter()
                .position(|x| x == id)
                .map_or((1, c.position), |p| {
                    (0, i32::try_from(p).unwrap_or(i32::MAX))
                }),
            ..Default::default()
        });
        q.kind = Kind::from_code(c.kind);
        q.rank.1 = if q.rank.0 == 1 {
            q.rank.1.min(c.position)
        } else {
            q.rank.1
        };
        q.shown += c.shown;
        q.answered += c.answered;
        q.dropped += c.dropped;
        if let Some(n) = c.number {
            q.num_sum += n * c.answered;
            q.num_count += c.answered;
            *q.values.entry(n).or_default() += c.answered;
            q.totals.add(q.kind, n, c.answered);
            all.add(q.kind, n, c.answered);
        }
    }
    let mut picked: BTreeMap<&str, Vec<pb::ValueCount>> = BTreeMap::new();
    for c in &choices {
        picked
            .entry(c.question.as_str())
            .or_default()
            .push(pb::ValueCount {
                value: c.choice.clone(),
                count: c.n,
            });
    }
    let mut ordered: Vec<(&str, Question)> = questions.into_iter().collect();
    ordered.sort_by_key(|(id, q)| (q.rank, id.to_string()));
    let questions = ordered
        .into_iter()
        .map(|(id, q)| {
            let mut distribution: Vec<pb::ValueCount> = q
                .values
                .iter()
                .map(|(v, n)| pb::ValueCount {
                    value: v.to_string(),
                    count: *n,
                })
                .collect();
            distribution.extend(picked.remove(id).unwrap_or_default());
            pb::QuestionSummary {
                question: id.to_owned(),
                kind: q.kind.map_or(0, |k| convert::kind_to_proto(k) as i32),
                shown: q.shown,
                answered: q.answered,
                skipped: q.shown - q.answered,
                dropped: q.dropped,
                drop_off_rate: ratio(q.dropped, q.shown),
                mean: ratio(q.num_sum, q.num_count),
                distribution,
                nps: (q.kind == Some(Kind::Nps)).then(|| q.totals.nps()),
                csat: (q.kind == Some(Kind::Csat)).then(|| q.totals.csat()),
                ces: (q.kind == Some(Kind::Ces)).then(|| q.totals.ces()),
            }
        })
        .collect();
    let mut buckets: BTreeMap<i64, (Totals, i64, i64)> = BTreeMap::new();
    for c in &trend_cells {
        if let Some(n) = c.number {
            buckets
                .entry(c.bucket)
                .or_default()
                .0
                .add(Kind::from_code(c.kind), n, c.answered);
        }
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
        questions,
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
