//! Sealed-object opening (`chunk::seal::open`) with a fixed key ring, in two modes chosen by
//! the first input byte (bits 0..2: the expected object kind; bit 7: mode):
//!
//! - raw (bit 7 clear): the rest is a stored object, opened as is. This covers every check
//!   before the tag (length, magic, version, kind, flags, reserved byte, key id, claimed
//!   length) and the tag itself; seeds are objects sealed with the same keys.
//! - re-tagged (bit 7 set): the rest is a 32-byte header followed by a payload, both taken as
//!   the fuzzer made them; the target encrypts the payload and computes the GCM tag over
//!   them with the header's key (as only a key holder could), so opening gets past the tag
//!   into the content checks: zstd frames of any shape, claimed lengths that lie either way.
//!
//! What opens must match what was sealed; a well-formed uncompressed object must open.
//! Opened plaintext then goes through the parser the vault uses on that kind of object.
#![no_main]

use aes_gcm::aead::AeadInOut;
use aes_gcm::Nonce;
use drvault::chunk::seal::open;
use drvault::file_formats::{
    ObjectKind, FLAG_ZSTD, MAX_SEALED_PLAINTEXT, SEALED_HEADER_LEN, SEALED_MAGIC, SEALED_VERSION,
};
use drvault_fuzz::{keys, OBJECT_NAME};
use libfuzzer_sys::fuzz_target;

const KINDS: [ObjectKind; 6] = ObjectKind::ALL;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let kind = KINDS[usize::from(sel & 0x07) % KINDS.len()];
    if sel & 0x80 == 0 {
        if let Ok(plain) = open(keys(), kind, OBJECT_NAME, rest.to_vec()) {
            after_open(kind, &plain);
        }
        return;
    }
    if rest.len() < SEALED_HEADER_LEN {
        return;
    }
    let (header, body) = rest.split_at(SEALED_HEADER_LEN);
    let key_id = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
    let cipher = keys()
        .cipher(key_id)
        .or_else(|| keys().cipher(keys().active_id()))
        .unwrap_or_else(|| unreachable!("the active key is in the ring"));
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(&header[12..24]);
    let mut aad = header.to_vec();
    aad.extend_from_slice(OBJECT_NAME.as_bytes());
    let mut object = rest.to_vec();
    let tag = match cipher.encrypt_inout_detached(
        &Nonce::from(nonce),
        &aad,
        (&mut object[SEALED_HEADER_LEN..]).into(),
    ) {
        Ok(tag) => tag,
        Err(_) => return,
    };
    object.extend_from_slice(&tag);

    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&header[24..32]);
    let claimed = u64::from_le_bytes(len8);
    let well_formed = header[0..4] == SEALED_MAGIC
        && header[4] == SEALED_VERSION
        && header[5] == kind as u8
        && header[6] & !FLAG_ZSTD == 0
        && header[7] == 0
        && keys().cipher(key_id).is_some()
        && claimed <= MAX_SEALED_PLAINTEXT;
    match open(keys(), kind, OBJECT_NAME, object) {
        Ok(plain) => {
            assert!(well_formed, "opened an object with a bad header");
            assert_eq!(
                plain.len() as u64,
                claimed,
                "plaintext length differs from the header"
            );
            if header[6] & FLAG_ZSTD == 0 {
                assert!(plain == body, "uncompressed payload changed");
            }
            after_open(kind, &plain);
        }
        Err(e) => assert!(
            !(well_formed && header[6] == 0 && body.len() as u64 == claimed),
            "well-formed uncompressed object refused: {e}"
        ),
    }
});

/// The parsing the vault does on opened plaintext of each kind, where it is a pure function.
fn after_open(kind: ObjectKind, plain: &[u8]) {
    if kind == ObjectKind::LogFrame {
        // Extent lists are stored as log-frame objects.
        if let Some(ext) = drvault::journal::decode_extents(plain) {
            assert_eq!(drvault::journal::encode_extents(&ext), plain);
        }
    }
}
