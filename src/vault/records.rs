//! Versioned records: small sealed JSON documents (VM, disk, job, registry) that change over time.
//!
//! A record lives under a prefix as versions `v00000000000000000001`, `…02`, …; each version is
//! written once with a create-only put, which every backend supports (local files by hard link,
//! Azure with `If-None-Match: *`, S3 conditional writes). An update reads the highest version n,
//! computes the new value and creates n+1; losing a race means `Existed`: re-read and retry
//! (compare-and-swap, as SlateDB's manifest store does). Readers take the highest version, so a
//! record is never seen half-written.
//!
//! Pruning and the stale writer. Old versions are deleted after a successful update, which
//! reopens their numbers: a writer that read version n-1 and then stalled (a slow put, a paused
//! process) can create version n again after n was pruned, and a create-only put cannot tell.
//! Two rules close this. A version is pruned only when it was superseded more than
//! [`VERSION_GRACE_MS`] ago (by the store's clock: its successor's modification time, compared
//! with the newest version's), so above a stale write at least one version is that old; a
//! fresh write's successors are all younger than it. After creating version n, the writer lists
//! the versions: if none is above n, n is the latest; if one above n is older than n
//! by more than half the grace, n was a stale re-creation: it is deleted and the update retried;
//! otherwise another writer already built on n, and n counts. The argument needs the list to
//! follow the put within half the grace; when it does not, the outcome is unknown and the update
//! answers `record_contended` instead of guessing.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::chunk::pipeline::ChunkError;
use crate::chunk::ChunkStore;
use crate::error::{Error, Result};
use crate::file_formats::ObjectKind;
use crate::store::{Key, PutOutcome, StoreError};
use crate::vault::layout::{self, Family};

/// A record written under a lease (see [`crate::cluster`]): it carries the epoch of the lease
/// its last writer held.
pub trait Fenced {
    fn fence(&self) -> u64;
    fn set_fence(&mut self, epoch: u64);
}

/// A value with the version it was read at.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub version: u64,
    pub value: T,
}

#[derive(Clone)]
pub struct Records {
    chunks: ChunkStore,
    grace_ms: u64,
}

/// How many times an update retries after losing a race before reporting the store busy.
const MAX_CAS_ATTEMPTS: usize = 64;

/// How long a superseded version is kept before pruning (see the module doc).
pub const VERSION_GRACE_MS: u64 = 30_000;

impl Records {
    pub fn new(chunks: ChunkStore) -> Records {
        Records {
            chunks,
            grace_ms: VERSION_GRACE_MS,
        }
    }

    /// The same records with another pruning grace (tests).
    #[cfg(test)]
    fn with_grace_ms(mut self, grace_ms: u64) -> Records {
        self.grace_ms = grace_ms;
        self
    }

    /// Versions with their modification times (store clock, ms), lowest first.
    async fn listed_versions(&self, prefix: &Key) -> Result<Vec<(u64, u64)>> {
        let mut v: Vec<(u64, u64)> = self
            .chunks
            .store()
            .list(prefix)
            .await?
            .iter()
            .filter(|l| l.key.as_str().len() == prefix.as_str().len() + 22)
            .filter_map(|l| Some((layout::parse_record_version(&l.key)?, l.modified_ms)))
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    async fn versions(&self, prefix: &Key) -> Result<Vec<u64>> {
        let mut v: Vec<u64> = self
            .chunks
            .store()
            .list(prefix)
            .await?
            .iter()
            // Only direct children named v<20 digits> are versions of this record.
            .filter(|l| l.key.as_str().len() == prefix.as_str().len() + 22)
            .filter_map(|l| layout::parse_record_version(&l.key))
            .collect();
        v.sort_unstable();
        Ok(v)
    }

    /// The highest version of the record, or `None` when it was never written.
    pub async fn load<T: DeserializeOwned>(&self, prefix: &Key) -> Result<Option<Versioned<T>>> {
        // A version can be pruned between list and get by a concurrent update: list again.
        for _ in 0..8 {
            let versions = self.versions(prefix).await?;
            let Some(&version) = versions.last() else {
                return Ok(None);
            };
            let key = layout::record_version(prefix, version);
            match self.chunks.get_sealed(ObjectKind::Record, &key).await {
                Ok(plain) => {
                    let value = serde_json::from_slice(&plain).map_err(|e| {
                        Error::internal(format!("record {key} does not parse: {e}"))
                    })?;
                    return Ok(Some(Versioned { version, value }));
                }
                Err(ChunkError::Store(StoreError::NotFound { .. })) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Busy {
            code: "record_contended",
            message: format!("record {prefix} changes too fast to read"),
            retry_after_s: 1,
        })
    }

    /// Writes version 1 of a new record; `Ok(false)` if the record already exists.
    pub async fn create<T: Serialize>(&self, prefix: &Key, value: &T) -> Result<bool> {
        if !self.versions(prefix).await?.is_empty() {
            return Ok(false);
        }
        let started = std::time::Instant::now();
        Ok(
            self.write_version(prefix, 1, value).await? == PutOutcome::Created
                && self.confirm_latest(prefix, 1, started).await?,
        )
    }

    /// After creating `version` (its put started at `started`): whether the write counts (see
    /// the module doc). A stale re-creation is deleted; a write that counts prunes what it
    /// superseded long enough ago.
    async fn confirm_latest(
        &self,
        prefix: &Key,
        version: u64,
        started: std::time::Instant,
    ) -> Result<bool> {
        let listed = self.listed_versions(prefix).await?;
        if started.elapsed().as_millis() as u64 > self.grace_ms / 2 {
            return Err(Error::Busy {
                code: "record_contended",
                message: format!(
                    "record {prefix}: the store took over {} s to write and list version {version}; \
                     whether the update took effect is unknown: read the record before retrying",
                    self.grace_ms / 2000
                ),
                retry_after_s: 1,
            });
        }
        if listed.last().is_some_and(|&(v, _)| v == version) {
            self.prune(prefix, version, &listed).await;
            return Ok(true);
        }
        // Others are above. Built on this write, they are all younger than it; above a stale
        // one, at least one is older by more than half the grace. Only a stale version can be
        // pruned this soon.
        let counts = match listed.iter().find(|(v, _)| *v == version) {
            None => false,
            Some(&(_, mine)) => !listed
                .iter()
                .any(|&(v, t)| v > version && t + self.grace_ms / 2 < mine),
        };
        if !counts {
            let _ = self
                .chunks
                .store()
                .delete(&layout::record_version(prefix, version))
                .await;
        }
        Ok(counts)
    }

    /// Compare-and-swap update. `f` sees the current value (None if absent) and returns the new
    /// value, or `Ok(None)` to leave the record unchanged. `f` may run several times: it must not
    /// have side effects.
    pub async fn update<T, F>(&self, prefix: &Key, mut f: F) -> Result<Option<Versioned<T>>>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<&T>) -> Result<Option<T>>,
    {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let cur: Option<Versioned<T>> = self.load(prefix).await?;
            let next = f(cur.as_ref().map(|c| &c.value))?;
            let Some(next) = next else { return Ok(cur) };
            let version = cur.as_ref().map(|c| c.version).unwrap_or(0) + 1;
            let started = std::time::Instant::now();
            match self.write_version(prefix, version, &next).await? {
                PutOutcome::Created if self.confirm_latest(prefix, version, started).await? => {
                    return Ok(Some(Versioned {
                        version,
                        value: next,
                    }));
                }
                PutOutcome::Created | PutOutcome::Existed => continue,
            }
        }
        Err(Error::Busy {
            code: "record_contended",
            message: format!("record {prefix}: too many concurrent updates"),
            retry_after_s: 1,
        })
    }

    async fn write_version<T: Serialize>(
        &self,
        prefix: &Key,
        version: u64,
        value: &T,
    ) -> Result<PutOutcome> {
        let body = serde_json::to_vec(value)
            .map_err(|e| Error::internal(format!("record encode: {e}")))?;
        let key = layout::record_version(prefix, version);
        Ok(self
            .chunks
            .put_sealed_if_absent(ObjectKind::Record, &key, body, false)
            .await?)
    }

    /// Deletes versions below `current - 1` that were superseded more than the grace before
    /// `current` was written (`listed`: the versions with their times, lowest first). Best
    /// effort: leftovers are harmless.
    async fn prune(&self, prefix: &Key, current: u64, listed: &[(u64, u64)]) {
        let Some(&(_, now)) = listed.iter().find(|(v, _)| *v == current) else {
            return;
        };
        for &(v, _) in listed.iter().filter(|(v, _)| v + 1 < current) {
            let successor = listed.iter().find(|(s, _)| *s == v + 1).map(|&(_, t)| t);
            // A version whose successor is missing is a stale writer's leftover: that writer
            // deletes it (pruning it here could hide an old version from its check).
            if successor.is_some_and(|t| t + self.grace_ms < now) {
                let _ = self
                    .chunks
                    .store()
                    .delete(&layout::record_version(prefix, v))
                    .await;
            }
        }
    }

    /// The highest stored version number, without reading it (verify checks it separately).
    pub async fn latest_version(&self, prefix: &Key) -> Result<Option<u64>> {
        Ok(self.versions(prefix).await?.last().copied())
    }

    /// Writes `value` as the version after the highest stored one, without reading that one:
    /// verify replaces a damaged latest version with the server's own copy this way, so no
    /// older version ever becomes the latest. `None` when a concurrent update created that
    /// version first (the damaged one is no longer the latest either way).
    pub async fn write_after_latest<T: Serialize>(
        &self,
        prefix: &Key,
        value: &T,
    ) -> Result<Option<u64>> {
        let next = self.latest_version(prefix).await?.unwrap_or(0) + 1;
        let started = std::time::Instant::now();
        Ok(match self.write_version(prefix, next, value).await? {
            PutOutcome::Created if self.confirm_latest(prefix, next, started).await? => Some(next),
            PutOutcome::Created | PutOutcome::Existed => None,
        })
    }

    /// Deletes every version of a record.
    pub async fn remove(&self, prefix: &Key) -> Result<()> {
        for v in self.versions(prefix).await? {
            self.chunks
                .store()
                .delete(&layout::record_version(prefix, v))
                .await?;
        }
        Ok(())
    }

    /// Compare-and-swap update made under a lease of `epoch` (see [`crate::cluster`]): refused
    /// with `lease_lost` when the record was written under a newer epoch, and stamped with
    /// `epoch` otherwise. Because the check and the write are one compare-and-swap, a writer
    /// that lost its lease (paused, partitioned) can publish nothing once the new holder has
    /// written the record once: its create of version n+1 either finds n+1 taken (it re-reads
    /// and sees the newer epoch) or it read that version already.
    pub async fn update_fenced<T, F>(
        &self,
        prefix: &Key,
        epoch: u64,
        mut f: F,
    ) -> Result<Option<Versioned<T>>>
    where
        T: Serialize + DeserializeOwned + Fenced,
        F: FnMut(Option<&T>) -> Result<Option<T>>,
    {
        self.update(prefix, |cur: Option<&T>| {
            if let Some(c) = cur {
                if c.fence() > epoch {
                    metrics::counter!("drvault_fenced_writes_total").increment(1);
                    return Err(Error::LeaseLost {
                        message: format!(
                            "record {prefix} was written under lease epoch {}, newer than this \
                             server's {epoch}: another server took the VM over; nothing was changed",
                            c.fence()
                        ),
                    });
                }
            }
            Ok(f(cur)?.map(|mut next| {
                next.set_fence(epoch);
                next
            }))
        })
        .await
    }

    /// The newest version of every record of a family, by id, from one listing: what a reader
    /// compares its cached versions with (several servers write the same records).
    pub async fn latest_versions(
        &self,
        family: Family,
    ) -> Result<std::collections::BTreeMap<String, u64>> {
        let prefix = layout::record_family(family);
        let mut out = std::collections::BTreeMap::new();
        for l in self.chunks.store().list(&prefix).await? {
            let Some(rest) = l.key.as_str().strip_prefix(prefix.as_str()) else {
                continue;
            };
            let mut parts = rest.trim_start_matches('/').split('/');
            let (Some(id), Some(_), None) = (parts.next(), parts.next(), parts.next()) else {
                continue;
            };
            if let Some(v) = layout::parse_record_version(&l.key) {
                let e = out.entry(id.to_string()).or_insert(0);
                *e = (*e).max(v);
            }
        }
        Ok(out)
    }

    /// Seconds since the record's newest version was written (store clock against this
    /// machine's; 0 for a record without versions).
    pub async fn age_s(&self, prefix: &Key) -> Result<u64> {
        let newest = self.listed_versions(prefix).await?.last().map(|&(_, t)| t);
        Ok(newest.map_or(0, |t| crate::util::unix_now_ms().saturating_sub(t) / 1000))
    }

    /// Ids of every record of a family.
    pub async fn ids(&self, family: Family) -> Result<Vec<String>> {
        let prefix = layout::record_family(family);
        let mut ids: Vec<String> = self
            .chunks
            .store()
            .list(&prefix)
            .await?
            .iter()
            .filter_map(|l| {
                l.key
                    .as_str()
                    .strip_prefix(prefix.as_str())?
                    .strip_prefix('/')?
                    .split('/')
                    .next()
                    .map(String::from)
            })
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{CpuPool, KeyRing};
    use crate::store::Store;
    use std::sync::Arc;

    fn records() -> Records {
        Records::new(ChunkStore::new(
            Store::open("memory://", &[]).unwrap(),
            Arc::new(KeyRing::random()),
            CpuPool::new(2),
            1,
        ))
    }

    #[tokio::test]
    async fn versions_advance_and_old_ones_are_pruned_after_the_grace() {
        let r = records().with_grace_ms(50);
        let p = layout::record(Family::Vm, "abc");
        assert!(r.load::<u32>(&p).await.unwrap().is_none());
        assert!(r.create(&p, &1u32).await.unwrap());
        assert!(!r.create(&p, &9u32).await.unwrap());
        let bump = |cur: Option<&u32>| Ok(Some(cur.copied().unwrap_or(0) + 1));
        for i in 2..=10u32 {
            let v = r.update(&p, bump).await.unwrap().unwrap();
            assert_eq!(v.version, i as u64);
        }
        let cur = r.load::<u32>(&p).await.unwrap().unwrap();
        assert_eq!((cur.version, cur.value), (10, 10));
        // Not a wait for a condition: the versions' store times must be older than the grace.
        tokio::time::sleep(std::time::Duration::from_millis(120)).await;
        r.update(&p, bump).await.unwrap();
        assert_eq!(r.versions(&p).await.unwrap(), vec![10, 11]);
        assert_eq!(r.ids(Family::Vm).await.unwrap(), vec!["abc".to_string()]);
    }

    #[tokio::test]
    async fn young_versions_are_kept_so_a_reader_finds_what_it_listed() {
        let r = records();
        let p = layout::record(Family::Vm, "young");
        r.create(&p, &1u32).await.unwrap();
        for i in 2..=6u32 {
            r.update(&p, |_: Option<&u32>| Ok(Some(i))).await.unwrap();
        }
        assert_eq!(r.versions(&p).await.unwrap(), vec![1, 2, 3, 4, 5, 6]);
    }

    #[tokio::test]
    async fn a_stale_writer_cannot_bring_back_a_pruned_version_number() {
        let r = records().with_grace_ms(100);
        let p = layout::record(Family::Vm, "stale");
        r.create(&p, &1u32).await.unwrap();
        for i in 2..=5u32 {
            tokio::time::sleep(std::time::Duration::from_millis(120)).await;
            r.update(&p, |_: Option<&u32>| Ok(Some(i))).await.unwrap();
        }
        assert_eq!(r.versions(&p).await.unwrap(), vec![4, 5]);
        // A writer that read version 1 long ago now writes version 2, which was pruned: the
        // create-only put succeeds, but the write lost the race and must not count.
        let started = std::time::Instant::now();
        assert_eq!(
            r.write_version(&p, 2, &99u32).await.unwrap(),
            PutOutcome::Created
        );
        assert!(!r.confirm_latest(&p, 2, started).await.unwrap());
        assert_eq!(r.versions(&p).await.unwrap(), vec![4, 5], "orphan removed");
        let cur = r.load::<u32>(&p).await.unwrap().unwrap();
        assert_eq!((cur.version, cur.value), (5, 5));
    }

    #[tokio::test]
    async fn a_write_another_writer_already_built_on_counts() {
        let r = records().with_grace_ms(100);
        let p = layout::record(Family::Vm, "built-on");
        r.create(&p, &1u32).await.unwrap();
        let started = std::time::Instant::now();
        r.write_version(&p, 2, &2u32).await.unwrap();
        // Before the writer of 2 lists, another reads 2 and writes 3 on top of it.
        r.write_version(&p, 3, &3u32).await.unwrap();
        assert!(r.confirm_latest(&p, 2, started).await.unwrap());
        assert_eq!(r.versions(&p).await.unwrap(), vec![1, 2, 3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_updates_lose_nothing() {
        let r = records();
        let p = layout::record(Family::Job, "counter");
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let r = r.clone();
            let p = p.clone();
            tasks.push(tokio::spawn(async move {
                r.update(&p, |cur: Option<&u32>| {
                    Ok(Some(cur.copied().unwrap_or(0) + 1))
                })
                .await
                .unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(r.load::<u32>(&p).await.unwrap().unwrap().value, 16);
    }

    #[tokio::test]
    async fn a_damaged_latest_version_is_replaced_without_reading_it() {
        let r = records();
        let p = layout::record(Family::Disk, "d");
        r.create(&p, &1u32).await.unwrap();
        r.update(&p, |_: Option<&u32>| Ok(Some(2u32)))
            .await
            .unwrap();
        let v2 = layout::record_version(&p, 2);
        r.chunks
            .store()
            .put(&v2, bytes::Bytes::from_static(b"garbage"))
            .await
            .unwrap();
        assert!(r.load::<u32>(&p).await.is_err());
        assert_eq!(r.latest_version(&p).await.unwrap(), Some(2));
        assert_eq!(r.write_after_latest(&p, &2u32).await.unwrap(), Some(3));
        assert_eq!(r.load::<u32>(&p).await.unwrap().unwrap().value, 2);
    }

    #[tokio::test]
    async fn a_moved_version_fails_to_open() {
        let r = records();
        let a = layout::record(Family::Vm, "a");
        let b = layout::record(Family::Vm, "b");
        r.create(&a, &"secret-a").await.unwrap();
        let raw = r
            .chunks
            .store()
            .get(&layout::record_version(&a, 1))
            .await
            .unwrap();
        r.chunks
            .store()
            .put(&layout::record_version(&b, 1), raw)
            .await
            .unwrap();
        assert!(matches!(r.load::<String>(&b).await, Err(Error::Corrupt(_))));
    }
}
