//! `drvault serve` and `drvault status`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use super::init_logging;
use super::operator::Conn;

pub(super) async fn serve(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    listen: Option<String>,
) -> Result<i32> {
    let mut cfg = match &config {
        Some(p) => crate::config::Config::load(p)?,
        None => crate::config::Config::default(),
    };
    if let Some(d) = data_dir {
        cfg.server.data_dir = d;
    }
    if let Some(l) = listen {
        cfg.server.listen = l;
    }
    cfg.validate()?;
    init_logging("info", cfg.server.log_format == "json");
    let prepared = crate::server::prepare(cfg.clone()).await?;
    let dd = &cfg.server.data_dir;
    println!(
        "drvault {} serving {}",
        env!("CARGO_PKG_VERSION"),
        prepared.url
    );
    println!("  vault           {}", cfg.vault_url()?);
    println!("  master key      {}", cfg.master_key_path().display());
    println!(
        "  operator token  {}",
        dd.join(crate::server::OPERATOR_TOKEN_FILE).display()
    );
    println!(
        "  server file     {}",
        dd.join(crate::server::SERVER_FILE).display()
    );
    println!(
        "  console         {}/ (sign in with an account token, e.g. admin's operator token)",
        prepared.url
    );
    println!("  metrics         {}/metrics", prepared.url);
    use std::io::Write;
    let _ = std::io::stdout().flush();
    crate::server::run(prepared, crate::server::shutdown_signal()).await;
    Ok(0)
}

pub(super) async fn status(wait: Option<Duration>, json: bool, conn: Conn) -> Result<i32> {
    let deadline = std::time::Instant::now() + wait.unwrap_or_default();
    loop {
        // server.json appears once the server listens; a stale one from a stopped server
        // fails to connect: both are retried while --wait lasts.
        let answer = async {
            let c = conn.client()?;
            let info = c.server_info().await?;
            Ok::<_, anyhow::Error>((c.base().to_string(), info))
        }
        .await;
        match answer {
            Ok((url, info)) if json => {
                let mut v = serde_json::to_value(&info)?;
                v["url"] = serde_json::Value::String(url);
                super::print_json(&v)?;
                return Ok(0);
            }
            Ok((url, info)) => {
                println!("drvault {} answers at {url}", info.version);
                return Ok(0);
            }
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `drvault servers`.
pub(super) async fn servers(json: bool, conn: Conn) -> Result<i32> {
    let list = conn.client()?.servers().await?;
    if json {
        super::print_json(&list)?;
        return Ok(0);
    }
    println!(
        "{:<16} {:<5} {:>9} {:>6}  {:<28} VMS (epoch, lease age)",
        "SERVER", "LIVE", "SEEN", "LEASES", "URL"
    );
    for s in &list.servers {
        let vms: Vec<String> = s
            .leases
            .iter()
            .map(|l| format!("{} ({}, {:.0}s)", l.vm, l.epoch, l.age_s))
            .collect();
        println!(
            "{:<16} {:<5} {:>8.1}s {:>6}  {:<28} {}",
            if s.this_server {
                format!("{}*", s.id)
            } else {
                s.id.clone()
            },
            if s.live { "yes" } else { "no" },
            s.last_seen_age_s,
            s.leases.len(),
            s.url,
            vms.join(", ")
        );
    }
    println!(
        "(* answered; a server unseen for {} s is not live and its VMs go to the others)",
        list.lease_ttl_s
    );
    Ok(0)
}
