//! Recovery points and merges.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeRequest {
    /// Merge every log, not only those past the retention window.
    #[serde(default)]
    pub all: bool,
    /// Merge every log up to and including this point (`c<cycle>`).
    #[serde(default)]
    pub through: Option<String>,
}

/// A VM recovery point as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct PointView {
    pub id: String,
    pub cycle: u64,
    /// The point's time: the latest of its logs' own times (the MS-HRL header's), where a log
    /// has none when the server accepted it.
    pub time: String,
    pub time_unix: u64,
    /// When the server accepted the point's last log (RFC 3339 and Unix seconds).
    #[serde(default)]
    pub accepted: String,
    #[serde(default)]
    pub accepted_unix: u64,
    /// `initial` (cycle 0, the initial replication), `crash_consistent` or `app_consistent`;
    /// `incomplete` for a cycle some disks have sent and others not yet (see `waiting_for`):
    /// not a recovery point until they do.
    pub kind: String,
    /// Every disk's log of the cycle was flagged final (the source VM had shut down).
    pub final_point: bool,
    pub disks: Vec<String>,
    /// The point reads through an object verify found damaged or missing: failover and export
    /// refuse it (`409 point_damaged`).
    #[serde(default)]
    pub damaged: bool,
    /// Which objects, when damaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damage: Option<String>,
    /// An incomplete cycle: the disks whose log of the cycle has not arrived yet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting_for: Vec<String>,
}

/// What a merge did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct MergeReport {
    pub disks: usize,
    pub logs_merged: usize,
    pub blocks_rewritten: u64,
    pub log_bytes_freed: u64,
}
