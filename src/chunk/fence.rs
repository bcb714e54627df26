//! The write fence between uploads and garbage collection.
//!
//! Garbage collection marks what the records reference, then deletes the rest. Two kinds of
//! writer could otherwise lose data to it:
//!
//! * A writer that stores objects first and references them later (a block upload: chunk, then
//!   receipt; a merge: chunks and map, then the disk record). If a collection read the records
//!   between the two steps, the new objects would look unreferenced. Such a *critical section*
//!   runs under [`WriteFence::writer`] (a shared lock); [`WriteFence::begin_collection`] takes the
//!   lock exclusively for an instant, so every critical section either finished before the
//!   collection started (its reference is durable, the mark sees it) or starts after it.
//! * A writer that finds an existing object instead of storing it (deduplication: `head` says
//!   "already have it") may pick an unreferenced chunk the sweep is about to delete. While a
//!   collection runs, every key a writer stores or finds is *touched* first, under the sweep lock,
//!   and the sweep deletes a key only under that lock and only if it was not touched. So either
//!   the writer's touch came first (the sweep skips the key) or the delete did (the writer's
//!   `head` then finds nothing and stores the object again).
//!
//! Change logs stream for minutes and must not hold the shared lock that long (a collection would
//! wait for them and every upload behind it). A log being received registers its key prefix
//! instead ([`WriteFence::log_upload`]): prefixes in flight when a collection starts, or
//! registered while it runs, count as touched.
//!
//! Lock order: the writer lock is always taken before any other lock (VM, disk, session locks),
//! and never twice by one task: tokio's `RwLock` queues new readers behind a waiting collection.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedRwLockReadGuard, RwLock};

use crate::store::{Key, Store, StoreError};

/// Shared by every clone of a [`crate::chunk::ChunkStore`].
#[derive(Clone, Default)]
pub struct WriteFence {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    writers: Arc<RwLock<()>>,
    /// Held by a touch and by each sweep delete: makes "touch, then head" and "check, then
    /// delete" atomic with respect to each other.
    sweep: tokio::sync::Mutex<()>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// `Some` while a collection runs.
    collecting: Option<Touched>,
    /// Log prefixes being received, with how many uploads hold each.
    logs_in_flight: HashMap<String, usize>,
}

#[derive(Default)]
struct Touched {
    keys: HashSet<String>,
    logs: HashSet<String>,
}

/// Held across a critical section (store objects → reference them).
pub type WriterGuard = OwnedRwLockReadGuard<()>;

/// Registration of a log being received; dropping it ends the registration.
pub struct LogUpload {
    fence: WriteFence,
    prefix: String,
}

impl Drop for LogUpload {
    fn drop(&mut self) {
        let mut st = self.fence.state();
        if let Some(n) = st.logs_in_flight.get_mut(&self.prefix) {
            *n -= 1;
            if *n == 0 {
                st.logs_in_flight.remove(&self.prefix);
            }
        }
    }
}

/// A running collection; dropping it ends the touch tracking.
pub struct Collection {
    fence: WriteFence,
}

impl Drop for Collection {
    fn drop(&mut self) {
        self.fence.state().collecting = None;
    }
}

impl WriteFence {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain sets behind: still usable.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Enters a critical section: store objects, then make them reachable, then drop the guard.
    pub async fn writer(&self) -> WriterGuard {
        self.inner.writers.clone().read_owned().await
    }

    /// Notes that `key` is being stored or reused. Call before `head`/`put` of the key.
    pub async fn touch(&self, key: &Key) {
        let _sweep = self.inner.sweep.lock().await;
        if let Some(t) = self.state().collecting.as_mut() {
            t.keys.insert(key.as_str().to_string());
        }
    }

    /// Registers a change log being received under `prefix` until the guard is dropped.
    pub fn log_upload(&self, prefix: &Key) -> LogUpload {
        let p = prefix.as_str().to_string();
        let mut st = self.state();
        *st.logs_in_flight.entry(p.clone()).or_default() += 1;
        if let Some(t) = st.collecting.as_mut() {
            t.logs.insert(p.clone());
        }
        LogUpload {
            fence: self.clone(),
            prefix: p,
        }
    }

    /// Starts a collection: waits until no critical section runs, then tracks touches until the
    /// returned value is dropped. Mark only after this returns. One collection at a time is the
    /// caller's business (the scrub service serializes them).
    pub async fn begin_collection(&self) -> Collection {
        let _exclusive = self.inner.writers.write().await;
        let mut st = self.state();
        let logs = st.logs_in_flight.keys().cloned().collect();
        st.collecting = Some(Touched {
            keys: HashSet::new(),
            logs,
        });
        Collection {
            fence: self.clone(),
        }
    }
}

impl WriteFence {
    /// Waits until no critical section runs and keeps new ones from starting until the guard
    /// is dropped: a collection on another server deletes while this is held (see
    /// [`crate::scrub`], "Several servers").
    pub async fn block_writers(&self) -> tokio::sync::OwnedRwLockWriteGuard<()> {
        self.inner.writers.clone().write_owned().await
    }
}

impl Collection {
    /// The keys and log prefixes writers touched since the collection began.
    pub fn touched(&self) -> (Vec<String>, Vec<String>) {
        match self.fence.state().collecting.as_ref() {
            Some(t) => (
                t.keys.iter().cloned().collect(),
                t.logs.iter().cloned().collect(),
            ),
            None => (Vec::new(), Vec::new()),
        }
    }

    /// Counts keys and log prefixes other servers' writers touched as touched here.
    pub fn add_touched(
        &self,
        keys: impl IntoIterator<Item = String>,
        logs: impl IntoIterator<Item = String>,
    ) {
        if let Some(t) = self.fence.state().collecting.as_mut() {
            t.keys.extend(keys);
            t.logs.extend(logs);
        }
    }

    /// Deletes `key` unless a writer touched it (or, with `log_prefix`, its log) since the
    /// collection began. Returns whether it was deleted.
    pub async fn delete_if_untouched(
        &self,
        store: &Store,
        key: &Key,
        log_prefix: Option<&str>,
    ) -> Result<bool, StoreError> {
        let _sweep = self.fence.inner.sweep.lock().await;
        let touched = match self.fence.state().collecting.as_ref() {
            Some(t) => {
                t.keys.contains(key.as_str()) || log_prefix.is_some_and(|p| t.logs.contains(p))
            }
            // Cannot happen while `self` lives; refusing to delete is the safe answer.
            None => true,
        };
        if touched {
            return Ok(false);
        }
        store.delete(key).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;

    fn key(s: &str) -> Key {
        Key::new(&s.split('/').collect::<Vec<_>>()).unwrap()
    }

    #[tokio::test]
    async fn a_touched_key_survives_the_sweep_and_an_untouched_one_does_not() {
        let store = Store::open("memory://", &[]).unwrap();
        let fence = WriteFence::default();
        let (a, b) = (key("chunks/aaa/a"), key("chunks/bbb/b"));
        for k in [&a, &b] {
            store.put(k, Bytes::from_static(b"x")).await.unwrap();
        }
        // A touch before the collection does not count: the mark sees what it references.
        fence.touch(&a).await;
        let c = fence.begin_collection().await;
        fence.touch(&b).await;
        assert!(c.delete_if_untouched(&store, &a, None).await.unwrap());
        assert!(!c.delete_if_untouched(&store, &b, None).await.unwrap());
        assert_eq!(store.head(&a).await.unwrap(), None);
        assert_eq!(store.head(&b).await.unwrap(), Some(1));
        drop(c);
        // A new collection starts with nothing touched.
        let c = fence.begin_collection().await;
        assert!(c.delete_if_untouched(&store, &b, None).await.unwrap());
    }

    #[tokio::test]
    async fn logs_in_flight_at_the_start_or_registered_later_are_kept() {
        let store = Store::open("memory://", &[]).unwrap();
        let fence = WriteFence::default();
        let (early, late, done) = (key("logs/v/d/e"), key("logs/v/d/l"), key("logs/v/d/x"));
        let early_upload = fence.log_upload(&early);
        let finished = fence.log_upload(&done);
        drop(finished);
        let c = fence.begin_collection().await;
        let late_upload = fence.log_upload(&late);
        let frame = |p: &Key| key(&format!("{p}/f00000000"));
        for p in [&early, &late, &done] {
            store
                .put(&frame(p), Bytes::from_static(b"f"))
                .await
                .unwrap();
        }
        assert!(!c
            .delete_if_untouched(&store, &frame(&early), Some(early.as_str()))
            .await
            .unwrap());
        assert!(!c
            .delete_if_untouched(&store, &frame(&late), Some(late.as_str()))
            .await
            .unwrap());
        assert!(c
            .delete_if_untouched(&store, &frame(&done), Some(done.as_str()))
            .await
            .unwrap());
        drop((early_upload, late_upload));
    }

    #[tokio::test]
    async fn a_collection_waits_for_critical_sections_and_holds_back_new_ones_only_briefly() {
        let fence = WriteFence::default();
        let w = fence.writer().await;
        let f2 = fence.clone();
        let started = tokio::spawn(async move {
            let c = f2.begin_collection().await;
            drop(c);
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !started.is_finished(),
            "the collection waited for the writer"
        );
        drop(w);
        started.await.unwrap();
        // Writers proceed again once the collection has started.
        let _w = fence.writer().await;
    }
}
