//! The reference agent: what runs on a Hyper-V host. It reads the host's virtual disks (raw,
//! VHD, VHDX), streams them to drvault and retries on recoverable errors with the seed's
//! back-off. Other agents can be written against the same API (docs/api.md).

pub mod backoff;
pub mod failback;
pub mod protect;
pub mod replicate;
pub mod resync;
pub mod run;
pub(crate) mod sync;

use std::path::Path;

use crate::client::{Client, ClientError};
use crate::wire::Credentials;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("credentials file {path}: {message}")]
    Creds { path: String, message: String },
    #[error("disk {path}: {message}")]
    Disk { path: String, message: String },
    /// A disk image that cannot be opened as its name or `--format` says, or read; the image
    /// error names the file once, this says it is a disk.
    #[error("disk {0}")]
    Image(Box<crate::format::image::ImageError>),
    #[error("change log {path}: {message}")]
    Log { path: String, message: String },
    // Transparent: the client error is the whole message, printed once (not again as a cause).
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("{0}")]
    Invalid(String),
    #[error("gave up after {attempts} attempts over {elapsed_s} s: {last}")]
    GaveUp {
        attempts: u32,
        elapsed_s: u64,
        last: ClientError,
    },
}

impl From<crate::format::image::ImageError> for AgentError {
    fn from(e: crate::format::image::ImageError) -> AgentError {
        // Boxed: image errors are large and every agent result carries this type.
        AgentError::Image(Box::new(e))
    }
}

impl AgentError {
    /// An image error, boxed: it is large, and every agent result carries the variant.
    pub fn image(e: crate::format::image::ImageError) -> Self {
        AgentError::Image(Box::new(e))
    }
}

/// Loads a credentials file written by `drvault host add` / `drvault provider add`.
pub fn load_creds(path: &Path) -> Result<Credentials, AgentError> {
    let p = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| AgentError::Creds {
        path: p.clone(),
        message: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| AgentError::Creds {
        path: p,
        message: format!("not a drvault credentials file: {e}"),
    })
}

/// A client for the credentials; providers must name the host they act for.
pub fn client_for(creds: &Credentials, acting_host: Option<String>) -> Result<Client, AgentError> {
    if creds.kind == "provider" && acting_host.is_none() {
        return Err(AgentError::Invalid(format!(
            "provider credentials ({}) need --host NAME: the host to act for",
            creds.name
        )));
    }
    Ok(
        Client::new(&creds.server, &creds.token, Some(&creds.ca_cert_pem))?
            .with_servers(&creds.servers)
            .acting_for(acting_host),
    )
}
