//! Replicas: what a protected disk holds. The base block map (a disk's content at one point),
//! reading a disk at a recovery point (base map plus journal), and the block patches resync and
//! failback send.

pub mod blockmap;
pub mod patch;
pub mod point;

pub use blockmap::{BlockMap, MapEntry};
