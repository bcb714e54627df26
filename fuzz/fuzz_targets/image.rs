//! Content detection and the common image interface (`format::image::open_reader`): raw, VHD
//! (with the fuzz parent directory) or VHDX from a sparse in-memory file (see the fuzz crate's
//! lib.rs). The detected format must follow the documented magic rules, and any image that
//! opens must keep its promises (`drvault_fuzz::check_disk`).
#![no_main]

use std::sync::Arc;

use drvault::format::image::{open_reader, ImageFormat};
use drvault::format::ReadAt;
use drvault_fuzz::{check_disk, parent_dir, SparseImage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some(image) = SparseImage::decode(data) else {
        return;
    };
    let len = image.len().unwrap_or(0);
    let mut head = [0u8; 8];
    let head_ok = image.read_exact_at(&mut head, 0).is_ok();
    let image = Arc::new(image);
    let Ok(img) = open_reader(image.clone(), Some(parent_dir())) else {
        return;
    };
    match img.format() {
        ImageFormat::Raw => {
            assert!(!(head_ok && (&head == b"vhdxfile" || &head == b"conectix")));
            assert_eq!(img.virtual_size(), len);
        }
        ImageFormat::VhdxFixed | ImageFormat::VhdxDynamic => {
            assert!(head_ok && &head == b"vhdxfile")
        }
        _ => assert!(head_ok && &head != b"vhdxfile"),
    }
    let ranges = img
        .allocated_ranges()
        .unwrap_or_else(|e| panic!("opened image has no allocated ranges: {e}"));
    check_disk(img.virtual_size(), &ranges, |buf, at| img.read_at(buf, at));
});
