//! Operator commands: they find the server and the operator token in `./drvault-data` (or
//! `--data-dir`, `--server`, `--token`, or the DRVAULT_* environment variables) and talk to the
//! `/v1/` API like any other client.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub use crate::client::export::export;
use crate::client::Client;
use crate::server::{ServerFile, OPERATOR_TOKEN_FILE, SERVER_FILE};
use crate::wire::{AddHost, AddProvider, Credentials};

/// Printed when the operator token is an argument.
pub const TOKEN_ARG_WARNING: &str = "warning: --token on the command line shows in `ps` and /proc to every user of this machine; set DRVAULT_TOKEN instead (or let drvault read <data-dir>/operator.token)";

/// How to reach the server as the operator.
#[derive(Debug, Clone, clap::Args)]
pub struct Conn {
    /// Server data directory holding server.json and operator.token.
    #[arg(
        long,
        env = "DRVAULT_DATA_DIR",
        default_value = "drvault-data",
        global = true
    )]
    pub data_dir: PathBuf,
    /// Server URL (default: from <data-dir>/server.json).
    #[arg(long, env = "DRVAULT_SERVER", global = true)]
    pub server: Option<String>,
    /// Operator token (default: <data-dir>/operator.token). Prefer DRVAULT_TOKEN: a value
    /// given as --token shows in `ps` to every user of the machine.
    #[arg(long, env = "DRVAULT_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// PEM certificate to trust (default: the one named in <data-dir>/server.json).
    #[arg(long, env = "DRVAULT_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
}

impl Conn {
    pub fn client(&self) -> Result<Client> {
        let sf_path = self.data_dir.join(SERVER_FILE);
        let sf: Option<ServerFile> = std::fs::read_to_string(&sf_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let server = match (&self.server, &sf) {
            (Some(s), _) => s.clone(),
            (None, Some(f)) => f.url.clone(),
            (None, None) => bail!(
                "no server given and {} not found: is `drvault serve` running from this directory? (or pass --server/--data-dir)",
                sf_path.display()
            ),
        };
        let token = match &self.token {
            Some(t) => t.clone(),
            None => {
                let p = self.data_dir.join(OPERATOR_TOKEN_FILE);
                std::fs::read_to_string(&p)
                    .with_context(|| {
                        format!(
                            "reading the operator token {} (or pass --token)",
                            p.display()
                        )
                    })?
                    .trim()
                    .to_string()
            }
        };
        let ca_path = self.ca_cert.clone().or_else(|| sf.map(|f| f.ca_cert));
        let ca = match ca_path {
            Some(p) => Some(
                std::fs::read_to_string(&p)
                    .with_context(|| format!("reading CA certificate {}", p.display()))?,
            ),
            None => None,
        };
        Ok(Client::new(&server, &token, ca.as_deref())?)
    }
}

/// What `register` registers.
pub enum Registration {
    Host(AddHost),
    Provider(AddProvider),
}

impl Registration {
    fn name(&self) -> &str {
        match self {
            Registration::Host(r) => &r.name,
            Registration::Provider(r) => &r.name,
        }
    }
}

/// Registers a host or a provider and writes its
/// credentials file to `out`. The token exists only in the server's answer, so the file is
/// created (empty, 0600) before asking: a path that cannot be written fails with nothing
/// registered. Should filling it fail afterwards, the registration is removed again.
pub async fn register(c: &Client, what: &Registration, out: &Path) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating credentials file {}", out.display()))?;
    let answer = match what {
        Registration::Host(req) => c.add_host(req).await,
        Registration::Provider(req) => c.add_provider(req).await,
    };
    let creds: Credentials = match answer {
        Ok(creds) => creds,
        Err(e) => {
            let _ = std::fs::remove_file(out);
            return Err(e.into());
        }
    };
    let text = serde_json::to_string_pretty(&creds)?;
    if let Err(e) = f.write_all(text.as_bytes()).and_then(|()| f.sync_all()) {
        let _ = std::fs::remove_file(out);
        let name = what.name();
        let undo = match what {
            Registration::Host(_) => c.remove_host(name).await,
            Registration::Provider(_) => c.remove_provider(name).await,
        };
        let undone = match undo {
            Ok(()) => format!("{name} was not registered"),
            Err(undo) => format!("and removing the registration of {name} failed too ({undo}): remove it before adding it again"),
        };
        return Err(anyhow::Error::new(e).context(format!(
            "writing credentials file {}; {undone}",
            out.display()
        )));
    }
    Ok(())
}
