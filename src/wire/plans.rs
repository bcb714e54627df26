//! Recovery plans (`/v1/plans`).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::failover::FailoverKind;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanGroup {
    pub vms: Vec<String>,
    /// Shell command run before the group's failovers; a non-zero exit stops the plan.
    #[serde(default)]
    pub pre: Option<String>,
    /// Shell command run after them.
    #[serde(default)]
    pub post: Option<String>,
    /// Wait for `drvault jobs resume` before the group starts (a manual action).
    #[serde(default)]
    pub pause_before: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub name: String,
    pub groups: Vec<PlanGroup>,
}

/// How a plan picks each VM's point.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanFailoverRequest {
    pub kind: FailoverKind,
    /// `latest` (per VM, the default), `latest-common` (the latest cycle every VM of the plan
    /// has), or any point selector applied to each VM.
    #[serde(default)]
    pub point: Option<String>,
}
