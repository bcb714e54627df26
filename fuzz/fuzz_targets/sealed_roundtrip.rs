//! Seal, then open, the fuzzer's plaintext with the fixed key ring; then damage the object.
//! Input: byte 0 = kind (bits 0..2) and compression (bits 4..5: 0 none, else zstd level
//! 1..3); bytes 1..5 = a flip position (u32 LE, taken modulo the object length); byte 5 = the
//! bit mask to flip (0 is taken as 1); the rest is the plaintext.
//!
//! Properties: the object opens to the same plaintext; it does not open under another name
//! or as another kind; with any one byte changed it does not open at all. The `sealed`
//! target's re-tagged mode is what reaches the content checks behind the tag with hostile
//! payloads; this one checks the integrity promise on real objects.
#![no_main]

use drvault::chunk::seal::{open, seal, SealError};
use drvault::file_formats::ObjectKind;
use drvault_fuzz::{keys, OBJECT_NAME};
use libfuzzer_sys::fuzz_target;

const KINDS: [ObjectKind; 6] = ObjectKind::ALL;

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let kind = KINDS[usize::from(data[0] & 0x07) % KINDS.len()];
    let other = KINDS[(usize::from(data[0] & 0x07) + 1) % KINDS.len()];
    let level = match (data[0] >> 4) & 0x03 {
        0 => None,
        l => Some(i32::from(l)),
    };
    let flip_at = u32::from_le_bytes([data[1], data[2], data[3], data[4]]) as usize;
    let mask = data[5].max(1);
    let plain = &data[6..];

    let sealed = seal(keys(), kind, OBJECT_NAME, plain, level).expect("a fuzz run seals far fewer objects than one key allows");
    assert_eq!(
        open(keys(), kind, OBJECT_NAME, sealed.bytes.clone()).as_deref(),
        Ok(plain),
        "round trip"
    );
    assert!(matches!(
        open(keys(), kind, "fuzz/elsewhere", sealed.bytes.clone()),
        Err(SealError::TagMismatch { .. })
    ));
    assert!(matches!(
        open(keys(), other, OBJECT_NAME, sealed.bytes.clone()),
        Err(SealError::WrongKind { .. })
    ));
    let mut damaged = sealed.bytes;
    let at = flip_at % damaged.len();
    damaged[at] ^= mask;
    let r = open(keys(), kind, OBJECT_NAME, damaged);
    assert!(r.is_err(), "object with byte {at} changed still opens");
});
