//! MS-HRL reader over arbitrary bytes: it must refuse or accept without panicking, and any log
//! it accepts must apply completely, inside the disk, from the same bytes.
#![no_main]

use drvault::format::hrl::{apply, read_log};
use libfuzzer_sys::fuzz_target;

const DISK_SIZE: u64 = 1 << 40;

fuzz_target!(|data: &[u8]| {
    if let Ok(log) = read_log(data, DISK_SIZE) {
        let applied = apply(&log, data, |disk_offset, bytes| {
            assert!(disk_offset + bytes.len() as u64 <= DISK_SIZE);
            Ok(())
        });
        assert!(applied.is_ok(), "validated log failed to apply: {applied:?}");
    }
});
