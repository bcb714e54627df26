//! VHDX reader (headers, region tables, metadata, BAT, and the in-memory log replay) over a
//! sparse in-memory file (see the fuzz crate's lib.rs). Any disk the reader accepts must keep
//! its promises (`drvault_fuzz::check_disk`).
#![no_main]

use std::sync::Arc;

use drvault::format::vhdx::VhdxDisk;
use drvault_fuzz::{check_disk, SparseImage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(image) = SparseImage::decode(data) else {
        return;
    };
    let Ok(disk) = VhdxDisk::open(Arc::new(image)) else {
        return;
    };
    let ranges = disk.allocated_ranges();
    check_disk(disk.virtual_size(), &ranges, |buf, at| {
        disk.read_at(buf, at)
    });
});
