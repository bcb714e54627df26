//! The journal: per disk, the ordered chain of accepted MS-HRL change logs.
//!
//! A log is stored as it arrives, in sealed frames of `LOG_FRAME_LEN` bytes
//! (`logs/<vm>/<disk>/<log id>/f<n>`), so memory stays at one frame whatever the log's size and
//! any byte range can be read back by opening only the frames that hold it. Once whole, it is
//! validated by the same MS-HRL reader that reads local files, through [`StoredLog`]; its extent
//! list is stored beside it (`…/extents`). Only then does the disk record's journal gain the entry
//! (the acknowledgement's commit point). A log that fails validation is deleted.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::chunk::pipeline::ChunkError;
use crate::chunk::ChunkStore;
use crate::file_formats::{ObjectKind, EXTENT_ENTRY_LEN, LOG_FRAME_LEN};
use crate::format::ReadAt;
use crate::store::Key;
use crate::vault::layout;

/// One accepted log in a disk's journal: a disk recovery point.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JournalEntry {
    /// The log's UniqueId (GUID text).
    pub log_id: String,
    pub previous_id: String,
    /// Replication cycle: a VM recovery point exists when every disk has a log of the cycle.
    pub cycle: u64,
    pub app_consistent: bool,
    /// Sent after the source VM shut down (planned failover waits for it).
    pub final_log: bool,
    pub accepted_unix: u64,
    /// The log's own time (its header's, see `HrlHeader::content_time_unix`): what a point's
    /// time shows; `None` for a log without one and for entries that are not logs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_unix: Option<u64>,
    /// The disk's size when the log was accepted: a point reads at its newest log's size (a
    /// grown disk's older points keep the old one). `None` in entries that are not logs and in
    /// records from before disks could grow (the base map's size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_size: Option<u64>,
    pub log_bytes: u64,
    pub extents: u64,
    /// Bytes of disk data the log writes.
    pub data_bytes: u64,
    /// Not a log: a resynchronization (or failback) replaced the disk's whole content with the
    /// block map of this root. The point is that map alone; earlier logs do not reach past it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_root: Option<String>,
    /// Not a log: the disk did not change in this cycle (another disk of the VM was
    /// resynchronized), so the VM still has a point for the cycle.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unchanged: bool,
}

impl JournalEntry {
    /// The time of the point this entry makes: the log's own time, else when it was accepted.
    pub fn point_unix(&self) -> u64 {
        self.log_unix.unwrap_or(self.accepted_unix)
    }

    /// Whether a stored change log backs this entry.
    pub fn is_log(&self) -> bool {
        self.snapshot_root.is_none() && !self.unchanged
    }
}

/// One write of a stored log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub disk_offset: u64,
    pub length: u32,
    pub log_offset: u64,
}

/// Object-key form of a log id: the GUID's 32 hex digits.
pub fn log_key_id(log_id: &crate::format::hrl::Guid) -> String {
    hex::encode(log_id.0)
}

pub fn encode_extents(ext: &[Extent]) -> Vec<u8> {
    let mut v = Vec::with_capacity(ext.len() * EXTENT_ENTRY_LEN);
    for e in ext {
        v.extend_from_slice(&e.disk_offset.to_le_bytes());
        v.extend_from_slice(&e.length.to_le_bytes());
        v.extend_from_slice(&e.log_offset.to_le_bytes());
    }
    v
}

pub fn decode_extents(b: &[u8]) -> Option<Vec<Extent>> {
    if b.len() % EXTENT_ENTRY_LEN != 0 {
        return None;
    }
    Some(
        b.chunks_exact(EXTENT_ENTRY_LEN)
            .map(|c| Extent {
                disk_offset: u64::from_le_bytes(crate::format::array_at(c, 0)),
                length: u32::from_le_bytes(crate::format::array_at(c, 8)),
                log_offset: u64::from_le_bytes(crate::format::array_at(c, 12)),
            })
            .collect(),
    )
}

/// Cuts a streamed log into frames and stores each sealed as soon as it is full.
pub struct FrameWriter {
    chunks: ChunkStore,
    vm_id: String,
    disk_id: String,
    log_id: String,
    buf: BytesMut,
    frames: u64,
    total: u64,
}

impl FrameWriter {
    pub fn new(chunks: ChunkStore, vm_id: &str, disk_id: &str, log_id: &str) -> FrameWriter {
        FrameWriter {
            chunks,
            vm_id: vm_id.into(),
            disk_id: disk_id.into(),
            log_id: log_id.into(),
            buf: BytesMut::with_capacity(LOG_FRAME_LEN),
            frames: 0,
            total: 0,
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub async fn push(&mut self, mut data: Bytes) -> Result<(), ChunkError> {
        self.total += data.len() as u64;
        while !data.is_empty() {
            let take = (LOG_FRAME_LEN - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data.split_to(take));
            if self.buf.len() == LOG_FRAME_LEN {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), ChunkError> {
        let frame = std::mem::replace(&mut self.buf, BytesMut::with_capacity(LOG_FRAME_LEN));
        let key = layout::log_frame(&self.vm_id, &self.disk_id, &self.log_id, self.frames);
        // Logs compress well (runs of zeros and text in guest writes): zstd where it helps.
        self.chunks
            .put_sealed_compressed(ObjectKind::LogFrame, &key, frame.to_vec())
            .await?;
        self.frames += 1;
        Ok(())
    }

    /// Stores the last partial frame; returns the log's length.
    pub async fn finish(mut self) -> Result<u64, ChunkError> {
        if !self.buf.is_empty() {
            self.flush().await?;
        }
        Ok(self.total)
    }
}

/// Frames by key, and their keys oldest first (the eviction order).
type CachedFrames = (HashMap<Key, Arc<Vec<u8>>>, VecDeque<Key>);

/// Recently opened frames, shared by every reader (bounded: `capacity` frames).
#[derive(Clone)]
pub struct FrameCache {
    inner: Arc<Mutex<CachedFrames>>,
    capacity: usize,
}

impl FrameCache {
    pub fn new(capacity: usize) -> FrameCache {
        FrameCache {
            inner: Arc::new(Mutex::new((HashMap::new(), VecDeque::new()))),
            capacity,
        }
    }

    fn get(&self, k: &Key) -> Option<Arc<Vec<u8>>> {
        self.inner.lock().ok()?.0.get(k).cloned()
    }

    fn put(&self, k: Key, v: Arc<Vec<u8>>) {
        if let Ok(mut g) = self.inner.lock() {
            if g.0.insert(k.clone(), v).is_none() {
                g.1.push_back(k);
            }
            while g.1.len() > self.capacity {
                if let Some(old) = g.1.pop_front() {
                    g.0.remove(&old);
                }
            }
        }
    }

    pub fn forget_prefix(&self, prefix: &str) {
        if let Ok(mut g) = self.inner.lock() {
            g.0.retain(|k, _| !k.as_str().starts_with(prefix));
            g.1.retain(|k| !k.as_str().starts_with(prefix));
        }
    }
}

/// A stored log as a positional reader. Blocking: use it from a blocking thread (it drives the
/// async store through the runtime handle it was made on).
pub struct StoredLog {
    chunks: ChunkStore,
    vm_id: String,
    disk_id: String,
    log_id: String,
    len: u64,
    cache: FrameCache,
    rt: tokio::runtime::Handle,
}

impl StoredLog {
    pub fn new(
        chunks: ChunkStore,
        vm_id: &str,
        disk_id: &str,
        log_id: &str,
        len: u64,
        cache: FrameCache,
        rt: tokio::runtime::Handle,
    ) -> StoredLog {
        StoredLog {
            chunks,
            vm_id: vm_id.into(),
            disk_id: disk_id.into(),
            log_id: log_id.into(),
            len,
            cache,
            rt,
        }
    }

    fn frame(&self, n: u64) -> std::io::Result<Arc<Vec<u8>>> {
        let key = layout::log_frame(&self.vm_id, &self.disk_id, &self.log_id, n);
        if let Some(f) = self.cache.get(&key) {
            return Ok(f);
        }
        // The store's error itself travels inside the io::Error (see [`store_failure`]): a
        // frame the store could not give back is the store's failure, not a bad log.
        // This runs on a CPU-pool thread (the log is parsed there): the frame is opened here,
        // not on the pool, which every parser waiting for a permit would deadlock.
        let f = self
            .chunks
            .get_sealed_on_pool_thread(&self.rt, ObjectKind::LogFrame, &key)
            .map_err(std::io::Error::other)?;
        let f = Arc::new(f);
        self.cache.put(key, f.clone());
        Ok(f)
    }
}

impl ReadAt for StoredLog {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len);
        if end.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the end of the log",
            ));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = pos / LOG_FRAME_LEN as u64;
            let within = (pos % LOG_FRAME_LEN as u64) as usize;
            let frame = self.frame(n)?;
            let avail = frame.len().saturating_sub(within);
            if avail == 0 {
                return Err(std::io::Error::other(format!(
                    "log frame {n} is shorter than the log's recorded length"
                )));
            }
            let take = avail.min(buf.len() - done);
            buf[done..done + take].copy_from_slice(&frame[within..within + take]);
            done += take;
        }
        Ok(())
    }

    fn len(&self) -> std::io::Result<u64> {
        Ok(self.len)
    }
}

/// The vault's error behind a failed read of a [`StoredLog`] when the store failed (an outage,
/// a full disk, a frame that does not open), rather than the log's bytes being wrong; `None`
/// for any other I/O error.
pub fn store_failure(e: std::io::Error) -> Option<crate::error::Error> {
    let inner = e.into_inner()?.downcast::<ChunkError>().ok()?;
    Some(crate::error::Error::from(*inner))
}

/// One frame of a stored log, opened (tag checked, decrypted, decompressed) unless the shared
/// cache holds it. `keep` puts a frame it opened in the cache: readers that read a log a range
/// at a time want it; one that opens each frame once on its own (a merge reading frame by
/// frame) would only push out frames other readers still use.
pub async fn open_frame(
    chunks: &ChunkStore,
    cache: &FrameCache,
    vm_id: &str,
    disk_id: &str,
    log_id: &str,
    n: u64,
    keep: bool,
) -> Result<Arc<Vec<u8>>, ChunkError> {
    let key = layout::log_frame(vm_id, disk_id, log_id, n);
    if let Some(f) = cache.get(&key) {
        return Ok(f);
    }
    let f = Arc::new(chunks.get_sealed(ObjectKind::LogFrame, &key).await?);
    if keep {
        cache.put(key, f.clone());
    }
    Ok(f)
}

/// The error for a frame that holds fewer bytes than a log's extents place in it.
pub fn short_frame(vm_id: &str, disk_id: &str, log_id: &str, n: u64) -> ChunkError {
    ChunkError::Corrupt(crate::chunk::SealError::BadPayload {
        name: layout::log_frame(vm_id, disk_id, log_id, n).to_string(),
        reason: "frame shorter than the extents say".into(),
    })
}

/// Loads a stored log's extent list.
pub async fn load_extents(
    chunks: &ChunkStore,
    vm_id: &str,
    disk_id: &str,
    log_id: &str,
) -> Result<Vec<Extent>, ChunkError> {
    let key = layout::log_extents(vm_id, disk_id, log_id);
    let plain = chunks.get_sealed(ObjectKind::LogFrame, &key).await?;
    decode_extents(&plain).ok_or_else(|| {
        ChunkError::Corrupt(crate::chunk::SealError::BadPayload {
            name: key.to_string(),
            reason: "extent list length".into(),
        })
    })
}

/// Deletes every object of a stored log (frames and extents). Best effort per object.
pub async fn delete_log(
    chunks: &ChunkStore,
    vm_id: &str,
    disk_id: &str,
    log_id: &str,
) -> Result<(), crate::store::StoreError> {
    let prefix = layout::log_prefix(vm_id, disk_id, log_id);
    for l in chunks.store().list(&prefix).await? {
        chunks.store().delete(&l.key).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{CpuPool, KeyRing};
    use crate::store::Store;

    /// Log "l" of disk "d" of VM "v", `len` bytes, read with a small frame cache.
    fn stored(cs: &ChunkStore, len: u64) -> StoredLog {
        StoredLog::new(
            cs.clone(),
            "v",
            "d",
            "l",
            len,
            FrameCache::new(2),
            tokio::runtime::Handle::current(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_round_trip_any_range() {
        let cs = ChunkStore::new(
            Store::open("memory://", &[]).unwrap(),
            Arc::new(KeyRing::random()),
            CpuPool::new(2),
            1,
        );
        let data: Vec<u8> = (0..(LOG_FRAME_LEN * 2 + 12345))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut w = FrameWriter::new(cs.clone(), "v", "d", "l");
        for piece in data.chunks(70_001) {
            w.push(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        assert_eq!(w.finish().await.unwrap(), data.len() as u64);
        let log = stored(&cs, data.len() as u64);
        let d2 = data.clone();
        tokio::task::spawn_blocking(move || {
            for (off, len) in [
                (0u64, 10usize),
                (LOG_FRAME_LEN as u64 - 5, 10),
                (0, d2.len()),
                (d2.len() as u64 - 1, 1),
            ] {
                let mut b = vec![0u8; len];
                log.read_exact_at(&mut b, off).unwrap();
                assert_eq!(&b[..], &d2[off as usize..off as usize + len]);
            }
            let mut b = [0u8; 2];
            assert!(log.read_exact_at(&mut b, d2.len() as u64 - 1).is_err());
        })
        .await
        .unwrap();
        let e = vec![Extent {
            disk_offset: 512,
            length: 4096,
            log_offset: 8192,
        }];
        assert_eq!(decode_extents(&encode_extents(&e)).unwrap(), e);
        delete_log(&cs, "v", "d", "l").await.unwrap();
        assert!(cs
            .store()
            .list(&layout::log_prefix("v", "d", "l"))
            .await
            .unwrap()
            .is_empty());
    }

    // Logs are parsed on the CPU pool and read their frames from there. With every permit held
    // by such a parser, a frame opened through the pool waited for a permit that never came:
    // the server stopped (two VMs of one agent sending logs at once on a 2-core machine).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn parsers_holding_every_pool_permit_still_read_their_frames() {
        let pool = CpuPool::new(1);
        let cs = ChunkStore::new(
            Store::open("memory://", &[]).unwrap(),
            Arc::new(KeyRing::random()),
            pool.clone(),
            1,
        );
        let data = vec![5u8; LOG_FRAME_LEN + 100];
        let mut w = FrameWriter::new(cs.clone(), "v", "d", "l");
        w.push(Bytes::from(data.clone())).await.unwrap();
        w.finish().await.unwrap();
        let log = stored(&cs, data.len() as u64);
        let read = pool.run(move || {
            let mut b = vec![0u8; data.len()];
            log.read_exact_at(&mut b, 0).map(|_| b == data)
        });
        // A deadline for a deadlock, not a timing: the read takes milliseconds.
        let same = tokio::time::timeout(std::time::Duration::from_secs(120), read)
            .await
            .expect("a frame read from a pool thread waited for the pool it holds")
            .unwrap();
        assert!(same);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_store_is_told_apart_from_a_bad_log() {
        use crate::store::faulty::{FaultKind, FaultOp, FaultRule, FaultyStore};
        let (store, faults) = FaultyStore::wrap(&Store::open("memory://", &[]).unwrap(), 1);
        let cs = ChunkStore::new(store, Arc::new(KeyRing::random()), CpuPool::new(1), 1);
        let mut w = FrameWriter::new(cs.clone(), "v", "d", "l");
        w.push(Bytes::from(vec![7u8; 1000])).await.unwrap();
        let len = w.finish().await.unwrap();
        faults
            .set_rules(vec![FaultRule::new(FaultOp::Get, FaultKind::Error(1.0))])
            .unwrap();
        let log = StoredLog::new(
            cs,
            "v",
            "d",
            "l",
            len,
            FrameCache::new(2),
            tokio::runtime::Handle::current(),
        );
        let (outage, past_end) = tokio::task::spawn_blocking(move || {
            let mut b = [0u8; 10];
            let outage = log.read_exact_at(&mut b, 0).unwrap_err();
            let past_end = log.read_exact_at(&mut b, len - 5).unwrap_err();
            (outage, past_end)
        })
        .await
        .unwrap();
        let e = store_failure(outage).expect("the store's error");
        assert_eq!(e.code(), "store_unavailable");
        assert!(e.recoverable(), "an outage is retried, not a bad log");
        assert!(
            store_failure(past_end).is_none(),
            "reading past the end is the log's fault"
        );
    }
}
