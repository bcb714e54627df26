//! One method per `/v1/` route, with the wire types as arguments and answers. Names in paths
//! are sent as given: the server validates them and refuses bad ones with its own error.

use bytes::Bytes;
use reqwest::Method;

use super::{Client, ClientError, LogUpload, UploadBody};
use crate::wire::*;

/// A block as the server sent it: its bytes and the plain BLAKE3 (hex) of its header.
#[derive(Debug, Clone)]
pub struct BlockDownload {
    pub bytes: Bytes,
    pub blake3: Option<String>,
}

/// The `?point=` suffix of map and block downloads (the selector as given, like the CLI always
/// sent it).
fn point_query(point: Option<&str>) -> String {
    point.map(|p| format!("?point={p}")).unwrap_or_default()
}

/// A log upload's query string (`LogQuery`; fields at their default are left out).
fn log_query(q: &LogQuery) -> String {
    let mut parts = Vec::new();
    if let Some(c) = q.cycle {
        parts.push(format!("cycle={c}"));
    }
    if q.app_consistent {
        parts.push("app_consistent=true".to_string());
    }
    if q.final_log {
        parts.push("final=true".to_string());
    }
    parts.join("&")
}

/// An empty JSON object: the body of routes that take none.
#[derive(serde::Serialize)]
struct Empty {}

impl Client {
    // ---------- server, hosts, providers, keys (operator) ----------

    /// A target network with its bridges and DHCP reservations (`drvault network up`).
    pub async fn host_network(&self, name: &str) -> Result<HostNetworkView, ClientError> {
        self.get_json(&format!("/v1/networks/{name}")).await
    }

    pub async fn server_info(&self) -> Result<ServerInfo, ClientError> {
        self.get_json("/v1/server").await
    }

    /// The servers sharing the vault (`drvault servers`).
    pub async fn servers(&self) -> Result<crate::wire::ServerList, ClientError> {
        self.get_json("/v1/servers").await
    }

    pub async fn hosts(&self) -> Result<Vec<HostView>, ClientError> {
        self.get_json("/v1/hosts").await
    }

    pub async fn add_host(&self, req: &AddHost) -> Result<Credentials, ClientError> {
        self.send_json(Method::POST, "/v1/hosts", req).await
    }

    /// Sets (`None`: clears) the operator's bandwidth cap of a host, MB/s.
    pub async fn set_host_throttle(
        &self,
        name: &str,
        mb_s: Option<f64>,
    ) -> Result<HostThrottle, ClientError> {
        self.send_json(
            Method::PUT,
            &format!("/v1/hosts/{name}/throttle"),
            &HostThrottle { mb_s },
        )
        .await
    }

    pub async fn remove_host(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/hosts/{name}")).await
    }

    pub async fn providers(&self) -> Result<Vec<ProviderView>, ClientError> {
        self.get_json("/v1/providers").await
    }

    pub async fn add_provider(&self, req: &AddProvider) -> Result<Credentials, ClientError> {
        self.send_json(Method::POST, "/v1/providers", req).await
    }

    pub async fn remove_provider(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/providers/{name}")).await
    }

    /// A new token for a host (the old one is revoked): the credentials its agent now needs.
    pub async fn rotate_host_token(&self, name: &str) -> Result<Credentials, ClientError> {
        self.send_json(Method::POST, &format!("/v1/hosts/{name}/token"), &Empty {})
            .await
    }

    /// A new token for a provider (the old one is revoked).
    pub async fn rotate_provider_token(&self, name: &str) -> Result<Credentials, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/v1/providers/{name}/token"),
            &Empty {},
        )
        .await
    }

    // ---------- accounts ----------

    pub async fn whoami(&self) -> Result<Whoami, ClientError> {
        self.get_json("/v1/whoami").await
    }

    pub async fn accounts(&self) -> Result<Vec<AccountView>, ClientError> {
        self.get_json("/v1/accounts").await
    }

    pub async fn add_account(&self, req: &AddAccount) -> Result<AccountToken, ClientError> {
        self.send_json(Method::POST, "/v1/accounts", req).await
    }

    pub async fn remove_account(&self, name: &str) -> Result<(), ClientError> {
        self.delete(&format!("/v1/accounts/{name}")).await
    }

    /// A new token for an account; its other tokens are revoked.
    pub async fn rotate_account_token(
        &self,
        name: &str,
        req: &RotateToken,
    ) -> Result<AccountToken, ClientError> {
        self.send_json(Method::POST, &format!("/v1/accounts/{name}/token"), req)
            .await
    }

    pub async fn keys(&self) -> Result<KeysView, ClientError> {
        self.get_json("/v1/keys").await
    }

    pub async fn rotate_key(&self) -> Result<KeysView, ClientError> {
        self.send_json(Method::POST, "/v1/keys/rotate", &Empty {})
            .await
    }

    // ---------- VMs, maps, blocks, points (operator) ----------

    pub async fn vms(&self) -> Result<Vec<VmView>, ClientError> {
        self.get_json("/v1/vms").await
    }

    pub async fn vm(&self, vm: &str) -> Result<VmView, ClientError> {
        self.get_json(&format!("/v1/vms/{vm}")).await
    }

    /// Disables protection of `vm` (`delete_data`: its records go now).
    pub async fn disable_vm(
        &self,
        vm: &str,
        delete_data: bool,
    ) -> Result<crate::wire::DisableReport, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/v1/vms/{vm}/disable"),
            &crate::wire::DisableRequest { delete_data },
        )
        .await
    }

    pub async fn set_policy(&self, vm: &str, change: &PolicyChange) -> Result<VmView, ClientError> {
        self.send_json(Method::PATCH, &format!("/v1/vms/{vm}"), change)
            .await
    }

    pub async fn map(
        &self,
        vm: &str,
        disk: &str,
        point: Option<&str>,
    ) -> Result<MapView, ClientError> {
        let q = point_query(point);
        self.get_json(&format!("/v1/vms/{vm}/disks/{disk}/map{q}"))
            .await
    }

    pub async fn block(
        &self,
        vm: &str,
        disk: &str,
        index: u64,
        point: Option<&str>,
    ) -> Result<BlockDownload, ClientError> {
        let q = point_query(point);
        let (bytes, headers) = self
            .get_bytes(&format!("/v1/vms/{vm}/disks/{disk}/blocks/{index}{q}"))
            .await?;
        let blake3 = headers
            .get(BLAKE3_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(BlockDownload { bytes, blake3 })
    }

    pub async fn points(&self, vm: &str) -> Result<Vec<PointView>, ClientError> {
        self.get_json(&format!("/v1/vms/{vm}/points")).await
    }

    pub async fn merge(&self, vm: &str, req: &MergeRequest) -> Result<MergeReport, ClientError> {
        self.send_json(Method::POST, &format!("/v1/vms/{vm}/merge"), req)
            .await
    }

    pub async fn nics(&self, vm: &str) -> Result<Vec<NicMappingView>, ClientError> {
        self.get_json(&format!("/v1/vms/{vm}/nics")).await
    }

    pub async fn set_nic(
        &self,
        vm: &str,
        index: u32,
        options: &NicOptions,
    ) -> Result<VmView, ClientError> {
        self.send_json(Method::PUT, &format!("/v1/vms/{vm}/nics/{index}"), options)
            .await
    }

    pub async fn clear_nic(&self, vm: &str, index: u32) -> Result<VmView, ClientError> {
        self.call(Method::DELETE, &format!("/v1/vms/{vm}/nics/{index}"))
            .await
    }

    // ---------- failover, resync, failback (operator) ----------

    pub async fn failover(&self, vm: &str) -> Result<FailoverView, ClientError> {
        self.get_json(&format!("/v1/vms/{vm}/failover")).await
    }

    pub async fn start_failover(
        &self,
        vm: &str,
        req: &FailoverRequest,
    ) -> Result<FailoverRecord, ClientError> {
        self.send_json(Method::POST, &format!("/v1/vms/{vm}/failover"), req)
            .await
    }

    /// `step`: `cleanup`, `commit` or `cancel`.
    async fn failover_step(&self, vm: &str, step: &str) -> Result<FailoverRecord, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/v1/vms/{vm}/failover/{step}"),
            &Empty {},
        )
        .await
    }

    pub async fn cleanup_failover(&self, vm: &str) -> Result<FailoverRecord, ClientError> {
        self.failover_step(vm, "cleanup").await
    }

    pub async fn commit_failover(&self, vm: &str) -> Result<FailoverRecord, ClientError> {
        self.failover_step(vm, "commit").await
    }

    pub async fn cancel_failover(&self, vm: &str) -> Result<FailoverRecord, ClientError> {
        self.failover_step(vm, "cancel").await
    }

    pub async fn resync(&self, vm: &str) -> Result<ResyncSession, ClientError> {
        self.get_json(&format!("/v1/vms/{vm}/resync")).await
    }

    pub async fn start_resync(
        &self,
        vm: &str,
        req: &ResyncRequest,
    ) -> Result<ResyncSession, ClientError> {
        self.send_json(Method::POST, &format!("/v1/vms/{vm}/resync"), req)
            .await
    }

    pub async fn cancel_resync(&self, vm: &str) -> Result<ResyncSession, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/v1/vms/{vm}/resync/cancel"),
            &Empty {},
        )
        .await
    }

    pub async fn failback(&self, vm: &str) -> Result<FailbackRecord, ClientError> {
        self.get_json(&format!("/v1/vms/{vm}/failback")).await
    }

    pub async fn commit_failback(
        &self,
        vm: &str,
        req: &FailbackCommitRequest,
    ) -> Result<FailbackRecord, ClientError> {
        self.send_json(Method::POST, &format!("/v1/vms/{vm}/failback/commit"), req)
            .await
    }

    // ---------- jobs, plans, verify, gc (operator) ----------

    pub async fn jobs(&self, q: &JobsQuery) -> Result<Vec<Job>, ClientError> {
        match &q.vm {
            Some(vm) => self.get_json(&format!("/v1/jobs?vm={vm}")).await,
            None => self.get_json("/v1/jobs").await,
        }
    }

    /// `GET /v1/audit` (`since` in RFC 3339 UTC, as `drvault audit` sends it).
    pub async fn audit(&self, q: &AuditQuery) -> Result<AuditList, ClientError> {
        let mut path = String::from("/v1/audit");
        let mut sep = '?';
        if let Some(since) = &q.since {
            // `+` of an offset would read as a space in a query.
            path.push_str(&format!("{sep}since={}", since.replace('+', "%2B")));
            sep = '&';
        }
        if let Some(limit) = q.limit {
            path.push_str(&format!("{sep}limit={limit}"));
        }
        self.get_json(&path).await
    }

    pub async fn job(&self, id: &str) -> Result<Job, ClientError> {
        self.get_json(&format!("/v1/jobs/{id}")).await
    }

    pub async fn resume_job(&self, id: &str) -> Result<Job, ClientError> {
        self.send_json(Method::POST, &format!("/v1/jobs/{id}/resume"), &Empty {})
            .await
    }

    pub async fn plans(&self) -> Result<Vec<Plan>, ClientError> {
        self.get_json("/v1/plans").await
    }

    pub async fn plan(&self, name: &str) -> Result<Plan, ClientError> {
        self.get_json(&format!("/v1/plans/{name}")).await
    }

    pub async fn create_plan(&self, plan: &Plan) -> Result<Plan, ClientError> {
        self.send_json(Method::POST, "/v1/plans", plan).await
    }

    pub async fn start_plan(
        &self,
        name: &str,
        req: &PlanFailoverRequest,
    ) -> Result<Started, ClientError> {
        self.send_json(Method::POST, &format!("/v1/plans/{name}/failover"), req)
            .await
    }

    pub async fn start_verify(&self, req: &VerifyRequest) -> Result<Started, ClientError> {
        self.send_json(Method::POST, "/v1/verify", req).await
    }

    pub async fn verify_report(&self, job: &str) -> Result<VerifyReport, ClientError> {
        self.get_json(&format!("/v1/verify/{job}")).await
    }

    pub async fn damage(&self) -> Result<DamageRecord, ClientError> {
        self.get_json("/v1/damage").await
    }

    pub async fn start_gc(&self, req: &GcRequest) -> Result<Started, ClientError> {
        self.send_json(Method::POST, "/v1/gc", req).await
    }

    pub async fn gc_report(&self, job: &str) -> Result<GcReport, ClientError> {
        self.get_json(&format!("/v1/gc/{job}")).await
    }

    // ---------- agent: protection, initial replication, logs ----------

    pub async fn enable_protection(&self, vm: &str, spec: &VmSpec) -> Result<VmView, ClientError> {
        self.send_json(Method::PUT, &format!("/v1/agent/vms/{vm}"), spec)
            .await
    }

    pub async fn agent_vm(&self, vm: &str) -> Result<VmView, ClientError> {
        self.get_json(&format!("/v1/agent/vms/{vm}")).await
    }

    /// The long-running agent's report for this interval; the answer directs the next one.
    pub async fn heartbeat(&self, hb: &Heartbeat) -> Result<HeartbeatAck, ClientError> {
        self.send_json(Method::POST, "/v1/agent/heartbeat", hb)
            .await
    }

    pub async fn query_blocks(
        &self,
        vm: &str,
        disk: &str,
        q: &ReceivedQuery,
    ) -> Result<MissingBlocks, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/v1/agent/vms/{vm}/disks/{disk}/blocks/query"),
            q,
        )
        .await
    }

    /// `blake3`: the block's plain BLAKE3 (hex), checked by the server on the plain bytes.
    pub async fn put_block(
        &self,
        vm: &str,
        disk: &str,
        index: u64,
        blake3: &str,
        body: &UploadBody,
    ) -> Result<BlockAck, ClientError> {
        self.put_body(
            &format!("/v1/agent/vms/{vm}/disks/{disk}/blocks/{index}"),
            &[(BLAKE3_HEADER, blake3.to_string())],
            body,
        )
        .await
    }

    pub async fn complete_disk(
        &self,
        vm: &str,
        disk: &str,
        req: &CompleteRequest,
    ) -> Result<DiskView, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/v1/agent/vms/{vm}/disks/{disk}/complete"),
            req,
        )
        .await
    }

    /// Streams one change log ([`Client::encode_log`] makes the body).
    pub async fn put_log(
        &self,
        vm: &str,
        disk: &str,
        log_id: &str,
        q: &LogQuery,
        log: LogUpload,
    ) -> Result<LogAck, ClientError> {
        let q = log_query(q);
        let sep = if q.is_empty() { "" } else { "?" };
        let path = format!("/v1/agent/vms/{vm}/disks/{disk}/logs/{log_id}{sep}{q}");
        let compressed = log.is_compressed();
        let body = reqwest::Body::wrap_stream(log.pieces);
        if !compressed {
            return self
                .send_stream(Method::PUT, &path, body, Some(log.plain_len))
                .await;
        }
        // The compressed length is known only once it is sent: the server bounds the
        // decompression by the plain length instead.
        let rb = self
            .req(Method::PUT, &path)
            .body(body)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_ENCODING, ZSTD_ENCODING)
            .header(PLAIN_LENGTH_HEADER, log.plain_len);
        let r = self.send(rb).await?;
        r.json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    // ---------- agent: resync and failback (block sync) ----------

    pub async fn resync_view(&self, vm: &str, disk: &str) -> Result<ResyncDiskView, ClientError> {
        self.get_json(&format!("/v1/agent/vms/{vm}/disks/{disk}/resync"))
            .await
    }

    pub async fn resync_put_patch(
        &self,
        vm: &str,
        disk: &str,
        index: u64,
        blake3: &str,
        patch: &UploadBody,
    ) -> Result<PatchAck, ClientError> {
        self.put_body(
            &format!("/v1/agent/vms/{vm}/disks/{disk}/resync/blocks/{index}"),
            &[(BLAKE3_HEADER, blake3.to_string())],
            patch,
        )
        .await
    }

    pub async fn resync_complete(
        &self,
        vm: &str,
        disk: &str,
        req: &DigestRequest,
    ) -> Result<ResyncCompletion, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/v1/agent/vms/{vm}/disks/{disk}/resync/complete"),
            req,
        )
        .await
    }

    pub async fn failback_view(
        &self,
        vm: &str,
        disk: &str,
    ) -> Result<FailbackDiskView, ClientError> {
        self.get_json(&format!("/v1/agent/vms/{vm}/disks/{disk}/failback"))
            .await
    }

    pub async fn failback_ranges(
        &self,
        vm: &str,
        disk: &str,
        req: &RangeRequest,
    ) -> Result<Bytes, ClientError> {
        self.post_json_bytes(
            &format!("/v1/agent/vms/{vm}/disks/{disk}/failback/ranges"),
            req,
        )
        .await
    }

    pub async fn failback_complete(
        &self,
        vm: &str,
        disk: &str,
        req: &DigestRequest,
    ) -> Result<FailbackRecord, ClientError> {
        self.send_json(
            Method::POST,
            &format!("/v1/agent/vms/{vm}/disks/{disk}/failback/complete"),
            req,
        )
        .await
    }

    /// The server side's block hashes of a sync (`flow`: `resync` or `failback`): 32 bytes a
    /// block.
    pub async fn sync_hashes(
        &self,
        flow: SyncFlow,
        vm: &str,
        disk: &str,
    ) -> Result<Bytes, ClientError> {
        let (b, _) = self
            .get_bytes(&format!(
                "/v1/agent/vms/{vm}/disks/{disk}/{}/hashes",
                flow.segment()
            ))
            .await?;
        Ok(b)
    }

    /// The server side's 4 KiB hashes of some blocks of a sync.
    pub async fn sync_fine(
        &self,
        flow: SyncFlow,
        vm: &str,
        disk: &str,
        req: &FineRequest,
    ) -> Result<Bytes, ClientError> {
        self.post_json_bytes(
            &format!("/v1/agent/vms/{vm}/disks/{disk}/{}/fine", flow.segment()),
            req,
        )
        .await
    }
}

/// Which block sync a hash request belongs to: a resync (agent → vault) or a failback
/// (vault → agent). Both serve block hashes and 4 KiB hashes the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncFlow {
    Resync,
    Failback,
}

impl SyncFlow {
    fn segment(self) -> &'static str {
        match self {
            SyncFlow::Resync => "resync",
            SyncFlow::Failback => "failback",
        }
    }
}
