//! The audit log: every operator action, with who, when, what, from where and the result,
//! append-only and hash-chained.
//!
//! Each entry is one sealed object `audit/<20-digit seq>`, written once with a create-only put,
//! so an append never rewrites what is there. Entries are numbered from 1 without gaps and each
//! holds the BLAKE3 of its predecessor (`prev`) next to its own (`hash`, over the entry's JSON
//! with `hash` empty): a removed entry leaves a gap, an edited one no longer opens (the seal
//! binds the object's name) or no longer matches its hash, and a reordered one breaks `prev`.
//! [`AuditLog::check_chain`] walks the chain for verify; the tail is checked against what this
//! process wrote, so truncating the newest entries is seen too.
//!
//! **Several writers.** Sequence numbers and `prev` come from this process's memory, and
//! appends are serialized by one lock. Several servers on one vault append to the one chain:
//! an entry's create-only put that finds its number taken (another server appended first)
//! re-reads the newest entry and renumbers and re-chains the entries still queued after it,
//! then writes again. Queued entries are not stored yet, so renumbering them changes nothing
//! anyone has read; the chain stays one line with no gap. Times are each server's clock, so
//! two servers' entries may go back by the skew between them.
//!
//! **A write that fails.** The action it records has already happened and its answer stands
//! (undoing a failover because the log could not be written would be worse). The entry keeps
//! its place in the queue, the failure is logged at error and counted in
//! `drvault_audit_write_errors_total`, and the queue is written again in order every few
//! seconds ([`AuditLog::spawn_retry`]) and before the next append. Entries waiting are shown by
//! `drvault_audit_pending_entries`; they are lost if the server stops before the store
//! recovers.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;

use crate::chunk::pipeline::ChunkError;
use crate::error::Error;
use crate::file_formats::ObjectKind;
use crate::store::{PutOutcome, StoreError};
use crate::tasks::Tasks;
use crate::vault::layout;
use crate::vault::registry::Principal;
use crate::vault::Vault;
pub use crate::wire::{AuditDamage, AuditEntry, AuditList, AuditQuery};

/// `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Entries `GET /v1/audit` returns without `limit`.
pub const DEFAULT_LIMIT: u32 = 100;
/// The most entries one `GET /v1/audit` returns.
pub const MAX_LIMIT: u32 = 1000;
/// How often entries whose write failed are written again.
pub const RETRY_PERIOD: Duration = Duration::from_secs(5);
/// Breaks verify lists at most (a vault with its audit prefix wiped would list every number).
const MAX_REPORTED: usize = 1000;

/// The name an entry gives the caller. The operator token is the `admin` account's.
pub fn actor_name(who: &Principal) -> String {
    match who {
        Principal::Account { name, .. } => name.clone(),
        Principal::Host { name } => format!("host/{name}"),
        Principal::Provider { name, .. } => format!("provider/{name}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit entry {seq} could not be written: {source}")]
    Write {
        seq: u64,
        #[source]
        source: ChunkError,
    },
    #[error(
        "audit entry {seq} already exists with other content: another process writes this \
         vault's audit log, and this server assumes it is the only writer"
    )]
    Taken { seq: u64 },
    #[error("audit entry {seq} cannot be read: {reason} (run `drvault verify`)")]
    Unreadable { seq: u64, reason: String },
    #[error("audit entry {seq} could not be read: {source}")]
    Read {
        seq: u64,
        #[source]
        source: StoreError,
    },
    #[error("listing the audit log: {0}")]
    List(#[source] StoreError),
    #[error("{message}")]
    Query { code: &'static str, message: String },
}

impl From<AuditError> for Error {
    fn from(e: AuditError) -> Error {
        match e {
            AuditError::Query { code, message } => Error::Invalid { code, message },
            AuditError::List(s) | AuditError::Read { source: s, .. } => Error::Store(s),
            AuditError::Write { source, .. } => source.into(),
            e @ AuditError::Taken { .. } => Error::conflict("audit_contended", e.to_string()),
            e @ AuditError::Unreadable { .. } => Error::internal(e.to_string()),
        }
    }
}

/// What the API layer knows of an action once it was answered.
#[derive(Debug, Clone)]
pub struct Action {
    pub actor: String,
    pub action: String,
    pub target: String,
    pub from: String,
    pub status: u16,
    pub code: Option<String>,
    pub job: Option<String>,
}

/// The hash of an entry: BLAKE3 of its JSON (fields in declaration order) with `hash` empty.
pub fn entry_hash(e: &AuditEntry) -> String {
    let mut plain = e.clone();
    plain.hash = String::new();
    // A struct of strings and numbers always serializes.
    let bytes = serde_json::to_vec(&plain).unwrap_or_default();
    blake3::hash(&bytes).to_hex().to_string()
}

/// The audit log of one vault. Cheap to clone; every clone shares the one writer.
#[derive(Clone)]
pub struct AuditLog {
    vault: Vault,
    writer: Arc<Mutex<Writer>>,
}

struct Writer {
    next_seq: u64,
    prev: String,
    /// `at` of the newest entry (Unix seconds): entries never go back in time.
    last_at: u64,
    /// Numbered entries not yet stored, oldest first.
    pending: VecDeque<AuditEntry>,
    /// The newest entry this process knows stored (seq, hash): verify checks the tail with it.
    stored: Option<(u64, String)>,
    /// The entry the last flush wrote last, as stored (renumbered if other servers appended).
    last_written: Option<AuditEntry>,
}

/// How many times one flush re-chains after other servers' appends before giving up (the
/// queue is written again later).
const MAX_RECHAINS: usize = 64;

impl AuditLog {
    /// Opens the log, continuing the chain after its newest entry.
    pub async fn open(vault: Vault) -> Result<AuditLog, AuditError> {
        let seqs = list_seqs(&vault).await?;
        let mut w = Writer {
            next_seq: 1,
            prev: GENESIS.to_string(),
            last_at: 0,
            pending: VecDeque::new(),
            stored: None,
            last_written: None,
        };
        if let Some(&last) = seqs.last() {
            w.next_seq = last + 1;
            match read_entry(&vault, last).await {
                Ok(e) => {
                    w.last_at = parse_at(&e.at).unwrap_or(0);
                    w.prev = e.hash.clone();
                    w.stored = Some((last, e.hash));
                }
                // New entries still get numbers after it; verify reports the break.
                Err(e) => tracing::error!(error = %e, "the newest audit entry is unreadable"),
            }
        }
        Ok(AuditLog {
            vault,
            writer: Arc::new(Mutex::new(w)),
        })
    }

    /// Numbers `a`, chains it and stores it after every entry before it. `Err` when it could
    /// not be stored now: it stays queued and is written again later (see the module doc).
    pub async fn append(&self, a: Action) -> Result<AuditEntry, AuditError> {
        let mut w = self.writer.lock().await;
        let at = crate::util::unix_now().max(w.last_at);
        let mut e = AuditEntry {
            seq: w.next_seq,
            at: crate::util::rfc3339(at),
            actor: a.actor,
            action: a.action,
            target: a.target,
            from: a.from,
            result: if a.status < 400 { "ok" } else { "error" }.to_string(),
            status: a.status,
            code: a.code,
            job: a.job,
            hash: String::new(),
            prev: w.prev.clone(),
        };
        e.hash = entry_hash(&e);
        w.next_seq += 1;
        w.last_at = at;
        w.prev = e.hash.clone();
        w.pending.push_back(e.clone());
        let flushed = self.flush_locked(&mut w).await;
        match flushed {
            // Ours was queued last: the flush wrote it last (renumbered if it had to be).
            Ok(()) => Ok(w.last_written.clone().unwrap_or(e)),
            Err(err) => {
                tracing::error!(seq = e.seq, action = %e.action, target = %e.target, actor = %e.actor,
                    error = %err, "audit entry not written yet: the action stands; retrying in the background");
                Err(err)
            }
        }
    }

    /// Writes the queued entries in order, stopping at the first that fails.
    async fn flush_locked(&self, w: &mut Writer) -> Result<(), AuditError> {
        let result = async {
            let mut taken = 0;
            while let Some(e) = w.pending.front() {
                match write_entry(&self.vault, e).await {
                    Ok(()) => {}
                    // Another server appended this number first: continue after its entry.
                    Err(AuditError::Taken { .. }) if taken < MAX_RECHAINS => {
                        taken += 1;
                        self.rechain(w).await?;
                        continue;
                    }
                    Err(err) => return Err(err),
                }
                w.stored = Some((e.seq, e.hash.clone()));
                w.last_written = w.pending.pop_front();
            }
            Ok(())
        }
        .await;
        metrics::gauge!("drvault_audit_pending_entries").set(w.pending.len() as f64);
        if result.is_err() {
            metrics::counter!("drvault_audit_write_errors_total").increment(1);
        }
        result
    }

    /// Renumbers and re-chains the queued entries after the newest stored one.
    async fn rechain(&self, w: &mut Writer) -> Result<(), AuditError> {
        let seqs = list_seqs(&self.vault).await?;
        let Some(&last) = seqs.last() else {
            return Ok(());
        };
        let tail = read_entry(&self.vault, last).await?;
        let mut seq = last + 1;
        let mut prev = tail.hash.clone();
        for e in w.pending.iter_mut() {
            e.seq = seq;
            e.prev = prev.clone();
            e.hash = String::new();
            e.hash = entry_hash(e);
            prev = e.hash.clone();
            seq += 1;
        }
        w.next_seq = seq;
        w.prev = prev;
        Ok(())
    }

    /// Entries whose write failed and wait to be written again.
    pub async fn pending(&self) -> usize {
        self.writer.lock().await.pending.len()
    }

    /// Writes queued entries again every [`RETRY_PERIOD`] until shutdown.
    pub fn spawn_retry(&self, tasks: &Tasks) {
        let me = self.clone();
        tasks.every("audit retry", RETRY_PERIOD, move || {
            let me = me.clone();
            async move {
                let mut w = me.writer.lock().await;
                if w.pending.is_empty() {
                    return;
                }
                match me.flush_locked(&mut w).await {
                    Ok(()) => tracing::info!("queued audit entries written"),
                    Err(e) => {
                        tracing::error!(pending = w.pending.len(), error = %e, "audit entries still not written")
                    }
                }
            }
        });
    }

    /// `GET /v1/audit`: stored entries, oldest first.
    pub async fn list(&self, q: &AuditQuery) -> Result<AuditList, AuditError> {
        let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(AuditError::Query {
                code: "invalid_limit",
                message: format!("limit {limit}: must be 1 to {MAX_LIMIT}"),
            });
        }
        let since = match &q.since {
            None => None,
            Some(s) => Some(parse_at(s).ok_or_else(|| AuditError::Query {
                code: "invalid_since",
                message: format!("since {s:?}: not an RFC 3339 time (e.g. 2026-12-06T15:00:00Z)"),
            })?),
        };
        let seqs = list_seqs(&self.vault).await?;
        let start = match since {
            None => seqs.len().saturating_sub(limit as usize),
            Some(t) => self.first_at_or_after(&seqs, t).await?,
        };
        let mut entries = Vec::new();
        for &seq in seqs.iter().skip(start).take(limit as usize) {
            entries.push(read_entry(&self.vault, seq).await?);
        }
        Ok(AuditList { entries })
    }

    /// The index in `seqs` of the first entry at or after `t` (entries never go back in time,
    /// so a binary search reads a handful of them).
    async fn first_at_or_after(&self, seqs: &[u64], t: u64) -> Result<usize, AuditError> {
        let (mut lo, mut hi) = (0usize, seqs.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = read_entry(&self.vault, seqs[mid]).await?;
            if parse_at(&e.at).unwrap_or(0) < t {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Ok(lo)
    }

    /// Walks the chain from entry 1 and returns every break: missing numbers (also at the end,
    /// against what this process stored), entries that do not open or parse, that do not match
    /// their hash, and entries whose `prev` is not their predecessor's hash.
    pub async fn check_chain(&self) -> Result<Vec<AuditDamage>, AuditError> {
        // What this process stored before the listing is certainly in it.
        let stored = self.writer.lock().await.stored.clone();
        let seqs = list_seqs(&self.vault).await?;
        let mut damage = Vec::new();
        let mut report = |seq: u64, problem: &str, reason: String| {
            if damage.len() < MAX_REPORTED {
                damage.push(AuditDamage {
                    kind: "audit_chain".into(),
                    seq,
                    problem: problem.into(),
                    reason,
                });
            }
        };
        let mut expected = 1u64;
        // The hash the next entry must name as `prev`; `None` after a break already reported.
        let mut prev: Option<String> = Some(GENESIS.to_string());
        for &seq in &seqs {
            if seq > expected {
                for missing in expected..seq {
                    report(
                        missing,
                        "missing",
                        format!("audit entry {missing} was removed"),
                    );
                    if missing - expected >= MAX_REPORTED as u64 {
                        break;
                    }
                }
                prev = None;
            }
            expected = seq + 1;
            let e = match read_entry(&self.vault, seq).await {
                Ok(e) => e,
                Err(AuditError::Unreadable { reason, .. }) => {
                    report(seq, "corrupt", reason);
                    prev = None;
                    continue;
                }
                Err(AuditError::Read {
                    source: StoreError::NotFound { .. },
                    ..
                }) => {
                    report(seq, "missing", format!("audit entry {seq} was removed"));
                    prev = None;
                    continue;
                }
                Err(other) => return Err(other),
            };
            if e.seq != seq {
                report(
                    seq,
                    "out_of_order",
                    format!("the entry stored as {seq} says it is entry {}", e.seq),
                );
            } else if entry_hash(&e) != e.hash {
                report(
                    seq,
                    "edited",
                    format!(
                        "audit entry {seq} does not match its own hash: its content was changed"
                    ),
                );
            } else if let Some(p) = prev.as_deref().filter(|p| *p != e.prev) {
                report(
                    seq,
                    "out_of_order",
                    format!(
                        "audit entry {seq} does not follow entry {}: its prev is {}, that entry's hash {p}",
                        seq.saturating_sub(1),
                        e.prev
                    ),
                );
            }
            if let Some((s, h)) = &stored {
                if *s == seq && *h != e.hash {
                    report(
                        seq,
                        "edited",
                        format!("audit entry {seq} is not the entry this server wrote"),
                    );
                }
            }
            prev = Some(e.hash);
        }
        if let Some((s, _)) = stored {
            let from = expected.max(1);
            for missing in (from..=s).take(MAX_REPORTED) {
                report(
                    missing,
                    "missing",
                    format!("audit entry {missing} was removed (the log ends before it)"),
                );
            }
        }
        Ok(damage)
    }
}

/// The stored entries' numbers, lowest first.
async fn list_seqs(vault: &Vault) -> Result<Vec<u64>, AuditError> {
    let mut seqs: Vec<u64> = vault
        .store()
        .list(&layout::audit_prefix())
        .await
        .map_err(AuditError::List)?
        .iter()
        .filter_map(|l| layout::parse_audit_entry(&l.key))
        .collect();
    seqs.sort_unstable();
    Ok(seqs)
}

async fn read_entry(vault: &Vault, seq: u64) -> Result<AuditEntry, AuditError> {
    let key = layout::audit_entry(seq);
    let plain = match vault.chunks.get_sealed(ObjectKind::Record, &key).await {
        Ok(p) => p,
        Err(ChunkError::Store(source)) => return Err(AuditError::Read { seq, source }),
        Err(e) => {
            return Err(AuditError::Unreadable {
                seq,
                reason: format!(
                    "audit entry {seq} does not open under its own name ({e}): its bytes were \
                     changed, or it was moved from another entry's place"
                ),
            })
        }
    };
    serde_json::from_slice(&plain).map_err(|e| AuditError::Unreadable {
        seq,
        reason: format!("audit entry {seq} does not parse: {e}"),
    })
}

async fn write_entry(vault: &Vault, e: &AuditEntry) -> Result<(), AuditError> {
    let key = layout::audit_entry(e.seq);
    let body = serde_json::to_vec(e).unwrap_or_default();
    let out = vault
        .chunks
        .put_sealed_if_absent(ObjectKind::Record, &key, body, false)
        .await
        .map_err(|source| AuditError::Write { seq: e.seq, source })?;
    if out == PutOutcome::Existed {
        // An earlier attempt may have stored it and then failed to answer: ours if it is equal.
        match read_entry(vault, e.seq).await {
            Ok(there) if there == *e => {}
            _ => return Err(AuditError::Taken { seq: e.seq }),
        }
    }
    Ok(())
}

/// Unix seconds of an RFC 3339 time.
fn parse_at(s: &str) -> Option<u64> {
    let t = chrono::DateTime::parse_from_rfc3339(s).ok()?.timestamp();
    u64::try_from(t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{CpuPool, KeyRing};
    use crate::store::Store;

    async fn vault() -> Vault {
        Vault::open(
            Store::open("memory://", &[]).unwrap(),
            Arc::new(KeyRing::random()),
            CpuPool::new(2),
            1,
        )
        .await
        .unwrap()
    }

    fn action(n: u32) -> Action {
        Action {
            actor: "admin".into(),
            action: "failover.test".into(),
            target: format!("vm/web{n:02}"),
            from: "127.0.0.1".into(),
            status: 202,
            code: None,
            job: Some(format!("job-{n}")),
        }
    }

    #[tokio::test]
    async fn entries_chain_and_a_reopened_log_continues_the_chain() {
        let v = vault().await;
        let log = AuditLog::open(v.clone()).await.unwrap();
        let a = log.append(action(1)).await.unwrap();
        let b = log.append(action(2)).await.unwrap();
        assert_eq!((a.seq, a.prev.as_str()), (1, GENESIS));
        assert_eq!((b.seq, b.prev.as_str()), (2, a.hash.as_str()));
        let again = AuditLog::open(v).await.unwrap();
        let c = again.append(action(3)).await.unwrap();
        assert_eq!((c.seq, c.prev.as_str()), (3, b.hash.as_str()));
        assert!(again.check_chain().await.unwrap().is_empty());
        let all = again.list(&AuditQuery::default()).await.unwrap();
        assert_eq!(
            all.entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        let last = again
            .list(&AuditQuery {
                since: None,
                limit: Some(1),
            })
            .await
            .unwrap();
        assert_eq!(last.entries[0].seq, 3);
    }

    #[tokio::test]
    async fn removed_and_truncated_entries_are_breaks() {
        let v = vault().await;
        let log = AuditLog::open(v.clone()).await.unwrap();
        for n in 1..=5 {
            log.append(action(n)).await.unwrap();
        }
        v.store().delete(&layout::audit_entry(2)).await.unwrap();
        v.store().delete(&layout::audit_entry(5)).await.unwrap();
        let d = log.check_chain().await.unwrap();
        let got: Vec<(u64, &str)> = d.iter().map(|d| (d.seq, d.problem.as_str())).collect();
        assert_eq!(got, [(2, "missing"), (5, "missing")]);
    }

    #[tokio::test]
    async fn bad_queries_are_refused() {
        let log = AuditLog::open(vault().await).await.unwrap();
        for (since, limit, code) in [
            (None, Some(0), "invalid_limit"),
            (None, Some(MAX_LIMIT + 1), "invalid_limit"),
            (Some("notadate"), None, "invalid_since"),
        ] {
            let q = AuditQuery {
                since: since.map(String::from),
                limit,
            };
            match log.list(&q).await {
                Err(AuditError::Query { code: c, .. }) => assert_eq!(c, code),
                other => panic!("{q:?}: {other:?}"),
            }
        }
    }
}
