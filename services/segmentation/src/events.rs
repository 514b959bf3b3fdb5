//! The customer change stream, applied to the facts projection and
//! re-evaluated incrementally: each handler writes the projection
//! set-based for its run of events, then asks the engine to re-evaluate
//! only the segments the changed facts can affect, for those customers
//! only. Membership changes and their outbox events commit with the
//! stream cursor; cache writes follow the commit.

use crate::catalog::{channel_name, purpose_name};
use crate::engine::{Change, Engine, Outcome};
use crate::store::facts::{self, Profile, TouchRow};
use crate::store::members::{self, Pair};
use chrono::{DateTime, Utc};
use clm_domain::consent::{Channel, Purpose};
use clm_domain::lifecycle::Stage;
use clm_platform::changes::{Apply, Handlers, On, OnBatch};
use clm_platform::customer_events::{self, time};
use clm_platform::db::to_micros;
use clm_platform::{Error, Result};
use clm_proto::common::ChangeEvent;
use clm_proto::customer as cpb;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Handlers of the customer stream.
pub fn customer_handlers(engine: Engine) -> Handlers {
    let h = Arc::new(CustomerFacts { engine });
    Handlers::new()
        .on_batch_partitioned::<cpb::CustomerCreated, _>(h.clone())
        .on_batch_partitioned::<cpb::CustomerUpdated, _>(h.clone())
        .on_batch_partitioned::<cpb::TouchpointRecorded, _>(h.clone())
        .on_batch_partitioned::<cpb::StageChanged, _>(h.clone())
        .on_batch_partitioned::<cpb::ConsentChanged, _>(h.clone())
        .on::<cpb::CustomersMerged, _>(h.clone())
        .on::<cpb::CustomerErased, _>(h)
        .first(Arc::new(BatchLocks))
}

/// First in each batch of every followed stream (on PostgreSQL; SQLite has
/// one writer): the locks of the batch's customers
/// ([`facts::lock_customers`]: its events' subjects and the customers a
/// merge folds in), all at once and in one order, then the membership lock
/// ([`members::lock_membership`]) for a batch that merges or erases.
/// Every segmentation writer that takes both takes them in this order
/// (customers, then membership), and every writer of fact rows holds
/// their customers' locks, so none waits for another in a cycle and a
/// customer's profile and score arriving together on two streams are
/// ordered: whichever commits second sees the other and evaluates with
/// both.
///
/// A batch of facts only (profiles, touchpoints, stages, consents,
/// scores, answers, loyalty) takes the membership lock late, in
/// [`Engine::evaluate_locking_late`]: its fact writes, reads and
/// evaluation run beside the other partitions' and streams' batches, and
/// only the membership writes queue.
struct BatchLocks;

/// Event types whose handlers write facts and then settle
/// ([`CustomerFacts::settle`]): the membership lock can wait until then.
static FACTS_ONLY: std::sync::LazyLock<std::collections::BTreeSet<String>> =
    std::sync::LazyLock::new(|| {
        use prost::Name;
        [
            cpb::CustomerCreated::full_name(),
            cpb::CustomerUpdated::full_name(),
            cpb::TouchpointRecorded::full_name(),
            cpb::StageChanged::full_name(),
            cpb::ConsentChanged::full_name(),
            clm_proto::scoring::ScoreChanged::full_name(),
            clm_proto::feedback::ResponseCompleted::full_name(),
            clm_proto::loyalty::TierChanged::full_name(),
            clm_proto::loyalty::PointsChanged::full_name(),
        ]
        .into_iter()
        .collect()
    });

static MERGED: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(<cpb::CustomersMerged as prost::Name>::full_name);
static ERASED: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(<cpb::CustomerErased as prost::Name>::full_name);

/// The customers a batch's handlers write: each event's subject, and the
/// customers a merge folds into its survivor or an erasure names.
fn customers_of(events: &[ChangeEvent]) -> Vec<String> {
    let mut ids: Vec<String> = events.iter().filter_map(|e| bare(&e.subject)).collect();
    for e in events {
        if e.event_type == *MERGED
            && let Some(m) = e.payload.as_ref().and_then(|p| {
                <cpb::CustomersMerged as prost::Message>::decode(p.value.as_slice()).ok()
            })
        {
            ids.extend(bare(&m.survivor));
            ids.extend(m.merged.iter().filter_map(|n| bare(n)));
        }
        if e.event_type == *ERASED
            && let Some(m) = e.payload.as_ref().and_then(|p| {
                <cpb::CustomerErased as prost::Message>::decode(p.value.as_slice()).ok()
            })
        {
            ids.extend(bare(&m.customer));
            ids.extend(m.merged_from.iter().filter_map(|n| bare(n)));
        }
    }
    ids
}

#[async_trait::async_trait]
impl clm_platform::changes::BatchStart for BatchLocks {
    async fn start(&self, cx: &mut Apply, events: &[ChangeEvent]) -> Result<(), Error> {
        facts::lock_customers(cx.txn(), &customers_of(events)).await?;
        if !events.iter().all(|e| FACTS_ONLY.contains(&e.event_type)) {
            members::lock_membership(cx.txn()).await?;
        }
        Ok(())
    }
}

/// Handlers of the scoring stream: each `ScoreChanged` sets the
/// customer's score (per model and name: its curve in time, so rules read
/// it at any instant, decay included) and grade in the projection and
/// re-evaluates the segments that read scores, which arms timers at the
/// instants decay moves a score across a rule's numbers. A score for a
/// customer not seen yet is kept until the customer arrives.
pub fn scoring_handlers(engine: Engine) -> Handlers {
    Handlers::new()
        .on_batch_partitioned::<clm_proto::scoring::ScoreChanged, _>(Arc::new(CustomerFacts {
            engine,
        }))
        .first(Arc::new(BatchLocks))
}

#[async_trait::async_trait]
impl OnBatch<clm_proto::scoring::ScoreChanged> for CustomerFacts {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, clm_proto::scoring::ScoreChanged)>,
    ) -> Result<(), Error> {
        let events: Vec<&ChangeEvent> = messages.iter().map(|(e, _)| *e).collect();
        let rows: Vec<facts::ScoreRow> = messages
            .iter()
            .filter_map(|(e, m)| {
                let row = crate::convert::score_row(m);
                if row.is_none() {
                    tracing::warn!(event = %e.event_id, "ScoreChanged without a readable score; skipped");
                }
                row
            })
            .collect();
        let ids: Vec<String> = rows.iter().map(|r| r.customer.clone()).collect();
        facts::lock_customers(cx.txn(), &ids).await?;
        let updated = facts::set_scores(cx.txn(), &rows).await?;
        let work = updated
            .into_iter()
            .map(|id| (id, vec![Change::Score]))
            .collect();
        self.settle(cx, &events, work).await
    }
}

/// Handlers of the feedback stream: each completed response sets the
/// customer's last NPS and CSAT answers (`nps.last`, `nps.last_category`,
/// `csat.last`) and records its answers as `SURVEY_ANSWER` touchpoints
/// (see `clm_platform::customer_events::survey_answers`), so rules count
/// answers in windows like any touchpoint.
pub fn feedback_handlers(engine: Engine) -> Handlers {
    Handlers::new()
        .on_batch_partitioned::<clm_proto::feedback::ResponseCompleted, _>(Arc::new(
            CustomerFacts { engine },
        ))
        .first(Arc::new(BatchLocks))
}

#[async_trait::async_trait]
impl OnBatch<clm_proto::feedback::ResponseCompleted> for CustomerFacts {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, clm_proto::feedback::ResponseCompleted)>,
    ) -> Result<(), Error> {
        use clm_proto::feedback::QuestionKind;
        let events: Vec<&ChangeEvent> = messages.iter().map(|(e, _)| *e).collect();
        let mut last = Vec::new();
        let mut rows = Vec::new();
        for (_, m) in &messages {
            let Some(id) = bare(&m.customer) else {
                continue;
            };
            let number = |kind: QuestionKind| {
                m.answers
                    .iter()
                    .rev()
                    .find(|a| a.kind == kind as i32)
                    .and_then(|a| a.number)
            };
            let nps = number(QuestionKind::Nps).and_then(|n| i16::try_from(n).ok());
            let csat = number(QuestionKind::Csat).map(|n| n as f64);
            last.push((id, nps, csat));
            rows.extend(
                customer_events::survey_answers(m)
                    .iter()
                    .filter_map(touch_row),
            );
        }
        let ids: Vec<String> = last.iter().map(|r| r.0.clone()).collect();
        facts::lock_customers(cx.txn(), &ids).await?;
        facts::insert_touchpoints(cx.txn(), &rows).await?;
        let mut work: BTreeMap<String, Vec<Change>> = BTreeMap::new();
        for id in facts::set_feedback(cx.txn(), &last).await? {
            work.entry(id).or_default().push(Change::Feedback);
        }
        for r in &rows {
            let ch = Change::Touch(Arc::new(r.touchpoint.clone()));
            let list = work.entry(r.customer.clone()).or_default();
            if !list.contains(&ch) {
                list.push(ch);
            }
        }
        self.settle(cx, &events, work).await
    }
}

/// Handlers of the loyalty stream: `TierChanged` sets the customer's
/// `loyalty.tier` (and balance), `PointsChanged` its `loyalty.balance`,
/// then the customer's segments are re-evaluated. Only the primary
/// program's events count (`secondary` is false): with several programs
/// the plain facts are the primary program's, never whichever came last.
pub fn loyalty_handlers(engine: Engine) -> Handlers {
    let h = Arc::new(CustomerFacts { engine });
    Handlers::new()
        .on_batch_partitioned::<clm_proto::loyalty::TierChanged, _>(h.clone())
        .on_batch_partitioned::<clm_proto::loyalty::PointsChanged, _>(h)
        .first(Arc::new(BatchLocks))
}

impl CustomerFacts {
    async fn loyalty(
        &self,
        cx: &mut Apply,
        events: &[&ChangeEvent],
        rows: Vec<facts::LoyaltyRow>,
    ) -> Result<()> {
        let ids: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        facts::lock_customers(cx.txn(), &ids).await?;
        let updated = facts::set_loyalty(cx.txn(), &rows).await?;
        let work = updated
            .into_iter()
            .map(|id| (id, vec![Change::All]))
            .collect();
        self.settle(cx, events, work).await
    }
}

#[async_trait::async_trait]
impl OnBatch<clm_proto::loyalty::TierChanged> for CustomerFacts {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, clm_proto::loyalty::TierChanged)>,
    ) -> Result<(), Error> {
        let events: Vec<&ChangeEvent> = messages.iter().map(|(e, _)| *e).collect();
        let rows = messages
            .iter()
            .filter(|(_, m)| !m.secondary)
            .filter_map(|(_, m)| Some((bare(&m.customer)?, Some(m.new_tier.clone()), m.balance)))
            .collect();
        self.loyalty(cx, &events, rows).await
    }
}

#[async_trait::async_trait]
impl OnBatch<clm_proto::loyalty::PointsChanged> for CustomerFacts {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, clm_proto::loyalty::PointsChanged)>,
    ) -> Result<(), Error> {
        let events: Vec<&ChangeEvent> = messages.iter().map(|(e, _)| *e).collect();
        let rows = messages
            .iter()
            .filter(|(_, m)| !m.secondary)
            .filter_map(|(_, m)| Some((bare(&m.customer)?, None, m.balance)))
            .collect();
        self.loyalty(cx, &events, rows).await
    }
}

/// Applies customer facts.
pub struct CustomerFacts {
    engine: Engine,
}

fn bare(name: &str) -> Option<String> {
    customer_events::bare_id(name)
}

/// A customer message as profile facts.
pub fn profile(c: &cpb::Customer) -> Option<Profile> {
    let id = bare(&c.name)?;
    let f = customer_events::profile_facts(c);
    Some(Profile {
        id,
        email: f.email,
        display_name: f.display_name,
        birth_date: f.demographics.birth_date,
        gender: f.demographics.gender,
        income: f.demographics.annual_income,
        occupation: f.demographics.occupation,
        stage: f.stage,
        attributes: f.attributes,
    })
}

fn touch_row(t: &cpb::Touchpoint) -> Option<TouchRow> {
    Some(TouchRow {
        customer: bare(&t.customer)?,
        touchpoint: customer_events::touchpoint(t)?,
    })
}

impl CustomerFacts {
    /// Re-evaluates `work`, emits the membership events and schedules the
    /// cache writes; records the facts' freshness.
    async fn settle(
        &self,
        cx: &mut Apply,
        events: &[&ChangeEvent],
        work: BTreeMap<String, Vec<Change>>,
    ) -> Result<()> {
        let now = clm_domain::clock::micros(cx.now());
        let out = self
            .engine
            .evaluate_locking_late(cx.txn(), &work, now)
            .await?;
        // After the evaluation: its row is the membership lock's.
        if let Some(newest) = events
            .iter()
            .filter_map(|e| time(e.occurred_time.as_ref()))
            .max()
        {
            facts::mark_fresh(cx.txn(), to_micros(newest), to_micros(now)).await?;
        }
        let changes = out.events.len();
        let oldest = events
            .iter()
            .filter_map(|e| time(e.occurred_time.as_ref()))
            .min();
        if let Some(oldest) = oldest.filter(|_| changes > 0) {
            let engine = self.engine.clone();
            let recorded = to_micros(oldest);
            cx.after_commit(async move { engine.record_freshness(recorded, changes) });
        }
        self.finish(cx, out);
        Ok(())
    }

    fn finish(&self, cx: &mut Apply, out: Outcome) {
        let Outcome {
            events,
            cache,
            timers_set,
        } = out;
        for e in events {
            cx.emit(e);
        }
        let engine = self.engine.clone();
        cx.after_commit(async move {
            engine
                .after_commit(Outcome {
                    events: Vec::new(),
                    cache,
                    timers_set,
                })
                .await;
        });
    }

    async fn profiles(
        &self,
        cx: &mut Apply,
        events: Vec<&ChangeEvent>,
        rows: Vec<Profile>,
    ) -> Result<()> {
        // The customers' locks are held already (`BatchLocks`).
        facts::upsert_profiles(cx.txn(), &rows).await?;
        let work = rows
            .iter()
            .map(|p| (p.id.clone(), vec![Change::All]))
            .collect();
        self.settle(cx, &events, work).await
    }

    /// Ends the memberships of `ids` at `at` (a merge or an erasure), under
    /// the membership lock.
    async fn drop_members(
        &self,
        cx: &mut Apply,
        ids: &[String],
        at: DateTime<Utc>,
    ) -> Result<Outcome> {
        // The lock first, then the pairs: a backfill that entered one of
        // these customers and committed while this waited is seen and
        // ended too (read before the lock, its entry would outlive them).
        let version = members::lock_version(cx.txn()).await?;
        let pairs: Vec<Pair> = members::of_customers(cx.txn(), ids).await?;
        let mut out = Outcome::default();
        if pairs.is_empty() {
            return Ok(out);
        }
        let reg = self.engine.registry(cx.txn()).await?;
        let reason = clm_proto::segmentation::MembershipReason::FactChanged;
        let stamped: Vec<members::Stamped> = pairs
            .iter()
            .map(|p| {
                let v = reg.get(&p.0).map_or(0, |c| c.version);
                (p.clone(), v, reason as i16)
            })
            .collect();
        members::exit(cx.txn(), &stamped, to_micros(at), version).await?;
        for (seg, cu) in &pairs {
            if let Some(c) = reg.get(seg) {
                out.record(c, cu, false, at, version, reason);
            }
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl OnBatch<cpb::CustomerCreated> for CustomerFacts {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, cpb::CustomerCreated)>,
    ) -> Result<(), Error> {
        let events: Vec<&ChangeEvent> = messages.iter().map(|(e, _)| *e).collect();
        let rows = messages
            .iter()
            .filter_map(|(_, m)| m.customer.as_ref().and_then(profile))
            .collect();
        self.profiles(cx, events, rows).await
    }
}

#[async_trait::async_trait]
impl OnBatch<cpb::CustomerUpdated> for CustomerFacts {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, cpb::CustomerUpdated)>,
    ) -> Result<(), Error> {
        let events: Vec<&ChangeEvent> = messages.iter().map(|(e, _)| *e).collect();
        let rows = messages
            .iter()
            .filter_map(|(_, m)| m.customer.as_ref().and_then(profile))
            .collect();
        self.profiles(cx, events, rows).await
    }
}

#[async_trait::async_trait]
impl OnBatch<cpb::TouchpointRecorded> for CustomerFacts {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, cpb::TouchpointRecorded)>,
    ) -> Result<(), Error> {
        let events: Vec<&ChangeEvent> = messages.iter().map(|(e, _)| *e).collect();
        let rows: Vec<TouchRow> = messages
            .iter()
            .filter_map(|(_, m)| m.touchpoint.as_ref().and_then(touch_row))
            .collect();
        facts::insert_touchpoints(cx.txn(), &rows).await?;
        let mut work: BTreeMap<String, Vec<Change>> = BTreeMap::new();
        for r in &rows {
            let ch = Change::Touch(Arc::new(r.touchpoint.clone()));
            let list = work.entry(r.customer.clone()).or_default();
            if !list.contains(&ch) {
                list.push(ch);
            }
        }
        self.settle(cx, &events, work).await
    }
}

#[async_trait::async_trait]
impl OnBatch<cpb::StageChanged> for CustomerFacts {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, cpb::StageChanged)>,
    ) -> Result<(), Error> {
        let events: Vec<&ChangeEvent> = messages.iter().map(|(e, _)| *e).collect();
        let rows: Vec<(String, Stage, DateTime<Utc>)> = messages
            .iter()
            .filter_map(|(_, m)| {
                let c = m.change.as_ref()?;
                Some((
                    bare(&m.customer)?,
                    Stage::from_code(i16::try_from(c.to_stage).ok()?)?,
                    time(c.change_time.as_ref())?,
                ))
            })
            .collect();
        facts::set_stages(cx.txn(), &rows).await?;
        let work = rows
            .iter()
            .map(|(id, _, _)| (id.clone(), vec![Change::Stage]))
            .collect();
        self.settle(cx, &events, work).await
    }
}

#[async_trait::async_trait]
impl OnBatch<cpb::ConsentChanged> for CustomerFacts {
    async fn on_batch(
        &self,
        cx: &mut Apply,
        messages: Vec<(&ChangeEvent, cpb::ConsentChanged)>,
    ) -> Result<(), Error> {
        let events: Vec<&ChangeEvent> = messages.iter().map(|(e, _)| *e).collect();
        let mut cells = Vec::new();
        let mut work: BTreeMap<String, Vec<Change>> = BTreeMap::new();
        for (_, m) in &messages {
            let Some(id) = bare(&m.customer) else {
                continue;
            };
            for ch in &m.changes {
                let (Some(p), Some(c)) = (
                    i16::try_from(ch.purpose).ok().and_then(Purpose::from_code),
                    i16::try_from(ch.channel).ok().and_then(Channel::from_code),
                ) else {
                    continue;
                };
                let state = match cpb::ConsentState::try_from(ch.to_state) {
                    Ok(cpb::ConsentState::Granted) => Some(true),
                    Ok(cpb::ConsentState::Denied) => Some(false),
                    _ => None,
                };
                cells.push((
                    id.clone(),
                    purpose_name(p).to_owned(),
                    channel_name(c).to_owned(),
                    state,
                ));
            }
            work.insert(id, vec![Change::Consent]);
        }
        facts::set_consents(cx.txn(), &cells).await?;
        self.settle(cx, &events, work).await
    }
}

#[async_trait::async_trait]
impl On<cpb::CustomersMerged> for CustomerFacts {
    async fn on(
        &self,
        cx: &mut Apply,
        event: &ChangeEvent,
        m: cpb::CustomersMerged,
    ) -> Result<(), Error> {
        let Some(survivor) = bare(&m.survivor) else {
            return Ok(());
        };
        let merged: Vec<String> = m.merged.iter().filter_map(|n| bare(n)).collect();
        let now = clm_domain::clock::micros(cx.now());
        facts::lock_customers(cx.txn(), &merged).await?;
        facts::merge(cx.txn(), &survivor, &merged, now.timestamp_micros()).await?;
        if let Some(p) = m.customer.as_ref().and_then(profile) {
            facts::upsert_profiles(cx.txn(), &[p]).await?;
        }
        // The merged customers leave their segments; their history moves
        // to the survivor, whose membership is decided from the merged facts.
        let out = self.drop_members(cx, &merged, now).await?;
        members::rekey_history(cx.txn(), &survivor, &merged).await?;
        members::delete_customers(cx.txn(), &merged).await?;
        self.finish(cx, out);
        let work = BTreeMap::from([(survivor, vec![Change::All])]);
        self.settle(cx, &[event], work).await
    }
}

#[async_trait::async_trait]
impl On<cpb::CustomerErased> for CustomerFacts {
    async fn on(
        &self,
        cx: &mut Apply,
        _event: &ChangeEvent,
        m: cpb::CustomerErased,
    ) -> Result<(), Error> {
        let Some(id) = bare(&m.customer) else {
            return Ok(());
        };
        let now = clm_domain::clock::micros(cx.now());
        let mut ids = vec![id.clone()];
        ids.extend(m.merged_from.iter().filter_map(|n| bare(n)));
        // First, so a score of the customer being applied concurrently
        // either commits before (and is deleted here) or sees it gone.
        facts::lock_customers(cx.txn(), &ids).await?;
        let out = self.drop_members(cx, &ids, now).await?;
        facts::erase(cx.txn(), &ids, now.timestamp_micros()).await?;
        members::delete_customers(cx.txn(), &ids).await?;
        self.finish(cx, out);
        // Segments that name an erased customer's membership are decided
        // again by their own rules when other facts change; nothing else
        // holds the customer here.
        cx.erased(&m).await
    }
}
