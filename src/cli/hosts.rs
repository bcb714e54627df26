//! `drvault host` and `drvault provider`: register, list and remove hosts and providers.

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;

use super::operator::{self, Conn};

#[derive(Subcommand)]
pub(super) enum HostCmd {
    /// Register a host and write its credentials file (server URL, host token, CA certificate).
    Add {
        name: String,
        /// Put the host in a VMM cloud (its provider may then act for it).
        #[arg(long)]
        cloud: Option<String>,
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
            output,
        } => {
            let out = output.unwrap_or_else(|| PathBuf::from(format!("{name}.creds.json")));
            let body = serde_json::json!({"name": name, "cloud": cloud});
            operator::register(&c, "hosts", &name, &body, &out).await?;
            println!("host {name} registered; credentials written to {} (copy it to the host, keep it secret)", out.display());
        }
        HostCmd::List { json } => {
            let v: serde_json::Value = c.get_json("/v1/hosts").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<24} {:<16} {:<22} VMS", "HOST", "CLOUD", "REGISTERED");
                for h in v.as_array().into_iter().flatten() {
                    let vms: Vec<&str> = h["vms"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|x| x.as_str())
                        .collect();
                    println!(
                        "{:<24} {:<16} {:<22} {}",
                        h["name"].as_str().unwrap_or(""),
                        h["cloud"].as_str().unwrap_or("-"),
                        h["created"].as_str().unwrap_or(""),
                        vms.join(",")
                    );
                }
            }
        }
        HostCmd::Remove { name } => {
            c.delete(&format!("/v1/hosts/{name}")).await?;
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
            let body = serde_json::json!({"name": name, "cloud": cloud});
            operator::register(&c, "providers", &name, &body, &out).await?;
            println!(
                "provider {name} registered for cloud {cloud}; credentials written to {}",
                out.display()
            );
        }
        ProviderCmd::List { json } => {
            let v: serde_json::Value = c.get_json("/v1/providers").await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{:<24} {:<16} REGISTERED", "PROVIDER", "CLOUD");
                for p in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<24} {:<16} {}",
                        p["name"].as_str().unwrap_or(""),
                        p["cloud"].as_str().unwrap_or(""),
                        p["created"].as_str().unwrap_or("")
                    );
                }
            }
        }
        ProviderCmd::Remove { name } => {
            c.delete(&format!("/v1/providers/{name}")).await?;
            println!("provider {name} removed");
        }
    }
    Ok(0)
}
