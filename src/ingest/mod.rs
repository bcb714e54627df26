//! Ingest: what hosts send. [`blocks`] takes a disk's initial replication (block uploads with
//! their receipts, resume queries, completion into the disk's base map, finalizing the VM);
//! [`logs`] takes the MS-HRL change log of every later replication cycle (stored as frames,
//! validated, chained, appended to the disk's journal); [`wire`] decodes upload bodies
//! (identity or zstd, inflated with a hard bound).
//!
//! [`Ingest`] holds a [`Catalog`] handle and only the state it uses: the open initial-replication
//! sessions and the opened-frame cache log validation shares with the point readers. It asks
//! the damage register whether a block must be stored again (a heal), and the resync service to
//! open a session when a log breaks the chain or pending log data grows past half the disk.

pub mod blocks;
pub mod logs;
pub mod wire;

pub use blocks::{BlockAck, CompleteRequest, QueryBlock, ReceivedQuery, MAX_QUERY_BLOCKS};
pub use logs::{LogAck, LogBody, LogMeta};

use crate::catalog::Catalog;
use crate::replica::damage::DamageRegister;
use crate::replica::resync::Resyncs;
use crate::tasks::Tasks;

/// Largest change log accepted by default (bytes).
pub const DEFAULT_MAX_LOG_BYTES: u64 = 64 << 30;

/// The ingest service. Cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    catalog: Catalog,
    damage: DamageRegister,
    resyncs: Resyncs,
    tasks: Tasks,
    sessions: blocks::ReceivingSessions,
    /// Opened log frames, shared with the point readers.
    frames: crate::journal::FrameCache,
    max_log_bytes: u64,
}

impl Ingest {
    pub fn new(
        catalog: Catalog,
        damage: DamageRegister,
        resyncs: Resyncs,
        frames: crate::journal::FrameCache,
        tasks: Tasks,
    ) -> Ingest {
        let sessions = blocks::ReceivingSessions::default();
        // Another server may have taken receipts while it held the VM: rebuild from the vault.
        let s = sessions.clone();
        catalog.on_take(move |vm_id| {
            let s = s.clone();
            Box::pin(async move { s.forget_vm(&vm_id).await })
        });
        Ingest {
            catalog,
            damage,
            resyncs,
            tasks,
            sessions,
            frames,
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
        }
    }

    /// Largest change log accepted (bytes); larger uploads get 413.
    pub fn with_max_log_bytes(mut self, max: u64) -> Ingest {
        self.max_log_bytes = max;
        self
    }
}
