//! Replicas: what a protected disk holds. For now the base block map (a disk's content at one
//! point); the journal of change logs and recovery points stack on it.

pub mod blockmap;
pub mod point;

pub use blockmap::{BlockMap, MapEntry};
