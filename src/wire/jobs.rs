//! Jobs (`/v1/jobs`).

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// Query of the job list: only this VM's jobs.
#[derive(Debug, Clone, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct JobsQuery {
    pub vm: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    EnableProtection,
    FinalizeProtection,
    Merge,
    TestFailover,
    PlannedFailover,
    UnplannedFailover,
    FailoverCleanup,
    FailoverCommit,
    RecoveryPlan,
    Resync,
    Failback,
    Verify,
    GarbageCollection,
    DisableProtection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    WaitingForInput,
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct JobStep {
    pub name: String,
    pub state: JobState,
    /// What the step found or did, when it reports more than its state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct JobError {
    pub code: String,
    pub message: String,
    pub recoverable: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct Job {
    pub id: String,
    pub kind: JobKind,
    pub title: String,
    pub vm: Option<String>,
    pub state: JobState,
    /// 0.0 ..= 1.0
    pub progress: f64,
    pub steps: Vec<JobStep>,
    pub created_unix: u64,
    pub started_unix: Option<u64>,
    pub ended_unix: Option<u64>,
    pub error: Option<JobError>,
    /// While the job waits (`waiting_for_input`): what for, e.g. the disks whose final log a
    /// planned failover still needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// Per-disk progress of a job that writes disks (a failover's materialization).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<DiskProgress>,
    /// The server that runs the job (several servers may share a vault).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

/// How far a job has written one disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct DiskProgress {
    pub disk: String,
    /// Data bytes written so far (blocks that hold data; zero blocks are never written).
    pub bytes_written: u64,
    /// Data bytes the disk has to write in all.
    pub bytes_total: u64,
    /// Average rate since the disk started, MB/s (10^6 bytes per second).
    pub mb_s: f64,
    /// Whether the disk is complete (for an Azure target: its footer read back and checked).
    #[serde(default)]
    pub done: bool,
}
