//! The vault's key ring.
//!
//! The master key file (`master.key`, mode 0600, outside the object store) holds one or more
//! 256-bit master keys with ids. Every sealed object records the id of the key that sealed it,
//! so `drvault key rotate` can add a key for new writes while old objects stay readable.
//! Subkeys are derived with BLAKE3 `derive_key` (contexts in `file_formats`):
//!
//! * seal key (per master key): AES-256-GCM;
//! * name, ident and token keys: derived from the *first* master key only, forever, because
//!   chunk names must stay stable across rotations (or deduplication would stop at a rotation)
//!   and because VM/disk ids and token digests are looked up by recomputing them.

use std::collections::BTreeMap;
use std::path::Path;

use aes_gcm::{Aes256Gcm, KeyInit};
use serde::{Deserialize, Serialize};

use crate::file_formats::{KDF_CHUNK_NAME, KDF_IDENT, KDF_SEAL, KDF_TOKEN};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("master key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("master key file {path} has mode {mode:o}; it must be readable by its owner only (chmod 600)")]
    Permissions { path: String, mode: u32 },
    #[error("master key file {path} is malformed: {reason}")]
    Malformed { path: String, reason: String },
}

/// On-disk form of the master key file.
#[derive(Serialize, Deserialize)]
struct KeyFile {
    format: u32,
    active: u32,
    keys: Vec<KeyFileEntry>,
}

#[derive(Serialize, Deserialize)]
struct KeyFileEntry {
    id: u32,
    created_unix: u64,
    key: String,
}

/// Derived keys, ready to use. Cheap to share behind an `Arc`.
pub struct KeyRing {
    active: u32,
    seal: BTreeMap<u32, Aes256Gcm>,
    name_key: [u8; 32],
    ident_key: [u8; 32],
    token_key: [u8; 32],
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("KeyRing")
            .field("active", &self.active)
            .field("ids", &self.seal.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl KeyRing {
    /// Builds a ring from raw master keys (id, key); the first (lowest id) anchors names.
    pub fn from_masters(masters: &[(u32, [u8; 32])], active: u32) -> Option<KeyRing> {
        let (_, first) = masters.iter().min_by_key(|(id, _)| *id)?;
        let mut seal = BTreeMap::new();
        for (id, m) in masters {
            let k = blake3::derive_key(KDF_SEAL, m);
            seal.insert(*id, Aes256Gcm::new_from_slice(&k).ok()?);
        }
        if !seal.contains_key(&active) {
            return None;
        }
        Some(KeyRing {
            active,
            seal,
            name_key: blake3::derive_key(KDF_CHUNK_NAME, first),
            ident_key: blake3::derive_key(KDF_IDENT, first),
            token_key: blake3::derive_key(KDF_TOKEN, first),
        })
    }

    /// A ring with one random key, for tests and benches.
    pub fn random() -> KeyRing {
        KeyRing::from_masters(&[(1, random_key())], 1).unwrap_or_else(|| unreachable!("one key"))
    }

    /// Loads the master key file, refusing one that others can read.
    pub fn load(path: &Path) -> Result<KeyRing, KeyError> {
        use std::os::unix::fs::PermissionsExt;
        let p = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| KeyError::Io {
            path: p.clone(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions { path: p, mode });
        }
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: p.clone(),
            source,
        })?;
        let kf: KeyFile = serde_json::from_str(&text).map_err(|e| KeyError::Malformed {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        if kf.format != 1 {
            return Err(KeyError::Malformed {
                path: p,
                reason: format!("unknown format {}", kf.format),
            });
        }
        let mut masters = Vec::new();
        for e in &kf.keys {
            let mut k = [0u8; 32];
            hex::decode_to_slice(&e.key, &mut k).map_err(|_| KeyError::Malformed {
                path: p.clone(),
                reason: format!("key {} is not 64 hex digits", e.id),
            })?;
            masters.push((e.id, k));
        }
        KeyRing::from_masters(&masters, kf.active).ok_or_else(|| KeyError::Malformed {
            path: p,
            reason: "no keys, or the active key id is not among them".into(),
        })
    }

    /// Creates a new master key file with one random key (mode 0600, never overwrites).
    pub fn create_file(path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let p = path.display().to_string();
        let kf = KeyFile {
            format: 1,
            active: 1,
            keys: vec![KeyFileEntry {
                id: 1,
                created_unix: crate::util::unix_now(),
                key: hex::encode(random_key()),
            }],
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| KeyError::Io {
                path: p.clone(),
                source,
            })?;
        let text = serde_json::to_string_pretty(&kf).map_err(|e| KeyError::Malformed {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|source| KeyError::Io { path: p, source })
    }

    pub fn active_id(&self) -> u32 {
        self.active
    }

    pub fn active_cipher(&self) -> (u32, &Aes256Gcm) {
        // `from_masters` guarantees the active id is present.
        (self.active, &self.seal[&self.active])
    }

    pub fn cipher(&self, id: u32) -> Option<&Aes256Gcm> {
        self.seal.get(&id)
    }

    pub fn name_key(&self) -> &[u8; 32] {
        &self.name_key
    }

    /// Stable, opaque identifier for a caller-chosen name (VM, disk): the store never sees
    /// the name itself, and no caller-supplied text reaches an object key.
    pub fn ident(&self, domain: &str, name: &str) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.ident_key);
        h.update(domain.as_bytes());
        h.update(&[0]);
        h.update(name.as_bytes());
        hex::encode(&h.finalize().as_bytes()[..16])
    }

    /// Digest under which a bearer token is stored (tokens are never stored in clear).
    pub fn token_digest(&self, token: &str) -> String {
        hex::encode(blake3::keyed_hash(&self.token_key, token.as_bytes()).as_bytes())
    }
}

/// 32 random bytes from the operating system.
pub fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    crate::util::fill_random(&mut k);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_round_trip_and_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        KeyRing::create_file(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let a = KeyRing::load(&p).unwrap();
        let b = KeyRing::load(&p).unwrap();
        assert_eq!(a.ident("vm", "web01"), b.ident("vm", "web01"));
        assert!(
            KeyRing::create_file(&p).is_err(),
            "must never overwrite a key file"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            KeyRing::load(&p),
            Err(KeyError::Permissions { .. })
        ));
    }

    #[test]
    fn rotation_keeps_names_stable() {
        let k1 = [7u8; 32];
        let k2 = [9u8; 32];
        let one = KeyRing::from_masters(&[(1, k1)], 1).unwrap();
        let two = KeyRing::from_masters(&[(1, k1), (2, k2)], 2).unwrap();
        assert_eq!(one.name_key(), two.name_key());
        assert_eq!(two.active_id(), 2);
        assert!(KeyRing::from_masters(&[(1, k1)], 3).is_none());
    }
}
