//! Sealed-object framing: every object drvault writes (chunks, block maps, records, receipts,
//! log frames) is one of these. Layout, version 1 (all integers little-endian):
//!
//! ```text
//! offset size field
//!  0      4   magic "DRVS"                      (file_formats::SEALED_MAGIC)
//!  4      1   format version = 1
//!  5      1   object kind (chunk, map root, map segment, record, receipt, log frame)
//!  6      1   flags: bit 0 = payload is zstd-compressed; other bits must be 0
//!  7      1   reserved, 0
//!  8      4   key id (which master key's seal key sealed it)
//! 12     12   nonce (fresh random 96 bits per object)
//! 24      8   plaintext length (after decompression), at most MAX_SEALED_PLAINTEXT
//! 32      n   AES-256-GCM ciphertext of the payload
//! 32+n   16   GCM tag
//! ```
//!
//! Associated data = the 32 header bytes followed by the object's key in the store. So the tag
//! covers format version, kind, flags, key id and length, and an object copied or moved to another
//! key (another chunk's name, another disk's record) fails to open.
//!
//! Opening checks, in order: length ≥ header + tag → magic → version → kind → flags/reserved →
//! key id known → claimed length bounded → tag → decompression bounded by the claimed length →
//! exact length. Content hashes (chunk names) are checked by the caller that knows them.

use aes_gcm::aead::AeadInOut;
use aes_gcm::{Aes256Gcm, Nonce};

use crate::chunk::keys::{KeyError, KeyRing};
use crate::file_formats::{
    ObjectKind, FLAG_ZSTD, MAX_SEALED_PLAINTEXT, SEALED_HEADER_LEN, SEALED_MAGIC, SEALED_TAG_LEN,
    SEALED_VERSION, ZSTD_WINDOW_LOG_MAX,
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("object {name}: too short to be a sealed object ({len} bytes)")]
    Truncated { name: String, len: usize },
    #[error("object {name}: bad magic (not a drvault sealed object)")]
    BadMagic { name: String },
    #[error("object {name}: unsupported sealed-object version {version}")]
    UnsupportedVersion { name: String, version: u8 },
    #[error("object {name}: holds a {found:?} where a {expected:?} was expected")]
    WrongKind {
        name: String,
        expected: ObjectKind,
        found: u8,
    },
    #[error("object {name}: unknown flags {flags:#04x}")]
    BadFlags { name: String, flags: u8 },
    #[error(
        "object {name}: sealed with key id {key_id}, which this vault's key file does not hold"
    )]
    UnknownKey { name: String, key_id: u32 },
    #[error("object {name}: claims {len} bytes of plaintext, over the limit")]
    TooLarge { name: String, len: u64 },
    #[error("object {name}: authentication failed (corrupted, truncated, moved, or wrong key)")]
    TagMismatch { name: String },
    #[error("object {name}: payload does not decompress to its recorded length: {reason}")]
    BadPayload { name: String, reason: String },
    #[error("object {name}: content does not match its name")]
    ContentMismatch { name: String },
}

impl SealError {
    /// Every seal error means the stored bytes are not what was written: corruption.
    pub fn object_name(&self) -> &str {
        match self {
            SealError::Truncated { name, .. }
            | SealError::BadMagic { name }
            | SealError::UnsupportedVersion { name, .. }
            | SealError::WrongKind { name, .. }
            | SealError::BadFlags { name, .. }
            | SealError::UnknownKey { name, .. }
            | SealError::TooLarge { name, .. }
            | SealError::TagMismatch { name }
            | SealError::BadPayload { name, .. }
            | SealError::ContentMismatch { name } => name,
        }
    }
}

/// Result of sealing: the object bytes and whether compression was used.
pub struct Sealed {
    pub bytes: Vec<u8>,
    pub compressed: bool,
}

/// Seals `plaintext` for storage under `name`. `zstd_level` None stores it uncompressed;
/// otherwise it is compressed and the compressed form kept only when smaller. Fails only when
/// the active key's seal budget is spent and no new key could be made ([`KeyError::Exhausted`]).
pub fn seal(
    keys: &KeyRing,
    kind: ObjectKind,
    name: &str,
    plaintext: &[u8],
    zstd_level: Option<i32>,
) -> Result<Sealed, KeyError> {
    let mut out = Vec::with_capacity(SEALED_HEADER_LEN + plaintext.len() + SEALED_TAG_LEN);
    out.resize(SEALED_HEADER_LEN, 0);
    let mut compressed = false;
    if let Some(level) = zstd_level {
        // Compress into a per-thread scratch buffer that keeps its capacity (zstd writes into
        // the spare capacity, so nothing is zero-filled per block), then keep the result only
        // when it is smaller than the plaintext.
        COMPRESSOR.with(|c| {
            let mut c = c.borrow_mut();
            let (comp, scratch) = &mut *c;
            let _ = comp.set_compression_level(level);
            scratch.clear();
            scratch.reserve(zstd::zstd_safe::compress_bound(plaintext.len()));
            if let Ok(n) = comp.compress_to_buffer(plaintext, scratch) {
                if n < plaintext.len() {
                    out.extend_from_slice(&scratch[..n]);
                    compressed = true;
                }
            }
        });
    }
    if !compressed {
        out.extend_from_slice(plaintext);
    }
    seal_payload(keys, kind, name, out, compressed, plaintext.len())
}

/// Seals a zstd payload someone else compressed (an agent's upload) as it is, flagged
/// compressed, for `plain_len` bytes of plaintext. The caller must have inflated `payload` with
/// [`inflate_bounded`] to exactly the plaintext it vouches for (its hash checked): that is the
/// decoding [`open`] repeats, so the object opens to the same bytes. Nothing is compressed here.
pub fn seal_zstd_payload(
    keys: &KeyRing,
    kind: ObjectKind,
    name: &str,
    payload: &[u8],
    plain_len: usize,
) -> Result<Sealed, KeyError> {
    let mut out = Vec::with_capacity(SEALED_HEADER_LEN + payload.len() + SEALED_TAG_LEN);
    out.resize(SEALED_HEADER_LEN, 0);
    out.extend_from_slice(payload);
    seal_payload(keys, kind, name, out, true, plain_len)
}

/// Encrypts `out[SEALED_HEADER_LEN..]` (the payload, after room for the header) in place,
/// writes the header and appends the tag.
fn seal_payload(
    keys: &KeyRing,
    kind: ObjectKind,
    name: &str,
    mut out: Vec<u8>,
    compressed: bool,
    plain_len: usize,
) -> Result<Sealed, KeyError> {
    let (key_id, cipher) = keys.seal_cipher()?;
    let mut nonce = [0u8; 12];
    crate::util::fill_random(&mut nonce);
    let header = header_bytes(
        kind,
        if compressed { FLAG_ZSTD } else { 0 },
        key_id,
        &nonce,
        plain_len as u64,
    );
    out[..SEALED_HEADER_LEN].copy_from_slice(&header);
    let aad = associated_data(&header, name);
    let (_, body) = out.split_at_mut(SEALED_HEADER_LEN);
    let tag = encrypt(&cipher, &nonce, &aad, body);
    out.extend_from_slice(&tag);
    Ok(Sealed {
        bytes: out,
        compressed,
    })
}

/// Why a zstd payload did not inflate within its bound.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InflateError {
    #[error("inflates to more than {bound} bytes")]
    TooLong { bound: usize },
    #[error("not a complete zstd stream ({reason})")]
    Invalid { reason: &'static str },
}

/// Inflates a zstd payload (one or more frames) into a buffer of `bound` bytes, allocated up
/// front: zstd stops at its end, so a payload claiming more (a zstd bomb) is refused without
/// allocating what it claims. The same one-shot decoding as [`open`] uses, with the same
/// context settings.
pub fn inflate_bounded(payload: &[u8], bound: usize) -> Result<Vec<u8>, InflateError> {
    let mut out: Vec<u8> = Vec::with_capacity(bound);
    let got = DECOMPRESSOR.with(|d| d.borrow_mut().decompress(&mut out, payload));
    match got {
        Ok(n) => {
            out.truncate(n);
            Ok(out)
        }
        Err(code) if code == DST_SIZE_TOO_SMALL => Err(InflateError::TooLong { bound }),
        Err(code) => Err(InflateError::Invalid {
            reason: zstd::zstd_safe::get_error_name(code),
        }),
    }
}

/// zstd's error code for "destination buffer is too small" (codes are negated enum values).
const DST_SIZE_TOO_SMALL: usize =
    (zstd::zstd_safe::zstd_sys::ZSTD_ErrorCode::ZSTD_error_dstSize_tooSmall as usize)
        .wrapping_neg();

/// Opens a sealed object stored under `name`, expecting `kind`. Never returns wrong data: any
/// change to the bytes, the name, or the key yields an error.
pub fn open(
    keys: &KeyRing,
    kind: ObjectKind,
    name: &str,
    mut bytes: Vec<u8>,
) -> Result<Vec<u8>, SealError> {
    let opened = decrypt_in_place(keys, kind, name, &mut bytes)?;
    if !opened.compressed {
        bytes.truncate(SEALED_HEADER_LEN + opened.plain_len);
        bytes.drain(..SEALED_HEADER_LEN);
        return Ok(bytes);
    }
    // Decompress into spare capacity (no zero-fill); zstd stops at the capacity, so a frame
    // that inflates past the recorded length fails instead of allocating more.
    let mut out: Vec<u8> = Vec::with_capacity(opened.plain_len);
    let got = DECOMPRESSOR.with(|d| d.borrow_mut().decompress(&mut out, opened.payload(&bytes)));
    check_inflated(name, got, opened.plain_len)?;
    Ok(out)
}

/// Opens like [`open`], writing the plaintext to the front of `out` (a caller's reusable, for
/// example aligned, buffer) instead of a new allocation. Returns the plaintext's length; an
/// `out` shorter than the recorded length is a [`SealError::BadPayload`].
pub fn open_into(
    keys: &KeyRing,
    kind: ObjectKind,
    name: &str,
    mut bytes: Vec<u8>,
    out: &mut [u8],
) -> Result<usize, SealError> {
    let opened = decrypt_in_place(keys, kind, name, &mut bytes)?;
    let n = opened.plain_len;
    let Some(dest) = out.get_mut(..n) else {
        return Err(SealError::BadPayload {
            name: name.to_string(),
            reason: format!("{n} bytes do not fit a buffer of {}", out.len()),
        });
    };
    if opened.compressed {
        let got = DECOMPRESSOR.with(|d| d.borrow_mut().decompress(dest, opened.payload(&bytes)));
        check_inflated(name, got, n)?;
    } else {
        dest.copy_from_slice(opened.payload(&bytes));
    }
    Ok(n)
}

/// What [`decrypt_in_place`] found: the payload between the header and the tag.
struct Opened {
    compressed: bool,
    plain_len: usize,
    payload_end: usize,
}

impl Opened {
    fn payload<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        &bytes[SEALED_HEADER_LEN..self.payload_end]
    }
}

/// Checks the header, then authenticates and decrypts the payload in place. An uncompressed
/// payload is checked against the recorded length here; a compressed one by its decompression.
fn decrypt_in_place(
    keys: &KeyRing,
    kind: ObjectKind,
    name: &str,
    bytes: &mut [u8],
) -> Result<Opened, SealError> {
    let n = || name.to_string();
    if bytes.len() < SEALED_HEADER_LEN + SEALED_TAG_LEN {
        return Err(SealError::Truncated {
            name: n(),
            len: bytes.len(),
        });
    }
    let mut header = [0u8; SEALED_HEADER_LEN];
    header.copy_from_slice(&bytes[..SEALED_HEADER_LEN]);
    if header[0..4] != SEALED_MAGIC {
        return Err(SealError::BadMagic { name: n() });
    }
    if header[4] != SEALED_VERSION {
        return Err(SealError::UnsupportedVersion {
            name: n(),
            version: header[4],
        });
    }
    if header[5] != kind as u8 {
        return Err(SealError::WrongKind {
            name: n(),
            expected: kind,
            found: header[5],
        });
    }
    let flags = header[6];
    if flags & !FLAG_ZSTD != 0 || header[7] != 0 {
        return Err(SealError::BadFlags { name: n(), flags });
    }
    let key_id = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    let cipher = keys
        .cipher(key_id)
        .ok_or(SealError::UnknownKey { name: n(), key_id })?;
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&header[12..24]);
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&header[24..32]);
    let plain_len = u64::from_le_bytes(len8);
    if plain_len > MAX_SEALED_PLAINTEXT {
        return Err(SealError::TooLarge {
            name: n(),
            len: plain_len,
        });
    }
    let tag_at = bytes.len() - SEALED_TAG_LEN;
    let mut tag = [0u8; SEALED_TAG_LEN];
    tag.copy_from_slice(&bytes[tag_at..]);
    let aad = associated_data(&header, name);
    decrypt(
        &cipher,
        &nonce,
        &aad,
        &mut bytes[SEALED_HEADER_LEN..tag_at],
        &tag,
    )
    .map_err(|_| SealError::TagMismatch { name: n() })?;
    // plain_len ≤ MAX_SEALED_PLAINTEXT (64 MiB) fits usize on every supported target.
    let plain_len = plain_len as usize;
    let compressed = flags & FLAG_ZSTD != 0;
    if !compressed && tag_at - SEALED_HEADER_LEN != plain_len {
        return Err(SealError::BadPayload {
            name: n(),
            reason: format!(
                "{} bytes stored, {plain_len} recorded",
                tag_at - SEALED_HEADER_LEN
            ),
        });
    }
    Ok(Opened {
        compressed,
        plain_len,
        payload_end: tag_at,
    })
}

/// A decompression's outcome against the recorded plaintext length.
fn check_inflated(
    name: &str,
    got: zstd::zstd_safe::SafeResult,
    plain_len: usize,
) -> Result<(), SealError> {
    match got {
        Ok(k) if k == plain_len => Ok(()),
        Ok(k) => Err(SealError::BadPayload {
            name: name.to_string(),
            reason: format!("{k} bytes instead of {plain_len}"),
        }),
        Err(code) => Err(SealError::BadPayload {
            name: name.to_string(),
            reason: zstd::zstd_safe::get_error_name(code).to_string(),
        }),
    }
}

fn header_bytes(
    kind: ObjectKind,
    flags: u8,
    key_id: u32,
    nonce: &[u8; 12],
    plain_len: u64,
) -> [u8; SEALED_HEADER_LEN] {
    let mut h = [0u8; SEALED_HEADER_LEN];
    h[0..4].copy_from_slice(&SEALED_MAGIC);
    h[4] = SEALED_VERSION;
    h[5] = kind as u8;
    h[6] = flags;
    h[8..12].copy_from_slice(&key_id.to_le_bytes());
    h[12..24].copy_from_slice(nonce);
    h[24..32].copy_from_slice(&plain_len.to_le_bytes());
    h
}

fn associated_data(header: &[u8; SEALED_HEADER_LEN], name: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(SEALED_HEADER_LEN + name.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(name.as_bytes());
    aad
}

fn encrypt(
    cipher: &Aes256Gcm,
    nonce: &[u8; 12],
    aad: &[u8],
    buf: &mut [u8],
) -> [u8; SEALED_TAG_LEN] {
    let nonce = Nonce::from(*nonce);
    // Encryption with a valid key cannot fail for buffers under GCM's 64 GiB limit; our objects
    // are bounded by MAX_SEALED_PLAINTEXT.
    match cipher.encrypt_inout_detached(&nonce, aad, buf.into()) {
        Ok(tag) => tag.into(),
        Err(_) => unreachable!("AES-GCM encryption of a bounded buffer"),
    }
}

fn decrypt(
    cipher: &Aes256Gcm,
    nonce: &[u8; 12],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; SEALED_TAG_LEN],
) -> Result<(), ()> {
    let nonce = Nonce::from(*nonce);
    let tag = aes_gcm::Tag::from(*tag);
    cipher
        .decrypt_inout_detached(&nonce, aad, buf.into(), &tag)
        .map_err(|_| ())
}

thread_local! {
    // zstd contexts are expensive to create (~100 KiB of tables); one per worker thread.
    static COMPRESSOR: std::cell::RefCell<(zstd::bulk::Compressor<'static>, Vec<u8>)> =
        std::cell::RefCell::new((zstd::bulk::Compressor::new(1).unwrap_or_else(|_| unreachable!("zstd context")), Vec::new()));
    // One context for opening objects and for inflating agents' payloads before they are
    // sealed as they are: both decode the same way.
    static DECOMPRESSOR: std::cell::RefCell<zstd::zstd_safe::DCtx<'static>> = std::cell::RefCell::new({
        let mut d = zstd::zstd_safe::DCtx::try_create().unwrap_or_else(|| unreachable!("zstd context"));
        let _ = d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX));
        d
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(n: usize) -> Vec<u8> {
        (0..n).map(|i| b"the quick brown fox "[i % 20]).collect()
    }

    #[test]
    fn round_trip_compressed_and_not() {
        let keys = KeyRing::random();
        let t = text(100_000);
        let s = seal(&keys, ObjectKind::Chunk, "chunks/a", &t, Some(1)).unwrap();
        assert!(s.compressed && s.bytes.len() < 10_000);
        assert_eq!(
            open(&keys, ObjectKind::Chunk, "chunks/a", s.bytes).unwrap(),
            t
        );
        let mut rnd = vec![0u8; 70_000];
        crate::util::fill_random(&mut rnd);
        let s = seal(&keys, ObjectKind::Chunk, "chunks/b", &rnd, Some(1)).unwrap();
        assert!(!s.compressed, "random data must be stored raw");
        assert_eq!(
            open(&keys, ObjectKind::Chunk, "chunks/b", s.bytes).unwrap(),
            rnd
        );
        let s = seal(&keys, ObjectKind::Record, "r", b"", None).unwrap();
        assert_eq!(open(&keys, ObjectKind::Record, "r", s.bytes).unwrap(), b"");
    }

    #[test]
    fn open_into_fills_the_callers_buffer_and_refuses_one_too_short() {
        let keys = KeyRing::random();
        let t = text(100_000);
        let mut rnd = vec![0u8; 70_000];
        crate::util::fill_random(&mut rnd);
        for (plain, name) in [(&t, "chunks/a"), (&rnd, "chunks/b")] {
            let s = seal(&keys, ObjectKind::Chunk, name, plain, Some(1)).unwrap();
            let mut out = vec![0xAAu8; plain.len() + 100];
            let n = open_into(&keys, ObjectKind::Chunk, name, s.bytes.clone(), &mut out).unwrap();
            assert_eq!((n, &out[..n]), (plain.len(), &plain[..]));
            assert!(
                out[n..].iter().all(|&b| b == 0xAA),
                "nothing written past the plaintext"
            );
            let mut short = vec![0u8; plain.len() - 1];
            assert!(matches!(
                open_into(&keys, ObjectKind::Chunk, name, s.bytes.clone(), &mut short),
                Err(SealError::BadPayload { .. })
            ));
            let mut bad = s.bytes;
            bad[SEALED_HEADER_LEN + 3] ^= 1;
            assert!(matches!(
                open_into(&keys, ObjectKind::Chunk, name, bad, &mut out),
                Err(SealError::TagMismatch { .. })
            ));
        }
    }

    #[test]
    fn nonces_are_fresh() {
        let keys = KeyRing::random();
        let a = seal(&keys, ObjectKind::Chunk, "n", b"same", None)
            .unwrap()
            .bytes;
        let b = seal(&keys, ObjectKind::Chunk, "n", b"same", None)
            .unwrap()
            .bytes;
        assert_ne!(a[12..24], b[12..24]);
        assert_ne!(a, b);
    }

    #[test]
    fn every_flipped_byte_fails() {
        let keys = KeyRing::random();
        let t = text(3000);
        for compress in [None, Some(1)] {
            let good = seal(&keys, ObjectKind::Chunk, "chunks/x", &t, compress)
                .unwrap()
                .bytes;
            for i in 0..good.len() {
                let mut bad = good.clone();
                bad[i] ^= 0x40;
                assert!(
                    open(&keys, ObjectKind::Chunk, "chunks/x", bad).is_err(),
                    "flip at {i} accepted"
                );
            }
        }
    }

    #[test]
    fn truncation_rename_kind_and_key_fail() {
        let keys = KeyRing::random();
        let good = seal(&keys, ObjectKind::Chunk, "chunks/x", &text(5000), Some(1))
            .unwrap()
            .bytes;
        for cut in [0, 10, 31, 47, good.len() - 1] {
            assert!(open(&keys, ObjectKind::Chunk, "chunks/x", good[..cut].to_vec()).is_err());
        }
        assert_eq!(
            open(&keys, ObjectKind::Chunk, "chunks/y", good.clone()),
            Err(SealError::TagMismatch {
                name: "chunks/y".into()
            })
        );
        assert!(matches!(
            open(&keys, ObjectKind::Record, "chunks/x", good.clone()),
            Err(SealError::WrongKind { .. })
        ));
        let other = KeyRing::random();
        assert!(matches!(
            open(&other, ObjectKind::Chunk, "chunks/x", good),
            Err(SealError::TagMismatch { .. })
        ));
    }

    #[test]
    fn rotated_ring_reads_old_objects() {
        let k1 = crate::chunk::keys::random_key();
        let k2 = crate::chunk::keys::random_key();
        let old = KeyRing::from_masters(&[(1, k1)], 1).unwrap();
        let new = KeyRing::from_masters(&[(1, k1), (2, k2)], 2).unwrap();
        let o = seal(&old, ObjectKind::Chunk, "c", b"old data", None)
            .unwrap()
            .bytes;
        let n = seal(&new, ObjectKind::Chunk, "c", b"new data", None)
            .unwrap()
            .bytes;
        assert_eq!(open(&new, ObjectKind::Chunk, "c", o).unwrap(), b"old data");
        assert_eq!(n[8..12], 2u32.to_le_bytes());
        assert!(matches!(
            open(&old, ObjectKind::Chunk, "c", n),
            Err(SealError::UnknownKey { key_id: 2, .. })
        ));
    }

    #[test]
    fn zstd_bomb_is_bounded() {
        // A validly sealed object whose header claims a small length but whose payload inflates
        // to far more: decompression must stop at the claimed length and report corruption.
        let keys = KeyRing::random();
        let big = vec![0u8; 8 * 1024 * 1024];
        let bomb = zstd::bulk::compress(&big, 19).unwrap();
        let (key_id, cipher) = keys.seal_cipher().unwrap();
        let nonce = [3u8; 12];
        let header = header_bytes(ObjectKind::Chunk, FLAG_ZSTD, key_id, &nonce, 4096);
        let mut body = bomb.clone();
        let tag = encrypt(&cipher, &nonce, &associated_data(&header, "b"), &mut body);
        let mut obj = header.to_vec();
        obj.extend_from_slice(&body);
        obj.extend_from_slice(&tag);
        assert!(matches!(
            open(&keys, ObjectKind::Chunk, "b", obj),
            Err(SealError::BadPayload { .. })
        ));
    }

    /// Writes seeds for the `sealed` fuzz target into `$SEALED_SEED_DIR` and for
    /// `sealed_roundtrip` into `$SEALED_ROUNDTRIP_SEED_DIR` (fuzz/seed.sh), with the fuzz
    /// crate's fixed key ring (master keys 0x11 × 32 as id 1, 0x22 × 32 as id 2, 2 active).
    /// First byte: the kind's index (kind − 1); bit 7 set = re-tagged mode, whose seeds are a
    /// header and a payload before encryption.
    #[test]
    #[ignore = "writes fuzz seeds; run through fuzz/seed.sh"]
    fn write_fuzz_seeds() {
        let tmp = tempfile::tempdir().unwrap();
        let dir_of = |var: &str, sub: &str| {
            let d = std::env::var_os(var)
                .map_or_else(|| tmp.path().join(sub), std::path::PathBuf::from);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let sealed_dir = dir_of("SEALED_SEED_DIR", "sealed");
        let roundtrip_dir = dir_of("SEALED_ROUNDTRIP_SEED_DIR", "roundtrip");
        let keys = KeyRing::from_masters(&[(1, [0x11; 32]), (2, [0x22; 32])], 2).unwrap();
        let extents = crate::journal::encode_extents(&[
            crate::journal::Extent {
                disk_offset: 4096,
                length: 512,
                log_offset: 0,
            },
            crate::journal::Extent {
                disk_offset: 1 << 20,
                length: 65536,
                log_offset: 512,
            },
        ]);
        let plains: [(&str, Vec<u8>); 4] = [
            ("empty", Vec::new()),
            ("text", text(3000)),
            ("bytes", (0..=255u8).collect()),
            ("extents", extents),
        ];
        for kind in ObjectKind::ALL {
            let index = kind as u8 - 1;
            for (what, plain) in &plains {
                for level in [None, Some(1)] {
                    let s = seal(&keys, kind, "fuzz/object", plain, level).unwrap();
                    assert_eq!(
                        open(&keys, kind, "fuzz/object", s.bytes.clone()).unwrap(),
                        *plain
                    );
                    let tag = if s.compressed { "zstd" } else { "plain" };
                    let mut raw = vec![index];
                    raw.extend_from_slice(&s.bytes);
                    std::fs::write(sealed_dir.join(format!("{index}-{what}-{tag}")), raw).unwrap();

                    let payload = if s.compressed {
                        zstd::bulk::compress(plain, 1).unwrap()
                    } else {
                        plain.clone()
                    };
                    let flags = if s.compressed { FLAG_ZSTD } else { 0 };
                    let mut retag = vec![0x80 | index];
                    retag.extend_from_slice(&header_bytes(
                        kind,
                        flags,
                        2,
                        &[9; 12],
                        plain.len() as u64,
                    ));
                    retag.extend_from_slice(&payload);
                    let name = format!("retag-{index}-{what}-{tag}");
                    std::fs::write(sealed_dir.join(name), retag).unwrap();

                    let mut rt = vec![index | if level.is_some() { 0x10 } else { 0 }];
                    rt.extend_from_slice(&[40, 0, 0, 0, 0x01]);
                    rt.extend_from_slice(plain);
                    let name = format!("{index}-{what}-{tag}");
                    std::fs::write(roundtrip_dir.join(name), rt).unwrap();
                }
            }
        }
    }
}
