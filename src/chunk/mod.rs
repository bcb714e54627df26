//! Chunks: blocks of disk content, named by a keyed digest, compressed where it helps, sealed
//! with AES-256-GCM, stored once.
//!
//! * [`digest`] is the only place object names are computed.
//! * [`seal`] frames a payload as a sealed object and opens it again (tag, then content checks).
//! * [`fence`] keeps garbage collection from deleting what an upload is about to reference.
//! * [`keys`] holds the key ring derived from the vault's master keys.
//! * [`pipeline`] runs hash → compress → seal → put-if-absent on a bounded CPU pool.

pub mod digest;
pub mod fence;
pub mod keys;
pub mod pipeline;
pub mod seal;

pub use digest::{ChunkName, PlainHash};
pub use keys::KeyRing;
pub use pipeline::{BlockPut, ChunkStore, CpuPool};
pub use seal::SealError;
