//! Verify, garbage collection and the damage register.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Families of objects, as reports name them.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ObjectFamily {
    Chunk,
    Map,
    Log,
    Receipt,
    Record,
    /// A pack of sealed block pieces.
    Pack,
}

/// Answer to starting a job.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Started {
    pub job: String,
}

/// `POST /v1/verify`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// Only this VM's objects (default: every VM).
    #[serde(default)]
    pub vm: Option<String>,
    /// Share of chunks and log frames to read, 0 < p ≤ 100 (default 100).
    #[serde(default)]
    pub sample_percent: Option<f64>,
}

/// Objects and plaintext bytes read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Checked {
    pub objects: u64,
    pub bytes: u64,
}

/// A point that needs a damaged object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DamagedPoint {
    pub vm: String,
    pub point: String,
    pub objects: Vec<String>,
}

/// What a verify found (`GET /v1/verify/{job}`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VerifyReport {
    pub job: String,
    pub vm: Option<String>,
    pub sample_percent: f64,
    /// Chunks and frames written before this time were not read (scheduled verify).
    pub since_unix: Option<u64>,
    pub started_unix: u64,
    pub seconds: f64,
    pub checked: BTreeMap<ObjectFamily, Checked>,
    /// Plaintext bytes read and checked per second, in MB (10^6).
    pub mb_per_s: f64,
    /// Every object this run found damaged or missing (new or already registered), with what
    /// was done about it and what needs it.
    pub damaged: Vec<DamagedObject>,
    /// Registered objects that read back sound now (re-uploaded or restored).
    pub healed: Vec<String>,
    /// Registered objects nothing references any more (dropped from the register).
    pub unreferenced: Vec<String>,
    /// Points now marked damaged.
    pub damaged_points: Vec<DamagedPoint>,
    /// Breaks in the audit log's hash chain (damage of kind `audit_chain`; checked by verifies
    /// that cover every VM).
    #[serde(default)]
    pub audit_damage: Vec<crate::wire::AuditDamage>,
    /// Nothing damaged, nothing registered in the scope, the audit chain whole.
    pub clean: bool,
}

/// `POST /v1/gc`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GcRequest {
    /// Report what would be freed, delete nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Only objects older than this many seconds are deleted (default `[gc] grace_s`).
    #[serde(default)]
    pub grace_s: Option<u64>,
}

/// Objects and stored bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Count {
    pub objects: u64,
    pub bytes: u64,
}

/// What a collection did (`GET /v1/gc/{job}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct GcReport {
    pub job: String,
    pub dry_run: bool,
    pub grace_s: u64,
    pub started_unix: u64,
    pub seconds: f64,
    /// Objects younger than this (Unix milliseconds) were kept whatever they are.
    pub cutoff_unix_ms: u64,
    /// Referenced: map objects and chunks by name, logs and open sessions by prefix.
    pub marked: BTreeMap<ObjectFamily, u64>,
    /// Objects listed under the swept prefixes.
    pub scanned: u64,
    /// Deleted (with `dry_run`: would be deleted), by family.
    pub freed: BTreeMap<ObjectFamily, Count>,
    pub freed_total: Count,
    /// Unreferenced but inside the grace period (or written after the collection started).
    pub kept_young: Count,
    /// Unreferenced and old, but an upload stored or reused it while the collection ran.
    pub kept_in_use: Count,
    /// Staging files interrupted writes left in a local vault (`<key>#<n>`), older than the
    /// cutoff and than [`STAGING_MIN_AGE_MS`]: removed (with `dry_run`: would be removed).
    #[serde(default)]
    pub staging_leftovers: Count,
}

/// One registered object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct DamagedObject {
    pub key: String,
    pub family: ObjectFamily,
    /// `missing` or `corrupt`.
    pub problem: String,
    pub reason: String,
    /// Where its bytes were moved (none for a missing object).
    pub quarantined: Option<String>,
    /// What verify did: `quarantined`, `registered` (missing), `repaired` (a record rewritten
    /// from the server's own copy: not registered), `kept` (a record with no other copy).
    #[serde(default)]
    pub action: String,
    pub found_unix: u64,
    /// What needed it when it was found.
    pub affects: Vec<Affected>,
}

/// The points (or open session) of one disk that need an object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, PartialOrd, Ord, ToSchema)]
pub struct Affected {
    pub vm: String,
    pub disk: String,
    /// Point ids (`c<cycle>`) of the disk.
    pub points: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
}

/// The stored register.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct DamageRecord {
    pub objects: BTreeMap<String, DamagedObject>,
    /// Start of the last verify that covered every VM and everything written before it (a
    /// full one, or a scheduled one): the next scheduled verify reads what was written since.
    #[serde(default)]
    pub last_verify_unix: Option<u64>,
    /// Registered chunks an upload has stored again since (they left `objects` then): the next
    /// verify reads them and reports them healed.
    #[serde(default)]
    pub healed: BTreeSet<String>,
}
