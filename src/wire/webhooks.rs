//! What a webhook receiver gets: one JSON [`WebhookEvent`] per POST, signed with the
//! endpoint's secret. The MAC is HMAC-SHA256 over `<timestamp>.<body>` (the timestamp header's
//! value, a dot, the raw body), sent as `sha256=<hex>`; a receiver recomputes it, compares in
//! constant time, and refuses a timestamp far from its own clock so a captured delivery cannot
//! be replayed later. A delivery that is retried keeps its `id`: receivers drop repeats by it.

use serde::{Deserialize, Serialize};

use super::{Health, HealthFinding, Job};

/// `sha256=<hex of HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub const WEBHOOK_SIGNATURE_HEADER: &str = "x-drvault-signature";
/// Unix seconds when this attempt was signed (each retry signs again).
pub const WEBHOOK_TIMESTAMP_HEADER: &str = "x-drvault-timestamp";
/// The event name, as in the body.
pub const WEBHOOK_EVENT_HEADER: &str = "x-drvault-event";
/// The event's id, as in the body.
pub const WEBHOOK_DELIVERY_HEADER: &str = "x-drvault-delivery";

/// A job ended: it succeeded.
pub const EVENT_JOB_SUCCEEDED: &str = "job.succeeded";
/// A job ended: it failed (its `error` says why).
pub const EVENT_JOB_FAILED: &str = "job.failed";
/// A VM's health level changed (Normal, Warning, Critical).
pub const EVENT_VM_HEALTH: &str = "vm.health";
/// Every event name an endpoint may subscribe to.
pub const WEBHOOK_EVENTS: [&str; 3] = [EVENT_JOB_SUCCEEDED, EVENT_JOB_FAILED, EVENT_VM_HEALTH];

/// The body of one delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WebhookEvent {
    /// Unique per event, the same on every retry of it.
    pub id: String,
    /// One of [`WEBHOOK_EVENTS`].
    pub event: String,
    /// When the event happened (RFC 3339, UTC).
    pub at: String,
    /// For `job.*`: the job as `GET /v1/jobs/{id}` shows it once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
    /// For `vm.health`: the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_health: Option<VmHealthChange>,
}

/// A VM's health moved from one level to another.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmHealthChange {
    pub vm: String,
    pub previous: Health,
    pub health: Health,
    /// Why, as `GET /v1/vms/{vm}` shows it (`health_findings`).
    pub findings: Vec<HealthFinding>,
}
