//! The block pipeline: zero check → hash → name → (skip if stored) → compress → seal →
//! create-only put; and the way back: get → open → verify the name against the content.
//!
//! CPU work runs on [`CpuPool`], a semaphore-bounded set of blocking threads, never on the async
//! runtime's workers. The pool size bounds CPU use and, with the callers' own semaphores, memory:
//! at most `threads` blocks are being compressed/sealed at once.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::Semaphore;

use crate::chunk::digest::{is_zero, ChunkName, PlainHash};
use crate::chunk::fence::WriteFence;
use crate::chunk::keys::KeyRing;
use crate::chunk::seal::{self, SealError};
use crate::file_formats::ObjectKind;
use crate::store::{Key, PutOutcome, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Corrupt(#[from] SealError),
    #[error("content hash {actual} does not match the claimed {claimed}")]
    HashMismatch { claimed: String, actual: String },
    /// Sealing was refused: the key's nonce budget is spent (see `chunk::keys`).
    #[error(transparent)]
    Key(#[from] crate::chunk::keys::KeyError),
}

/// The hash of a chunk's opened plaintext, once it is checked to still derive the chunk's name:
/// the second of every read's two checks (the tag proves who sealed it, this that the content
/// is the one the name promises).
fn derives_name(
    keys: &KeyRing,
    name: &ChunkName,
    key_str: &str,
    plain: &[u8],
) -> Result<PlainHash, ChunkError> {
    let hash = PlainHash::of(plain);
    let derived = ChunkName::derive(keys.name_key(), &hash, plain.len() as u64);
    if !derived.ct_eq(name) {
        return Err(ChunkError::Corrupt(SealError::ContentMismatch {
            name: key_str.to_string(),
        }));
    }
    Ok(hash)
}

/// Bounded pool for CPU-heavy work (hashing, compression, encryption).
#[derive(Clone)]
pub struct CpuPool {
    permits: Arc<Semaphore>,
}

impl CpuPool {
    pub fn new(threads: usize) -> CpuPool {
        CpuPool {
            permits: Arc::new(Semaphore::new(threads.max(1))),
        }
    }

    /// Number of threads matching the machine (one per core).
    pub fn default_threads() -> usize {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    }

    /// Runs `f` on a blocking thread once a permit is free. A panic in `f` is re-raised here.
    pub async fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        // The semaphore is never closed, so acquire cannot fail.
        let _permit = self.permits.acquire().await;
        match tokio::task::spawn_blocking(f).await {
            Ok(r) => r,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// What happened to one block.
#[derive(Debug, Clone)]
pub struct BlockPut {
    /// `None` for an all-zero block (never stored).
    pub name: Option<ChunkName>,
    pub hash: PlainHash,
    pub len: u64,
    /// `Existed` is a deduplication hit; `None` for a zero block.
    pub outcome: Option<PutOutcome>,
    /// Bytes written to the store (0 for zero blocks and dedup hits).
    pub stored_bytes: u64,
}

/// Chunk storage over a [`Store`].
#[derive(Clone)]
pub struct ChunkStore {
    store: Store,
    keys: Arc<KeyRing>,
    cpu: CpuPool,
    zstd_level: i32,
    /// Coordinates writers with garbage collection (see [`crate::chunk::fence`]).
    fence: WriteFence,
}

impl ChunkStore {
    pub fn new(store: Store, keys: Arc<KeyRing>, cpu: CpuPool, zstd_level: i32) -> ChunkStore {
        ChunkStore {
            store,
            keys,
            cpu,
            zstd_level,
            fence: WriteFence::default(),
        }
    }

    pub fn fence(&self) -> &WriteFence {
        &self.fence
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn keys(&self) -> &Arc<KeyRing> {
        &self.keys
    }

    pub fn cpu(&self) -> &CpuPool {
        &self.cpu
    }

    /// The zstd level objects are compressed with.
    pub fn zstd_level(&self) -> i32 {
        self.zstd_level
    }

    /// The object key of a chunk: `chunks/<first 3 hex>/<64 hex>` (4096 fan-out directories).
    pub fn chunk_key(name: &ChunkName) -> Key {
        let h = name.to_hex();
        Key::new(&["chunks", &h[..crate::file_formats::KEY_FANOUT_HEX], &h])
            .unwrap_or_else(|| unreachable!("hex is a safe key"))
    }

    /// Stores one block. `claimed` is the plain BLAKE3 the sender announced: re-checked here.
    pub async fn put_block(
        &self,
        data: Bytes,
        claimed: Option<PlainHash>,
    ) -> Result<BlockPut, ChunkError> {
        self.put_block_with_payload(data, claimed, None).await
    }

    /// [`put_block`](Self::put_block) for a block that arrived zstd-compressed: `zstd` is the
    /// payload `data` was inflated from with [`seal::inflate_bounded`]. When it is smaller than
    /// the block it is sealed as it is, instead of compressing the block again.
    pub async fn put_block_with_payload(
        &self,
        data: Bytes,
        claimed: Option<PlainHash>,
        zstd: Option<Bytes>,
    ) -> Result<BlockPut, ChunkError> {
        let len = data.len() as u64;
        let keys = self.keys.clone();
        let d = data.clone();
        // First CPU step: zero check and hashing (cheap) — decides whether sealing is needed.
        let (zero, hash) = self
            .cpu
            .run(move || {
                let zero = is_zero(&d);
                (zero, PlainHash::of(&d))
            })
            .await;
        if let Some(c) = claimed {
            if !c.ct_eq(&hash) {
                return Err(ChunkError::HashMismatch {
                    claimed: c.to_hex(),
                    actual: hash.to_hex(),
                });
            }
        }
        if zero {
            metrics::counter!("drvault_blocks_zero_total").increment(1);
            metrics::counter!("drvault_bytes_zero_total").increment(len);
            return Ok(BlockPut {
                name: None,
                hash,
                len,
                outcome: None,
                stored_bytes: 0,
            });
        }
        let name = ChunkName::derive(keys.name_key(), &hash, len);
        let key = Self::chunk_key(&name);
        // Touched before the existence check, so a running collection cannot delete the chunk
        // this block is about to be deduplicated against.
        self.fence.touch(&key).await;
        // A stat is far cheaper than compress + seal: identical blocks skip the CPU work. A
        // quarantined or missing chunk is absent here, so the block is stored again (healed).
        if self.store.head(&key).await?.is_some() {
            metrics::counter!("drvault_blocks_dedup_total").increment(1);
            metrics::counter!("drvault_bytes_dedup_total").increment(len);
            return Ok(BlockPut {
                name: Some(name),
                hash,
                len,
                outcome: Some(PutOutcome::Existed),
                stored_bytes: 0,
            });
        }
        let level = self.zstd_level;
        let key_str = key.as_str().to_string();
        let reuse = zstd.filter(|z| z.len() < data.len());
        let reused = reuse.is_some();
        let sealed = self
            .cpu
            .run(move || match reuse {
                Some(z) => {
                    seal::seal_zstd_payload(&keys, ObjectKind::Chunk, &key_str, &z, data.len())
                }
                None => seal::seal(&keys, ObjectKind::Chunk, &key_str, &data, Some(level)),
            })
            .await?;
        let stored = sealed.bytes.len() as u64;
        let outcome = self
            .store
            .put_if_absent(&key, Bytes::from(sealed.bytes))
            .await?;
        let stored_bytes = if outcome == PutOutcome::Created {
            stored
        } else {
            0
        };
        match outcome {
            PutOutcome::Created => {
                if reused {
                    // Sealed from the sender's compressed bytes: no compression ran here.
                    metrics::counter!("drvault_blocks_payload_reused_total").increment(1);
                }
                metrics::counter!("drvault_blocks_stored_total").increment(1);
                metrics::counter!("drvault_bytes_stored_plain_total").increment(len);
                metrics::counter!("drvault_bytes_stored_sealed_total").increment(stored);
            }
            PutOutcome::Existed => {
                metrics::counter!("drvault_blocks_dedup_total").increment(1);
                metrics::counter!("drvault_bytes_dedup_total").increment(len);
            }
        }
        Ok(BlockPut {
            name: Some(name),
            hash,
            len,
            outcome: Some(outcome),
            stored_bytes,
        })
    }

    /// Reads a block back, verifying the tag and that the content still derives its name.
    pub async fn get_block(&self, name: &ChunkName) -> Result<(Bytes, PlainHash), ChunkError> {
        self.open_block(name, |keys, name, key, raw| {
            let plain = seal::open(keys, ObjectKind::Chunk, key, raw)?;
            let hash = derives_name(keys, name, key, &plain)?;
            Ok((Bytes::from(plain), hash))
        })
        .await
    }

    /// Reads a block back into `buf[at..]` (a caller's reusable buffer, for example one aligned
    /// for direct I/O) with the checks of [`ChunkStore::get_block`]. Returns the buffer, the
    /// block's length and its hash.
    pub async fn get_block_into(
        &self,
        name: &ChunkName,
        mut buf: Vec<u8>,
        at: usize,
    ) -> Result<(Vec<u8>, usize, PlainHash), ChunkError> {
        self.open_block(name, move |keys, name, key, raw| {
            let out = buf.get_mut(at..).unwrap_or_default();
            let n = seal::open_into(keys, ObjectKind::Chunk, key, raw, out)?;
            let hash = derives_name(keys, name, key, &buf[at..at + n])?;
            Ok((buf, n, hash))
        })
        .await
    }

    /// Fetches a chunk's sealed bytes and runs `open` on them (keys, name, store key, bytes) on
    /// the CPU pool.
    async fn open_block<R, F>(&self, name: &ChunkName, open: F) -> Result<R, ChunkError>
    where
        R: Send + 'static,
        F: FnOnce(&KeyRing, &ChunkName, &str, Vec<u8>) -> Result<R, ChunkError> + Send + 'static,
    {
        let key = Self::chunk_key(name);
        let raw = self.store.get(&key).await?;
        let keys = self.keys.clone();
        let name = *name;
        self.cpu
            .run(move || open(&keys, &name, key.as_str(), Vec::from(raw)))
            .await
    }

    /// Seals and writes a small metadata object under a content-derived key (create-only).
    pub async fn put_sealed_if_absent(
        &self,
        kind: ObjectKind,
        key: &Key,
        plaintext: Vec<u8>,
        compress: bool,
    ) -> Result<PutOutcome, ChunkError> {
        self.fence.touch(key).await;
        let keys = self.keys.clone();
        let key_str = key.as_str().to_string();
        let level = compress.then_some(self.zstd_level);
        let sealed = self
            .cpu
            .run(move || seal::seal(&keys, kind, &key_str, &plaintext, level))
            .await?;
        Ok(self
            .store
            .put_if_absent(key, Bytes::from(sealed.bytes))
            .await?)
    }

    /// Seals (zstd where it helps) and writes, overwriting.
    pub async fn put_sealed_compressed(
        &self,
        kind: ObjectKind,
        key: &Key,
        plaintext: Vec<u8>,
    ) -> Result<(), ChunkError> {
        self.fence.touch(key).await;
        let keys = self.keys.clone();
        let key_str = key.as_str().to_string();
        let level = self.zstd_level;
        let sealed = self
            .cpu
            .run(move || seal::seal(&keys, kind, &key_str, &plaintext, Some(level)))
            .await?;
        Ok(self.store.put(key, Bytes::from(sealed.bytes)).await?)
    }

    /// Seals and writes (overwriting) a small object.
    pub async fn put_sealed(
        &self,
        kind: ObjectKind,
        key: &Key,
        plaintext: Vec<u8>,
    ) -> Result<(), ChunkError> {
        self.fence.touch(key).await;
        let keys = self.keys.clone();
        let key_str = key.as_str().to_string();
        let sealed = self
            .cpu
            .run(move || seal::seal(&keys, kind, &key_str, &plaintext, None))
            .await?;
        Ok(self.store.put(key, Bytes::from(sealed.bytes)).await?)
    }

    /// Reads and opens a sealed object of `kind`.
    pub async fn get_sealed(&self, kind: ObjectKind, key: &Key) -> Result<Vec<u8>, ChunkError> {
        let raw = self.store.get(key).await?;
        let keys = self.keys.clone();
        let key_str = key.as_str().to_string();
        Ok(self
            .cpu
            .run(move || seal::open(&keys, kind, &key_str, Vec::from(raw)))
            .await?)
    }

    /// [`get_sealed`](Self::get_sealed) for code already running on a CPU-pool thread (a log
    /// parsed by [`CpuPool::run`] reading its frames): the object is fetched on `rt` and opened
    /// on the calling thread. Taking a second pool permit there would deadlock once every
    /// permit is held by such a parser waiting for one.
    pub fn get_sealed_on_pool_thread(
        &self,
        rt: &tokio::runtime::Handle,
        kind: ObjectKind,
        key: &Key,
    ) -> Result<Vec<u8>, ChunkError> {
        let raw = rt.block_on(self.store.get(key))?;
        Ok(seal::open(&self.keys, kind, key.as_str(), Vec::from(raw))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cs() -> ChunkStore {
        ChunkStore::new(
            Store::open("memory://", &[]).unwrap(),
            Arc::new(KeyRing::random()),
            CpuPool::new(2),
            1,
        )
    }

    #[tokio::test]
    async fn dedup_zero_and_round_trip() {
        let cs = cs();
        let block = Bytes::from((0..65536u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
        let a = cs
            .put_block(block.clone(), Some(PlainHash::of(&block)))
            .await
            .unwrap();
        assert_eq!(a.outcome, Some(PutOutcome::Created));
        assert!(
            a.stored_bytes > 0 && a.stored_bytes < 65536,
            "compressible block stored compressed"
        );
        let b = cs.put_block(block.clone(), None).await.unwrap();
        assert_eq!(b.outcome, Some(PutOutcome::Existed));
        assert_eq!(a.name, b.name);
        let z = cs
            .put_block(Bytes::from(vec![0u8; 65536]), None)
            .await
            .unwrap();
        assert!(z.name.is_none() && z.outcome.is_none());
        assert_eq!(
            cs.store()
                .list(&Key::new(&["chunks"]).unwrap())
                .await
                .unwrap()
                .len(),
            1
        );
        let (back, h) = cs.get_block(&a.name.unwrap()).await.unwrap();
        assert_eq!(back, block);
        assert_eq!(h, a.hash);
    }

    #[tokio::test]
    async fn wrong_claimed_hash_stores_nothing() {
        let cs = cs();
        let block = Bytes::from(vec![5u8; 4096]);
        let r = cs.put_block(block, Some(PlainHash::of(b"other"))).await;
        assert!(matches!(r, Err(ChunkError::HashMismatch { .. })));
        assert!(cs
            .store()
            .list(&Key::new(&["chunks"]).unwrap())
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn swapped_chunk_is_detected() {
        let cs = cs();
        let a = cs
            .put_block(Bytes::from(vec![1u8; 8192]), None)
            .await
            .unwrap()
            .name
            .unwrap();
        let b = cs
            .put_block(Bytes::from(vec![2u8; 8192]), None)
            .await
            .unwrap()
            .name
            .unwrap();
        // Copy b's object over a's name: the tag (bound to the key) must fail.
        let braw = cs.store().get(&ChunkStore::chunk_key(&b)).await.unwrap();
        cs.store()
            .put(&ChunkStore::chunk_key(&a), braw)
            .await
            .unwrap();
        assert!(matches!(
            cs.get_block(&a).await,
            Err(ChunkError::Corrupt(_))
        ));
    }
}
