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
    /// List hosts and the VMs each protects.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a host: its token stops working at once.
    Remove { name: String },
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
                println!("{}", sorted_json(&hosts)?);
            } else {
                println!(
                    "{:<24} {:<16} {:<16} {:<22} VMS",
                    "HOST", "CLOUD", "CLUSTER", "REGISTERED"
                );
                for h in &hosts {
                    println!(
                        "{:<24} {:<16} {:<16} {:<22} {}",
                        h.name,
                        h.cloud.as_deref().unwrap_or("-"),
                        h.cluster.as_deref().unwrap_or("-"),
                        h.created,
                        h.vms.join(",")
                    );
                }
            }
        }
        HostCmd::Remove { name } => {
            c.remove_host(&name).await?;
            println!("host {name} removed; its token no longer works");
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
                println!("{}", sorted_json(&providers)?);
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
    }
    Ok(0)
}

/// Pretty JSON with the keys of every object in alphabetical order, as these lists have always
/// been printed.
fn sorted_json<T: serde::Serialize>(v: &T) -> Result<String> {
    Ok(serde_json::to_string_pretty(&serde_json::to_value(v)?)?)
}
