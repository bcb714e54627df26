//! The vault: one object store plus the key ring. Everything the server knows lives here; the
//! server process holds caches only.
//!
//! * [`layout`] builds every object key (one place, from server-made ids only).
//! * [`records`] versioned, sealed JSON records updated by create-only put of version n+1.
//! * [`registry`] hosts, providers and token digests.

pub mod layout;
pub mod records;
pub mod registry;

use std::sync::Arc;

use bytes::Bytes;

use crate::chunk::{ChunkStore, CpuPool, KeyRing};
use crate::error::{Error, Result};
use crate::file_formats::ObjectKind;
use crate::store::{PutOutcome, Store};

pub use records::{Records, Versioned};

/// Handle on an opened vault. Cheap to clone.
#[derive(Clone)]
pub struct Vault {
    pub chunks: ChunkStore,
    pub records: Records,
}

impl Vault {
    /// Opens (and on first use initializes) the vault in `store` with `keys`. A key file that
    /// does not belong to this vault is refused here, before anything is written.
    pub async fn open(
        store: Store,
        keys: Arc<KeyRing>,
        cpu: CpuPool,
        zstd_level: i32,
    ) -> Result<Vault> {
        let chunks = ChunkStore::new(store, keys, cpu, zstd_level);
        let records = Records::new(chunks.clone());
        let v = Vault { chunks, records };
        v.check_key().await?;
        Ok(v)
    }

    pub fn store(&self) -> &Store {
        self.chunks.store()
    }

    pub fn keys(&self) -> &Arc<KeyRing> {
        self.chunks.keys()
    }

    /// The key-check object: sealed once at creation; opening it proves the key ring matches.
    async fn check_key(&self) -> Result<()> {
        let key = layout::key_check();
        match self.chunks.get_sealed(ObjectKind::Record, &key).await {
            Ok(_) => Ok(()),
            Err(crate::chunk::pipeline::ChunkError::Store(crate::store::StoreError::NotFound { .. })) => {
                let body = serde_json::to_vec(&serde_json::json!({
                    "vault_format": 1, "created_unix": crate::util::unix_now(),
                }))
                .map_err(|e| Error::internal(e.to_string()))?;
                // Create-only: two servers initializing the same vault agree on one key check.
                let out = self.chunks.put_sealed_if_absent(ObjectKind::Record, &key, body, false).await?;
                if out == PutOutcome::Existed {
                    return Box::pin(self.check_key()).await;
                }
                Ok(())
            }
            Err(crate::chunk::pipeline::ChunkError::Corrupt(_)) => Err(Error::Invalid {
                code: "wrong_master_key",
                message: format!(
                    "the master key file does not open this vault ({}): wrong key file for this vault",
                    self.store().url()
                ),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Raw object access for tools (verify, tests).
    pub async fn raw_get(&self, key: &crate::store::Key) -> Result<Bytes> {
        Ok(self.store().get(key).await?)
    }
}
