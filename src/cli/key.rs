//! `drvault key list|rotate`: the vault's key ring, through the operator API.

use anyhow::Result;
use clap::Subcommand;

use super::operator::Conn;
use crate::wire::KeysView;

#[derive(Subcommand)]
pub enum KeyCmd {
    /// Show the keys, which one seals new objects, and how many objects each has sealed.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Add a new key for new writes; objects sealed with older keys stay readable. The server
    /// rewrites its key file: back it up again afterwards.
    Rotate {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: KeyCmd, conn: Conn) -> Result<i32> {
    let c = conn.client()?;
    let rotated = matches!(cmd, KeyCmd::Rotate { .. });
    let (v, json): (KeysView, bool) = match cmd {
        KeyCmd::List { json } => (c.keys().await?, json),
        KeyCmd::Rotate { json } => (c.rotate_key().await?, json),
    };
    if rotated {
        // The operator, not only the server log, must hear it: a backup of the key file taken
        // before the rotation cannot open what is sealed from now on.
        eprintln!(
            "key {} now seals new objects. The server rewrote its key file (vault.master_key_file, \
             by default master.key in its data directory): back it up again now; older copies \
             cannot read what is sealed from now on.",
            v.active
        );
    }
    if json {
        super::print_json(&v)?;
        return Ok(0);
    }
    println!("{:<6} {:<8} {:<22} SEALS", "KEY", "ACTIVE", "CREATED");
    for k in &v.keys {
        println!(
            "{:<6} {:<8} {:<22} {}",
            k.id,
            if k.active { "yes" } else { "" },
            crate::util::rfc3339(k.created_unix),
            k.seals
        );
    }
    Ok(0)
}
