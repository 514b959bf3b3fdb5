//! Concurrent point reads of one kind gathered into one statement.
//!
//! Under load, many calls read one row each (GetCustomer): each pays a
//! statement of its own, a round trip to the database and the wake-ups
//! around it, which cost the server and the database more than reading the
//! row. A [`Coalescer`] gathers the keys of the calls that arrive while
//! earlier reads are in flight and reads them with one statement. Alone, a
//! call is read at once (a batch of one, no waiting for company); at 64
//! concurrent calls each statement carries a few dozen keys.
//!
//! **What a call sees.** Its key is read by a statement that starts after
//! the call arrived, so it sees every write committed before the call: the
//! same guarantee as a statement of its own.
//!
//! **Never an error of its own.** [`Coalescer::get`] answers `Some(value)`,
//! or `None` when the batch did not find the key, when the batch failed, or
//! when the coalescer is saturated. The caller then reads that key itself,
//! with its own errors (not found, merged, the database down): a missing
//! key and a failure are told apart by the one path that already does.

use futures::future::BoxFuture;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, OnceLock};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Reads a batch of keys: the values found, by key (absent keys left out).
pub type Fetch<K, V> =
    Arc<dyn Fn(Vec<K>) -> BoxFuture<'static, crate::Result<HashMap<K, V>>> + Send + Sync>;

type Waiter<K, V> = (K, oneshot::Sender<Option<V>>);

/// Calls waiting beyond this many get `None` at once (they read alone).
const QUEUE: usize = 4096;

/// Gathers concurrent lookups of `K` into batches read by one [`Fetch`].
pub struct Coalescer<K, V> {
    fetch: Fetch<K, V>,
    max_batch: usize,
    max_in_flight: usize,
    /// Started on first use, inside the runtime that serves the calls.
    queue: OnceLock<mpsc::Sender<Waiter<K, V>>>,
}

impl<K, V> std::fmt::Debug for Coalescer<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("max_batch", &self.max_batch)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl<K, V> Coalescer<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    /// Reads with `fetch`, at most `max_in_flight` batches at a time (each
    /// holds a pooled connection while it runs), each of at most
    /// `max_batch` keys.
    pub fn new(fetch: Fetch<K, V>, max_batch: usize, max_in_flight: usize) -> Self {
        Self {
            fetch,
            max_batch: max_batch.max(1),
            max_in_flight: max_in_flight.max(1),
            queue: OnceLock::new(),
        }
    }

    /// The value of `key`, read in a batch with the calls beside it; `None`
    /// when the batch did not find it or could not read (see the module
    /// docs: the caller reads it alone then).
    pub async fn get(&self, key: K) -> Option<V> {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(gather(
                self.fetch.clone(),
                rx,
                self.max_batch,
                self.max_in_flight,
            ));
            tx
        });
        let (tx, rx) = oneshot::channel();
        queue.try_send((key, tx)).ok()?;
        rx.await.ok().flatten()
    }
}

/// Takes the first waiting call as soon as a batch may start, with every
/// call queued behind it (up to `max_batch`), and reads them in a task of
/// their own. Ends when the coalescer is dropped.
async fn gather<K, V>(
    fetch: Fetch<K, V>,
    mut queue: mpsc::Receiver<Waiter<K, V>>,
    max_batch: usize,
    max_in_flight: usize,
) where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    let permits = Arc::new(Semaphore::new(max_in_flight));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let Some(first) = queue.recv().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        let fetch = fetch.clone();
        tokio::spawn(async move {
            answer(&fetch, batch).await;
            drop(permit);
        });
    }
}

/// Reads the batch's distinct keys once and answers every waiter; on a
/// failure every waiter hears `None` and reads alone.
async fn answer<K, V>(fetch: &Fetch<K, V>, batch: Vec<Waiter<K, V>>)
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    let mut waiters: HashMap<K, Vec<oneshot::Sender<Option<V>>>> =
        HashMap::with_capacity(batch.len());
    for (key, tx) in batch {
        waiters.entry(key).or_default().push(tx);
    }
    let keys: Vec<K> = waiters.keys().cloned().collect();
    let mut found = match fetch(keys).await {
        Ok(found) => found,
        Err(e) => {
            tracing::debug!(error = %e, "coalesced read failed; each call reads alone");
            HashMap::new()
        }
    };
    for (key, mut txs) in waiters {
        let value = found.remove(&key);
        let last = txs.pop();
        for tx in txs {
            let _ = tx.send(value.clone());
        }
        if let Some(tx) = last {
            let _ = tx.send(value);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A fetch of squares that records each batch it was given and takes
    /// `delay` per batch; keys over 1,000 are "absent", key 666 fails its
    /// whole batch.
    fn squares(delay: Duration, batches: Arc<Mutex<Vec<Vec<u32>>>>) -> Fetch<u32, u64> {
        Arc::new(move |keys: Vec<u32>| {
            let batches = batches.clone();
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                batches.lock().unwrap().push(keys.clone());
                if keys.contains(&666) {
                    return Err(crate::Error::Unavailable("down".into()));
                }
                Ok(keys
                    .into_iter()
                    .filter(|k| *k <= 1000)
                    .map(|k| (k, u64::from(k) * u64::from(k)))
                    .collect())
            })
        })
    }

    #[tokio::test]
    async fn a_lone_call_is_read_at_once_in_a_batch_of_one() {
        let batches = Arc::default();
        let c = Coalescer::new(squares(Duration::ZERO, Arc::clone(&batches)), 64, 2);
        assert_eq!(c.get(12).await, Some(144));
        assert_eq!(c.get(13).await, Some(169));
        assert_eq!(*batches.lock().unwrap(), vec![vec![12], vec![13]]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_batches_and_each_gets_its_own_value() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let c = Arc::new(Coalescer::new(
            squares(Duration::from_millis(20), Arc::clone(&batches)),
            64,
            1,
        ));
        let calls: Vec<_> = (0..200u32)
            .map(|i| {
                let c = c.clone();
                // Key 7 asked many times: every asker gets it.
                let key = if i % 10 == 0 { 7 } else { i };
                tokio::spawn(async move { (key, c.get(key).await) })
            })
            .collect();
        for call in calls {
            let (key, value) = call.await.unwrap();
            assert_eq!(value, Some(u64::from(key) * u64::from(key)));
        }
        let batches = batches.lock().unwrap();
        assert!(batches.iter().all(|b| b.len() <= 64), "{batches:?}");
        assert!(
            batches.len() < 50,
            "200 calls while one batch at a time runs share batches: {} batches",
            batches.len()
        );
        let asked: usize = batches.iter().map(Vec::len).sum();
        assert!(asked < 200, "a key asked twice in one batch is read once");
    }

    #[tokio::test]
    async fn an_absent_key_or_a_failed_batch_answers_none() {
        let c = Coalescer::new(squares(Duration::ZERO, Arc::default()), 64, 2);
        assert_eq!(c.get(5000).await, None);
        assert_eq!(c.get(666).await, None);
        assert_eq!(c.get(3).await, Some(9));
    }

    #[tokio::test]
    async fn a_batch_that_panics_answers_none_and_the_next_calls_still_work() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let fetch: Fetch<u32, u32> = Arc::new(move |keys: Vec<u32>| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                assert!(n > 0, "the first batch panics");
                Ok(keys.into_iter().map(|k| (k, k)).collect())
            })
        });
        let c = Coalescer::new(fetch, 8, 1);
        assert_eq!(c.get(1).await, None);
        assert_eq!(c.get(2).await, Some(2));
    }
}
