//! drvault (design document: being written)
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod bench;
pub mod chunk;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod failover;
pub mod file_formats;
pub mod format;
pub mod jobs;
pub mod protection;
pub mod replica;
pub mod server;
pub mod store;
pub mod util;
pub mod vault;
