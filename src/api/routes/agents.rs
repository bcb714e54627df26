//! The long-running agent's heartbeat (`POST /v1/agent/heartbeat`): the host reports its VMs
//! (backlog, last error), the server records the report and answers what the agent should know
//! for its next interval (each VM's state, policy and open resync session, the operator's
//! bandwidth cap).
//!
//! The handler is cheap: every check and every answer comes from memory (catalog, registry,
//! cached resync sessions); the report itself is written to the vault later, at most every few
//! seconds ([`crate::contact`]). The only store write a heartbeat can cause is the one that
//! matters: a backlog that reached half a disk marks it resync-required.

use axum::body::Body;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};

use crate::api::auth::AgentHost;
use crate::api::error::ApiResult;
use crate::api::extract::read_json;
use crate::api::AppState;
use crate::catalog::VmRecord;
use crate::error::{Error, Result};
use crate::vault::registry::valid_name;
use crate::wire::{Heartbeat, HeartbeatAck, VmDirective};

pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/v1/agent/heartbeat", post(heartbeat))
}

/// Most VMs one heartbeat may report (one host runs far fewer).
const MAX_VMS: usize = 4096;
/// Most disks one VM report may list.
const MAX_DISKS: usize = 256;
/// Longest heartbeat interval: a day, as the longest replication interval.
const MAX_INTERVAL_S: u64 = crate::catalog::spec::MAX_INTERVAL_S;
/// Longest agent version string and error message kept.
const MAX_TEXT: usize = 4096;

#[utoipa::path(
    post,
    path = "/v1/agent/heartbeat",
    tag = "agent",
    summary = "The long-running agent's report",
    params(crate::api::openapi::params::ActingHost),
    request_body = crate::wire::Heartbeat,
    responses(
        (status = 200, description = "What the agent should know for its next interval", body = crate::wire::HeartbeatAck),
    )
)]
async fn heartbeat(
    AgentHost(host): AgentHost,
    State(s): State<AppState>,
    body: Body,
) -> ApiResult<Json<HeartbeatAck>> {
    let hb: Heartbeat = read_json(body).await?;
    check(&hb)?;
    // Every VM the report names must be this host's (or not protected yet): a report naming
    // another host's VM is refused whole, and nothing of it is recorded.
    let mut owned: Vec<Option<VmRecord>> = Vec::with_capacity(hb.vms.len());
    for r in &hb.vms {
        owned.push(match s.catalog.vm_for(Some(&host), &r.vm).await {
            Ok(rec) => Some(rec),
            Err(Error::NotFound { .. }) => None,
            // The host may act on it, but protection was disabled: the answer says so (the
            // agent stops that VM) instead of refusing the whole report.
            Err(e) if e.code() == "vm_disabled" => Some(s.catalog.vm_for(None, &r.vm).await?),
            Err(e) => return Err(e.into()),
        });
    }
    let now = crate::util::unix_now();
    s.contacts.record(&host, &hb, now);
    let mut directives = Vec::with_capacity(hb.vms.len());
    for (r, rec) in hb.vms.iter().zip(owned) {
        let Some(rec) = rec else {
            directives.push(VmDirective {
                vm: r.vm.clone(),
                state: None,
                policy: None,
                resync: None,
            });
            continue;
        };
        for b in &r.disks {
            if rec.state != crate::wire::VmState::Disabled
                && rec.spec.disks.iter().any(|d| d.id == b.disk)
            {
                s.ingest
                    .note_backlog(&rec.name, &b.disk, b.backlog_bytes)
                    .await?;
            }
        }
        directives.push(VmDirective {
            vm: rec.name.clone(),
            state: Some(rec.state),
            policy: Some(rec.spec.policy.clone().unwrap_or_default()),
            resync: s
                .resyncs
                .resync_session(&rec.id)
                .await?
                .filter(|x| x.state.is_open())
                .map(|x| crate::overview::resync_brief(&x)),
        });
    }
    metrics::counter!("drvault_heartbeats_total").increment(1);
    Ok(Json(HeartbeatAck {
        server_time_unix: now,
        throttle_mb_s: s.registry.host(&host).await.and_then(|h| h.throttle_mb_s),
        vms: directives,
    }))
}

/// The report's shape: names, counts and lengths within bounds, an interval of at least 1 s.
fn check(hb: &Heartbeat) -> Result<()> {
    let bad = |m: String| Err(Error::invalid("invalid_heartbeat", m));
    if !(1..=MAX_INTERVAL_S).contains(&hb.interval_s) {
        return bad(format!(
            "interval_s {}: must be from 1 to {MAX_INTERVAL_S}",
            hb.interval_s
        ));
    }
    if hb.agent_version.is_empty() || hb.agent_version.len() > 64 {
        return bad("agent_version: 1-64 characters".into());
    }
    if hb.vms.len() > MAX_VMS {
        return bad(format!(
            "{} VMs: at most {MAX_VMS} per heartbeat",
            hb.vms.len()
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for v in &hb.vms {
        if !valid_name(&v.vm) {
            return bad(format!("VM name {:?} is not valid", v.vm));
        }
        if !seen.insert(v.vm.as_str()) {
            return bad(format!("VM {} is reported twice", v.vm));
        }
        if v.disks.len() > MAX_DISKS {
            return bad(format!("VM {}: at most {MAX_DISKS} disks", v.vm));
        }
        if let Some(d) = v.disks.iter().find(|d| !valid_name(&d.disk)) {
            return bad(format!("VM {}: disk name {:?} is not valid", v.vm, d.disk));
        }
        if let Some(f) = &v.last_error {
            if f.code.is_empty() || f.code.len() > 64 || f.message.len() > MAX_TEXT {
                return bad(format!(
                    "VM {}: last_error needs a code of 1-64 characters and a message of at most {MAX_TEXT}",
                    v.vm
                ));
            }
        }
    }
    Ok(())
}
