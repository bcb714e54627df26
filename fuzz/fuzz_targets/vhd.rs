//! VHD reader (footer, dynamic header, BAT, sector bitmaps, differencing parent locators) over
//! a sparse in-memory file (see the fuzz crate's lib.rs). A differencing disk's parent is
//! looked for in a directory holding one fixed disk, `parent.vhd`, which the seeds name. Any
//! disk the reader accepts must keep its promises (`drvault_fuzz::check_disk`).
#![no_main]

use std::sync::Arc;

use drvault::format::vhd::VhdDisk;
use drvault_fuzz::{check_disk, parent_dir, SparseImage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(image) = SparseImage::decode(data) else {
        return;
    };
    let Ok(disk) = VhdDisk::open(Arc::new(image), Some(parent_dir())) else {
        return;
    };
    let size = disk.virtual_size();
    assert!(size > 0 && size % 512 == 0, "virtual size {size}");
    let ranges = disk
        .allocated_ranges()
        .unwrap_or_else(|e| panic!("accepted disk has no allocated ranges: {e}"));
    check_disk(size, &ranges, |buf, at| disk.read_at(buf, at));
});
