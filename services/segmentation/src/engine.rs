//! The membership engine: the registry of compiled segment rules, the
//! incremental evaluation of changed facts, the backfill of a segment, and
//! the timer queue that makes time windows expire at the exact instant.
//!
//! * **Incremental.** A changed fact names what changed
//!   ([`Change`]); the registry's index by fact kind (built from
//!   `rules::reads`) yields the only segments that can be affected, which
//!   are evaluated in memory (`rules::evaluate`) for that customer only, in
//!   dependency order so `in_segment` sees the new membership.
//! * **Backfill.** A rule compiles to one SQL query ([`crate::sql`]); its
//!   diff with the current members is taken without the membership lock
//!   (the evaluations meanwhile record whom they decide) and applied
//!   set-based under it, less those decided since, then dependents and
//!   (for rules that read time) every customer's next-change timer, a
//!   chunk per transaction (see [`Engine::backfill`]).
//! * **Timers.** The platform timer queue holds, per customer (kind
//!   [`members::WINDOW`]), an instant no later than the earliest one at
//!   which `rules::next_change` says time alone changes the answer of any
//!   rule that reads time (a timer is moved earlier, never later: a new
//!   fact that pushes the change later leaves it, and it fires, finds the
//!   answers unchanged and arms the next change then); the queue fires
//!   each at its instant by the service clock, once across replicas, and
//!   the engine ([`OnDue`]) evaluates every such rule for the customer
//!   then, so a change is recorded at exactly the time it happens. One
//!   timer per customer, not per (segment, customer): entering a hundred
//!   windowed segments writes one timer row, not a hundred.
//!
//! Every membership write runs in a transaction that takes the membership
//! version ([`members::lock_version`]) before it writes: writers are
//! serialised, the registry is checked against its generation under that
//! lock, and entered / exited events go to the outbox in the same
//! transaction. A stream batch of facts reads and evaluates before it
//! (under its customers' locks) and keeps its decision only if what it read
//! is unchanged under the lock ([`Engine::evaluate_locking_late`]); every
//! other writer takes it first.

use crate::cache;
use crate::catalog;
use crate::convert::{self, Live};
use crate::lookback::Lookback;
use crate::sql::Compiler;
use crate::store::backfill_diffs;
use crate::store::facts;
use crate::store::members::{self, Stamped};
use crate::store::segments::{self, State};
use chrono::{DateTime, Utc};
use clm_domain::rules::{self, Fact, Rule, TouchQuery};
use clm_domain::touchpoint::Touchpoint;
use clm_platform::cache::SetWrite;
use clm_platform::changes::Apply;
use clm_platform::db::{from_micros, is_postgres, to_micros};
use clm_platform::operations;
use clm_platform::outbox::NewEvent;
use clm_platform::timers::{OnDue, Timer};
use clm_platform::{Error, Result, Runtime};
use clm_proto::google::longrunning::Operation;
use clm_proto::segmentation as pb;
use prost::Message;
use sea_orm::{ConnectionTrait, TransactionTrait};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

/// What changed about a customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Anything (a new or merged customer).
    All,
    /// Profile, demographics, attributes (and possibly the stage).
    Profile,
    /// The lifecycle stage.
    Stage,
    /// Consent.
    Consent,
    /// Scores and grade (from the scoring service's stream).
    Score,
    /// The last NPS and CSAT answers (from the feedback service's stream).
    Feedback,
    /// A touchpoint: only segments with a query it passes (its kind,
    /// custom type and `where` filter) can change. One that passes no
    /// query's filter changes no count, sum, first or last those segments
    /// read; time alone moving their answer is their timers' business.
    Touch(Arc<Touchpoint>),
    /// Only this segment (a backfill's evaluation of everyone).
    Only(String),
    /// Every rule that reads time (the customer's timer fired).
    Timed,
    /// The customer's membership of this segment (`segments/{id}`).
    Member(String),
}

/// Index keys: the kinds of facts segments read.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Profile,
    Stage,
    Consent,
    Score,
    Feedback,
    Touch(i16),
    Segment(String),
    Other,
}

fn key_of(f: &Fact) -> Key {
    match f {
        Fact::BirthDate
        | Fact::Gender
        | Fact::Income
        | Fact::Occupation
        | Fact::Email
        | Fact::DisplayName
        | Fact::Attribute(_) => Key::Profile,
        Fact::Stage => Key::Stage,
        Fact::Consent { .. } => Key::Consent,
        Fact::Score(_) | Fact::Grade => Key::Score,
        Fact::Nps | Fact::Csat => Key::Feedback,
        Fact::Touchpoints(t) => Key::Touch(t.kind.code()),
        Fact::Segment(s) => Key::Segment(s.clone()),
        _ => Key::Other,
    }
}

/// A segment's rule, ready to evaluate.
#[derive(Debug)]
pub struct Compiled {
    /// Bare id.
    pub id: String,
    /// `segments/{id}`.
    pub name: String,
    /// The rule.
    pub rule: Rule,
    /// Rule version.
    pub version: i64,
    /// Facts it reads.
    pub reads: BTreeSet<Fact>,
    /// Its touchpoint queries (what a new touchpoint must pass to matter).
    pub touches: Vec<TouchQuery>,
    /// Whether time alone can change its answer.
    pub timed: bool,
    /// Depth in the `in_segment` graph (segments it names come first).
    pub rank: usize,
    /// Whether its backfill is computing a diff outside the lock: each
    /// evaluation then records whom it decided (`store::backfill_diffs`).
    pub diffing: bool,
}

/// Every segment's compiled rule, indexed by the facts they read.
#[derive(Debug, Default)]
pub struct Registry {
    generation: i64,
    by_id: HashMap<String, Arc<Compiled>>,
    /// The segments reading each kind of fact (the compiled rules
    /// themselves: a touchpoint's lookup hashes no segment id).
    index: HashMap<Key, Vec<Arc<Compiled>>>,
    /// The touchpoints any rule reads (what an evaluation loads).
    lookback: Lookback,
    /// The rules whose answer time alone can change.
    timed: Vec<Arc<Compiled>>,
}

impl Registry {
    fn build(generation: i64, rows: Vec<segments::Segment>, diffing: &BTreeSet<String>) -> Self {
        let mut parsed = BTreeMap::new();
        for s in rows {
            match rules::parse(&s.rule_text) {
                Ok(rule) => {
                    parsed.insert(s.id.clone(), (s, rule));
                }
                Err(e) => {
                    tracing::error!(segment = %s.id, error = %e, "stored rule does not parse")
                }
            }
        }
        let mut ranks: HashMap<String, usize> = HashMap::new();
        fn rank(
            id: &str,
            parsed: &BTreeMap<String, (segments::Segment, Rule)>,
            ranks: &mut HashMap<String, usize>,
            depth: usize,
        ) -> usize {
            if let Some(r) = ranks.get(id) {
                return *r;
            }
            let Some((_, rule)) = parsed.get(id) else {
                return 0;
            };
            let r = if depth > 64 {
                0
            } else {
                rules::segments_referenced(rule)
                    .iter()
                    .filter_map(|n| n.strip_prefix("segments/"))
                    .map(|d| rank(d, parsed, ranks, depth + 1) + 1)
                    .max()
                    .unwrap_or(0)
            };
            ranks.insert(id.to_owned(), r);
            r
        }
        let ids: Vec<String> = parsed.keys().cloned().collect();
        for id in &ids {
            rank(id, &parsed, &mut ranks, 0);
        }
        let mut reg = Registry {
            generation,
            lookback: Lookback::of(parsed.values().map(|(_, rule)| rule)),
            ..Registry::default()
        };
        for (id, (s, rule)) in parsed {
            let mut touches = Vec::new();
            rule.for_each_condition(&mut |c| {
                if let rules::Condition::Compare { operand, .. } = c
                    && let Some(q) = operand.query()
                {
                    touches.push(q.clone());
                }
            });
            let compiled = Compiled {
                touches,
                name: format!("segments/{id}"),
                timed: rules::depends_on_time(&rule),
                rank: ranks.get(&id).copied().unwrap_or(0),
                id: id.clone(),
                version: s.version,
                reads: rules::reads(&rule),
                diffing: diffing.contains(&id),
                rule,
            };
            let compiled = Arc::new(compiled);
            if compiled.timed {
                reg.timed.push(compiled.clone());
            }
            for f in &compiled.reads {
                let list = reg.index.entry(key_of(f)).or_default();
                if !list.iter().any(|c| c.id == id) {
                    list.push(compiled.clone());
                }
            }
            reg.by_id.insert(id, compiled);
        }
        reg
    }

    /// A segment's compiled rule.
    pub fn get(&self, id: &str) -> Option<&Arc<Compiled>> {
        self.by_id.get(id)
    }

    fn keyed(&self, k: &Key) -> impl Iterator<Item = &Arc<Compiled>> {
        self.index.get(k).into_iter().flatten()
    }

    /// The segments a change can affect.
    fn affected(&self, change: &Change) -> Vec<Arc<Compiled>> {
        match change {
            Change::All => self.by_id.values().cloned().collect(),
            Change::Profile => self
                .keyed(&Key::Profile)
                .chain(self.keyed(&Key::Stage))
                .cloned()
                .collect(),
            Change::Stage => self.keyed(&Key::Stage).cloned().collect(),
            Change::Consent => self.keyed(&Key::Consent).cloned().collect(),
            Change::Score => self.keyed(&Key::Score).cloned().collect(),
            Change::Feedback => self.keyed(&Key::Feedback).cloned().collect(),
            Change::Touch(tp) => self
                .keyed(&Key::Touch(tp.kind.code()))
                .filter(|c| c.touches.iter().any(|q| q.matches(tp)))
                .cloned()
                .collect(),
            Change::Only(id) => self.by_id.get(id).cloned().into_iter().collect(),
            Change::Timed => self.timed.clone(),
            Change::Member(name) => self.keyed(&Key::Segment(name.clone())).cloned().collect(),
        }
    }

    /// The touchpoints an evaluation of segments `ids` reads: theirs and
    /// those of every segment a change of their membership can cascade to
    /// (transitively), so a cascade finds the facts it needs loaded.
    fn lookback_of<'a>(&self, ids: impl IntoIterator<Item = &'a String>) -> Lookback {
        let mut todo: Vec<&Arc<Compiled>> = ids.into_iter().filter_map(|id| self.get(id)).collect();
        let mut closure: HashMap<&str, &Arc<Compiled>> = HashMap::new();
        while let Some(c) = todo.pop() {
            if closure.insert(c.id.as_str(), c).is_some() {
                continue;
            }
            todo.extend(self.keyed(&Key::Segment(c.name.clone())));
        }
        if closure.len() == self.by_id.len() {
            return self.lookback.clone();
        }
        Lookback::of(closure.values().map(|c| &c.rule))
    }
}

/// One customer's evaluation: the segments its changes can affect, by
/// rank (those a membership change cascades to join as it goes), and why
/// each is looked at (the first change that names it).
struct Plan<'a> {
    customer: &'a String,
    queue: BTreeSet<(usize, String)>,
    why: HashMap<String, pb::MembershipReason>,
}

impl<'a> Plan<'a> {
    /// `None` when no segment can be affected by `changes`.
    fn of(reg: &Registry, customer: &'a String, changes: &[Change]) -> Option<Self> {
        let mut queue = BTreeSet::new();
        let mut why = HashMap::new();
        // Touchpoints alike in every field a filter reads affect the same
        // segments: a run of them is matched against the registry once.
        let mut touched = std::collections::HashSet::new();
        for ch in changes {
            if let Change::Touch(tp) = ch
                && !touched.insert(TouchQuery::match_key(tp))
            {
                continue;
            }
            let reason = match ch {
                Change::Only(_) | Change::Timed => pb::MembershipReason::TimeWindow,
                Change::Member(_) => pb::MembershipReason::Dependency,
                _ => pb::MembershipReason::FactChanged,
            };
            for c in reg.affected(ch) {
                why.entry(c.id.clone()).or_insert(reason);
                queue.insert((c.rank, c.id.clone()));
            }
        }
        (!queue.is_empty()).then_some(Self {
            customer,
            queue,
            why,
        })
    }
}

/// An evaluation's decision, not yet written: what changes, and what it
/// read that another writer could change (see
/// [`Engine::evaluate_locking_late`]).
struct Decided {
    at: DateTime<Utc>,
    /// The customers looked at.
    ids: Vec<String>,
    /// The memberships read, per customer with facts (`segments/{id}`).
    read_members: HashMap<String, BTreeSet<String>>,
    /// The customers' timers read.
    existing: HashMap<String, i64>,
    /// Each membership change: segment, customer, entered, why.
    changes: Vec<(Arc<Compiled>, String, bool, pb::MembershipReason)>,
    entered: Vec<Stamped>,
    exited: Vec<Stamped>,
    /// Customers' timers to arm (customer, due).
    timers_set: Vec<(String, i64)>,
    decided_for_diffs: Vec<members::Pair>,
}

impl Decided {
    /// Whether the memberships and timers it read are still those stored
    /// (asked under the membership lock).
    async fn still_current(&self, txn: &impl ConnectionTrait) -> Result<bool> {
        let mut now: HashMap<&str, BTreeSet<String>> = self
            .read_members
            .keys()
            .map(|id| (id.as_str(), BTreeSet::new()))
            .collect();
        for (seg, cu) in members::of_customers(txn, &self.ids).await? {
            if let Some(set) = now.get_mut(cu.as_str()) {
                set.insert(format!("segments/{seg}"));
            }
        }
        let same_members = now
            .iter()
            .all(|(id, set)| self.read_members.get(*id) == Some(set));
        Ok(same_members && members::timers_of(txn, &self.ids).await? == self.existing)
    }
}

/// What a membership transaction produced: its outbox events and, once it
/// commits, its cache writes.
#[derive(Debug, Default)]
pub struct Outcome {
    /// `SegmentMembershipChanged` events.
    pub events: Vec<NewEvent>,
    /// Cache writes to apply after the commit.
    pub cache: Vec<SetWrite>,
    /// Whether timers were set (the timer task should look again).
    pub timers_set: bool,
}

impl Outcome {
    /// Records one membership change: its event and cache writes.
    pub fn record(
        &mut self,
        c: &Compiled,
        customer: &str,
        entered: bool,
        at: DateTime<Utc>,
        version: i64,
        reason: pb::MembershipReason,
    ) {
        let msg = pb::SegmentMembershipChanged {
            segment: c.name.clone(),
            customer: format!("customers/{customer}"),
            change: if entered {
                pb::MembershipChange::Entered
            } else {
                pb::MembershipChange::Exited
            } as i32,
            change_time: Some(clm_platform::convert::timestamp(at)),
            segment_version: c.version,
            reason: reason as i32,
        };
        self.events.push(NewEvent::new(c.name.clone(), &msg));
        self.cache
            .extend(cache::writes(&c.id, customer, entered, version));
    }
}

/// The engine; cheap to clone.
#[derive(Clone, Debug)]
pub struct Engine {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    rt: Runtime,
    registry: Mutex<Arc<Registry>>,
    progress: Mutex<HashMap<String, f64>>,
    freshness: opentelemetry::metrics::Histogram<f64>,
}

/// Operation kind of a segment backfill.
pub const BACKFILL: &str = "segmentation.backfill";
/// How often a running backfill's progress is written to its operation.
pub const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// Customers per chunk of a backfill's timer computation.
const TIMER_CHUNK: u64 = 1000;
/// Customers a backfill enters or exits, cascades and appends events for
/// at a time: its memory stays bounded whatever the segment's size.
const BACKFILL_CHUNK: usize = 5000;

impl Engine {
    /// An engine over `rt`.
    pub fn new(rt: Runtime) -> Self {
        Self {
            inner: Arc::new(Inner {
                registry: Mutex::new(Arc::new(Registry::default())),
                progress: Mutex::new(HashMap::new()),
                freshness: clm_platform::telemetry::meter(crate::SERVICE)
                    .f64_histogram("clm.segmentation.freshness")
                    .with_unit("s")
                    .with_description(
                        "Seconds from an event's commit at its source to the membership change it caused, committed here",
                    )
                    .with_boundaries(vec![
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    ])
                    .build(),
                rt,
            }),
        }
    }

    /// The runtime.
    pub fn rt(&self) -> &Runtime {
        &self.inner.rt
    }

    /// The registry as of the database's generation (reloaded when a
    /// segment changed, on this replica or another).
    pub async fn registry(&self, db: &impl ConnectionTrait) -> Result<Arc<Registry>> {
        let generation = members::generation(db).await?;
        {
            let cached = self
                .inner
                .registry
                .lock()
                .map_err(|_| Error::internal("registry lock poisoned"))?;
            if cached.generation == generation && generation != 0 {
                return Ok(cached.clone());
            }
        }
        let reg = Arc::new(Registry::build(
            generation,
            segments::all(db).await?,
            &backfill_diffs::diffing(db).await?,
        ));
        *self
            .inner
            .registry
            .lock()
            .map_err(|_| Error::internal("registry lock poisoned"))? = reg.clone();
        Ok(reg)
    }

    /// The registry as last loaded, without asking the database (the
    /// membership read path: no query per call).
    pub fn cached_registry(&self) -> Arc<Registry> {
        self.inner
            .registry
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Whether segment `id` exists: from the loaded registry, reloaded only
    /// when it does not know the id (a segment created on another replica).
    pub async fn knows(&self, id: &str) -> Result<bool> {
        if self.cached_registry().get(id).is_some() {
            return Ok(true);
        }
        Ok(self.registry(&self.inner.rt.read).await?.get(id).is_some())
    }

    /// Backfill progress of a segment, if one is running here.
    pub fn progress(&self, id: &str) -> Option<f64> {
        self.inner
            .progress
            .lock()
            .ok()
            .and_then(|p| p.get(id).copied())
    }

    fn set_progress(&self, id: &str, p: Option<f64>) {
        if let Ok(mut map) = self.inner.progress.lock() {
            match p {
                Some(p) => {
                    map.insert(id.to_owned(), p);
                }
                None => {
                    map.remove(id);
                }
            }
        }
    }

    /// Wakes the timer queue (after timers were set).
    pub fn wake_timers(&self) {
        self.inner.rt.timers.wake();
    }

    /// Re-evaluates, inside `txn`, the segments each change can affect for
    /// its customer at `at`, and writes the membership changes and timers,
    /// all under the membership lock, taken first.
    pub async fn evaluate(
        &self,
        txn: &impl ConnectionTrait,
        work: &BTreeMap<String, Vec<Change>>,
        at: DateTime<Utc>,
    ) -> Result<Outcome> {
        if work.is_empty() {
            return Ok(Outcome::default());
        }
        let version = members::lock_version(txn).await?;
        let reg = self.registry(txn).await?;
        match self.decide(txn, &reg, work, at).await? {
            Some(d) => self.write(txn, d, version).await,
            None => Ok(Outcome::default()),
        }
    }

    /// Like [`Self::evaluate`], for a stream batch whose customers' locks
    /// (`facts::lock_customers`) the transaction holds: on PostgreSQL the
    /// facts are read and the rules evaluated *before* the membership
    /// lock, so batches applied side by side (the subscriber's partitions,
    /// and the other streams' batches) overlap their reads and evaluation
    /// and queue only for the writes. Under the lock, the decision stands
    /// only if nothing it read can have changed: the registry's generation
    /// and the customers' memberships and timers (every other writer of
    /// these customers' facts holds their locks, so their facts are as
    /// read). Otherwise (a backfill's chunk, a timer or a segment edit came
    /// in between) the customers are evaluated again under the lock.
    pub async fn evaluate_locking_late(
        &self,
        txn: &impl ConnectionTrait,
        work: &BTreeMap<String, Vec<Change>>,
        at: DateTime<Utc>,
    ) -> Result<Outcome> {
        if work.is_empty() {
            return Ok(Outcome::default());
        }
        if !is_postgres(txn) {
            return self.evaluate(txn, work, at).await;
        }
        let reg = self.registry(txn).await?;
        let decided = self.decide(txn, &reg, work, at).await?;
        backfill_pause::point(backfill_pause::At::Decided).await;
        let version = members::lock_version(txn).await?;
        let stands = members::generation(txn).await? == reg.generation
            && match &decided {
                Some(d) => d.still_current(txn).await?,
                None => true,
            };
        let decided = if stands {
            decided
        } else {
            let reg = self.registry(txn).await?;
            self.decide(txn, &reg, work, at).await?
        };
        match decided {
            Some(d) => self.write(txn, d, version).await,
            None => Ok(Outcome::default()),
        }
    }

    /// Reads the facts of `work`'s customers (those a change can affect a
    /// segment of) and evaluates, in memory, the segments their changes
    /// can affect: what would change, nothing written. `None` when no
    /// segment can be affected.
    async fn decide(
        &self,
        txn: &impl ConnectionTrait,
        reg: &Registry,
        work: &BTreeMap<String, Vec<Change>>,
        at: DateTime<Utc>,
    ) -> Result<Option<Decided>> {
        if reg.by_id.is_empty() {
            return Ok(None);
        }
        // Per customer, the segments its changes can affect, before any
        // fact is read: a customer whose changes affect none is not loaded.
        let plans: Vec<Plan<'_>> = work
            .iter()
            .filter_map(|(customer, changes)| Plan::of(reg, customer, changes))
            .collect();
        if plans.is_empty() {
            return Ok(None);
        }
        let ids: Vec<String> = plans.iter().map(|p| p.customer.clone()).collect();
        let lookback = reg.lookback_of(plans.iter().flat_map(|p| p.queue.iter().map(|(_, id)| id)));
        let mut facts = facts::load(txn, &ids, &lookback, at).await?;
        let read_members: HashMap<String, BTreeSet<String>> = facts
            .iter()
            .map(|(id, fs)| (id.clone(), fs.segments.clone()))
            .collect();
        // Only timers that change are written.
        let existing = members::timers_of(txn, &ids).await?;
        let mut d = Decided {
            at,
            ids,
            read_members,
            changes: Vec::new(),
            entered: Vec::new(),
            exited: Vec::new(),
            timers_set: Vec::new(),
            decided_for_diffs: Vec::new(),
            existing,
        };
        for Plan {
            customer,
            mut queue,
            mut why,
        } in plans
        {
            let Some(fs) = facts.get_mut(customer) else {
                continue;
            };
            // The earliest next change by time alone among the rules
            // evaluated.
            let mut soonest: Option<i64> = None;
            let mut seen = BTreeSet::new();
            // Segments whose touchpoint filters are equal (their windows
            // aside) share one index of this customer's touchpoints.
            let mut timelines = rules::SharedTimelines::default();
            while let Some((_, id)) = queue.pop_first() {
                if !seen.insert(id.clone()) {
                    continue;
                }
                let Some(c) = reg.get(&id) else { continue };
                if c.diffing {
                    d.decided_for_diffs.push((id.clone(), customer.clone()));
                }
                // A timed rule's answer and its next change from one index
                // of its touchpoints (the rule cannot read its own
                // membership, so the change of it below alters neither).
                let (now_in, next) = if c.timed {
                    rules::evaluate_and_next_change(&c.rule, fs, at, &mut timelines)
                } else {
                    (rules::evaluate(&c.rule, fs, at), None)
                };
                let was_in = fs.segments.contains(&c.name);
                if now_in != was_in {
                    let reason = why
                        .get(&id)
                        .copied()
                        .unwrap_or(pb::MembershipReason::Dependency);
                    let stamped = ((id.clone(), customer.clone()), c.version, reason as i16);
                    if now_in {
                        fs.segments.insert(c.name.clone());
                        d.entered.push(stamped);
                    } else {
                        fs.segments.remove(&c.name);
                        d.exited.push(stamped);
                    }
                    d.changes
                        .push((c.clone(), customer.clone(), now_in, reason));
                    for dep in reg.affected(&Change::Member(c.name.clone())) {
                        why.entry(dep.id.clone())
                            .or_insert(pb::MembershipReason::Dependency);
                        queue.insert((dep.rank, dep.id.clone()));
                    }
                }
                if let Some(t) = next.map(to_micros) {
                    soonest = Some(soonest.map_or(t, |s| s.min(t)));
                }
            }
            // One timer per customer, due no later than the next change of
            // any rule that reads time. A firing evaluated every such rule:
            // it arms the earliest next change (none left: the queue
            // deletes the timer). Any other evaluation looked at some
            // rules only, and every other rule's next change is as it was
            // (this change cannot move it), so the timer only ever moves
            // earlier: one still to come fires, finds the answers
            // unchanged and arms the next change then. Moving it later on
            // every fact would rewrite it per event (each touchpoint pushes
            // a window's end later).
            let firing = work
                .get(customer)
                .is_some_and(|changes| changes.contains(&Change::Timed));
            if let Some(t) = soonest
                && (firing || d.existing.get(customer).is_none_or(|&had| t < had))
            {
                d.timers_set.push((customer.clone(), t));
            }
        }
        Ok(Some(d))
    }

    /// Writes a decision under the membership lock, at `version`.
    async fn write(&self, txn: &impl ConnectionTrait, d: Decided, version: i64) -> Result<Outcome> {
        let mut out = Outcome::default();
        for (c, customer, now_in, reason) in &d.changes {
            out.record(c, customer, *now_in, d.at, version, *reason);
        }
        let at_us = to_micros(d.at);
        members::exit(txn, &d.exited, at_us, version).await?;
        members::enter(txn, &d.entered, at_us, version).await?;
        members::set_timers(txn, &d.timers_set).await?;
        backfill_diffs::mark_seen(txn, &d.decided_for_diffs, version).await?;
        out.timers_set = !d.timers_set.is_empty();
        Ok(out)
    }

    /// Records, once per membership change committed, the seconds since
    /// `recorded_us` (the commit time at its source of the oldest event
    /// that caused it): the `clm.segmentation.freshness` histogram.
    pub fn record_freshness(&self, recorded_us: i64, changes: usize) {
        let now = to_micros(self.inner.rt.clock.now());
        let seconds = (now - recorded_us).max(0) as f64 / 1e6;
        for _ in 0..changes {
            self.inner.freshness.record(seconds, &[]);
        }
    }

    /// Applies an outcome's after-commit effects.
    pub async fn after_commit(&self, out: Outcome) {
        cache::apply(&self.inner.rt, &out.cache).await;
        if out.timers_set {
            self.wake_timers();
        }
    }

    /// A fresh operation name for a backfill (`operations/{id}`).
    pub fn new_backfill_name() -> String {
        format!("{}{}", operations::PREFIX, uuid::Uuid::now_v7().simple())
    }

    /// Starts, in the write's transaction, the backfill operation `row`
    /// names (its `operation`) for the row's rule version; after the
    /// commit, `operations.wake()` lets a replica claim it.
    pub async fn start_backfill(
        txn: &impl ConnectionTrait,
        row: &segments::Segment,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let name = row
            .operation
            .as_deref()
            .ok_or_else(|| Error::internal("a backfill without an operation name"))?;
        let meta = pb::BackfillSegmentMetadata {
            segment: format!("segments/{}", row.id),
            segment_version: row.version,
            progress: 0.0,
            start_time: Some(clm_platform::convert::timestamp(now)),
        };
        operations::start(
            txn,
            name.trim_start_matches(operations::PREFIX),
            BACKFILL,
            clm_proto::pack_any(&meta),
            now,
        )
        .await?;
        Ok(())
    }

    /// The runner of backfill operations (registered in the descriptor):
    /// one replica runs each, another resumes it if that one dies (a
    /// resumed backfill starts over: its diff is then empty). While it runs,
    /// its progress is written to the operation every [`PROGRESS_EVERY`],
    /// and the segment's `backfill_progress` on the running replica is exact.
    pub fn runner(&self) -> operations::Runner {
        let engine = self.clone();
        Arc::new(move |_, op, cancel| {
            let engine = engine.clone();
            Box::pin(async move { engine.run_backfill_operation(op, cancel).await })
        })
    }

    async fn run_backfill_operation(
        &self,
        mut op: Operation,
        cancel: CancellationToken,
    ) -> Result<()> {
        let rt = self.inner.rt.clone();
        let mut meta = op
            .metadata
            .as_ref()
            .and_then(|m| pb::BackfillSegmentMetadata::decode(m.value.as_slice()).ok())
            .ok_or_else(|| Error::internal(format!("{}: unreadable metadata", op.name)))?;
        let id = meta.segment.trim_start_matches("segments/").to_owned();
        // A cancel before it starts stops it here; after, it finishes (its
        // diff is applied in one transaction, never half).
        if cancel.is_cancelled() {
            return Err(Error::Cancelled("backfill cancelled".into()));
        }
        let reporter = {
            let this = self.clone();
            let rt = rt.clone();
            let mut op = op.clone();
            let mut meta = meta.clone();
            let id = id.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(PROGRESS_EVERY).await;
                    let Some(p) = this.progress(&id) else {
                        continue;
                    };
                    if (p - meta.progress).abs() < f64::EPSILON {
                        continue;
                    }
                    meta.progress = p;
                    let _ = operations::progress(
                        &rt.db,
                        &rt.operations,
                        &mut op,
                        clm_proto::pack_any(&meta),
                        rt.clock.now(),
                    )
                    .await;
                }
            })
        };
        let outcome = self.run_backfill(&id).await;
        reporter.abort();
        let _ = reporter.await;
        // The reporter may have stored progress: end from the stored body.
        if let Ok(latest) = operations::get(&rt.db, &op.name).await {
            op = latest;
        }
        let now = rt.clock.now();
        match outcome {
            Ok(()) => {
                meta.progress = 1.0;
                let segment = match segments::get(&rt.read, &id).await? {
                    Some(row) => {
                        let count =
                            members::counts(&rt.read, std::slice::from_ref(&row.id)).await?;
                        convert::segment_to_proto(
                            &row,
                            &Live {
                                member_count: count.get(&row.id).copied().unwrap_or(0),
                                progress: None,
                                lag_us: None,
                                objectives: Vec::new(),
                            },
                        )
                    }
                    // Deleted meanwhile: the response names it.
                    None => pb::Segment {
                        name: meta.segment.clone(),
                        ..Default::default()
                    },
                };
                operations::succeed(
                    &rt.db,
                    &rt.operations,
                    &mut op,
                    clm_proto::pack_any(&meta),
                    clm_proto::pack_any(&segment),
                    now,
                )
                .await
            }
            Err(reason) => {
                operations::fail(
                    &rt.db,
                    &rt.operations,
                    &mut op,
                    tonic::Code::FailedPrecondition,
                    reason,
                    now,
                )
                .await
            }
        }
    }

    /// Backfills segment `id`, recording a failure on the segment; the
    /// error is the reason recorded.
    pub async fn run_backfill(&self, id: &str) -> std::result::Result<(), String> {
        self.set_progress(id, Some(0.0));
        let result = self.backfill(id).await;
        self.set_progress(id, None);
        if let Err(e) = result {
            tracing::warn!(segment = %id, error = %e, "segment evaluation failed");
            // The caller sees that and when it failed, never an SQL message
            // (that is in the service log).
            let reason = match &e {
                Error::Internal(_) => format!(
                    "evaluation failed at {}: the database could not evaluate the rule; \
                     membership may be stale until RefreshSegment succeeds (details in the service log)",
                    self.inner.rt.clock.now().to_rfc3339()
                ),
                other => {
                    clm_domain::validation::shorten(&format!("evaluation failed: {other}"), 500)
                        .into_owned()
                }
            };
            let rt = &self.inner.rt;
            let failed = async {
                let txn = rt.db.begin().await?;
                if let Some(s) = segments::get(&txn, id).await? {
                    segments::set_state(
                        &txn,
                        id,
                        s.version,
                        State::Failed,
                        Some(reason.clone()),
                        None,
                    )
                    .await?;
                }
                txn.commit().await
            };
            if let Err(e) = failed.await {
                tracing::error!(segment = %id, error = %e, "cannot record the failure");
            }
            return Err(reason);
        }
        Ok(())
    }

    /// Backfills segment `id` in three steps, none holding the membership
    /// lock for longer than a chunk:
    ///
    /// 1. **Diff, no lock.** A short transaction under the lock marks the
    ///    segment as diffing after membership version `since`; then one
    ///    query per side finds who enters and who leaves, while the
    ///    subscribers and timers go on (each evaluation of the segment
    ///    records whom it decided: `store::backfill_diffs`).
    /// 2. **Apply, under the lock.** The diff less those decided since,
    ///    gone since or already moved, a transaction per chunk with its
    ///    events and cascade, its cache writes read back after its commit;
    ///    then the mark ends. A segment edited or deleted since stops here
    ///    (an edit's own backfill runs).
    /// 3. **Timers** (rules that read time): every customer is evaluated
    ///    again, a chunk per transaction, which sets each next-change timer
    ///    and corrects a window that expired since the diff.
    async fn backfill(&self, id: &str) -> Result<()> {
        let rt = &self.inner.rt;
        let now = clm_domain::clock::micros(rt.clock.now());
        let compiler = Compiler {
            at: now,
            postgres: is_postgres(&rt.db),
        };
        let txn = rt.db.begin().await?;
        let since = members::lock_version(&txn).await?;
        let Some(seg) = segments::get(&txn, id).await? else {
            return Ok(());
        };
        backfill_diffs::start(&txn, id, since).await?;
        // Every replica's registry learns the segment is diffing.
        members::bump_generation(&txn).await?;
        txn.commit().await?;
        let reg = self.registry(&rt.db).await?;
        let Some(c) = reg.get(id).cloned() else {
            return Err(Error::internal("segment missing from the registry"));
        };
        let (entering, leaving) = members::diff(&rt.db, id, compiler.select(&c.rule)).await?;
        self.set_progress(id, Some(0.5));
        backfill_pause::point(backfill_pause::At::Diffed).await;
        let at_us = to_micros(now);
        let backfill = pb::MembershipReason::Backfill;
        let stamped = |ids: &[String]| -> Vec<Stamped> {
            ids.iter()
                .map(|cu| ((id.to_owned(), cu.clone()), c.version, backfill as i16))
                .collect()
        };
        let member = Change::Member(c.name.clone());
        // Only when another segment reads this one's membership.
        let cascades = !reg.affected(&member).is_empty();
        let at = now;
        // A transaction per chunk: the lock is held for one chunk's
        // members, events and cascade, its cache writes read back after.
        for (ids, entered) in [(&leaving, false), (&entering, true)] {
            for chunk in ids.chunks(BACKFILL_CHUNK) {
                let txn = rt.db.begin().await?;
                let version = members::lock_version(&txn).await?;
                if !still_version(&txn, id, seg.version).await? {
                    return Ok(());
                }
                let (enter, exit) = if entered {
                    backfill_diffs::still_to_apply(&txn, id, chunk, &[]).await?
                } else {
                    backfill_diffs::still_to_apply(&txn, id, &[], chunk).await?
                };
                let chunk = if entered { enter } else { exit };
                if entered {
                    members::enter(&txn, &stamped(&chunk), at_us, version).await?;
                } else {
                    members::exit(&txn, &stamped(&chunk), at_us, version).await?;
                }
                let mut out = Outcome::default();
                for cu in &chunk {
                    out.record(&c, cu, entered, at, version, backfill);
                }
                if cascades && !chunk.is_empty() {
                    let dependents: BTreeMap<String, Vec<Change>> = chunk
                        .iter()
                        .map(|cu| (cu.clone(), vec![member.clone()]))
                        .collect();
                    let cascade = self.evaluate(&txn, &dependents, at).await?;
                    out.events.extend(cascade.events);
                    out.timers_set |= cascade.timers_set;
                }
                rt.outbox.append(&txn, &out.events, at).await?;
                // Every version from the first to this one is this chunk's
                // (the cascade takes its own), all under the lock.
                let written = version..=members::version(&txn).await?;
                backfill_pause::point(backfill_pause::At::Written).await;
                rt.outbox.commit(txn).await?;
                self.after_commit(Outcome {
                    timers_set: out.timers_set,
                    ..Outcome::default()
                })
                .await;
                cache::write_back(rt, written, BACKFILL_CHUNK as u64).await;
            }
        }
        let txn = rt.db.begin().await?;
        members::lock_version(&txn).await?;
        if !still_version(&txn, id, seg.version).await? {
            return Ok(());
        }
        backfill_diffs::finish(&txn, id).await?;
        members::bump_generation(&txn).await?;
        txn.commit().await?;
        if c.timed {
            self.evaluate_everyone(id).await?;
        }
        // READY once the cache holds the changes too, so a caller who saw
        // READY reads the new membership from IsMember. A crash before this
        // leaves the segment BACKFILLING: its operation is resumed and the
        // backfill runs again (an empty diff) and ends here. An edit since
        // (a new version) is left alone: its own backfill ends it.
        segments::set_state(&rt.db, id, seg.version, State::Ready, None, Some(at_us)).await?;
        Ok(())
    }

    /// Evaluates segment `id` for every customer, [`TIMER_CHUNK`] of them
    /// per transaction (a backfill's step 3): sets each one's next-change
    /// timer and applies what changed since the diff.
    async fn evaluate_everyone(&self, id: &str) -> Result<()> {
        let rt = &self.inner.rt;
        let total = members::customer_count(&rt.db).await?.max(1) as f64;
        let mut done = 0usize;
        let mut after: Option<String> = None;
        loop {
            let ids = members::customers_after(&rt.db, after.as_deref(), TIMER_CHUNK).await?;
            let Some(last) = ids.last().cloned() else {
                break;
            };
            let work: BTreeMap<String, Vec<Change>> = ids
                .iter()
                .map(|cu| (cu.clone(), vec![Change::Only(id.to_owned())]))
                .collect();
            let at = rt.clock.now();
            let txn = rt.db.begin().await?;
            let out = self.evaluate(&txn, &work, at).await?;
            rt.outbox.append(&txn, &out.events, at).await?;
            rt.outbox.commit(txn).await?;
            self.after_commit(out).await;
            done += ids.len();
            self.set_progress(id, Some(0.5 + 0.5 * (done as f64 / total).min(1.0)));
            after = Some(last);
        }
        Ok(())
    }

    /// Evaluates `rule` now without saving: how many customers match and
    /// the first `sample` of them by id.
    pub async fn preview(&self, rule: &Rule, sample: u64) -> Result<(i64, Vec<String>)> {
        let rt = &self.inner.rt;
        let compiler = Compiler {
            at: clm_domain::clock::micros(rt.clock.now()),
            postgres: is_postgres(&rt.read),
        };
        let select = compiler.select(rule);
        let count = sea_orm::sea_query::Query::select()
            .expr_as(
                sea_orm::sea_query::Func::count(sea_orm::sea_query::Expr::val(1)),
                sea_orm::sea_query::Alias::new("n"),
            )
            .from_subquery(select.clone(), sea_orm::sea_query::Alias::new("r"))
            .to_owned();
        let n: i64 = match rt.read.query_one(&count).await? {
            Some(r) => r.try_get("", "n")?,
            None => 0,
        };
        let mut first = select;
        first
            .order_by(
                (
                    sea_orm::sea_query::Alias::new(crate::sql::CUSTOMER),
                    sea_orm::sea_query::Alias::new("customer_id"),
                ),
                sea_orm::sea_query::Order::Asc,
            )
            .limit(sample);
        let ids = rt
            .read
            .query_all(&first)
            .await?
            .iter()
            .map(|r| r.try_get_by_index::<String>(0))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok((n, ids))
    }

    /// Gives each segment left BACKFILLING without an operation (by a
    /// version before backfills were operations) one, once across
    /// replicas; the operations' runner does the rest.
    pub async fn resume_backfills(self) {
        let rt = self.inner.rt.clone();
        let legacy = match segments::backfilling_without_operation(&rt.read).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list interrupted backfills");
                return;
            }
        };
        for mut row in legacy {
            let started = async {
                let txn = rt.db.begin().await?;
                let Some(current) = segments::get(&txn, &row.id).await? else {
                    return Ok::<_, Error>(());
                };
                if current.operation.is_some() {
                    return Ok(());
                }
                row.operation = Some(Self::new_backfill_name());
                Self::start_backfill(&txn, &row, rt.clock.now()).await?;
                segments::set_operation(
                    &txn,
                    &row.id,
                    row.operation.as_deref().unwrap_or_default(),
                )
                .await?;
                txn.commit().await?;
                Ok(())
            };
            if let Err(e) = started.await {
                tracing::warn!(segment = %row.id, error = %e, "cannot resume a backfill");
            }
        }
        rt.operations.wake();
    }
}

/// Whether segment `id` still has rule version `version` (read under the
/// membership lock, which edits and deletions take too).
async fn still_version(txn: &impl ConnectionTrait, id: &str, version: i64) -> Result<bool> {
    Ok(segments::get(txn, id)
        .await?
        .is_some_and(|s| s.version == version))
}

/// Fires time-window timers ([`members::WINDOW`]): each due customer's
/// rules that read time are evaluated at the timer's instant, under the
/// membership lock, taken first.
#[async_trait::async_trait]
impl OnDue for Engine {
    async fn lock(
        &self,
        txn: &sea_orm::DatabaseTransaction,
        _due: &[Timer],
    ) -> std::result::Result<(), Error> {
        members::lock_version(txn).await?;
        Ok(())
    }

    async fn fire(&self, cx: &mut Apply, due: Vec<Timer>) -> std::result::Result<(), Error> {
        let mut by_instant: BTreeMap<i64, BTreeMap<String, Vec<Change>>> = BTreeMap::new();
        for t in &due {
            let changes = by_instant
                .entry(t.due_us)
                .or_default()
                .entry(t.subject.clone())
                .or_default();
            if changes.is_empty() {
                changes.push(Change::Timed);
            }
        }
        for (at, work) in by_instant {
            // Evaluation re-arms the customers whose rules change again
            // later; the queue deletes the others.
            let out = self.evaluate(cx.txn(), &work, from_micros(at)).await?;
            for e in &out.events {
                cx.emit(e.clone());
            }
            let this = self.clone();
            cx.after_commit(async move { this.after_commit(out).await });
        }
        Ok(())
    }
}

/// The catalog for checking a rule, knowing the existing segments and the
/// custom score names: those any customer has (from scoring's stream)
/// and, when `peers.scoring` is configured, those the scoring models
/// define, by model (asked at once, so a segment can name a score no
/// customer has yet, `score("<model>").<name>` is checked against its
/// model and a plain `score.<name>` several models define is ambiguous; a
/// scoring service that does not answer leaves the first set).
pub async fn catalog_with_segments(rt: &Runtime) -> Result<rules::FieldCatalog> {
    let db = &rt.read;
    let names = segments::all(db)
        .await?
        .into_iter()
        .map(|s| format!("segments/{}", s.id))
        .collect();
    let mut c = catalog::catalog(names);
    c.scores = facts::score_names(db).await?;
    if let Some(models) = model_score_names(rt).await {
        c.scores.extend(models.values().flatten().cloned());
        c.score_models = Some(models);
    }
    Ok(c)
}

/// The scores of every scoring model by model id (`fit` and `engagement`
/// included), from the scoring service (`None` when it is not configured
/// or does not answer).
async fn model_score_names(rt: &Runtime) -> Option<BTreeMap<String, BTreeSet<String>>> {
    use clm_platform::peer::Idempotency;
    use clm_proto::scoring::ListScoringModelsRequest;
    use clm_proto::scoring::scoring_service_client::ScoringServiceClient;
    let peer = rt.peers.get("scoring")?;
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut page_token = String::new();
    loop {
        let request = ListScoringModelsRequest {
            page_size: 1000,
            page_token: page_token.clone(),
        };
        let page = peer
            .unary(
                "ListScoringModels",
                Idempotency::Idempotent,
                request,
                |ch, req| async move { ScoringServiceClient::new(ch).list_scoring_models(req).await },
            )
            .await;
        match page {
            Ok(p) => {
                for m in &p.scoring_models {
                    let id = m.name.strip_prefix("scoringModels/").unwrap_or(&m.name);
                    let scores = names.entry(id.to_owned()).or_default();
                    scores.insert(clm_domain::scoring::FIT.to_owned());
                    scores.insert(clm_domain::scoring::ENGAGEMENT.to_owned());
                    scores.extend(m.scores.iter().map(|s| s.name.clone()));
                }
                if p.next_page_token.is_empty() {
                    return Some(names);
                }
                page_token = p.next_page_token;
            }
            Err(e) => {
                tracing::info!(error = %e, "scoring's model scores unknown; checking against the scores customers have");
                return None;
            }
        }
    }
}

/// Pause points for tests in a backfill (after its diff, or after it wrote
/// its changes, before its commit) and in a stream batch's evaluation
/// (decided, before the membership lock). A test holds a writer there to
/// show what other writers do meanwhile. Unused, each costs one
/// uncontended mutex.
#[doc(hidden)]
pub mod backfill_pause {
    use std::sync::{Arc, Mutex};
    use tokio::sync::Notify;

    /// Where a backfill is held.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum At {
        /// The diff taken (no lock held), before applying it.
        Diffed,
        /// Under the lock, changes written, before the commit.
        Written,
        /// A stream batch's evaluation decided, before it takes the
        /// membership lock ([`super::Engine::evaluate_locking_late`]).
        Decided,
    }

    /// A gate a test installs: `reached` is notified when a backfill
    /// arrives, which then waits for `release`.
    #[derive(Debug, Clone, Default)]
    pub struct Gate {
        /// Notified when a backfill reaches the point.
        pub reached: Arc<Notify>,
        /// Lets the waiting backfill go on.
        pub release: Arc<Notify>,
    }

    static GATE: Mutex<Option<(At, Gate)>> = Mutex::new(None);

    /// Holds every backfill of this process at `at` from now on.
    pub fn install(at: At) -> Gate {
        let gate = Gate::default();
        if let Ok(mut g) = GATE.lock() {
            *g = Some((at, gate.clone()));
        }
        gate
    }

    /// Lets backfills pass the point again.
    pub fn remove() {
        if let Ok(mut g) = GATE.lock() {
            *g = None;
        }
    }

    pub(crate) async fn point(here: At) {
        let gate = GATE
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .filter(|(at, _)| *at == here);
        if let Some((_, gate)) = gate {
            gate.reached.notify_one();
            gate.release.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clm_domain::touchpoint::TouchpointKind;

    fn segment(id: &str, rule_text: &str) -> segments::Segment {
        segments::Segment {
            id: id.into(),
            display_name: id.into(),
            owner: "ada".into(),
            description: String::new(),
            rule_text: rule_text.into(),
            version: 1,
            revision: 1,
            state: 0,
            failure_reason: None,
            create_us: 0,
            update_us: 0,
            evaluate_us: None,
            operation: None,
            team: String::new(),
            purpose: String::new(),
            playbook: String::new(),
            approval_required: false,
        }
    }

    fn feature_use(feature: &str) -> Change {
        Change::Touch(Arc::new(Touchpoint {
            event_id: "e".into(),
            kind: TouchpointKind::FeatureUse,
            custom_type: None,
            occurred_time: chrono::DateTime::UNIX_EPOCH,
            usage_millis: None,
            product: None,
            feature: Some(feature.into()),
            revenue: None,
            campaign: None,
            channel: None,
            properties: Default::default(),
        }))
    }

    fn ids(mut got: Vec<Arc<Compiled>>) -> Vec<String> {
        got.sort_by(|a, b| a.id.cmp(&b.id));
        got.iter().map(|c| c.id.clone()).collect()
    }

    #[test]
    fn a_touchpoint_affects_only_segments_with_a_query_it_passes() {
        let reg = Registry::build(
            1,
            vec![
                segment(
                    "a",
                    r#"count(feature_use where feature = "export", 7d) >= 2"#,
                ),
                segment("b", r#"count(feature_use where feature = "import") >= 1"#),
                segment("c", "count(feature_use, 1d) >= 1 and age > 20"),
                segment(
                    "d",
                    r#"age > 20 or last(feature_use where feature = "export") within 1d"#,
                ),
                segment("e", "count(purchase) >= 1"),
            ],
            &BTreeSet::new(),
        );
        assert_eq!(ids(reg.affected(&feature_use("export"))), ["a", "c", "d"]);
        assert_eq!(ids(reg.affected(&feature_use("import"))), ["b", "c"]);
        assert_eq!(ids(reg.affected(&feature_use("other"))), ["c"]);
    }
}
