//! Verify (scrub) and garbage collection: the vault's maintenance jobs.
//!
//! * [`refs`] finds what the records reference (the mark of GC, the object list of verify).
//! * [`verify`] re-reads referenced objects, checks tag and name, quarantines what is damaged
//!   and registers it in the damage register ([`crate::replica::damage`]), which marks the
//!   recovery points that need it.
//! * [`gc`] deletes objects nothing references any more.
//!
//! Both run as jobs ("Verify", "Garbage collection") started by the operator (`drvault verify`,
//! `drvault gc`) or, for verify, by the daily schedule (`[verify] interval_s`). They exclude each
//! other: a verify moving a damaged object to quarantine and a collection deleting it must not
//! race, and a verify must not report objects a collection is removing as missing.
//!
//! ## Why collection is safe while agents upload
//!
//! A collection *marks* everything reachable from the records, then *sweeps* (deletes) objects
//! under `chunks/`, `maps/`, `logs/` and `stage/` that are not marked. An object is deleted only
//! if all of these hold:
//!
//! 1. No record references it when the mark reads them, in the order [`refs`] explains (open
//!    sessions' receipts first, then resync sessions, then disk records), so a reference moving
//!    from one holder to the next during the mark is seen in one of them.
//! 2. It is older than the collection's start and than the grace period. An upload writes the
//!    chunk first and its receipt after ("chunk durable, then receipt"); whatever an upload
//!    stores after the collection started is younger than that start.
//! 3. No writer stored or reused it since the collection started (the write fence's touch, see
//!    [`crate::chunk::fence`]), and no writer was between storing objects and referencing them
//!    when it started (the fence's shared lock). This is what makes `--grace 0` safe too: a
//!    deduplicated upload reuses an old, unreferenced chunk without making it younger.
//!
//! With other servers on the vault, condition 3 holds across processes: the collection runs
//! in rounds ([`rounds`]) in which every live server begins a collection in its own fence
//! before the mark, and stops its writers and reports what they touched (and what its point
//! readers use) before the sweep.
//!
//! The grace period (default 24 h 5 min, as in Proxmox Backup Server) is the second line of
//! defence for anything the fence does not see: a server that was not live when the round
//! began, or a receipt a session wrote but no record points at. It must be longer than any
//! upload session, because a chunk is referenced by a receipt only from the moment the
//! receipt is written; 24 h covers a day-long initial replication step, and the 5 minutes cover
//! clock differences between the server and the object store, whose clock stamps the objects.
//!
//! A mark that cannot read part of a map (damaged or missing segment, unreadable receipt) would
//! not see the chunks behind it, so collection refuses (`409 gc_mark_incomplete`) until verify
//! has registered the damage and the points needing it are gone; it never guesses.

pub mod gc;
pub mod refs;
pub mod rounds;
pub mod verify;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::jobs::{Job, JobKind, JobState, Jobs};
use crate::replica::resync::Resyncs;
use crate::replica::Replicas;
use crate::store::{Key, StoreError};
use crate::tasks::Tasks;
use crate::vault::layout::{self, Family};
use crate::vault::Vault;
pub use crate::wire::{ObjectFamily, Started};

/// Default grace period of garbage collection: 24 hours and 5 minutes.
pub const DEFAULT_GRACE_S: u64 = 24 * 3600 + 300;

impl ObjectFamily {
    pub fn word(self) -> &'static str {
        match self {
            ObjectFamily::Chunk => "chunk",
            ObjectFamily::Map => "map",
            ObjectFamily::Log => "log",
            ObjectFamily::Receipt => "receipt",
            ObjectFamily::Record => "record",
            ObjectFamily::Pack => "pack",
        }
    }

    /// The family of an object by its key's first segment.
    pub fn of_key(k: &str) -> Option<ObjectFamily> {
        Some(match k.split('/').next()? {
            "chunks" => ObjectFamily::Chunk,
            "maps" => ObjectFamily::Map,
            "logs" => ObjectFamily::Log,
            "stage" => ObjectFamily::Receipt,
            "records" => ObjectFamily::Record,
            "packs" => ObjectFamily::Pack,
            _ => return None,
        })
    }
}

/// An object that could not be read back as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: Key,
    pub family: ObjectFamily,
    /// Not there at all (else: there but damaged).
    pub missing: bool,
    pub reason: String,
}

impl Problem {
    /// Damage from a read error; a transient store error is returned as the error (the job
    /// fails and is retried later: an outage is not damage).
    pub fn classify(key: &Key, family: ObjectFamily, e: Error) -> Result<Problem> {
        let (missing, reason) = match e {
            Error::Store(StoreError::NotFound { .. }) => (true, "missing".to_string()),
            Error::Corrupt(c) => (false, c.to_string()),
            // What does not parse after its tag checked (a record, a map's geometry).
            Error::Internal(m) => (false, m),
            other => return Err(other),
        };
        Ok(Problem {
            key: key.clone(),
            family,
            missing,
            reason,
        })
    }
}

/// The verify and garbage-collection service.
#[derive(Clone)]
pub struct Scrub {
    pub(crate) vault: Vault,
    pub(crate) catalog: Catalog,
    pub(crate) replicas: Replicas,
    pub(crate) resyncs: Resyncs,
    pub(crate) jobs: Jobs,
    /// The maintenance job running now, if any.
    running: Arc<Mutex<Option<String>>>,
    pub(crate) default_grace_s: u64,
    /// The server's background runner: jobs and schedules are its tasks, so shutdown stops
    /// the schedules and waits for a running job.
    tasks: Tasks,
    /// The audit log whose chain verify walks, once the server attached it.
    audit: Arc<std::sync::OnceLock<crate::audit::AuditLog>>,
    /// This server's part in a collection another server runs ([`rounds`]).
    joined: Arc<Mutex<Option<rounds::Joined>>>,
}

impl Scrub {
    pub fn new(
        vault: Vault,
        catalog: Catalog,
        replicas: Replicas,
        resyncs: Resyncs,
        jobs: Jobs,
        default_grace_s: u64,
        tasks: Tasks,
    ) -> Scrub {
        Scrub {
            vault,
            catalog,
            replicas,
            resyncs,
            jobs,
            running: Default::default(),
            default_grace_s,
            tasks,
            audit: Default::default(),
            joined: Default::default(),
        }
    }

    /// Lets verify check the audit log's chain (and its tail against what this server wrote).
    pub fn attach_audit(&self, audit: crate::audit::AuditLog) {
        // Set once at startup; a second call would only repeat the same log.
        let _ = self.audit.set(audit);
    }

    pub(crate) fn audit(&self) -> Option<&crate::audit::AuditLog> {
        self.audit.get()
    }

    /// Creates the job and runs `work` in the background; refuses while another maintenance
    /// job runs.
    async fn spawn<R, F, Fut>(&self, kind: JobKind, steps: &[&str], work: F) -> Result<Job>
    where
        R: Serialize + Send + Sync + 'static,
        F: FnOnce(Scrub, String) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<R>> + Send + 'static,
    {
        let mut running = self.running.lock().await;
        if let Some(id) = running.as_ref() {
            return Err(Error::conflict_recoverable(
                "maintenance_running",
                format!("a verify or garbage collection is already running (job {id}); wait for it to end"),
            ));
        }
        // One server at a time runs maintenance: the lease says which.
        let cluster = self.catalog.cluster().clone();
        cluster
            .acquire(crate::cluster::MAINTENANCE, crate::cluster::MAINTENANCE, |_| async {
                Ok(())
            })
            .await
            .map_err(|e| match e {
                Error::LeaseHeld { owner_url, .. } => Error::conflict_recoverable(
                    "maintenance_running",
                    format!("the server at {owner_url} is running a verify or garbage collection; wait for it to end"),
                ),
                other => other,
            })?;
        let job = self
            .jobs
            .create(kind, None, steps, JobState::Running)
            .await?;
        *running = Some(job.id.clone());
        drop(running);
        let me = self.clone();
        let id = job.id.clone();
        let word = report_word(kind);
        self.tasks.spawn(word, async move {
            let result = work(me.clone(), id.clone()).await;
            let stored = match result {
                Ok(report) => me.store_report(word, &id, &report).await,
                Err(e) => Err(e),
            };
            match stored {
                Ok(()) => {
                    let _ = me.jobs.succeed(&id).await;
                }
                Err(e) => {
                    tracing::warn!(job = %id, kind = word, error = %e, "maintenance job failed");
                    let _ = me.jobs.fail(&id, &e).await;
                }
            }
            if let Err(e) = me
                .catalog
                .cluster()
                .release(crate::cluster::MAINTENANCE)
                .await
            {
                tracing::warn!(error = %e, "could not release the maintenance lease; it frees when this server stops");
            }
            *me.running.lock().await = None;
        });
        Ok(job)
    }

    async fn store_report<R: Serialize>(&self, word: &str, job: &str, report: &R) -> Result<()> {
        let prefix = layout::record(Family::Scrub, &format!("{word}-{job}"));
        self.vault.records.create(&prefix, report).await?;
        Ok(())
    }

    /// Starts a verify (`since`: only objects written since then, for the schedule).
    pub async fn start_verify(
        &self,
        req: verify::VerifyRequest,
        since: Option<u64>,
    ) -> Result<Job> {
        req.validate()?;
        if let Some(vm) = &req.vm {
            self.catalog.vm_for(None, vm).await?;
        }
        self.spawn(JobKind::Verify, verify::STEPS, move |me, job| async move {
            verify::run(&me, &job, &req, since).await
        })
        .await
    }

    /// Starts a garbage collection.
    pub async fn start_gc(&self, req: gc::GcRequest) -> Result<Job> {
        let grace = req.grace_s.unwrap_or(self.default_grace_s);
        self.spawn(
            JobKind::GarbageCollection,
            gc::STEPS,
            move |me, job| async move {
                let started = crate::util::unix_now();
                let report = gc::run(&me, &job, req.dry_run, grace).await?;
                if !req.dry_run {
                    me.record_gc(started).await?;
                }
                Ok(report)
            },
        )
        .await
    }

    /// The report of a finished verify or collection job.
    pub async fn report<R: serde::de::DeserializeOwned>(
        &self,
        kind: JobKind,
        job: &str,
    ) -> Result<R> {
        let j = self
            .jobs
            .get(job)
            .await
            .filter(|j| j.kind == kind)
            .ok_or_else(|| {
                Error::not_found(
                    "job_not_found",
                    format!("no {} job {job}", report_word(kind)),
                )
            })?;
        if !j.state.is_final() {
            return Err(Error::conflict_recoverable(
                "report_not_ready",
                format!("job {job} is still running"),
            ));
        }
        let prefix = layout::record(Family::Scrub, &format!("{}-{job}", report_word(kind)));
        self.vault
            .records
            .load::<R>(&prefix)
            .await?
            .map(|v| v.value)
            .ok_or_else(|| {
                Error::not_found(
                    "report_not_found",
                    format!(
                        "job {job} ended without a report{}",
                        j.error
                            .map(|e| format!(": {} [{}]", e.message, e.code))
                            .unwrap_or_default()
                    ),
                )
            })
    }

    /// The damage register as it stands.
    pub async fn damage(&self) -> Arc<crate::replica::damage::DamageRecord> {
        self.replicas.damage().get().await
    }

    /// The start of the last collection that succeeded.
    pub async fn last_gc(&self) -> Result<Option<u64>> {
        Ok(self
            .vault
            .records
            .load::<GcSchedule>(&layout::record(Family::Scrub, GC_SCHEDULE))
            .await?
            .and_then(|v| v.value.last_gc_unix))
    }

    async fn record_gc(&self, started_unix: u64) -> Result<()> {
        self.vault
            .records
            .update(
                &layout::record(Family::Scrub, GC_SCHEDULE),
                move |cur: Option<&GcSchedule>| {
                    // Never move backwards (a manual run and the schedule may finish in any order).
                    let last = cur.and_then(|c| c.last_gc_unix).unwrap_or(0);
                    Ok((started_unix > last).then_some(GcSchedule {
                        last_gc_unix: Some(started_unix),
                    }))
                },
            )
            .await?;
        Ok(())
    }

    /// Runs a garbage collection with the configured grace every `interval`, counted from the
    /// last one that succeeded (kept in the vault); a new vault waits one interval first. A run
    /// refused because another maintenance job is running is tried again a minute later.
    pub fn spawn_gc_schedule(&self, interval: Duration) {
        let me = self.clone();
        me.tasks.clone().spawn("gc schedule", async move {
            let first_start = crate::util::unix_now();
            loop {
                let last = match me.last_gc().await {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::debug!(error = %e, "gc schedule unreadable; trying later");
                        if !nap(&me.tasks, Duration::from_secs(60)).await {
                            return;
                        }
                        continue;
                    }
                };
                let due = last.unwrap_or(first_start) + interval.as_secs();
                let now = crate::util::unix_now();
                if now < due {
                    if !nap(&me.tasks, Duration::from_secs(due - now)).await {
                        return;
                    }
                    continue;
                }
                match me.start_gc(gc::GcRequest::default()).await {
                    Ok(job) => {
                        tracing::info!(job = %job.id, "scheduled garbage collection started");
                        while me.running.lock().await.is_some() {
                            if !nap(&me.tasks, Duration::from_secs(5)).await {
                                return;
                            }
                        }
                        // A failed run (store outage, unreadable map) tries again after an hour.
                        if me.last_gc().await.ok().flatten() == last
                            && !nap(&me.tasks, Duration::from_secs(3600)).await
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "scheduled garbage collection postponed");
                        if !nap(&me.tasks, Duration::from_secs(60)).await {
                            return;
                        }
                    }
                }
            }
        });
    }

    /// Runs a verify of what was written since the last one every `interval`, counted from the
    /// last verify (a restarted server does not start over, nor verify at once on a new vault).
    pub fn spawn_schedule(&self, interval: Duration) {
        let me = self.clone();
        me.tasks.clone().spawn("verify schedule", async move {
            let first_start = crate::util::unix_now();
            loop {
                let last = me.damage().await.last_verify_unix;
                let due = last.unwrap_or(first_start) + interval.as_secs();
                let now = crate::util::unix_now();
                if now < due {
                    if !nap(&me.tasks, Duration::from_secs(due - now)).await {
                        return;
                    }
                    continue;
                }
                match me
                    .start_verify(verify::VerifyRequest::default(), last)
                    .await
                {
                    Ok(job) => {
                        tracing::info!(job = %job.id, since = ?last, "scheduled verify started");
                        while me.running.lock().await.is_some() {
                            if !nap(&me.tasks, Duration::from_secs(5)).await {
                                return;
                            }
                        }
                        // A failed run (store outage) tries again after a while, not at once.
                        if me.damage().await.last_verify_unix == last
                            && !nap(&me.tasks, Duration::from_secs(3600)).await
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "scheduled verify postponed");
                        if !nap(&me.tasks, Duration::from_secs(60)).await {
                            return;
                        }
                    }
                }
            }
        });
    }
}

/// When the last scheduled or manual collection that succeeded started (a record of its own:
/// the damage register is verify's).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GcSchedule {
    pub last_gc_unix: Option<u64>,
}

/// The record of the collection schedule.
const GC_SCHEDULE: &str = "schedule-gc";

fn report_word(kind: JobKind) -> &'static str {
    match kind {
        JobKind::GarbageCollection => "gc",
        _ => "verify",
    }
}

/// Sleeps for `period`; false when the server began stopping meanwhile (a schedule then ends).
async fn nap(tasks: &Tasks, period: Duration) -> bool {
    tokio::select! {
        _ = tasks.cancelled() => false,
        _ = tokio::time::sleep(period) => true,
    }
}
