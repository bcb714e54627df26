//! `drvault audit`: the audit log of operator actions, as a table or JSON.

use anyhow::Result;

use super::operator::Conn;
use crate::wire::AuditQuery;

#[derive(clap::Args)]
pub(super) struct AuditArgs {
    /// Only entries at or after this time: RFC 3339 (2026-12-06T15:00:00Z) or a duration ago
    /// (90m, 2h, 7d). Without it, the latest entries.
    #[arg(long, value_name = "TIME", value_parser = parse_since)]
    since: Option<String>,
    /// At most this many entries (1 to 1000).
    #[arg(long, value_name = "N", default_value_t = crate::audit::DEFAULT_LIMIT,
        value_parser = clap::value_parser!(u32).range(1..=crate::audit::MAX_LIMIT as i64))]
    limit: u32,
    /// The entries as JSON (`{"entries": [...]}`, with their hashes).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Conn,
}

/// An RFC 3339 time or a duration before now, as the RFC 3339 UTC time the API takes.
fn parse_since(s: &str) -> Result<String, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t
            .with_timezone(&chrono::Utc)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    }
    let ago = humantime::parse_duration(s).map_err(|_| {
        format!("{s:?} is neither an RFC 3339 time (2026-12-06T15:00:00Z) nor a duration (2h, 7d)")
    })?;
    let now = std::time::SystemTime::now();
    let then = now
        .checked_sub(ago)
        .filter(|t| *t >= std::time::UNIX_EPOCH)
        .ok_or_else(|| format!("{s:?} goes back before 1970"))?;
    Ok(humantime::format_rfc3339_seconds(then).to_string())
}

pub(super) async fn run(a: AuditArgs) -> Result<i32> {
    let c = a.conn.client()?;
    let list = c
        .audit(&AuditQuery {
            since: a.since,
            limit: Some(a.limit),
        })
        .await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    println!(
        "{:>6} {:<20} {:<18} {:<22} {:<24} {:<15} {:<10}  JOB",
        "SEQ", "AT", "ACTOR", "ACTION", "TARGET", "FROM", "RESULT"
    );
    for e in &list.entries {
        let result = match &e.code {
            Some(code) => format!("{} {code}", e.status),
            None => e.status.to_string(),
        };
        println!(
            "{:>6} {:<20} {:<18} {:<22} {:<24} {:<15} {:<10}  {}",
            e.seq,
            e.at,
            e.actor,
            e.action,
            e.target,
            e.from,
            result,
            e.job.as_deref().unwrap_or("-")
        );
    }
    if list.entries.is_empty() {
        println!("no entries");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_time_or_a_duration_and_refuses_the_rest() {
        assert_eq!(
            parse_since("2026-12-06T16:00:00+01:00").unwrap(),
            "2026-12-06T15:00:00Z"
        );
        assert!(parse_since("2h").unwrap().ends_with('Z'));
        let e = parse_since("notadate").unwrap_err();
        assert!(e.contains("RFC 3339"), "{e}");
    }
}
