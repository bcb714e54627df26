//! `drvault host` and `drvault provider`: register, list and remove hosts and providers.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use super::operator::{self, Conn, Registration};
use crate::wire::{AddHost, AddProvider};

#[derive(Subcommand)]
pub(super) enum HostCmd {
    /// Register a host and write its credentials file (server URL, host token, CA certificate).
    Add {
        name: String,
        /// Put the host in a VMM cloud (its provider may then act for it).
        #[arg(long)]
        cloud: Option<String>,
        /// Put the host in a cluster: any host of it may then replicate the VMs another host
        /// of the cluster protected (a VM that moved between nodes keeps its log chain).
        #[arg(long)]
        cluster: Option<String>,
        /// Credentials file to write (default NAME.creds.json).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    /// Cap the bandwidth of a host's agent (`drvault agent run`), in MB/s; `--mb-s none` clears
    /// the cap. The agent uses the lower of this and its own schedule.
    Throttle {
        name: String,
        /// MB/s (e.g. 20, 0.5), or `none`.
        #[arg(long = "mb-s", value_parser = parse_mb_s)]
        mb_s: MbS,
    },
    /// List hosts with their agent's last contact, version, backlog, last error and bandwidth
    /// cap, and the VMs each protects.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a host: its token stops working at once.
    Remove { name: String },
    /// Give a host a new token (the old one stops working at once) and write its credentials
    /// file anew; its VMs stay protected. Restart the host's agent with the new file.
    RotateToken {
        name: String,
        /// Credentials file to write (default NAME.creds.json, replaced whole).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub(super) enum ProviderCmd {
    /// Register a provider for a cloud and write its credentials file.
    Add {
        name: String,
        #[arg(long)]
        cloud: String,
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
    List {
        #[arg(long)]
        json: bool,
    },
    Remove {
        name: String,
    },
    /// Give a provider a new token (the old one stops working at once) and write its
    /// credentials file anew.
    RotateToken {
        name: String,
        /// Credentials file to write (default NAME.creds.json, replaced whole).
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
}

pub(super) async fn host(cmd: HostCmd, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    match cmd {
        HostCmd::Add {
            name,
            cloud,
            cluster,
            output,
        } => {
            let out = output.unwrap_or_else(|| PathBuf::from(format!("{name}.creds.json")));
            let req = AddHost {
                name: name.clone(),
                cloud,
                cluster,
            };
            operator::register(&c, &Registration::Host(req), &out).await?;
            println!("host {name} registered; credentials written to {} (copy it to the host, keep it secret)", out.display());
        }
        HostCmd::List { json } => {
            let hosts = c.hosts().await?;
            if json {
                super::print_json(&hosts)?;
            } else {
                println!(
                    "{:<24} {:<16} {:<16} {:<22} {:<22} {:<10} {:>10} {:>9} {:<24} LAST ERROR",
                    "HOST",
                    "CLOUD",
                    "CLUSTER",
                    "REGISTERED",
                    "LAST CONTACT",
                    "AGENT",
                    "BACKLOG",
                    "CAP MB/S",
                    "VMS"
                );
                for h in &hosts {
                    println!(
                        "{:<24} {:<16} {:<16} {:<22} {:<22} {:<10} {:>10} {:>9} {:<24} {}",
                        h.name,
                        h.cloud.as_deref().unwrap_or("-"),
                        h.cluster.as_deref().unwrap_or("-"),
                        h.created,
                        match (&h.last_contact, h.last_contact_age_s) {
                            (Some(_), Some(age)) => format!("{age} s ago"),
                            _ => "never".to_string(),
                        },
                        h.agent_version.as_deref().unwrap_or("-"),
                        if h.last_contact.is_some() {
                            crate::util::human_bytes(h.backlog_bytes)
                        } else {
                            "-".to_string()
                        },
                        h.throttle_mb_s
                            .map(|v| v.to_string())
                            .unwrap_or_else(|| "-".to_string()),
                        h.vms.join(","),
                        h.last_error.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        HostCmd::Throttle { name, mb_s } => {
            c.set_host_throttle(&name, mb_s.0).await?;
            match mb_s.0 {
                Some(v) => println!("host {name}: agent bandwidth capped at {v} MB/s"),
                None => println!("host {name}: bandwidth cap cleared"),
            }
        }
        HostCmd::Remove { name } => {
            c.remove_host(&name).await?;
            println!("host {name} removed; its token no longer works");
        }
        HostCmd::RotateToken { name, output } => {
            super::accounts::rotate_agent_token(&c, "host", &name, output).await?;
        }
    }
    Ok(0)
}

pub(super) async fn provider(cmd: ProviderCmd, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    match cmd {
        ProviderCmd::Add {
            name,
            cloud,
            output,
        } => {
            let out = output.unwrap_or_else(|| PathBuf::from(format!("{name}.creds.json")));
            let req = AddProvider {
                name: name.clone(),
                cloud: cloud.clone(),
            };
            operator::register(&c, &Registration::Provider(req), &out).await?;
            println!(
                "provider {name} registered for cloud {cloud}; credentials written to {}",
                out.display()
            );
        }
        ProviderCmd::List { json } => {
            let providers = c.providers().await?;
            if json {
                super::print_json(&providers)?;
            } else {
                println!("{:<24} {:<16} REGISTERED", "PROVIDER", "CLOUD");
                for p in &providers {
                    println!("{:<24} {:<16} {}", p.name, p.cloud, p.created);
                }
            }
        }
        ProviderCmd::Remove { name } => {
            c.remove_provider(&name).await?;
            println!("provider {name} removed");
        }
        ProviderCmd::RotateToken { name, output } => {
            super::accounts::rotate_agent_token(&c, "provider", &name, output).await?;
        }
    }
    Ok(0)
}

/// A bandwidth cap as given on the command line: MB/s, or `none`.
#[derive(Debug, Clone, Copy)]
pub(super) struct MbS(Option<f64>);

fn parse_mb_s(s: &str) -> std::result::Result<MbS, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(MbS(None));
    }
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(MbS(Some(v))),
        _ => Err(format!(
            "{s:?}: a bandwidth in MB/s above 0 (e.g. 20 or 0.5), or none"
        )),
    }
}
