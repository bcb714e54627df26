//! A garbage collection with other servers on the vault: the *round*, through two records.
//!
//! The collecting server writes `records/scrub/gc-round` (id, phase); every other server polls
//! it every second and answers in `records/scrub/gc-ack-<server id>`:
//!
//! 1. **mark**: each server begins a collection in its own write fence (waits out the
//!    critical sections it has in flight, then tracks what its writers store or reuse) and
//!    acknowledges. Once every live server has, every reference made before is in a record,
//!    and the collector marks from the vault's records (its caches are refreshed first).
//! 2. **sweep**: each server stops its writers' critical sections from starting (the fence's
//!    exclusive lock) and acknowledges with what its writers touched and what its point readers
//!    pin. The collector keeps those, and deletes. No writer anywhere can reuse an object
//!    between the collector's decision and its delete: the writers are stopped.
//! 3. **done**: the servers release their writers and end their collections.
//!
//! A server that is not live when the round starts takes no part (its leases go to others,
//! whose fencing stops it publishing); one that stops answering during the round makes the
//! collector give up without deleting (`gc_servers_unresponsive`). A participant whose
//! collector stops being live releases its writers after two lease TTLs, so a collector that
//! dies never stops ingest for longer. The residual risk, stated: a collector paused for more
//! than that between its last check and a delete could delete an object a writer reused since.
//! The collector checks it still holds the maintenance lease before every batch of deletes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Scrub;
use crate::chunk::fence::Collection;
use crate::error::{Error, Result};
use crate::vault::layout::{self, Family};

/// How often a participant reads the round record.
pub const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Mark,
    Sweep,
    Done,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    pub id: String,
    /// The collecting server.
    pub by: String,
    pub phase: Phase,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ack {
    pub round: String,
    pub phase: Option<Phase>,
    /// With `sweep`: keys and log prefixes this server's writers stored or reused.
    #[serde(default)]
    pub touched: Vec<String>,
    #[serde(default)]
    pub logs: Vec<String>,
    /// With `sweep`: map roots and log prefixes this server's point readers are using.
    #[serde(default)]
    pub pinned_maps: Vec<String>,
    #[serde(default)]
    pub pinned_logs: Vec<String>,
}

fn round_key() -> crate::store::Key {
    layout::record(Family::Scrub, "gc-round")
}

fn ack_key(server: &str) -> crate::store::Key {
    layout::record(Family::Scrub, &format!("gc-ack-{server}"))
}

/// A participant's part in a round run elsewhere.
pub(crate) struct Joined {
    round: String,
    collector: String,
    collection: Collection,
    blocked: Option<tokio::sync::OwnedRwLockWriteGuard<()>>,
    /// When the collector was last seen live.
    collector_seen: Instant,
}

impl Scrub {
    /// One poll of the round record (participants; every [`POLL`]).
    pub(crate) async fn participate(&self) -> Result<()> {
        let cluster = self.catalog.cluster().clone();
        let round = self
            .vault
            .records
            .load::<Round>(&round_key())
            .await?
            .map(|v| v.value);
        let mut joined = self.joined.lock().await;
        let Some(round) = round.filter(|r| r.by != cluster.id()) else {
            *joined = None;
            return Ok(());
        };
        if round.phase == Phase::Done || joined.as_ref().is_some_and(|j| j.round != round.id) {
            *joined = None;
        }
        if let Some(j) = joined.as_mut() {
            if cluster.alive(&j.collector) {
                j.collector_seen = Instant::now();
            } else if j.collector_seen.elapsed() > cluster.ttl() * 2 {
                tracing::warn!(round = %j.round, collector = %j.collector,
                    "the collecting server is gone: writers released, collection abandoned");
                *joined = None;
                return Ok(());
            }
        }
        match round.phase {
            Phase::Done => Ok(()),
            Phase::Mark => {
                if joined.is_none() && cluster.alive(&round.by) {
                    let collection = self.vault.chunks.fence().begin_collection().await;
                    *joined = Some(Joined {
                        round: round.id.clone(),
                        collector: round.by.clone(),
                        collection,
                        blocked: None,
                        collector_seen: Instant::now(),
                    });
                    self.write_ack(&Ack {
                        round: round.id,
                        phase: Some(Phase::Mark),
                        ..Ack::default()
                    })
                    .await?;
                }
                Ok(())
            }
            Phase::Sweep => {
                let Some(j) = joined.as_mut() else {
                    // Never joined this round's mark: the collector waits for us in vain and
                    // gives up; nothing to do.
                    return Ok(());
                };
                if j.blocked.is_none() {
                    j.blocked = Some(self.vault.chunks.fence().block_writers().await);
                    let (touched, logs) = j.collection.touched();
                    let pins = self.replicas.pinned_refs();
                    self.write_ack(&Ack {
                        round: round.id,
                        phase: Some(Phase::Sweep),
                        touched,
                        logs,
                        pinned_maps: pins.iter().map(|p| p.map_root.clone()).collect(),
                        pinned_logs: pins.into_iter().flat_map(|p| p.log_prefixes).collect(),
                    })
                    .await?;
                }
                Ok(())
            }
        }
    }

    async fn write_ack(&self, ack: &Ack) -> Result<()> {
        let id = self.catalog.cluster().id().to_string();
        self.vault
            .records
            .update(&ack_key(&id), |_: Option<&Ack>| Ok(Some(ack.clone())))
            .await?;
        Ok(())
    }

    /// Starts the participant's poll on the server's tasks.
    pub fn spawn_participant(&self) {
        let me = self.clone();
        self.tasks.every("gc-participant", POLL, move || {
            let me = me.clone();
            async move {
                if let Err(e) = me.participate().await {
                    tracing::warn!(error = %e, "reading the garbage-collection round failed; retried");
                }
            }
        });
    }

    /// Collector: writes the round's phase.
    pub(crate) async fn set_phase(&self, id: &str, phase: Phase) -> Result<()> {
        let r = Round {
            id: id.to_string(),
            by: self.catalog.cluster().id().to_string(),
            phase,
        };
        self.vault
            .records
            .update(&round_key(), |_: Option<&Round>| Ok(Some(r.clone())))
            .await?;
        Ok(())
    }

    /// Collector: waits until every server in `servers` acknowledged `phase` of round `id`
    /// (a server that stops being live meanwhile is dropped from the wait), and returns their
    /// acknowledgements. Gives up after `deadline`.
    pub(crate) async fn wait_acks(
        &self,
        id: &str,
        phase: Phase,
        servers: &[String],
        deadline: Duration,
    ) -> Result<BTreeMap<String, Ack>> {
        let cluster = self.catalog.cluster().clone();
        let until = Instant::now() + deadline;
        let mut got = BTreeMap::new();
        loop {
            for s in servers {
                if got.contains_key(s) {
                    continue;
                }
                if let Some(a) = self.vault.records.load::<Ack>(&ack_key(s)).await? {
                    if a.value.round == id && a.value.phase == Some(phase) {
                        got.insert(s.clone(), a.value);
                    }
                }
            }
            let waiting: Vec<&String> = servers
                .iter()
                .filter(|s| !got.contains_key(*s) && cluster.alive(s))
                .collect();
            if waiting.is_empty() {
                return Ok(got);
            }
            if Instant::now() >= until {
                return Err(Error::Unavailable {
                    code: "gc_servers_unresponsive",
                    message: format!(
                        "server(s) {} did not join the collection's {phase:?} phase within {} s; nothing was deleted",
                        waiting.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "),
                        deadline.as_secs()
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
