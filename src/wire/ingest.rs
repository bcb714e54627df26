//! Initial replication and change logs (agent routes): block acks, resume queries, completion,
//! log uploads.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// The answer to a resume query: the blocks the server still needs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MissingBlocks {
    pub missing: Vec<u64>,
}

/// Query of a log upload (`PUT .../logs/{log_id}`).
#[derive(Debug, Clone, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    pub cycle: Option<u64>,
    #[serde(default)]
    pub app_consistent: bool,
    #[serde(default, rename = "final")]
    pub final_log: bool,
}

/// How an uploaded block was taken.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct BlockAck {
    pub index: u64,
    /// `stored`, `deduplicated`, `zero`, `already_received`, or `healed` (the block's chunk was
    /// registered damaged and is stored again).
    pub outcome: String,
    /// Bytes written to the store for this block (after compression and sealing).
    pub stored_bytes: u64,
}

/// Resume query: the agent's view of some blocks.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReceivedQuery {
    pub blocks: Vec<QueryBlock>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QueryBlock {
    pub index: u64,
    pub hash: String,
}

/// Completion request: which blocks hold data (runs of `[first, count]`) and the digest over the
/// plain hashes of all blocks in order (a zero block contributing the hash of its zero bytes).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteRequest {
    #[schema(schema_with = super::pair_schemas::u64_runs)]
    pub data_runs: Vec<(u64, u64)>,
    pub digest: String,
}

/// The answer to a log upload.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogAck {
    pub log_id: String,
    /// `accepted` or `already_accepted`.
    pub status: String,
    pub cycle: u64,
    pub journal_length: usize,
    pub pending_log_bytes: u64,
    /// Set when this log made the disk resync-required (the log itself was accepted).
    pub resync_required: Option<String>,
}
