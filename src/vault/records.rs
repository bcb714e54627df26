//! Versioned records: small sealed JSON documents (VM, disk, job, registry) that change over time.
//!
//! A record lives under a prefix as versions `v00000000000000000001`, `…02`, …; each version is
//! written once with a create-only put, which every backend supports (local files by hard link,
//! Azure with `If-None-Match: *`, S3 conditional writes). An update reads the highest version n,
//! computes the new value and creates n+1; losing a race means `Existed`: re-read and retry
//! (compare-and-swap, as SlateDB's manifest store does). Readers take the highest version, so a
//! record is never seen half-written. Versions older than n-1 are pruned after a successful
//! update: a reader that listed just before still finds the version it picked.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::chunk::pipeline::ChunkError;
use crate::chunk::ChunkStore;
use crate::error::{Error, Result};
use crate::file_formats::ObjectKind;
use crate::store::{Key, PutOutcome, StoreError};
use crate::vault::layout::{self, Family};

/// A value with the version it was read at.
#[derive(Debug, Clone)]
pub struct Versioned<T> {
    pub version: u64,
    pub value: T,
}

#[derive(Clone)]
pub struct Records {
    chunks: ChunkStore,
}

/// How many times an update retries after losing a race before reporting the store busy.
const MAX_CAS_ATTEMPTS: usize = 64;

impl Records {
    pub fn new(chunks: ChunkStore) -> Records {
        Records { chunks }
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
        Ok(self.write_version(prefix, 1, value).await? == PutOutcome::Created)
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
            match self.write_version(prefix, version, &next).await? {
                PutOutcome::Created => {
                    self.prune(prefix, version).await;
                    return Ok(Some(Versioned {
                        version,
                        value: next,
                    }));
                }
                PutOutcome::Existed => continue,
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

    /// Deletes versions older than `current - 1`. Best effort: leftovers are harmless.
    async fn prune(&self, prefix: &Key, current: u64) {
        if current < 3 {
            return;
        }
        if let Ok(versions) = self.versions(prefix).await {
            for v in versions.into_iter().filter(|&v| v + 1 < current) {
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
        Ok(match self.write_version(prefix, next, value).await? {
            PutOutcome::Created => Some(next),
            PutOutcome::Existed => None,
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
    async fn versions_advance_and_prune() {
        let r = records();
        let p = layout::record(Family::Vm, "abc");
        assert!(r.load::<u32>(&p).await.unwrap().is_none());
        assert!(r.create(&p, &1u32).await.unwrap());
        assert!(!r.create(&p, &9u32).await.unwrap());
        for i in 2..=10u32 {
            let v = r
                .update(&p, |cur: Option<&u32>| {
                    Ok(Some(cur.copied().unwrap_or(0) + 1))
                })
                .await
                .unwrap()
                .unwrap();
            assert_eq!(v.version, i as u64);
        }
        let cur = r.load::<u32>(&p).await.unwrap().unwrap();
        assert_eq!((cur.version, cur.value), (10, 10));
        assert!(r.versions(&p).await.unwrap().len() <= 3);
        assert_eq!(r.ids(Family::Vm).await.unwrap(), vec!["abc".to_string()]);
    }

    #[tokio::test]
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
