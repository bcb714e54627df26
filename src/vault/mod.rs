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
use crate::file_formats::{ObjectKind, VAULT_FORMAT, VAULT_FORMAT_OLDEST};
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
    /// does not belong to this vault, and a vault format this release cannot serve, are refused
    /// here, before anything is written. An older format is left as it is: the caller upgrades
    /// it with [`Vault::upgrade_format`] once its own start checks passed.
    pub async fn open(
        store: Store,
        keys: Arc<KeyRing>,
        cpu: CpuPool,
        zstd_level: i32,
    ) -> Result<Vault> {
        let chunks = ChunkStore::new(store, keys, cpu, zstd_level);
        let records = Records::new(chunks.clone());
        let v = Vault { chunks, records };
        let created = v.check_key().await?;
        let format = v.current_format(created).await?;
        check_format(format)?;
        Ok(v)
    }

    /// Records this release's format in a vault of an older one (a no-op on a current vault);
    /// the format it had before when it changed. Servers of older releases do not fence their
    /// writes, and the refusal of a newer format is what keeps them out from now on.
    pub async fn upgrade_format(&self) -> Result<Option<u64>> {
        let created = self.check_key().await?;
        let mut from = None;
        self.records
            .update(
                &layout::vault_format(),
                |cur: Option<&serde_json::Value>| {
                    // Read again on every attempt: another server may have upgraded the vault (or
                    // a newer release moved it on) since this one opened it.
                    let now = cur.map(format_number).unwrap_or_else(|| created.clone());
                    check_format(now.clone())?;
                    from = match now {
                        FormatFound::Number(n) if n < VAULT_FORMAT => Some(n),
                        _ => None,
                    };
                    Ok(from.map(|n| {
                        serde_json::json!({
                            "vault_format": VAULT_FORMAT,
                            "upgraded_from": n,
                            "upgraded_unix": crate::util::unix_now(),
                        })
                    }))
                },
            )
            .await?;
        if let Some(n) = from {
            tracing::info!(from = n, to = VAULT_FORMAT, vault = %self.store().url(), "vault format upgraded");
        }
        Ok(from)
    }

    /// The vault's format now: its format record, or without one the key check's (the format
    /// the vault was created with).
    async fn current_format(&self, created: FormatFound) -> Result<FormatFound> {
        Ok(
            match self
                .records
                .load::<serde_json::Value>(&layout::vault_format())
                .await?
            {
                Some(rec) => format_number(&rec.value),
                None => created,
            },
        )
    }

    pub fn store(&self) -> &Store {
        self.chunks.store()
    }

    pub fn keys(&self) -> &Arc<KeyRing> {
        self.chunks.keys()
    }

    /// The key-check object: sealed once at creation; opening it proves the key ring matches.
    /// Its `vault_format` is the format the vault was created with.
    async fn check_key(&self) -> Result<FormatFound> {
        let key = layout::key_check();
        match self.chunks.get_sealed(ObjectKind::Record, &key).await {
            Ok(plain) => Ok(serde_json::from_slice::<serde_json::Value>(&plain)
                .map(|v| format_number(&v))
                .unwrap_or(FormatFound::Unreadable(String::from_utf8_lossy(&plain).into_owned()))),
            Err(crate::chunk::pipeline::ChunkError::Store(crate::store::StoreError::NotFound { .. })) => {
                let body = serde_json::to_vec(&serde_json::json!({
                    "vault_format": VAULT_FORMAT, "created_unix": crate::util::unix_now(),
                }))
                .map_err(|e| Error::internal(e.to_string()))?;
                // Create-only: two servers initializing the same vault agree on one key check.
                let out = self.chunks.put_sealed_if_absent(ObjectKind::Record, &key, body, false).await?;
                if out == PutOutcome::Existed {
                    return Box::pin(self.check_key()).await;
                }
                Ok(FormatFound::Number(VAULT_FORMAT))
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

/// A vault format number as stored, or the text that holds none.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FormatFound {
    Number(u64),
    Unreadable(String),
}

/// The `vault_format` of a key-check or format record.
fn format_number(v: &serde_json::Value) -> FormatFound {
    match v.get("vault_format").and_then(|f| f.as_u64()) {
        Some(n) => FormatFound::Number(n),
        None => FormatFound::Unreadable(v.to_string()),
    }
}

/// Whether this release may serve (and upgrade) a vault of format `found`.
fn check_format(found: FormatFound) -> Result<()> {
    match found {
        FormatFound::Number(n) if n > VAULT_FORMAT => Err(Error::Invalid {
            code: "vault_format_newer",
            message: format!(
                "vault format {n} is newer than this drvault (reads up to {VAULT_FORMAT}): upgrade \
                 drvault on this machine"
            ),
        }),
        FormatFound::Number(n) if n < VAULT_FORMAT_OLDEST => Err(Error::Invalid {
            code: "vault_format_old",
            message: format!(
                "vault format {n} is older than any this drvault can upgrade (it serves formats \
                 {VAULT_FORMAT_OLDEST} to {VAULT_FORMAT}): this is not a drvault vault it may write"
            ),
        }),
        FormatFound::Number(_) => Ok(()),
        FormatFound::Unreadable(text) => Err(Error::Invalid {
            code: "vault_format_unreadable",
            message: format!(
                "the vault's format number cannot be read ({}): the vault is damaged or was \
                 written by another program; this drvault will not write it",
                shortened(&text)
            ),
        }),
    }
}

/// At most 80 characters of stored text, for an error message.
fn shortened(text: &str) -> String {
    match text.char_indices().nth(80) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_code(found: FormatFound) -> Option<&'static str> {
        check_format(found).err().map(|e| e.code())
    }

    #[test]
    fn formats_this_release_serves_and_refuses() {
        assert_eq!(refused_code(FormatFound::Number(1)), None);
        assert_eq!(refused_code(FormatFound::Number(VAULT_FORMAT)), None);
        assert_eq!(
            refused_code(FormatFound::Number(VAULT_FORMAT + 1)),
            Some("vault_format_newer")
        );
        assert_eq!(
            refused_code(FormatFound::Number(0)),
            Some("vault_format_old")
        );
        assert_eq!(
            refused_code(format_number(&serde_json::json!({"vault_format": "two"}))),
            Some("vault_format_unreadable")
        );
        assert_eq!(
            refused_code(format_number(&serde_json::json!({"vault_format": -1}))),
            Some("vault_format_unreadable")
        );
        let msg = check_format(FormatFound::Number(99))
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            "vault format 99 is newer than this drvault (reads up to 2): upgrade drvault on this machine"
        );
    }

    async fn open(store: &Store, keys: &Arc<KeyRing>) -> Result<Vault> {
        Vault::open(store.clone(), keys.clone(), CpuPool::new(1), 1).await
    }

    #[tokio::test]
    async fn a_format_1_vault_is_upgraded_once_and_a_newer_one_refused() {
        let store = Store::open("memory://", &[]).unwrap();
        let keys = Arc::new(KeyRing::random());
        // A vault as releases before format 2 created it: only the key check, saying 1.
        let chunks = ChunkStore::new(store.clone(), keys.clone(), CpuPool::new(1), 1);
        let body =
            serde_json::to_vec(&serde_json::json!({"vault_format": 1, "created_unix": 1})).unwrap();
        chunks
            .put_sealed_if_absent(ObjectKind::Record, &layout::key_check(), body, false)
            .await
            .unwrap();
        let keycheck = store.get(&layout::key_check()).await.unwrap();

        let v = open(&store, &keys).await.unwrap();
        assert!(
            v.records
                .load::<serde_json::Value>(&layout::vault_format())
                .await
                .unwrap()
                .is_none(),
            "opening alone wrote the format"
        );
        assert_eq!(v.upgrade_format().await.unwrap(), Some(1));
        assert_eq!(v.upgrade_format().await.unwrap(), None, "upgraded twice");
        let rec = v
            .records
            .load::<serde_json::Value>(&layout::vault_format())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (rec.version, &rec.value["vault_format"]),
            (1, &serde_json::json!(2))
        );
        assert_eq!(store.get(&layout::key_check()).await.unwrap(), keycheck);

        // A newer release moves the vault on: this one refuses to open it.
        v.records
            .update(&layout::vault_format(), |_: Option<&serde_json::Value>| {
                Ok(Some(serde_json::json!({"vault_format": 3})))
            })
            .await
            .unwrap();
        let e = open(&store, &keys).await.err().unwrap();
        assert_eq!(e.code(), "vault_format_newer");
        assert_eq!(
            v.upgrade_format().await.unwrap_err().code(),
            "vault_format_newer"
        );
    }

    #[tokio::test]
    async fn a_new_vault_is_created_at_this_format() {
        let store = Store::open("memory://", &[]).unwrap();
        let keys = Arc::new(KeyRing::random());
        let v = open(&store, &keys).await.unwrap();
        assert_eq!(v.upgrade_format().await.unwrap(), None);
        let plain = v
            .chunks
            .get_sealed(ObjectKind::Record, &layout::key_check())
            .await
            .unwrap();
        let kc: serde_json::Value = serde_json::from_slice(&plain).unwrap();
        assert_eq!(kc["vault_format"], VAULT_FORMAT);
    }
}
