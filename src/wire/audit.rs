//! The audit log (`GET /v1/audit`): who did what to which object, from where, with what result.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// One recorded operator action. Entries are numbered from 1 without gaps; each carries the
/// BLAKE3 of its predecessor (`prev`) and its own (`hash`, over the entry's JSON with `hash`
/// empty), so a removed, edited or reordered entry breaks the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    pub seq: u64,
    /// When the action was answered (RFC 3339, seconds; never earlier than the previous entry).
    pub at: String,
    /// The account (or `host/<name>`, `provider/<name>`), `unknown` when the token was refused.
    pub actor: String,
    /// What was asked, e.g. `failover.test`, `host.add`, `key.rotate`.
    pub action: String,
    /// What it was asked of, e.g. `vm/web01`, `host/hv01`, `vault`.
    pub target: String,
    /// The caller's address.
    pub from: String,
    /// `ok` (2xx/3xx) or `error`.
    pub result: String,
    /// The HTTP status of the answer.
    pub status: u16,
    /// The error code of a refused or failed action.
    pub code: Option<String>,
    /// The job the action started, when it started one.
    pub job: Option<String>,
    /// BLAKE3 (hex) of this entry with `hash` set to the empty string.
    pub hash: String,
    /// `hash` of the previous entry; 64 zeros for the first.
    pub prev: String,
}

/// `GET /v1/audit`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditList {
    /// Oldest first.
    pub entries: Vec<AuditEntry>,
}

/// Query of `GET /v1/audit`: entries at or after `since` (RFC 3339), at most `limit` (1 to
/// 1000, default 100). Without `since` the latest `limit` entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// A break in the audit chain that verify found (damage of kind `audit_chain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditDamage {
    /// Always `audit_chain`.
    pub kind: String,
    /// The entry's sequence number.
    pub seq: u64,
    /// `missing` (removed), `corrupt` (does not open under its own name: edited, or moved from
    /// another entry's place), `edited` (opens, but its hash does not match its content),
    /// `out_of_order` (its `prev` is not its predecessor's hash, or its number is not its place).
    pub problem: String,
    pub reason: String,
}
