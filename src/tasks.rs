//! Background work that is tracked: every task the server starts outside a request (the merge
//! loop, verify and gc schedules, stage deletes, failover and plan runs) goes through one
//! [`Tasks`] runner, so shutdown can cancel the schedules and wait for the rest within its grace
//! period instead of dropping them mid-write.
//!
//! Work that fails and is retried later (merge, cleanup) keeps a [`RetryBook`]: one record per
//! key with a back-off that doubles up to a cap, so a disk whose merge keeps failing is not
//! retried on every tick, and one that recovers is retried promptly.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The server's background task set and its cancellation signal.
#[derive(Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Tasks {
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Starts `work` as a tracked task: shutdown waits for it (within the grace period).
    /// Work that should stop early on shutdown selects on [`Tasks::cancelled`].
    pub fn spawn<F>(&self, name: &'static str, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if self.cancel.is_cancelled() {
            tracing::warn!(task = name, "not started: the server is shutting down");
            return;
        }
        self.tracker.spawn(async move {
            work.await;
            tracing::debug!(task = name, "background task finished");
        });
    }

    /// Runs `tick` every `period` (first after one period) until shutdown. A tick in progress
    /// finishes; no new one starts once shutdown began.
    pub fn every<F, Fut>(&self, name: &'static str, period: Duration, mut tick: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.spawn(name, async move {
            let mut timer = tokio::time::interval(period);
            timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            timer.tick().await;
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = timer.tick() => {}
                }
                tick().await;
            }
        });
    }

    /// Resolves once shutdown has begun.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Tasks still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Cancels the schedules, refuses new tasks and waits up to `grace` for the running ones.
    /// Returns how many were still running when the grace period ended (0: all drained).
    pub async fn shutdown(&self, grace: Duration) -> usize {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_err()
        {
            let left = self.tracker.len();
            tracing::warn!(
                tasks = left,
                "grace period over: background tasks abandoned"
            );
            return left;
        }
        0
    }
}

/// Per-key retry records with capped exponential back-off.
#[derive(Clone)]
pub struct RetryBook<K> {
    first: Duration,
    cap: Duration,
    entries: Arc<Mutex<HashMap<K, Retry>>>,
}

/// One key's failures so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    pub failures: u32,
    pub next_at: Instant,
    pub last_error: String,
}

impl<K: Eq + Hash + Clone> RetryBook<K> {
    /// Back-off starts at `first` after a failure and doubles up to `cap`.
    pub fn new(first: Duration, cap: Duration) -> RetryBook<K> {
        RetryBook {
            first,
            cap: cap.max(first),
            entries: Arc::default(),
        }
    }

    /// Whether `key` may be tried now (no failure recorded, or its back-off has passed).
    pub fn due(&self, key: &K, now: Instant) -> bool {
        self.lock().get(key).is_none_or(|r| now >= r.next_at)
    }

    /// Records a failure and returns the delay before the next try.
    pub fn failed(&self, key: K, now: Instant, error: impl std::fmt::Display) -> Duration {
        let mut entries = self.lock();
        let failures = entries.get(&key).map_or(0, |r| r.failures) + 1;
        let delay = self
            .first
            .checked_mul(1u32.checked_shl(failures - 1).unwrap_or(u32::MAX))
            .unwrap_or(self.cap)
            .min(self.cap);
        entries.insert(
            key,
            Retry {
                failures,
                next_at: now + delay,
                last_error: error.to_string(),
            },
        );
        delay
    }

    /// Forgets `key`'s failures after a success.
    pub fn succeeded(&self, key: &K) {
        self.lock().remove(key);
    }

    pub fn get(&self, key: &K) -> Option<Retry> {
        self.lock().get(key).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, Retry>> {
        // A panic while holding this lock leaves the map consistent (each update is one insert
        // or remove), so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn back_off_doubles_up_to_the_cap_and_resets_on_success() {
        let book = RetryBook::new(Duration::from_secs(1), Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(book.due(&"a", t0));
        assert_eq!(book.failed("a", t0, "x"), Duration::from_secs(1));
        assert!(!book.due(&"a", t0));
        assert!(book.due(&"b", t0), "other keys are not held back");
        assert!(book.due(&"a", t0 + Duration::from_secs(1)));
        assert_eq!(book.failed("a", t0, "x"), Duration::from_secs(2));
        assert_eq!(book.failed("a", t0, "x"), Duration::from_secs(4));
        assert_eq!(book.failed("a", t0, "x"), Duration::from_secs(5));
        for _ in 0..40 {
            book.failed("a", t0, "still failing");
        }
        let r = book.get(&"a").expect("recorded");
        assert_eq!(r.next_at, t0 + Duration::from_secs(5));
        assert_eq!(r.last_error, "still failing");
        book.succeeded(&"a");
        assert!(book.due(&"a", t0));
        assert_eq!(book.failed("a", t0, "x"), Duration::from_secs(1));
    }

    #[tokio::test]
    async fn shutdown_waits_for_running_work_and_stops_schedules() {
        let tasks = Tasks::new();
        let ticks = Arc::new(AtomicUsize::new(0));
        let t = ticks.clone();
        tasks.every("tick", Duration::from_millis(1), move || {
            let t = t.clone();
            async move {
                t.fetch_add(1, Ordering::SeqCst);
            }
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicUsize::new(0));
        let f = finished.clone();
        tasks.spawn("work", async move {
            let _ = rx.await;
            f.fetch_add(1, Ordering::SeqCst);
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while ticks.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < deadline, "schedule never ticked");
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let drain = tokio::spawn({
            let tasks = tasks.clone();
            async move { tasks.shutdown(Duration::from_secs(60)).await }
        });
        // The schedule stops at once; the work still holds shutdown until it ends.
        while tasks.len() > 1 {
            assert!(Instant::now() < deadline, "schedule did not stop");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(!drain.is_finished());
        tasks.spawn("late", async { panic!("started after shutdown") });
        tx.send(()).expect("work waiting");
        assert_eq!(drain.await.expect("drain"), 0);
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        assert!(tasks.is_empty());
    }

    #[tokio::test]
    async fn shutdown_gives_up_after_the_grace_period() {
        let tasks = Tasks::new();
        tasks.spawn("stuck", std::future::pending());
        assert_eq!(tasks.shutdown(Duration::from_millis(10)).await, 1);
    }
}
