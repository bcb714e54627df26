//! `drvault account`: operator accounts and their tokens; and the token rotation of hosts and
//! providers (`drvault host rotate-token`, `drvault provider rotate-token`), which rewrites the
//! credentials file the agent reads.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;

use super::operator::Conn;
use crate::client::Client;
use crate::server::OPERATOR_TOKEN_FILE;
use crate::wire::{AddAccount, Credentials, RotateToken};

/// Printed under `drvault account --help`.
pub(super) const ROLES_HELP: &str = "Roles (each admits what the roles before it do):\n  \
viewer    reads everything: VMs, points, jobs, plans, hosts, providers, keys, accounts, verify and damage reports\n  \
operator  viewer + test, planned and unplanned failover, commit, cleanup, cancel, resync, failback, \
plans (create, run, resume), VM policy and NIC settings, verify, merge\n  \
admin     operator + hosts, providers, keys, accounts, gc, disabling a VM\n\n\
A first start creates account admin (role admin) whose token is <data-dir>/operator.token.";

#[derive(Subcommand)]
pub(super) enum AccountCmd {
    /// List accounts with their role and when their token expires (never a token).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Create an account and print its token (shown once; the server keeps only a digest).
    Add {
        name: String,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// When the token stops working (RFC 3339, e.g. 2030-01-31T18:00:00Z).
        #[arg(long)]
        expires: Option<String>,
        /// Write the token to this file (0600) instead of printing it.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Remove an account: its tokens stop working at once (the last admin cannot be removed).
    Remove { name: String },
    /// Give an account a new token and revoke its others. Rotating the account this command
    /// signs in as with <data-dir>/operator.token rewrites that file.
    Rotate {
        name: String,
        #[arg(long)]
        expires: Option<String>,
        /// Write the token to this file (0600) instead of printing it.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// The account and role of the token in use.
    Whoami {
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn account(cmd: AccountCmd, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    match cmd {
        AccountCmd::List { json } => {
            let accounts = c.accounts().await?;
            if json {
                super::print_json(&accounts)?;
            } else {
                println!(
                    "{:<24} {:<9} {:<22} {:>6} EXPIRES",
                    "ACCOUNT", "ROLE", "CREATED", "TOKENS"
                );
                for a in &accounts {
                    println!(
                        "{:<24} {:<9} {:<22} {:>6} {}",
                        a.name,
                        a.role,
                        a.created,
                        a.tokens,
                        a.expires_at.as_deref().unwrap_or("never")
                    );
                }
            }
        }
        AccountCmd::Add {
            name,
            role,
            expires,
            output,
        } => {
            let pending = output.as_deref().map(SecretFile::prepare).transpose()?;
            let t = c
                .add_account(&AddAccount {
                    name: name.clone(),
                    role,
                    expires_at: expires,
                })
                .await?;
            deliver_token(pending, &t.token, &format!("account {name} ({})", t.role))?;
        }
        AccountCmd::Remove { name } => {
            c.remove_account(&name).await?;
            println!("account {name} removed; its tokens no longer work");
        }
        AccountCmd::Rotate {
            name,
            expires,
            output,
        } => {
            // The CLI's own token file must follow when it rotates the account it signs in
            // with, or its next command would be refused.
            let own_file = conn.data_dir.join(OPERATOR_TOKEN_FILE);
            let rewrite_own = output.is_none()
                && conn.token.is_none()
                && c.whoami().await.is_ok_and(|w| w.account == name);
            let target = if rewrite_own { Some(own_file) } else { output };
            let pending = target.as_deref().map(SecretFile::prepare).transpose()?;
            let t = c
                .rotate_account_token(
                    &name,
                    &RotateToken {
                        expires_at: expires,
                    },
                )
                .await?;
            deliver_token(pending, &t.token, &format!("account {name}: new token"))?;
            println!("the other tokens of account {name} no longer work");
        }
        AccountCmd::Whoami { json } => {
            let w = c.whoami().await?;
            if json {
                super::print_json(&w)?;
            } else {
                println!(
                    "account {} role {} token expires {}",
                    w.account,
                    w.role,
                    w.expires_at.as_deref().unwrap_or("never")
                );
            }
        }
    }
    Ok(0)
}

/// The token on stdout, or in the prepared file.
fn deliver_token(pending: Option<SecretFile>, token: &str, what: &str) -> Result<()> {
    match pending {
        Some(f) => {
            let path = f.path.clone();
            f.commit(format!("{token}\n").as_bytes())
                .context("the token was issued but not saved: rotate it again")?;
            println!("{what}; token written to {}", path.display());
        }
        None => {
            eprintln!("{what}; token (shown once):");
            println!("{token}");
        }
    }
    Ok(())
}

/// `drvault host rotate-token` / `drvault provider rotate-token`: a new token, written into a
/// credentials file (the one `host add` wrote, by default) that replaces the old one whole.
/// The agent picks it up by being started again with the file (`--creds`); its VMs stay
/// protected, nothing is sent again.
pub(super) async fn rotate_agent_token(
    c: &Client,
    kind: &str,
    name: &str,
    output: Option<PathBuf>,
) -> Result<()> {
    let out = output.unwrap_or_else(|| PathBuf::from(format!("{name}.creds.json")));
    // Made before asking: the new token exists only in the answer, and the old one is revoked
    // by it, so a path that cannot be written must fail before anything changes.
    let pending = SecretFile::prepare(&out)?;
    let creds: Credentials = match kind {
        "provider" => c.rotate_provider_token(name).await?,
        _ => c.rotate_host_token(name).await?,
    };
    pending
        .commit(serde_json::to_string_pretty(&creds)?.as_bytes())
        .with_context(|| format!("the {kind}'s old token is revoked and the new one was not saved: run rotate-token again"))?;
    println!(
        "{kind} {name}: new token written to {} (copy it to the {kind} and restart its agent with it); the old token no longer works",
        out.display()
    );
    Ok(())
}

/// A file holding a secret, written whole or not at all: a 0600 temporary file beside it,
/// renamed over it once complete.
struct SecretFile {
    path: PathBuf,
    tmp: PathBuf,
    file: std::fs::File,
}

impl SecretFile {
    fn prepare(path: &Path) -> Result<SecretFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut name = path
            .file_name()
            .with_context(|| format!("{} names no file", path.display()))?
            .to_os_string();
        name.push(format!(".tmp-{}", std::process::id()));
        let tmp = path.with_file_name(name);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        Ok(SecretFile {
            path: path.to_path_buf(),
            tmp,
            file,
        })
    }

    fn commit(mut self, bytes: &[u8]) -> Result<()> {
        let written = self
            .file
            .write_all(bytes)
            .and_then(|()| self.file.sync_all())
            .and_then(|()| std::fs::rename(&self.tmp, &self.path));
        written.with_context(|| format!("writing {}", self.path.display()))
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        // Left only when not committed (renamed away otherwise).
        let _ = std::fs::remove_file(&self.tmp);
    }
}
