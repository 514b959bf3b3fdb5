//! Work the platform timer queue does for segment accountability, once
//! across replicas:
//!
//! * [`SNAPSHOT`] — one timer per segment and day (key
//!   `{segment}|{day_us}`) due at the configured `snapshot_hour_utc`: it
//!   records the segment's size and each objective's value and status of
//!   that day (a second firing of the same day writes nothing: the rows'
//!   keys are segment + day), emits `ObjectiveStatusChanged` for each
//!   status that changed, and arms the next day's timer.
//! * [`DEADLINE`] — one timer per objective (key `{segment}|{objective}`)
//!   due at its deadline: it freezes the value at the deadline (MET or
//!   MISSED from then on) and emits the change.
//!
//! Plus the retention of membership history ([`purge_history`]).

use crate::objectives::{self, Evaluated};
use crate::store::history::{self, DAY_US};
use crate::store::objectives::{self as stored, Objective};
use crate::store::segments;
use chrono::{DateTime, Utc};
use clm_platform::changes::Apply;
use clm_platform::convert::timestamp;
use clm_platform::db::{from_micros, to_micros};
use clm_platform::outbox::NewEvent;
use clm_platform::timers::{self, Arm, OnDue, Timer};
use clm_platform::{Error, Result, Runtime};
use clm_proto::segmentation as pb;
use sea_orm::ConnectionTrait;
use std::collections::BTreeMap;

/// Timer kind of the daily snapshot.
pub const SNAPSHOT: &str = "segmentation.snapshot";
/// Timer kind of an objective's deadline.
pub const DEADLINE: &str = "segmentation.deadline";

fn key(segment: &str, rest: &str) -> String {
    format!("{segment}|{rest}")
}

/// The start (00:00 UTC) of the day of `us`.
pub fn day_start(us: i64) -> i64 {
    us - us.rem_euclid(DAY_US)
}

/// The next snapshot instant strictly after `now_us` at `hour` UTC.
pub fn next_snapshot(now_us: i64, hour: u32) -> i64 {
    let today = day_start(now_us) + i64::from(hour) * 3_600_000_000;
    if today > now_us {
        today
    } else {
        today + DAY_US
    }
}

/// Arms `segment`'s next daily snapshot (in the write's transaction).
pub async fn arm_snapshot(
    db: &impl ConnectionTrait,
    segment: &str,
    now_us: i64,
    hour: u32,
) -> Result<()> {
    let due = next_snapshot(now_us, hour);
    let arm = Arm::new(key(segment, &day_start(due).to_string()), segment, due);
    timers::arm(db, SNAPSHOT, &[arm]).await?;
    Ok(())
}

/// Arms the deadline timers of `objectives` (of `segment`), replacing the
/// segment's previous ones: objectives not frozen yet are due at their
/// deadline (or at once when it has passed).
pub async fn arm_deadlines(
    db: &impl ConnectionTrait,
    segment: &str,
    objectives: &[Objective],
    now_us: i64,
) -> Result<()> {
    timers::disarm_prefix(db, DEADLINE, &key(segment, "")).await?;
    let arms: Vec<Arm> = objectives
        .iter()
        .filter(|o| o.final_value.is_none())
        .map(|o| {
            Arm::new(
                key(segment, &o.objective_id),
                segment,
                o.deadline_us.max(now_us),
            )
        })
        .collect();
    timers::arm(db, DEADLINE, &arms).await?;
    Ok(())
}

/// Disarms every accountability timer of a deleted segment.
pub async fn disarm(db: &impl ConnectionTrait, segment: &str) -> Result<()> {
    timers::disarm_prefix(db, SNAPSHOT, &key(segment, "")).await?;
    timers::disarm_prefix(db, DEADLINE, &key(segment, "")).await?;
    Ok(())
}

/// The outbox event of an objective whose status changed.
fn changed(owner: &str, o: &Objective, previous: i16, e: &Evaluated) -> NewEvent {
    let segment = format!("segments/{}", o.segment_id);
    let msg = pb::ObjectiveStatusChanged {
        segment: segment.clone(),
        objective: o.objective_id.clone(),
        previous_status: i32::from(previous),
        status: e.status as i32,
        value: e.value,
        projected_value: e.projected,
        target: o.target,
        direction: i32::from(o.direction),
        deadline: Some(timestamp(from_micros(o.deadline_us))),
        evaluate_time: Some(timestamp(from_micros(e.at_us))),
        owner: owner.to_owned(),
    };
    NewEvent::new(segment, &msg)
}

/// The daily snapshot and the deadline, as the timer queue fires them.
#[derive(Debug, Clone)]
pub struct Timers {
    /// The runtime (its config: hour and trend).
    pub rt: Runtime,
    /// Which kind this handler fires.
    pub kind: &'static str,
}

#[async_trait::async_trait]
impl OnDue for Timers {
    async fn fire(&self, cx: &mut Apply, due: Vec<Timer>) -> std::result::Result<(), Error> {
        let settings = &self.rt.config.segmentation;
        let mut by_segment: BTreeMap<String, Vec<(String, i64)>> = BTreeMap::new();
        for t in &due {
            if let Some((seg, rest)) = t.key.split_once('|') {
                by_segment
                    .entry(seg.to_owned())
                    .or_default()
                    .push((rest.to_owned(), t.due_us));
            }
        }
        for (seg, items) in by_segment {
            let Some(row) = segments::get(cx.txn(), &seg).await? else {
                continue;
            };
            // Measured now: a snapshot fired late (no replica ran at the
            // hour) records what is true when it runs, under its own day.
            let now_us = to_micros(cx.now());
            for (rest, due_us) in items {
                if self.kind == SNAPSHOT {
                    let day: i64 = rest.parse().unwrap_or_else(|_| day_start(due_us));
                    snapshot(
                        cx,
                        &row.owner,
                        &seg,
                        day,
                        now_us,
                        settings.objective_trend_days,
                    )
                    .await?;
                    let next = day + DAY_US + i64::from(settings.snapshot_hour_utc) * 3_600_000_000;
                    let arm = Arm::new(key(&seg, &(day + DAY_US).to_string()), seg.as_str(), next);
                    timers::arm(cx.txn(), SNAPSHOT, &[arm]).await?;
                } else {
                    deadline(cx, &row.owner, &seg, &rest, now_us.max(due_us)).await?;
                }
            }
        }
        Ok(())
    }
}

/// Takes `segment`'s snapshot of `day` at `at_us`.
async fn snapshot(
    cx: &mut Apply,
    owner: &str,
    segment: &str,
    day: i64,
    at_us: i64,
    trend_days: u32,
) -> Result<()> {
    let segs = [segment.to_owned()];
    let objs = stored::of_segments(cx.txn(), &segs)
        .await?
        .remove(segment)
        .unwrap_or_default();
    let refs: Vec<&Objective> = objs.iter().collect();
    let m = objectives::measure(cx.txn(), &segs, &refs, false, at_us).await?;
    let size = m.facts.get(segment).map_or(0, |f| f.size);
    history::insert_size(cx.txn(), segment, day, size, at_us).await?;
    let firsts = objectives::trend_starts(cx.txn(), &segs, at_us, trend_days).await?;
    let mut rows = Vec::new();
    for o in &objs {
        let v = objectives::value(o, &m);
        let first = firsts
            .get(&(o.segment_id.clone(), o.objective_id.clone()))
            .copied();
        let e = objectives::status(o, v, at_us, first);
        rows.push(stored::Snapshot {
            segment_id: segment.to_owned(),
            objective_id: o.objective_id.clone(),
            day_us: day,
            taken_us: at_us,
            value: e.value,
            status: e.status as i16,
        });
        if e.status as i16 != o.status {
            stored::set_status(cx.txn(), segment, &o.objective_id, e.status as i16, None).await?;
            cx.emit(changed(owner, o, o.status, &e));
        }
    }
    stored::insert_snapshots(cx.txn(), rows).await?;
    Ok(())
}

/// Freezes objective `objective` of `segment` at its deadline.
async fn deadline(
    cx: &mut Apply,
    owner: &str,
    segment: &str,
    objective: &str,
    at_us: i64,
) -> Result<()> {
    let segs = [segment.to_owned()];
    let Some(o) = stored::of_segments(cx.txn(), &segs)
        .await?
        .remove(segment)
        .unwrap_or_default()
        .into_iter()
        .find(|o| o.objective_id == objective)
    else {
        return Ok(());
    };
    if o.final_value.is_some() {
        return Ok(());
    }
    let m = objectives::measure(cx.txn(), &segs, &[&o], false, at_us).await?;
    let v = objectives::value(&o, &m);
    let e = objectives::status(&o, v, at_us, None);
    stored::set_status(cx.txn(), segment, objective, e.status as i16, Some(v)).await?;
    if e.status as i16 != o.status {
        cx.emit(changed(owner, &o, o.status, &e));
    }
    Ok(())
}

/// Arms the next snapshot of every segment (at start: segments created
/// before snapshots existed get theirs; arming an armed key again is a
/// no-op in effect).
pub async fn arm_all(rt: Runtime) {
    let now_us = to_micros(rt.clock.now());
    let hour = rt.config.segmentation.snapshot_hour_utc;
    let armed = async {
        let all = segments::all(&rt.read).await?;
        let arms: Vec<Arm> = all
            .iter()
            .map(|s| {
                let due = next_snapshot(now_us, hour);
                Arm::new(key(&s.id, &day_start(due).to_string()), s.id.as_str(), due)
            })
            .collect();
        timers::arm(&rt.db, SNAPSHOT, &arms).await?;
        Ok::<_, Error>(())
    };
    if let Err(e) = armed.await {
        tracing::warn!(error = %e, "cannot arm the daily snapshots");
    }
    rt.timers.wake();
}

/// Deletes membership history older than the retention, hourly, until
/// shutdown.
pub async fn purge_history(rt: Runtime, shutdown: tokio_util::sync::CancellationToken) {
    let days = i64::from(rt.config.segmentation.membership_history_retention_days);
    loop {
        let now: DateTime<Utc> = rt.clock.now();
        let before = to_micros(now) - days * DAY_US;
        match history::purge(&rt.db, before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "membership history past retention deleted"),
            Err(e) => tracing::warn!(error = %e, "cannot purge membership history"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(std::time::Duration::from_secs(3600)) => {}
        }
    }
}
