//! Block-map loading (`replica::blockmap::BlockMap::load`): root and segment plaintexts as the
//! fuzzer makes them, sealed into a fresh in-memory store under their content-derived names,
//! then loaded through the vault's own code.
//!
//! Input: u16 LE root length, the root plaintext, then segments, each a u16 LE length and its
//! bytes. Root slot s (bytes 32+32s..64+32s) that is not all zero is rewritten to the derived
//! name of segment s when there is one (names are keyed digests the fuzzer cannot guess), and
//! otherwise left to name a missing object.
//!
//! A map that loads must have one entry per block of its geometry and survive save + load.
#![no_main]

use std::sync::{Arc, OnceLock};

use drvault::chunk::{ChunkName, ChunkStore, CpuPool, KeyRing};
use drvault::file_formats::ObjectKind;
use drvault::replica::blockmap::{block_count, BlockMap};
use drvault::store::Store;
use drvault::vault::layout;
use drvault_fuzz::{KEY_1, KEY_2};
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"))
    })
}

fn split_u16(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = data.split_first_chunk::<2>()?;
    let n = usize::from(u16::from_le_bytes(*len)).min(rest.len());
    Some(rest.split_at(n))
}

fuzz_target!(|data: &[u8]| {
    let Some((root, mut rest)) = split_u16(data) else {
        return;
    };
    let mut segments = Vec::new();
    while let Some((seg, r)) = split_u16(rest) {
        segments.push(seg.to_vec());
        rest = r;
    }
    let keys = Arc::new(
        KeyRing::from_masters(&[(1, KEY_1), (2, KEY_2)], 2).unwrap_or_else(|| panic!("keys")),
    );
    let store = Store::open("memory://", &[]).unwrap_or_else(|e| panic!("store: {e}"));
    let cs = ChunkStore::new(store, keys.clone(), CpuPool::new(1), 1);
    let name_key = *keys.name_key();
    runtime().block_on(async {
        let mut root = root.to_vec();
        for (s, seg) in segments.iter().enumerate() {
            let name = ChunkName::derive_meta(&name_key, "map-segment", seg);
            let at = 32 + 32 * s;
            if let Some(slot) = root.get_mut(at..at + 32) {
                if slot.iter().any(|&b| b != 0) {
                    slot.copy_from_slice(&name.0);
                }
            }
            cs.put_sealed_if_absent(
                ObjectKind::MapSegment,
                &layout::map_object(&name),
                seg.clone(),
                true,
            )
            .await
            .unwrap_or_else(|e| panic!("put segment: {e}"));
        }
        let root_name = ChunkName::derive_meta(&name_key, "map-root", &root);
        cs.put_sealed_if_absent(
            ObjectKind::MapRoot,
            &layout::map_object(&root_name),
            root,
            true,
        )
        .await
        .unwrap_or_else(|e| panic!("put root: {e}"));
        let Ok(map) = BlockMap::load(&cs, &root_name).await else {
            return;
        };
        assert_eq!(map.len(), block_count(map.disk_size(), map.block_size()));
        let saved = map.save(&cs).await.unwrap_or_else(|e| panic!("save: {e}"));
        let back = BlockMap::load(&cs, &saved)
            .await
            .unwrap_or_else(|e| panic!("saved map does not load: {e}"));
        assert!(back == map, "save + load changed the map");
    });
});
