//! Replicas: what a protected disk holds and everything that reads or rewrites it.
//!
//! * [`blockmap`]: the base block map (a disk's content at one point), two-level and
//!   content-addressed, whose entries may be layered (a base plus pieces); [`pieces`]: the
//!   pieces merge stores for blocks that changed in part, sealed and packed many to an object;
//!   [`patch`]: the block patches resync and failback send.
//! * [`stage`]: receipts of blocks received for a map not committed yet (initial replication,
//!   resync).
//! * [`points`]: recovery points, point readers ([`point`]), merge, and the switch to a
//!   snapshot (resync, failback) — the [`Replicas`] service.
//! * [`resync`]: resynchronization sessions — the [`resync::Resyncs`] service.
//! * [`damage`]: the damage register verify writes and the read path consults.
//!
//! [`Replicas`] holds a [`Catalog`] handle and the caches of the read path: block maps by root,
//! point readers, the pins that keep a merge from deleting logs under a reader, and the merge's
//! per-disk retry record.

pub mod blockmap;
pub mod damage;
pub mod patch;
pub mod pieces;
pub mod point;
pub mod points;
pub mod resync;
pub mod stage;
pub mod sync;

pub use blockmap::{BlockMap, MapEntry};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::catalog::Catalog;
use crate::tasks::{RetryBook, Tasks};
use damage::DamageRegister;

/// First wait before a disk whose background merge failed is tried again; it doubles per
/// failure up to [`MERGE_RETRY_CAP`].
pub const MERGE_RETRY_FIRST: Duration = Duration::from_secs(60);
pub const MERGE_RETRY_CAP: Duration = Duration::from_secs(3600);

/// Points, point readers and merge. Cheap to clone.
#[derive(Clone)]
pub struct Replicas {
    catalog: Catalog,
    damage: DamageRegister,
    tasks: Tasks,
    /// Opened log frames, shared with log validation.
    frames: crate::journal::FrameCache,
    /// Recently read block maps by root name (immutable objects, so never stale).
    maps: Arc<tokio::sync::Mutex<HashMap<String, Arc<BlockMap>>>>,
    /// Point readers by (vm id, disk id, cycle, base map root).
    readers: points::ReaderCache,
    /// The pins of every point reader handed out or being built, by (vm id, disk id): a merge
    /// deletes the logs it folded in only once the readers pinned before it are gone.
    reader_pins: points::ReaderPins,
    /// What the pinned readers read through, kept by garbage collection.
    reader_refs: points::ReaderRefs,
    /// Background merge failures by (vm, disk).
    merge_retries: RetryBook<(String, String)>,
}

impl Replicas {
    pub fn new(
        catalog: Catalog,
        damage: DamageRegister,
        frames: crate::journal::FrameCache,
        tasks: Tasks,
    ) -> Replicas {
        Replicas {
            catalog,
            damage,
            tasks,
            frames,
            maps: Default::default(),
            readers: Default::default(),
            reader_pins: Default::default(),
            reader_refs: Default::default(),
            merge_retries: RetryBook::new(MERGE_RETRY_FIRST, MERGE_RETRY_CAP),
        }
    }

    /// The damage register the read path consults.
    pub fn damage(&self) -> &DamageRegister {
        &self.damage
    }
}
