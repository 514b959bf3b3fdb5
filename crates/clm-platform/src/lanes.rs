//! Lanes: in-process queues per key, taken *before* a database connection.
//!
//! A write that locks one row (a loyalty member, say) holds a pool
//! connection while it waits for that row's lock. A burst of calls for the
//! same few keys then parks most of the pool on lock waits, and calls for
//! every other key starve for a connection (UNAVAILABLE after the acquire
//! timeout). Taking the key's lane first queues same-key calls in memory,
//! so one replica holds at most one connection per busy key and the rest of
//! the pool keeps serving other keys. The row lock stays the guard across
//! replicas; a lane only orders calls inside one process.
//!
//! Keys are hashed onto a fixed set of stripes (no map to grow or clean);
//! two keys sharing a stripe merely queue behind each other.

use std::hash::{DefaultHasher, Hash, Hasher};
use tokio::sync::{Mutex, MutexGuard};

/// Stripes per [`Lanes`]: enough that 64 concurrent keys rarely share one.
const STRIPES: usize = 4096;

/// Striped in-process queues, one per key (see the module docs).
#[derive(Debug)]
pub struct Lanes {
    stripes: Box<[Mutex<()>]>,
}

impl Default for Lanes {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl Lanes {
    /// Waits for the lane of `key` (fairly, in arrival order) and holds it
    /// until the guard drops.
    pub async fn enter(&self, key: &str) -> MutexGuard<'_, ()> {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        // The modulo keeps the index below STRIPES, so it fits usize.
        let i = (h.finish() % STRIPES as u64) as usize;
        self.stripes[i].lock().await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn one_call_per_key_at_a_time_and_other_keys_pass() {
        let lanes = Arc::new(Lanes::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (lanes, inside, most) = (lanes.clone(), inside.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                let _g = lanes.enter("programs/p/members/m").await;
                let n = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(n, Ordering::SeqCst);
                tokio::task::yield_now().await;
                inside.fetch_sub(1, Ordering::SeqCst);
            }));
        }
        // Another key is not held up by the busy one.
        let busy = lanes.enter("programs/p/members/m").await;
        let other = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            lanes.enter("programs/p/members/other"),
        )
        .await;
        assert!(other.is_ok(), "a different key waited for a busy one");
        drop(other);
        drop(busy);
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1, "two calls shared a lane");
    }
}
