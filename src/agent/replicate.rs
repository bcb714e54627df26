//! `drvault agent replicate`: send one disk's change log for a replication cycle.
//!
//! The log is streamed from the file (never read into memory whole), zstd-compressed piece by
//! piece unless compression is off; the server stores it as it arrives and acknowledges only once it is validated and in the journal. The log's UniqueId,
//! read from its header here, names it in the URL so a retry of the same log is recognised.

use std::path::Path;

use super::backoff::Backoff;
use super::AgentError;
use crate::client::Client;
use crate::format::hrl::HrlHeader;
use crate::wire::{LogAck, LogQuery};

pub struct ReplicateOptions {
    pub vm: String,
    pub disk: String,
    pub cycle: Option<u64>,
    pub app_consistent: bool,
    pub final_log: bool,
    pub backoff: Backoff,
}

/// Reads the log's header (the server validates the whole log again).
pub fn log_header(path: &Path) -> Result<HrlHeader, AgentError> {
    let p = path.display().to_string();
    let mut buf = [0u8; 4096];
    let f = std::fs::File::open(path).map_err(|e| AgentError::Log {
        path: p.clone(),
        message: e.to_string(),
    })?;
    crate::format::ReadAt::read_exact_at(&f, &mut buf, 0).map_err(|e| AgentError::Log {
        path: p.clone(),
        message: format!("not an MS-HRL log: {e}"),
    })?;
    HrlHeader::parse(&buf).map_err(|e| AgentError::Log {
        path: p,
        message: format!("not a valid MS-HRL log: {e}"),
    })
}

pub async fn replicate(
    client: &Client,
    path: &Path,
    opts: &ReplicateOptions,
) -> Result<LogAck, AgentError> {
    let header = log_header(path)?;
    let query = LogQuery {
        cycle: opts.cycle,
        app_consistent: opts.app_consistent,
        final_log: opts.final_log,
    };
    let log_id = header.unique_id.to_string();
    let p = path.to_path_buf();
    // resync_in_progress: this log predates the resync, which will contain its changes; the
    // agent drops it (exit code 3) and sends the next cycle's log after the resync.
    opts.backoff
        .retry_unless("send log", &["resync_in_progress"], || {
            let p = p.clone();
            let query = &query;
            let log_id = &log_id;
            async move {
                let file = tokio::fs::File::open(&p).await.map_err(|e| {
                    crate::client::ClientError::Setup(format!("{}: {e}", p.display()))
                })?;
                let len = file
                    .metadata()
                    .await
                    .map_err(|e| crate::client::ClientError::Setup(e.to_string()))?
                    .len();
                let stream = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024);
                let log = client.encode_log(stream, len);
                client
                    .put_log(&opts.vm, &opts.disk, log_id, query, log)
                    .await
            }
        })
        .await
}
