//! A scoring model: scores, rules, caps, thresholds, grade bands, and the
//! award engine that turns touchpoints and signals into ledger awards.

use super::decay::{Decay, Inactivity, micros};
use crate::lifecycle::Stage;
use crate::rules::{Facts, Rule, TouchQuery, evaluate};
use crate::touchpoint::Touchpoint;
use chrono::{DateTime, Datelike, TimeDelta, TimeZone, Utc};
use std::collections::HashMap;

/// The two built-in scores.
pub const FIT: &str = "fit";
/// Engagement: what the customer does.
pub const ENGAGEMENT: &str = "engagement";

/// One score a model keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoreSpec {
    /// Name (`fit`, `engagement`, or a custom name).
    pub name: String,
    /// Lowest value (clamp), if any.
    pub floor: Option<i64>,
    /// Highest value (clamp), if any.
    pub ceiling: Option<i64>,
    /// Inactivity decay, if any.
    pub inactivity: Option<Inactivity>,
}

/// The period a cap counts over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// The UTC calendar day of the award.
    Day,
    /// The ISO week (Monday 00:00 UTC to the next Monday) of the award.
    IsoWeek,
    /// The `d` before the award: `(award − d, award]`.
    Rolling(TimeDelta),
}

/// At most `points` (absolute, before decay) per rule per customer per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    /// Most points, not negative.
    pub points: i64,
    /// The period.
    pub period: Period,
}

impl Cap {
    /// The half-open window `[start, end)` of the period holding `at_us`
    /// (for a rolling window: `(at − d, at]`, returned as `[at − d + 1, at + 1)`).
    pub fn window(&self, at_us: i64) -> (i64, i64) {
        const DAY: i64 = 86_400_000_000;
        match self.period {
            Period::Day => {
                let start = at_us.div_euclid(DAY) * DAY;
                (start, start + DAY)
            }
            Period::IsoWeek => {
                let day_start = at_us.div_euclid(DAY) * DAY;
                let weekday = Utc
                    .timestamp_micros(day_start)
                    .single()
                    .map_or(0, |t| i64::from(t.weekday().num_days_from_monday()));
                let start = day_start - weekday * DAY;
                (start, start + 7 * DAY)
            }
            Period::Rolling(d) => (at_us.saturating_sub(micros(d)) + 1, at_us + 1),
        }
    }

    /// What is left of the cap for an award at `at_us`, given the rule's
    /// prior awards `(award time, points)` for the customer.
    pub fn room(&self, prior: &[(i64, i64)], at_us: i64) -> i64 {
        let (start, end) = self.window(at_us);
        let used: i64 = prior
            .iter()
            .filter(|(t, _)| *t >= start && *t < end)
            .map(|(_, p)| p.saturating_abs())
            .fold(0, i64::saturating_add);
        (self.points - used).max(0)
    }
}

/// A rule scoring touchpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRule {
    /// Id, unique in the model.
    pub id: String,
    /// Score it adds to.
    pub score: String,
    /// Which touchpoints score (its window is ignored).
    pub trigger: TouchQuery,
    /// Points per matching touchpoint (negative for a negative signal).
    pub points: i64,
    /// Scores at most once per customer.
    pub once_per_customer: bool,
    /// Cap per period.
    pub cap: Option<Cap>,
    /// Decay of each award.
    pub decay: Decay,
}

impl EventRule {
    /// Whether earlier awards limit this rule's (a cap or once per customer).
    pub fn limited(&self) -> bool {
        self.once_per_customer || self.cap.is_some()
    }

    /// The points of a matching touchpoint at `at_us` given the rule's
    /// earlier awards `(award time, points)` for the customer (those before
    /// it in (time, event id) order): nothing if a once-per-customer rule
    /// already scored, else the points cut to what is left of the cap.
    pub fn award(&self, prior: &[(i64, i64)], at_us: i64) -> i64 {
        if self.once_per_customer && prior.iter().any(|(_, p)| *p != 0) {
            return 0;
        }
        match &self.cap {
            Some(cap) => {
                let room = cap.room(prior, at_us);
                self.points.signum() * self.points.saturating_abs().min(room)
            }
            None => self.points,
        }
    }

    /// The awards the rule gives `events` (matching touchpoints `(time,
    /// event id)`, in that order, all at or after every award in `before`),
    /// given the awards before them that still count: the order-independent
    /// definition of caps and once-only rules. Live scoring writes
    /// corrections towards this when a touchpoint arrives late.
    pub fn replay<'a>(
        &self,
        before: &[(i64, i64)],
        events: impl IntoIterator<Item = (i64, &'a str)>,
    ) -> Vec<(&'a str, i64)> {
        let mut prior = before.to_vec();
        events
            .into_iter()
            .map(|(at, id)| {
                let points = self.award(&prior, at);
                if points != 0 {
                    prior.push((at, points));
                }
                (id, points)
            })
            .collect()
    }
}

/// A rule on who the customer is: holds or not, re-evaluated when the
/// profile or stage changes. While it holds the score carries `points`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileRule {
    /// Id, unique in the model.
    pub id: String,
    /// Score it adds to (usually `fit`).
    pub score: String,
    /// Condition on demographics, attributes and stage.
    pub condition: Rule,
    /// Points while it holds.
    pub points: i64,
}

/// A rule scoring a consent denial (unsubscribe).
#[derive(Debug, Clone, PartialEq)]
pub struct ConsentRule {
    /// Id, unique in the model.
    pub id: String,
    /// Score it adds to.
    pub score: String,
    /// Only denials for this purpose (lower-case API name), or any.
    pub purpose: Option<String>,
    /// Points per denial (usually negative).
    pub points: i64,
    /// Decay of each award.
    pub decay: Decay,
}

/// What a threshold does when crossed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ThresholdKind {
    /// When the score rises to `value` or more, move to `to`.
    AtLeast {
        /// The value.
        value: f64,
        /// Target stage.
        to: Stage,
    },
    /// When the score falls below `value` while in `while_in`, move to `to`.
    Below {
        /// The value.
        value: f64,
        /// Only while the customer is in this stage.
        while_in: Stage,
        /// Target stage.
        to: Stage,
    },
}

/// A threshold that moves the lifecycle stage.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// Id, unique in the model.
    pub id: String,
    /// The score watched.
    pub score: String,
    /// What crossing it does.
    pub kind: ThresholdKind,
}

impl Threshold {
    /// The value compared with.
    pub fn value(&self) -> f64 {
        match self.kind {
            ThresholdKind::AtLeast { value, .. } | ThresholdKind::Below { value, .. } => value,
        }
    }

    /// The stage to move to when the score is on the firing side of the
    /// threshold now and was not before, for a customer in `stage`; `None`
    /// if nothing should move.
    pub fn fires(&self, was_above: bool, is_above: bool, stage: Option<Stage>) -> Option<Stage> {
        match self.kind {
            ThresholdKind::AtLeast { to, .. } => {
                (!was_above && is_above && stage != Some(to)).then_some(to)
            }
            ThresholdKind::Below { while_in, to, .. } => {
                (was_above && !is_above && stage == Some(while_in)).then_some(to)
            }
        }
    }
}

/// Grade bands: a fit value at or above `fit[0]` is A, `fit[1]` B,
/// `fit[2]` C, else D; engagement at or above `engagement[0]` is 1,
/// `[1]` 2, `[2]` 3, else 4. Grade = letter and digit (`B2`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bands {
    /// Fit lower bounds of A, B, C (descending).
    pub fit: [f64; 3],
    /// Engagement lower bounds of 1, 2, 3 (descending).
    pub engagement: [f64; 3],
}

impl Default for Bands {
    fn default() -> Self {
        Self {
            fit: [75.0, 50.0, 25.0],
            engagement: [75.0, 50.0, 25.0],
        }
    }
}

impl Bands {
    /// The grade of a fit and an engagement value.
    pub fn grade(&self, fit: f64, engagement: f64) -> String {
        let band = |v: f64, b: &[f64; 3]| b.iter().position(|lo| v >= *lo).unwrap_or(3);
        let letter = ['A', 'B', 'C', 'D'][band(fit, &self.fit)];
        let digit = band(engagement, &self.engagement) + 1;
        format!("{letter}{digit}")
    }
}

/// A compiled model version.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Model {
    /// Scores (always holds `fit` and `engagement`).
    pub scores: Vec<ScoreSpec>,
    /// Touchpoint rules.
    pub event_rules: Vec<EventRule>,
    /// Profile (fit) rules.
    pub profile_rules: Vec<ProfileRule>,
    /// Consent denial rules.
    pub consent_rules: Vec<ConsentRule>,
    /// Stage thresholds.
    pub thresholds: Vec<Threshold>,
    /// Grade bands.
    pub bands: Bands,
}

/// One ledger award the engine decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Award {
    /// Rule id.
    pub rule: String,
    /// Score.
    pub score: String,
    /// Points (after the cap).
    pub points: i64,
    /// The event that caused it.
    pub source_event: String,
    /// When it counts from (the event's time).
    pub award_us: i64,
    /// Its decay.
    pub decay: Decay,
}

/// A customer's prior awards per rule `(award time, points)`: what caps and
/// once-per-customer rules look at. Kept up to date by the engine.
pub type RuleHistory = HashMap<String, Vec<(i64, i64)>>;

impl Model {
    /// The spec of score `name`.
    pub fn score(&self, name: &str) -> Option<&ScoreSpec> {
        self.scores.iter().find(|s| s.name == name)
    }

    /// The awards of touchpoint `tp` (event id `tp.event_id`) for a customer
    /// with `history`, which is updated with them. Rules are applied in model
    /// order; a capped award is cut to what is left of the cap (a zero award
    /// is not made); a once-per-customer rule that already scored is skipped.
    pub fn award_touchpoint(&self, tp: &Touchpoint, history: &mut RuleHistory) -> Vec<Award> {
        let at = tp.occurred_time.timestamp_micros();
        let mut out = Vec::new();
        for rule in &self.event_rules {
            if !rule.trigger.matches(tp) {
                continue;
            }
            let prior = history.entry(rule.id.clone()).or_default();
            let points = rule.award(prior, at);
            if points == 0 {
                continue;
            }
            prior.push((at, points));
            out.push(Award {
                rule: rule.id.clone(),
                score: rule.score.clone(),
                points,
                source_event: tp.event_id.clone(),
                award_us: at,
                decay: rule.decay,
            });
        }
        out
    }

    /// Counts rule evaluations: how many event rules `tp` matches (the hot
    /// loop of [`Model::award_touchpoint`] without the bookkeeping; benches).
    pub fn matching_rules(&self, tp: &Touchpoint) -> usize {
        self.event_rules
            .iter()
            .filter(|r| r.trigger.matches(tp))
            .count()
    }

    /// The awards of a consent denial for `purpose` at `at`.
    pub fn award_consent_denial(&self, purpose: &str, event: &str, at: i64) -> Vec<Award> {
        self.consent_rules
            .iter()
            .filter(|r| r.purpose.as_deref().is_none_or(|p| p == purpose))
            .map(|r| Award {
                rule: r.id.clone(),
                score: r.score.clone(),
                points: r.points,
                source_event: event.to_owned(),
                award_us: at,
                decay: r.decay,
            })
            .collect()
    }

    /// Profile rules re-evaluated for `facts` at `at`: for each rule, the
    /// correcting award that makes its net contribution `points` if it holds
    /// and 0 if not, given its current net `net` (by rule id).
    pub fn award_profile(
        &self,
        facts: &dyn Facts,
        net: &HashMap<String, i64>,
        event: &str,
        at: DateTime<Utc>,
    ) -> Vec<Award> {
        self.profile_rules
            .iter()
            .filter_map(|r| {
                let want = if evaluate(&r.condition, facts, at) {
                    r.points
                } else {
                    0
                };
                let have = net.get(&r.id).copied().unwrap_or(0);
                (want != have).then(|| Award {
                    rule: r.id.clone(),
                    score: r.score.clone(),
                    points: want - have,
                    source_event: event.to_owned(),
                    award_us: at.timestamp_micros(),
                    decay: Decay::None,
                })
            })
            .collect()
    }
}
