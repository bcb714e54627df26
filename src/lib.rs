//! drvault: the storage side of Hyper-V-style disaster-recovery replication.
//!
//! (The full design document is being written; see DESIGN notes in the repository.)
#![forbid(unsafe_code)]

pub mod format;
pub mod store;
