//! Membership in the cache (`clm_platform::cache`): a set per segment
//! (`{seg:ID}`, its members' customer ids) and a set per customer
//! (`{cust:ID}`, its segments' ids), each key hash-tagged so it lives in
//! one Redis Cluster slot. Written after the database commit with the
//! membership version (`seg_meta.membership_version`, taken under a row
//! lock so versions follow commit order), so a late write never undoes a
//! newer one. Reads that miss load the customer's set from the database;
//! a cache that is down or cold answers from the database, never "not a
//! member" by mistake.

use crate::store::members;
use clm_platform::cache::{Lookup, SetWrite};
use clm_platform::{Result, Runtime};

/// The cache key of a segment's member set.
pub fn segment_key(segment_id: &str) -> String {
    format!("{{seg:{segment_id}}}")
}

/// The cache key of a customer's segment set.
pub fn customer_key(customer_id: &str) -> String {
    format!("{{cust:{customer_id}}}")
}

/// One membership change, as the two set writes it makes.
pub fn writes(segment_id: &str, customer_id: &str, present: bool, version: i64) -> [SetWrite; 2] {
    let version = u64::try_from(version).unwrap_or(1).max(1);
    [
        SetWrite {
            key: segment_key(segment_id),
            member: customer_id.to_owned(),
            version,
            present,
        },
        customer_write(segment_id, customer_id, present, version),
    ]
}

/// The customer's half of a membership change (a deleted segment's exits:
/// its own set is dropped whole with [`clm_platform::cache::Cache::delete`]).
pub fn customer_write(
    segment_id: &str,
    customer_id: &str,
    present: bool,
    version: u64,
) -> SetWrite {
    SetWrite {
        key: customer_key(customer_id),
        member: segment_id.to_owned(),
        version: version.max(1),
        present,
    }
}

/// Applies membership changes to the cache after their commit; a failure
/// is repaired by the cache itself, so it is only logged.
pub async fn apply(rt: &Runtime, writes: &[SetWrite]) {
    if writes.is_empty() {
        return;
    }
    if let Err(e) = rt.cache.set_apply(writes).await {
        tracing::debug!(error = %e, "membership cache write skipped");
    }
}

/// Writes to the cache, after their commit, the membership changes one
/// transaction made at the versions `versions` (a backfill and its
/// cascade: every version in the range is theirs, taken under the
/// membership lock), read back `chunk` rows at a time from the rows they
/// wrote (entries still current, exits in the history): the writes are
/// never all held in memory, whatever the segment's size. An entry undone
/// since is skipped (the later change has a higher version); a failure is
/// repaired by the cache itself, so it is only logged.
pub async fn write_back(rt: &Runtime, versions: std::ops::RangeInclusive<i64>, chunk: u64) {
    if let Err(e) = write_back_rows(rt, &versions, chunk).await {
        tracing::warn!(error = %e, "membership cache write-back stopped");
    }
}

async fn write_back_rows(
    rt: &Runtime,
    versions: &std::ops::RangeInclusive<i64>,
    chunk: u64,
) -> Result<()> {
    let mut after: Option<members::Pair> = None;
    loop {
        let page = members::entries_between(&rt.db, versions, after.as_ref(), chunk).await?;
        apply(rt, &as_writes(&page)).await;
        match page.last() {
            Some((pair, _, _)) if page.len() as u64 == chunk => after = Some(pair.clone()),
            _ => break,
        }
    }
    let mut after = 0;
    loop {
        let page = members::exits_between(&rt.db, versions, after, chunk).await?;
        let changes: Vec<members::Written> = page.iter().map(|(_, w)| w.clone()).collect();
        apply(rt, &as_writes(&changes)).await;
        match page.last() {
            Some((id, _)) if page.len() as u64 == chunk => after = *id,
            _ => break,
        }
    }
    Ok(())
}

fn as_writes(changes: &[members::Written]) -> Vec<SetWrite> {
    changes
        .iter()
        .flat_map(|((s, c), present, version)| writes(s, c, *present, *version))
        .collect()
}

/// The segment ids of a customer: from the cache, or from the database
/// (loading the cache when it is merely cold).
pub async fn customer_segments(rt: &Runtime, customer_id: &str) -> Result<Vec<String>> {
    let key = customer_key(customer_id);
    match rt.cache.set_members(&key).await {
        Lookup::Hit(ids) => Ok(ids),
        Lookup::Miss => {
            // The version first: the members read after it are at least as new.
            let version = members::version(&rt.read).await?;
            let ids = from_db(rt, customer_id).await?;
            let version = u64::try_from(version).unwrap_or(1).max(1);
            if let Err(e) = rt.cache.set_replace(&key, version, &ids).await {
                tracing::debug!(error = %e, "membership cache load skipped");
            }
            Ok(ids)
        }
        Lookup::Unavailable => from_db(rt, customer_id).await,
    }
}

async fn from_db(rt: &Runtime, customer_id: &str) -> Result<Vec<String>> {
    let mut ids: Vec<String> = members::of_customers(&rt.read, &[customer_id.to_owned()])
        .await?
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    ids.sort();
    Ok(ids)
}

/// Whether the customer is in the segment: the cache's answer when it has
/// one, else the customer's set (loaded from the database).
pub async fn is_member(rt: &Runtime, segment_id: &str, customer_id: &str) -> Result<bool> {
    match rt
        .cache
        .set_contains(&customer_key(customer_id), segment_id)
        .await
    {
        Lookup::Hit(b) => Ok(b),
        Lookup::Miss | Lookup::Unavailable => Ok(customer_segments(rt, customer_id)
            .await?
            .iter()
            .any(|s| s == segment_id)),
    }
}
