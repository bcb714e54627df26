//! Jobs: the seed's Jobs tab. Every long operation (enable protection, finalize protection, and
//! later merge, resync, failover) is a job with a kind, a VM, a state, progress, steps, start and
//! end time and, when it failed, the error the caller saw.
//!
//! Job records are versioned records in the vault (written on every state change); progress is
//! kept in memory and written into the record at most once every [`PROGRESS_PERSIST_EVERY`]
//! (and with any other change of the job), so a hot upload path never writes a record per block
//! and a restarted server still shows how far a job had come.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::RwLock;

use crate::error::{Error, Result};
use crate::vault::layout::{self, Family};
use crate::vault::Records;
pub use crate::wire::{Job, JobError, JobKind, JobState, JobStep};

impl JobKind {
    pub fn title(self) -> &'static str {
        match self {
            JobKind::EnableProtection => "Enable protection",
            JobKind::FinalizeProtection => "Finalize protection",
            JobKind::Merge => "Merge logs",
            JobKind::TestFailover => "Test failover",
            JobKind::PlannedFailover => "Planned failover",
            JobKind::UnplannedFailover => "Unplanned failover",
            JobKind::FailoverCleanup => "Test failover cleanup",
            JobKind::FailoverCommit => "Commit failover",
            JobKind::RecoveryPlan => "Recovery plan failover",
            JobKind::Resync => "Resynchronize",
            JobKind::Failback => "Fail back",
            JobKind::Verify => "Verify",
            JobKind::GarbageCollection => "Garbage collection",
            JobKind::DisableProtection => "Disable protection",
        }
    }
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::WaitingForInput => "waiting_for_input",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }
}

/// How often progress kept in memory is written into job records, at most.
pub const PROGRESS_PERSIST_EVERY: Duration = Duration::from_secs(1);

/// The job registry: vault records plus an in-memory cache (this server writes all jobs).
#[derive(Clone)]
pub struct Jobs {
    records: Records,
    cache: Arc<RwLock<BTreeMap<String, Job>>>,
    /// Jobs an operator resumed (`drvault jobs resume`), consumed by the waiting job.
    resumed: Arc<RwLock<BTreeSet<String>>>,
    /// Jobs whose progress changed in memory since their record was last written.
    progress_unsaved: Arc<std::sync::Mutex<BTreeSet<String>>>,
    /// Each job as it reaches a final state, for whoever listens (webhooks); sending never
    /// waits, a listener that falls behind is told how many it missed.
    finished: tokio::sync::broadcast::Sender<Job>,
    /// This server's id, stamped on the jobs it creates.
    server: Arc<std::sync::OnceLock<String>>,
    /// Record versions of other servers' jobs as last read ([`Jobs::refresh`]).
    seen: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
}

/// Finished jobs a slow listener may fall behind by before it misses some.
const FINISHED_BACKLOG: usize = 256;

impl Jobs {
    /// Loads every job record of the vault.
    pub async fn load(records: Records) -> Result<Jobs> {
        let mut cache = BTreeMap::new();
        for id in records.ids(Family::Job).await? {
            if let Some(v) = records
                .load::<Job>(&layout::record(Family::Job, &id))
                .await?
            {
                cache.insert(id, v.value);
            }
        }
        publish_state_gauges(&cache);
        Ok(Jobs {
            records,
            cache: Arc::new(RwLock::new(cache)),
            resumed: Default::default(),
            progress_unsaved: Default::default(),
            finished: tokio::sync::broadcast::channel(FINISHED_BACKLOG).0,
            server: Default::default(),
            seen: Default::default(),
        })
    }

    /// Names the server that creates jobs from now on (set once, at start).
    pub fn set_server(&self, id: &str) {
        let _ = self.server.set(id.to_string());
    }

    fn is_mine(&self, j: &Job) -> bool {
        j.server.is_none() || j.server.as_deref() == self.server.get().map(String::as_str)
    }

    /// Marks failed the unfinished jobs of `vm` that a server now gone ran (`gone` says which
    /// servers are): this server took the VM over, and their tasks died with that server.
    pub async fn fail_orphans(&self, vm: &str, gone: impl Fn(&str) -> bool) -> Result<usize> {
        let stale: Vec<(String, String)> = self
            .cache
            .read()
            .await
            .values()
            .filter(|j| !j.state.is_final() && j.kind != JobKind::EnableProtection)
            .filter(|j| j.vm.as_deref() == Some(vm))
            .filter_map(|j| Some((j.id.clone(), j.server.clone()?)))
            .filter(|(_, s)| gone(s))
            .collect();
        for (id, server) in &stale {
            let err = Error::Conflict {
                code: "interrupted",
                message: format!(
                    "server {server} stopped while this job ran; run the operation again"
                ),
                recoverable: true,
            };
            self.fail(id, &err).await?;
        }
        Ok(stale.len())
    }

    /// Every job that reaches a final state from now on.
    pub fn subscribe_finished(&self) -> tokio::sync::broadcast::Receiver<Job> {
        self.finished.subscribe()
    }

    /// Marks failed every job a previous server process left unfinished, except "Enable
    /// protection" (it spans agent runs and restarts; finalization ends it). Their tasks died with
    /// that process, so they would otherwise show `running` forever. Returns how many there were.
    pub async fn fail_interrupted(&self) -> Result<usize> {
        let stale: Vec<String> = self
            .cache
            .read()
            .await
            .values()
            .filter(|j| !j.state.is_final() && j.kind != JobKind::EnableProtection)
            // Other servers' jobs run there; the one that takes their VM over fails them if
            // their server is gone.
            .filter(|j| self.is_mine(j))
            .map(|j| j.id.clone())
            .collect();
        let err = Error::Conflict {
            code: "interrupted",
            message: "the server stopped while this job ran; run the operation again".into(),
            recoverable: true,
        };
        for id in &stale {
            self.fail(id, &err).await?;
        }
        if !stale.is_empty() {
            tracing::warn!(
                jobs = stale.len(),
                "jobs interrupted by a restart marked failed"
            );
        }
        Ok(stale.len())
    }

    /// Creates a job (state running unless `queued`), durable before returning.
    pub async fn create(
        &self,
        kind: JobKind,
        vm: Option<&str>,
        steps: &[&str],
        state: JobState,
    ) -> Result<Job> {
        let now = crate::util::unix_now();
        let job = Job {
            id: uuid::Uuid::new_v4().to_string(),
            kind,
            title: kind.title().to_string(),
            vm: vm.map(String::from),
            state,
            progress: 0.0,
            steps: steps
                .iter()
                .map(|s| JobStep {
                    name: s.to_string(),
                    state: JobState::Queued,
                    detail: None,
                })
                .collect(),
            created_unix: now,
            started_unix: (state == JobState::Running).then_some(now),
            ended_unix: None,
            error: None,
            waiting_for: None,
            disks: Vec::new(),
            server: self.server.get().cloned(),
        };
        self.records
            .create(&layout::record(Family::Job, &job.id), &job)
            .await?;
        let mut c = self.cache.write().await;
        c.insert(job.id.clone(), job.clone());
        publish_state_gauges(&c);
        Ok(job)
    }

    /// Applies `f` to a job and persists the result.
    pub async fn modify(&self, id: &str, f: impl Fn(&mut Job)) -> Result<Job> {
        let prefix = layout::record(Family::Job, id);
        // The record's progress may be older than memory's: the write carries memory's along
        // rather than taking the cache back to it; per-disk progress likewise.
        let (progress, disks, was_final) = match self.cache.read().await.get(id) {
            Some(j) => (Some(j.progress), j.disks.clone(), j.state.is_final()),
            None => (None, Vec::new(), false),
        };
        let updated = self
            .records
            .update(&prefix, |cur: Option<&Job>| {
                let mut j = cur.cloned().ok_or_else(|| {
                    Error::not_found("job_not_found", format!("job {id} not found"))
                })?;
                if let Some(p) = progress {
                    j.progress = p;
                }
                for d in &disks {
                    match j.disks.iter_mut().find(|x| x.disk == d.disk) {
                        Some(x) => *x = d.clone(),
                        None => j.disks.push(d.clone()),
                    }
                }
                f(&mut j);
                Ok(Some(j))
            })
            .await?
            .ok_or_else(|| Error::not_found("job_not_found", format!("job {id} not found")))?;
        let mut c = self.cache.write().await;
        c.insert(id.to_string(), updated.value.clone());
        // The write carried the progress: the once-a-second save has nothing left to write
        // (a record version with nothing new would be a write no one asked for).
        self.unsaved().remove(id);
        publish_state_gauges(&c);
        if updated.value.state.is_final() && !was_final {
            // No listener is not an error: webhooks may be off.
            let _ = self.finished.send(updated.value.clone());
        }
        Ok(updated.value)
    }

    pub async fn step(&self, id: &str, step: &str, state: JobState) -> Result<Job> {
        self.modify(id, |j| {
            if let Some(s) = j.steps.iter_mut().find(|s| s.name == step) {
                s.state = state;
            }
            if j.state == JobState::Queued {
                j.state = JobState::Running;
                j.started_unix = Some(crate::util::unix_now());
            }
        })
        .await
    }

    /// Sets a step's state and what it found.
    pub async fn step_with(
        &self,
        id: &str,
        step: &str,
        state: JobState,
        detail: String,
    ) -> Result<Job> {
        self.step(id, step, state).await?;
        self.modify(id, |j| {
            if let Some(s) = j.steps.iter_mut().find(|s| s.name == step) {
                s.detail = Some(detail.clone());
            }
        })
        .await
    }

    pub async fn succeed(&self, id: &str) -> Result<Job> {
        self.modify(id, |j| {
            j.state = JobState::Succeeded;
            j.progress = 1.0;
            j.ended_unix = Some(crate::util::unix_now());
            for s in &mut j.steps {
                if !s.state.is_final() {
                    s.state = JobState::Succeeded;
                }
            }
        })
        .await
    }

    pub async fn fail(&self, id: &str, err: &Error) -> Result<Job> {
        let je = JobError {
            code: err.code().to_string(),
            message: err.to_string(),
            recoverable: err.recoverable(),
        };
        self.modify(id, |j| {
            j.state = JobState::Failed;
            j.ended_unix = Some(crate::util::unix_now());
            j.error = Some(je.clone());
        })
        .await
    }

    /// In-memory progress update, cheap enough for the upload path: the record follows within
    /// [`PROGRESS_PERSIST_EVERY`] ([`Jobs::persist_progress`]).
    pub async fn set_progress(&self, id: &str, progress: f64) {
        let progress = progress.clamp(0.0, 1.0);
        if let Some(j) = self.cache.write().await.get_mut(id) {
            if j.progress != progress {
                j.progress = progress;
                self.unsaved().insert(id.to_string());
            }
        }
    }

    fn unsaved(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        // Inserts and takes are single steps: a poisoned set is still sound.
        self.progress_unsaved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Writes into their records the progress of jobs that changed since their last write. A
    /// job whose write failed is written again next time.
    pub async fn persist_progress(&self) -> Result<()> {
        let ids = std::mem::take(&mut *self.unsaved());
        let mut first_error = None;
        for id in ids {
            // `modify` writes the cached progress whatever `f` does.
            if let Err(e) = self.modify(&id, |_| {}).await {
                if e.code() != "job_not_found" {
                    self.unsaved().insert(id);
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Runs [`Jobs::persist_progress`] every [`PROGRESS_PERSIST_EVERY`] on `tasks`.
    pub fn spawn_progress_persist(&self, tasks: &crate::tasks::Tasks) {
        let me = self.clone();
        tasks.every("job-progress-persist", PROGRESS_PERSIST_EVERY, move || {
            let me = me.clone();
            async move {
                if let Err(e) = me.persist_progress().await {
                    tracing::warn!(error = %e, "could not save the progress of jobs; retried");
                }
            }
        });
    }

    /// In-memory per-disk progress, written into the record with the progress (at most once per
    /// [`PROGRESS_PERSIST_EVERY`]): replaces the entry of the same disk, or adds it.
    pub async fn set_disk_progress(&self, id: &str, disk: crate::wire::DiskProgress) {
        if let Some(j) = self.cache.write().await.get_mut(id) {
            match j.disks.iter_mut().find(|d| d.disk == disk.disk) {
                Some(d) => *d = disk,
                None => j.disks.push(disk),
            }
            self.unsaved().insert(id.to_string());
        }
    }

    /// Resumes a job waiting for a manual action.
    pub async fn resume(&self, id: &str) -> Result<Job> {
        let j = self
            .get(id)
            .await
            .ok_or_else(|| Error::not_found("job_not_found", format!("job {id} not found")))?;
        if j.state != JobState::WaitingForInput {
            return Err(Error::conflict(
                "job_not_waiting",
                format!("job {id} is {}, not waiting for input", j.state.as_str()),
            ));
        }
        self.resumed.write().await.insert(id.to_string());
        Ok(j)
    }

    /// Whether the job was resumed (clears the flag).
    pub async fn take_resume(&self, id: &str) -> bool {
        self.resumed.write().await.remove(id)
    }

    pub async fn get(&self, id: &str) -> Option<Job> {
        self.cache.read().await.get(id).cloned()
    }

    /// Reads the jobs other servers on the vault created or changed since the last call (their
    /// record version moved). This server's own jobs are never re-read: it writes them, and its
    /// cache may be ahead of their records (progress is saved every second).
    pub async fn refresh(&self) -> Result<()> {
        let latest = self.records.latest_versions(Family::Job).await?;
        let stale: Vec<String> = {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let cache = self.cache.read().await;
            latest
                .iter()
                .filter(|(id, v)| seen.get(*id).is_none_or(|s| s < *v))
                .filter(|(id, _)| {
                    cache
                        .get(*id)
                        .is_none_or(|j| !self.is_mine(j) || j.server.is_none())
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in stale {
            if let Some(v) = self
                .records
                .load::<Job>(&layout::record(Family::Job, &id))
                .await?
            {
                self.seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.clone(), v.version);
                let mut c = self.cache.write().await;
                if c.get(&id)
                    .is_none_or(|j| !self.is_mine(j) || j.server.is_none())
                {
                    c.insert(id, v.value);
                }
            }
        }
        Ok(())
    }

    /// All jobs, newest first.
    pub async fn list(&self) -> Vec<Job> {
        let mut v: Vec<Job> = self.cache.read().await.values().cloned().collect();
        v.sort_by(|a, b| {
            b.created_unix
                .cmp(&a.created_unix)
                .then_with(|| b.id.cmp(&a.id))
        });
        v
    }
}

fn publish_state_gauges(cache: &BTreeMap<String, Job>) {
    for state in [
        JobState::Queued,
        JobState::Running,
        JobState::WaitingForInput,
        JobState::Succeeded,
        JobState::Failed,
    ] {
        let n = cache.values().filter(|j| j.state == state).count();
        metrics::gauge!("drvault_jobs", "state" => state.as_str()).set(n as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::testing::memory;

    #[tokio::test]
    async fn progress_reaches_the_record_once_per_persist_and_survives_a_restart() {
        let (_s, vault) = memory().await;
        let jobs = Jobs::load(vault.records.clone()).await.unwrap();
        let job = jobs
            .create(
                JobKind::EnableProtection,
                Some("vm"),
                &["Copy"],
                JobState::Running,
            )
            .await
            .unwrap();
        let prefix = layout::record(Family::Job, &job.id);
        let version = || async { vault.records.load::<Job>(&prefix).await.unwrap().unwrap() };
        let v0 = version().await.version;
        // A hundred blocks' progress: memory only.
        for k in 1..=100 {
            jobs.set_progress(&job.id, f64::from(k) / 200.0).await;
        }
        assert_eq!(jobs.get(&job.id).await.unwrap().progress, 0.5);
        assert_eq!(version().await.version, v0, "no record write per update");
        jobs.persist_progress().await.unwrap();
        let saved = version().await;
        assert_eq!((saved.version, saved.value.progress), (v0 + 1, 0.5));
        // Nothing changed since: nothing to write.
        jobs.persist_progress().await.unwrap();
        jobs.set_progress(&job.id, 0.5).await;
        jobs.persist_progress().await.unwrap();
        assert_eq!(version().await.version, v0 + 1);
        // A step change keeps the progress memory has, and a restarted server shows it.
        jobs.set_progress(&job.id, 0.75).await;
        jobs.step(&job.id, "Copy", JobState::Running).await.unwrap();
        assert_eq!(jobs.get(&job.id).await.unwrap().progress, 0.75);
        let restarted = Jobs::load(vault.records.clone()).await.unwrap();
        assert_eq!(restarted.get(&job.id).await.unwrap().progress, 0.75);
    }
}
