//! Concurrent calls of one kind gathered into one statement.
//!
//! Under load, many calls read or write one row each (GetCustomer,
//! CreateCustomer): each pays a statement of its own, a round trip to the
//! database, a commit and the wake-ups around them, which cost the server
//! and the database more than the row. A [`Batcher`] gathers the calls that
//! arrive while earlier batches are in flight and runs them as one. Alone,
//! a call runs at once (a batch of one, no waiting for company); at 64
//! concurrent calls each batch carries a few dozen.
//!
//! **Reads** ([`Coalescer`]): a key is read by a statement that starts
//! after the call arrived, so it sees every write committed before the
//! call: the same guarantee as a statement of its own.
//!
//! **Writes**: a batch of writes is one statement, its own transaction,
//! all or nothing. When it cannot write every item (one of them conflicts,
//! or the batch failed), it writes none and each waiter hears `None`.
//!
//! **Never an error of its own.** A call answers `Some(value)`, or `None`
//! when the batch did not find or write its item, when the batch failed or
//! panicked, or when the batcher is saturated. The caller then does that
//! call alone, with its own errors (not found, merged, already exists, the
//! database down): every case is told apart by the one path that already
//! does.

use futures::future::BoxFuture;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, OnceLock};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// Runs a batch of items: one answer per item, in order (`None`: not done,
/// the caller does it alone). An error, or a list of another length,
/// answers `None` to every item.
pub type Run<T, R> =
    Arc<dyn Fn(Vec<T>) -> BoxFuture<'static, crate::Result<Vec<Option<R>>>> + Send + Sync>;

/// Reads a batch of keys: the values found, by key (absent keys left out).
pub type Fetch<K, V> =
    Arc<dyn Fn(Vec<K>) -> BoxFuture<'static, crate::Result<HashMap<K, V>>> + Send + Sync>;

/// A call waiting in a batch: its item, its span and where its answer goes.
type Waiter<T, R> = (T, tracing::Span, oneshot::Sender<Option<R>>);

/// Calls waiting beyond this many get `None` at once (they run alone).
const QUEUE: usize = 4096;

/// Gathers concurrent calls with items `T` into batches run by one [`Run`].
pub struct Batcher<T, R> {
    run: Run<T, R>,
    max_batch: usize,
    max_in_flight: usize,
    /// Started on first use, inside the runtime that serves the calls.
    queue: OnceLock<mpsc::Sender<Waiter<T, R>>>,
}

impl<T, R> std::fmt::Debug for Batcher<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("max_batch", &self.max_batch)
            .field("max_in_flight", &self.max_in_flight)
            .finish_non_exhaustive()
    }
}

impl<T, R> Batcher<T, R>
where
    T: Send + 'static,
    R: Send + 'static,
{
    /// Runs with `run`, at most `max_in_flight` batches at a time (each
    /// holds a pooled connection while it runs), each of at most
    /// `max_batch` items.
    pub fn new(run: Run<T, R>, max_batch: usize, max_in_flight: usize) -> Self {
        Self {
            run,
            max_batch: max_batch.max(1),
            max_in_flight: max_in_flight.max(1),
            queue: OnceLock::new(),
        }
    }

    /// The answer for `item`, run in a batch with the calls beside it;
    /// `None` when the batch did not do it (see the module docs: the
    /// caller does it alone then).
    pub async fn submit(&self, item: T) -> Option<R> {
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(gather(
                self.run.clone(),
                rx,
                self.max_batch,
                self.max_in_flight,
            ));
            tx
        });
        let (tx, rx) = oneshot::channel();
        queue.try_send((item, tracing::Span::current(), tx)).ok()?;
        rx.await.ok().flatten()
    }
}

/// Gathers concurrent lookups of `K` into batches read by one [`Fetch`],
/// each distinct key read once per batch.
pub struct Coalescer<K, V> {
    batcher: Batcher<K, V>,
}

impl<K, V> std::fmt::Debug for Coalescer<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("batcher", &self.batcher)
            .finish()
    }
}

impl<K, V> Coalescer<K, V>
where
    K: Eq + Hash + Clone + Send + 'static,
    V: Clone + Send + 'static,
{
    /// Reads with `fetch`, at most `max_in_flight` batches at a time, each
    /// of at most `max_batch` keys.
    pub fn new(fetch: Fetch<K, V>, max_batch: usize, max_in_flight: usize) -> Self {
        let run: Run<K, V> = Arc::new(move |keys: Vec<K>| {
            let fetch = fetch.clone();
            Box::pin(async move {
                let distinct: std::collections::HashSet<&K> = keys.iter().collect();
                let found = fetch(distinct.into_iter().cloned().collect()).await?;
                Ok(keys.iter().map(|k| found.get(k).cloned()).collect())
            })
        });
        Self {
            batcher: Batcher::new(run, max_batch, max_in_flight),
        }
    }

    /// The value of `key`, read in a batch with the calls beside it; `None`
    /// when the batch did not find it or could not read (see the module
    /// docs: the caller reads it alone then).
    pub async fn get(&self, key: K) -> Option<V> {
        self.batcher.submit(key).await
    }
}

/// Takes the first waiting call as soon as a batch may start, with every
/// call queued behind it (up to `max_batch`), and runs them in a task of
/// their own. Ends when the batcher is dropped.
async fn gather<T, R>(
    run: Run<T, R>,
    mut queue: mpsc::Receiver<Waiter<T, R>>,
    max_batch: usize,
    max_in_flight: usize,
) where
    T: Send + 'static,
    R: Send + 'static,
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
        let run = run.clone();
        tokio::spawn(async move {
            answer(&run, batch).await;
            drop(permit);
        });
    }
}

/// Runs the batch and answers every waiter; on a failure (or a panic,
/// which drops the senders) every waiter hears `None` and runs alone. The
/// batch runs in the first call's span: its statements are that call's
/// children in a trace (a call alone in its batch sees its own).
async fn answer<T, R>(run: &Run<T, R>, batch: Vec<Waiter<T, R>>)
where
    T: Send + 'static,
    R: Send + 'static,
{
    use tracing::Instrument as _;
    let span = batch
        .first()
        .map_or_else(tracing::Span::none, |(_, span, _)| span.clone());
    let (items, waiters): (Vec<T>, Vec<_>) = batch.into_iter().map(|(t, _, tx)| (t, tx)).unzip();
    let n = waiters.len();
    let answers = match run(items).instrument(span).await {
        Ok(answers) if answers.len() == n => answers,
        Ok(answers) => {
            tracing::error!(
                items = n,
                answers = answers.len(),
                "a batch answered the wrong number of items; each call runs alone"
            );
            Vec::new()
        }
        Err(e) => {
            tracing::debug!(error = %e, "a batch failed; each call runs alone");
            Vec::new()
        }
    };
    let mut answers = answers.into_iter();
    for tx in waiters {
        let _ = tx.send(answers.next().flatten());
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

    /// A batcher of writes, all or nothing like one statement: a batch
    /// holding a 0 (a conflicting item) writes nothing; every batch is
    /// recorded.
    fn all_or_nothing(batches: Arc<Mutex<Vec<Vec<u32>>>>) -> Batcher<u32, bool> {
        let run: Run<u32, bool> = Arc::new(move |items: Vec<u32>| {
            let batches = batches.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                batches.lock().unwrap().push(items.clone());
                let done = !items.contains(&0);
                let alone = items.len() == 1;
                Ok(vec![(done || alone).then_some(done); items.len()])
            })
        });
        Batcher::new(run, 16, 2)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_writes_share_batches_and_a_conflict_sends_each_back_alone() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let b = Arc::new(all_or_nothing(Arc::clone(&batches)));
        assert_eq!(b.submit(0).await, Some(false), "alone, it hears it failed");
        let calls: Vec<_> = (1..=100u32)
            .map(|i| {
                let b = b.clone();
                // Every 25th is a conflict that fails its whole batch.
                let item = if i % 25 == 0 { 0 } else { i };
                tokio::spawn(async move { (item, b.submit(item).await) })
            })
            .collect();
        let mut written = 0;
        for call in calls {
            match call.await.unwrap() {
                (0, answer) => assert_ne!(answer, Some(true), "a conflict is never written"),
                (_, Some(true)) => written += 1,
                (_, answer) => assert_eq!(answer, None, "sent back to write alone"),
            }
        }
        let batches = batches.lock().unwrap();
        assert!(batches.iter().all(|b| b.len() <= 16), "{batches:?}");
        assert!(
            batches.len() < 60,
            "100 calls share batches: {}",
            batches.len()
        );
        let in_clean_batches: usize = batches
            .iter()
            .filter(|b| !b.contains(&0))
            .map(Vec::len)
            .sum();
        assert_eq!(
            written, in_clean_batches,
            "exactly the clean batches' items are written"
        );
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
