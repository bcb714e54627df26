//! The vault's key ring.
//!
//! The master key file (`master.key`, mode 0600, outside the object store) holds one or more
//! 256-bit master keys with ids. Every sealed object records the id of the key that sealed it,
//! so `drvault key rotate` can add a key for new writes while old objects stay readable.
//!
//! Nonce budget: seals use random 96-bit nonces, safe for about 2^32 objects per key. Every
//! seal is counted against its key; the count is reserved in the key file in batches of 2^16
//! before use (`seals_reserved`), so a crash can only over-count. At `rotate_after` seals (2^30
//! by default) the server adds a new key by itself and logs it (the key file must then be backed
//! up again); at [`HARD_SEAL_LIMIT`] (3·2^30) sealing is refused. The file is only ever replaced
//! whole (write beside, fsync, rename, fsync the directory).
//! Subkeys are derived with BLAKE3 `derive_key` (contexts in `file_formats`):
//!
//! * seal key (per master key): AES-256-GCM;
//! * name, ident and token keys: derived from the *first* master key only, forever, because
//!   chunk names must stay stable across rotations (or deduplication would stop at a rotation)
//!   and because VM/disk ids and token digests are looked up by recomputing them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use aes_gcm::{Aes256Gcm, KeyInit};
use serde::{Deserialize, Serialize};

use crate::file_formats::{KDF_CHUNK_NAME, KDF_IDENT, KDF_SEAL, KDF_TOKEN};
pub use crate::wire::KeyUsage;

/// AES-GCM with random 96-bit nonces is safe for about 2^32 messages per key (NIST SP 800-38D).
/// Sealing refuses past three quarters of that, whatever happened to rotation.
pub const HARD_SEAL_LIMIT: u64 = 3 << 30;
/// Default number of seals after which the server rotates to a new key on its own (2^30).
pub const DEFAULT_ROTATE_AFTER: u64 = 1 << 30;
/// Largest `rotate_after` accepted: rotation must come well before the hard limit.
pub const MAX_ROTATE_AFTER: u64 = 1 << 31;
/// Seals reserved in the key file per write: a crash loses at most this many from the count.
const RESERVE_BATCH: u64 = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("master key file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("master key file {path} has mode {mode:o}: others can read it; it must be readable by its owner only: run `chmod 600 {path}`")]
    Permissions { path: String, mode: u32 },
    #[error("master key file {path} is malformed: {reason}")]
    Malformed { path: String, reason: String },
    #[error("key {key_id} has sealed {seals} objects, the limit for one AES-GCM key with random nonces is {limit}; rotation failed or is impossible (no key file): run `drvault key rotate`")]
    Exhausted { key_id: u32, seals: u64, limit: u64 },
    #[error("this key ring has no key file, so a new key could not be kept: rotation refused")]
    NoKeyFile,
    #[error("key ring is full: no key id after {0}")]
    NoFreeId(u32),
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
    /// Seals this key may have made: reserved in batches before they are used, so the count
    /// survives a crash (it can only be over-estimated). Absent in files written before it.
    #[serde(default)]
    seals_reserved: u64,
}

/// One master key and its usage.
struct RingKey {
    master: [u8; 32],
    cipher: Arc<Aes256Gcm>,
    created_unix: u64,
    /// Seals counted since load, on top of the reservation found in the file.
    seals: u64,
    /// Seals reserved in the key file.
    reserved: u64,
    /// Seal count at which an automatic rotation is (re)tried.
    next_rotation_try: u64,
}

struct RingState {
    active: u32,
    keys: BTreeMap<u32, RingKey>,
}

/// Derived keys, ready to use. Shared behind an `Arc`; rotation changes it in place.
pub struct KeyRing {
    state: Mutex<RingState>,
    name_key: [u8; 32],
    ident_key: [u8; 32],
    token_key: [u8; 32],
    /// Where the ring came from; reservations and rotations are written back there.
    file: Option<PathBuf>,
    rotate_after: u64,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        let st = self.lock();
        f.debug_struct("KeyRing")
            .field("active", &st.active)
            .field("ids", &st.keys.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn cipher_of(master: &[u8; 32]) -> Option<Arc<Aes256Gcm>> {
    let k = blake3::derive_key(KDF_SEAL, master);
    Aes256Gcm::new_from_slice(&k).ok().map(Arc::new)
}

impl KeyRing {
    /// Builds a ring from raw master keys (id, key); the first (lowest id) anchors names.
    pub fn from_masters(masters: &[(u32, [u8; 32])], active: u32) -> Option<KeyRing> {
        let entries: Vec<(u32, [u8; 32], u64, u64)> =
            masters.iter().map(|(id, m)| (*id, *m, 0, 0)).collect();
        KeyRing::build(&entries, active, None)
    }

    /// (id, master, created, reserved) entries.
    fn build(
        entries: &[(u32, [u8; 32], u64, u64)],
        active: u32,
        file: Option<PathBuf>,
    ) -> Option<KeyRing> {
        let (_, first, _, _) = entries.iter().min_by_key(|e| e.0)?;
        let mut keys = BTreeMap::new();
        for &(id, master, created_unix, reserved) in entries {
            let cipher = cipher_of(&master)?;
            let k = RingKey {
                master,
                cipher,
                created_unix,
                // Assume every reserved seal was used: the count never goes backwards.
                seals: reserved,
                reserved,
                next_rotation_try: 0,
            };
            if keys.insert(id, k).is_some() {
                return None;
            }
        }
        if !keys.contains_key(&active) {
            return None;
        }
        Some(KeyRing {
            name_key: blake3::derive_key(KDF_CHUNK_NAME, first),
            ident_key: blake3::derive_key(KDF_IDENT, first),
            token_key: blake3::derive_key(KDF_TOKEN, first),
            state: Mutex::new(RingState { active, keys }),
            file,
            rotate_after: DEFAULT_ROTATE_AFTER,
        })
    }

    /// A ring with one random key, for tests and benches.
    pub fn random() -> KeyRing {
        KeyRing::from_masters(&[(1, random_key())], 1).unwrap_or_else(|| unreachable!("one key"))
    }

    /// Rotates to a new key by itself after this many seals with one key (clamped to
    /// 1..=[`MAX_ROTATE_AFTER`]; config `vault.key_rotate_after_seals`).
    pub fn with_rotate_after(mut self, seals: u64) -> KeyRing {
        self.rotate_after = seals.clamp(1, MAX_ROTATE_AFTER);
        self
    }

    fn lock(&self) -> MutexGuard<'_, RingState> {
        // Every update below leaves the state consistent before anything can panic.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
        let mut entries = Vec::new();
        for e in &kf.keys {
            let mut k = [0u8; 32];
            hex::decode_to_slice(&e.key, &mut k).map_err(|_| KeyError::Malformed {
                path: p.clone(),
                reason: format!("key {} is not 64 hex digits", e.id),
            })?;
            entries.push((e.id, k, e.created_unix, e.seals_reserved));
        }
        KeyRing::build(&entries, kf.active, Some(path.to_path_buf())).ok_or_else(|| {
            KeyError::Malformed {
                path: p,
                reason: "no keys, a repeated key id, or the active key id is not among them".into(),
            }
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
                seals_reserved: 0,
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

    /// Rewrites the key file from `st`: a new file beside it (0600, fsynced), renamed over it,
    /// then the directory fsynced. A crash leaves the old file or the new one, never a mix.
    fn write_file(path: &Path, st: &RingState) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| KeyError::Io {
            path: path.display().to_string(),
            source,
        };
        let kf = KeyFile {
            format: 1,
            active: st.active,
            keys: st
                .keys
                .iter()
                .map(|(id, k)| KeyFileEntry {
                    id: *id,
                    created_unix: k.created_unix,
                    key: hex::encode(k.master),
                    seals_reserved: k.reserved,
                })
                .collect(),
        };
        let text = serde_json::to_string_pretty(&kf).map_err(|e| KeyError::Malformed {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".new");
        let tmp = PathBuf::from(tmp_name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(text.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }

    pub fn active_id(&self) -> u32 {
        self.lock().active
    }

    /// The cipher to seal one object with, counted against its key. Reserves seals in the key
    /// file in batches, rotates to a new key once the active one reached `rotate_after` (when
    /// the ring has a file to keep the new key in), and refuses past [`HARD_SEAL_LIMIT`].
    pub fn seal_cipher(&self) -> Result<(u32, Arc<Aes256Gcm>), KeyError> {
        let mut st = self.lock();
        let active = st.active;
        let Some(k) = st.keys.get_mut(&active) else {
            unreachable!("the active key is always in the ring");
        };
        if k.seals >= HARD_SEAL_LIMIT {
            return Err(KeyError::Exhausted {
                key_id: active,
                seals: k.seals,
                limit: HARD_SEAL_LIMIT,
            });
        }
        k.seals += 1;
        let seals = k.seals;
        let batch = (self.rotate_after / 4).clamp(1, RESERVE_BATCH);
        // Rotate at the threshold, and retry once per batch after that if it failed.
        let try_rotation =
            self.file.is_some() && seals >= self.rotate_after && seals >= k.next_rotation_try;
        if try_rotation {
            k.next_rotation_try = seals + batch;
        }
        if seals > k.reserved {
            // Counted as reserved even when the write fails, so a broken file is not rewritten
            // on every seal; the error is logged once per batch.
            k.reserved = seals - 1 + batch;
            if let Some(path) = &self.file {
                if let Err(e) = KeyRing::write_file(path, &st) {
                    tracing::error!(error = %e, key_id = active, "cannot record seal usage in the key file");
                }
            }
        }
        if try_rotation {
            match self.rotate_locked(&mut st) {
                Ok(id) => tracing::warn!(
                    old_key = active,
                    new_key = id,
                    seals,
                    "key {active} reached its seal budget: rotated to key {id}; back up the key file again"
                ),
                Err(e) => tracing::error!(error = %e, key_id = active, seals, "automatic key rotation failed"),
            }
        }
        let (id, cipher) = match st.keys.get(&st.active) {
            Some(k) => (st.active, k.cipher.clone()),
            None => unreachable!("the active key is always in the ring"),
        };
        Ok((id, cipher))
    }

    /// The cipher of key `id`, for opening (old keys stay readable after rotation).
    pub fn cipher(&self, id: u32) -> Option<Arc<Aes256Gcm>> {
        self.lock().keys.get(&id).map(|k| k.cipher.clone())
    }

    /// Adds a new random key and makes it the one new objects are sealed with; older keys stay
    /// for reading. The key file is rewritten first: if that fails, nothing changes.
    pub fn rotate(&self) -> Result<u32, KeyError> {
        let mut st = self.lock();
        self.rotate_locked(&mut st)
    }

    fn rotate_locked(&self, st: &mut RingState) -> Result<u32, KeyError> {
        let path = self.file.as_ref().ok_or(KeyError::NoKeyFile)?;
        let last = st.keys.keys().next_back().copied().unwrap_or(0);
        let id = last.checked_add(1).ok_or(KeyError::NoFreeId(last))?;
        let master = random_key();
        let cipher = cipher_of(&master).unwrap_or_else(|| unreachable!("32-byte AES key"));
        let old_active = st.active;
        st.keys.insert(
            id,
            RingKey {
                master,
                cipher,
                created_unix: crate::util::unix_now(),
                seals: 0,
                reserved: 0,
                next_rotation_try: 0,
            },
        );
        st.active = id;
        if let Err(e) = KeyRing::write_file(path, st) {
            st.active = old_active;
            st.keys.remove(&id);
            return Err(e);
        }
        metrics::counter!("drvault_key_rotations_total").increment(1);
        Ok(id)
    }

    /// Every key's id, state and usage, oldest first.
    pub fn usage(&self) -> Vec<KeyUsage> {
        let st = self.lock();
        st.keys
            .iter()
            .map(|(id, k)| KeyUsage {
                id: *id,
                active: *id == st.active,
                created_unix: k.created_unix,
                seals: k.seals,
            })
            .collect()
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
        assert!(
            KeyRing::from_masters(&[(1, k1), (1, k2)], 1).is_none(),
            "a repeated id is refused"
        );
    }

    fn file_ring(dir: &Path) -> (PathBuf, KeyRing) {
        let p = dir.join("master.key");
        KeyRing::create_file(&p).unwrap();
        let r = KeyRing::load(&p).unwrap();
        (p, r)
    }

    #[test]
    fn rotate_adds_a_key_keeps_the_old_and_survives_reload() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (p, ring) = file_ring(dir.path());
        let name_key = *ring.name_key();
        let (id1, c1) = ring.seal_cipher().unwrap();
        assert_eq!(ring.rotate().unwrap(), 2);
        let (id2, _) = ring.seal_cipher().unwrap();
        assert_eq!((id1, id2), (1, 2));
        assert!(ring.cipher(1).is_some(), "old key stays readable");
        let again = KeyRing::load(&p).unwrap();
        assert_eq!(again.active_id(), 2);
        assert_eq!(again.name_key(), &name_key, "names survive rotation");
        assert!(Arc::ptr_eq(&c1, &ring.cipher(1).unwrap()));
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let usage = again.usage();
        assert_eq!(usage.len(), 2);
        assert!(usage[1].active && !usage[0].active);
    }

    #[test]
    fn seal_counts_survive_a_restart_and_force_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let (p, ring) = file_ring(dir.path());
        let ring = ring.with_rotate_after(40);
        for _ in 0..39 {
            assert_eq!(ring.seal_cipher().unwrap().0, 1);
        }
        // A "crash" here: the reloaded ring counts at least the 39 seals already made.
        let reloaded = KeyRing::load(&p).unwrap().with_rotate_after(40);
        assert!(reloaded.usage()[0].seals >= 39, "{:?}", reloaded.usage());
        // The 40th seal reaches the budget: that seal already uses a fresh key.
        assert_eq!(reloaded.seal_cipher().unwrap().0, 2);
        assert_eq!(reloaded.active_id(), 2);
        assert_eq!(KeyRing::load(&p).unwrap().active_id(), 2);
    }

    #[test]
    fn a_ring_without_file_refuses_rotation_and_stops_at_the_hard_limit() {
        let ring = KeyRing::random().with_rotate_after(2);
        assert!(matches!(ring.rotate(), Err(KeyError::NoKeyFile)));
        for _ in 0..10 {
            assert_eq!(
                ring.seal_cipher().unwrap().0,
                1,
                "no file: no automatic rotation"
            );
        }
        // Pretend the key is nearly spent.
        ring.lock().keys.get_mut(&1).unwrap().seals = HARD_SEAL_LIMIT - 1;
        ring.seal_cipher().unwrap();
        match ring.seal_cipher() {
            Err(KeyError::Exhausted { key_id: 1, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_failed_rotation_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (p, ring) = file_ring(dir.path());
        // The file's directory goes away: the new key cannot be kept, so it is not used.
        std::fs::remove_file(&p).unwrap();
        std::fs::remove_dir_all(dir.path()).unwrap();
        assert!(matches!(ring.rotate(), Err(KeyError::Io { .. })));
        assert_eq!(ring.active_id(), 1);
        assert_eq!(ring.usage().len(), 1);
    }

    #[test]
    fn old_key_files_without_counts_load() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("old.key");
        let text = format!(
            r#"{{"format": 1, "active": 1, "keys": [{{"id": 1, "created_unix": 5, "key": "{}"}}]}}"#,
            "ab".repeat(32)
        );
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&p)
            .unwrap();
        std::io::Write::write_all(&mut f, text.as_bytes()).unwrap();
        let r = KeyRing::load(&p).unwrap();
        assert_eq!(r.usage()[0].seals, 0);
    }
}
