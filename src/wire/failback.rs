//! Failback: what the agent is told per disk, range downloads, the failback record, commit.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailbackCommitRequest {
    /// Commit even if a disk was not synchronized (its on-premises copy is stale).
    #[serde(default)]
    pub force: bool,
}

/// What the agent is told about one disk to fail back.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FailbackDiskView {
    pub failover: String,
    pub point: Option<String>,
    pub size: u64,
    pub block_size: u32,
    pub blocks: u64,
}

/// Ranges of one target block to download.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RangeRequest {
    pub block: u64,
    #[schema(schema_with = super::pair_schemas::u32_ranges)]
    pub ranges: Vec<(u32, u32)>,
}

/// The vault's record of a VM's failback.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct FailbackRecord {
    pub vm: String,
    pub failover: String,
    /// Disks the agent brought up to date: digest of the target at that time.
    pub synced: BTreeMap<String, SyncedDisk>,
    pub committed_unix: Option<u64>,
    pub cycle: Option<u64>,
    pub job: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SyncedDisk {
    pub digest: String,
    pub synced_unix: u64,
}
