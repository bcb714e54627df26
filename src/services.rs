//! The stateful core, composed: one [`Services`] value loads the catalog and builds the services
//! that hold a handle on it, in dependency order (catalog → damage register → replicas →
//! resyncs → ingest), and finishes what a crash interrupted before anything is served.

use std::collections::BTreeSet;

use crate::catalog::Catalog;
use crate::contact::Contacts;
use crate::error::Result;
use crate::ingest::Ingest;
use crate::jobs::Jobs;
use crate::overview::{HealthSettings, Overview};
use crate::replica::damage::DamageRegister;
use crate::replica::resync::{Resyncs, Window};
use crate::replica::Replicas;
use crate::tasks::Tasks;
use crate::vault::Vault;

/// What the services are configured with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Block size given to newly protected disks.
    pub block_size: u32,
    /// Source networks the configuration maps.
    pub mapped_networks: BTreeSet<String>,
    /// Largest change log accepted (bytes).
    pub max_log_bytes: u64,
    /// Off-hours window resync sessions wait for (`None`: start at once).
    pub resync_window: Option<Window>,
    /// Health thresholds (`[health]`).
    pub health: HealthSettings,
}

impl Settings {
    pub fn new(block_size: u32) -> Settings {
        Settings {
            block_size,
            mapped_networks: BTreeSet::new(),
            max_log_bytes: crate::ingest::DEFAULT_MAX_LOG_BYTES,
            resync_window: None,
            health: HealthSettings::default(),
        }
    }
}

/// The services, each cheap to clone.
#[derive(Clone)]
pub struct Services {
    pub catalog: Catalog,
    pub ingest: Ingest,
    pub replicas: Replicas,
    pub resyncs: Resyncs,
    pub overview: Overview,
    /// Each host's last heartbeat.
    pub contacts: Contacts,
}

impl Services {
    /// Loads the records and builds the services; background work goes to `tasks`.
    pub async fn load(
        vault: Vault,
        jobs: Jobs,
        tasks: Tasks,
        settings: Settings,
    ) -> Result<Services> {
        let catalog = Catalog::load(
            vault.clone(),
            jobs,
            settings.block_size,
            settings.mapped_networks,
        )
        .await?;
        let contacts = Contacts::load(vault.records.clone()).await?;
        let damage = DamageRegister::load(vault).await?;
        let frames = crate::journal::FrameCache::new(64);
        let replicas = Replicas::new(
            catalog.clone(),
            damage.clone(),
            frames.clone(),
            tasks.clone(),
        );
        let resyncs = Resyncs::new(
            catalog.clone(),
            replicas.clone(),
            damage.clone(),
            tasks.clone(),
            settings.resync_window,
        );
        resyncs.finish_interrupted().await?;
        let ingest = Ingest::new(catalog.clone(), damage, resyncs.clone(), frames, tasks)
            .with_max_log_bytes(settings.max_log_bytes);
        let overview = Overview::new(
            catalog.clone(),
            ingest.clone(),
            replicas.clone(),
            resyncs.clone(),
            contacts.clone(),
            settings.health,
        );
        Ok(Services {
            catalog,
            ingest,
            replicas,
            resyncs,
            overview,
            contacts,
        })
    }
}

/// Services over an in-memory vault, and helpers that drive them the way an agent does.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use bytes::Bytes;

    use super::{Services, Settings};
    use crate::catalog::{DiskSpec, VmSpec};
    use crate::chunk::{CpuPool, KeyRing, PlainHash};
    use crate::format::hrl::{Guid, HrlWriter, HrlWriterParams};
    use crate::ingest::{CompleteRequest, LogAck, LogMeta};
    use crate::jobs::Jobs;
    use crate::store::Store;
    use crate::vault::Vault;

    /// Block size of the test disks.
    pub(crate) const BS: u32 = 65536;

    /// A fresh in-memory vault with the services over it.
    pub(crate) async fn memory() -> (Services, Vault) {
        let store = Store::open("memory://", &[]).unwrap();
        on_store(store).await
    }

    /// The services over a new vault in `store`.
    pub(crate) async fn on_store(store: Store) -> (Services, Vault) {
        let vault = Vault::open(store, Arc::new(KeyRing::random()), CpuPool::new(2), 1)
            .await
            .unwrap();
        (reload(&vault).await, vault)
    }

    /// The services a restarted server builds over the same vault.
    pub(crate) async fn reload(vault: &Vault) -> Services {
        let jobs = Jobs::load(vault.records.clone()).await.unwrap();
        Services::load(
            vault.clone(),
            jobs,
            crate::tasks::Tasks::new(),
            Settings::new(BS),
        )
        .await
        .unwrap()
    }

    /// A VM spec with disks of these ids and sizes in blocks, no NICs.
    pub(crate) fn spec(disks: &[(&str, u64)]) -> VmSpec {
        VmSpec {
            generation: 2,
            cpus: 1,
            memory_mib: 512,
            disks: disks
                .iter()
                .map(|(id, blocks)| DiskSpec {
                    id: id.to_string(),
                    size: blocks * BS as u64,
                })
                .collect(),
            nics: vec![],
            policy: None,
        }
    }

    /// A block of `BS` bytes of one value.
    pub(crate) fn block(byte: u8) -> Bytes {
        Bytes::from(vec![byte; BS as usize])
    }

    /// Digest over the blocks' hashes, a `None` block being all zeros (what the agent sends).
    pub(crate) fn digest(blocks: &[Option<Bytes>]) -> String {
        let zero = PlainHash::of(&vec![0u8; BS as usize]);
        let hashes: Vec<PlainHash> = blocks
            .iter()
            .map(|b| b.as_ref().map(|b| PlainHash::of(b)).unwrap_or(zero))
            .collect();
        crate::replica::resync::digest_of(&hashes).to_hex()
    }

    /// Protects `vm` on host "h" with one disk per entry of `disks` and replicates each (a
    /// `None` block is left out as all zeros); every disk completes.
    pub(crate) async fn protect(s: &Services, vm: &str, disks: &[(&str, Vec<Option<Bytes>>)]) {
        let sizes: Vec<(&str, u64)> = disks.iter().map(|(d, b)| (*d, b.len() as u64)).collect();
        s.catalog.enable("h", vm, &spec(&sizes)).await.unwrap();
        for (disk, blocks) in disks {
            let mut runs = Vec::new();
            for (i, b) in blocks.iter().enumerate() {
                if let Some(b) = b {
                    s.ingest
                        .put_block("h", vm, disk, i as u64, PlainHash::of(b), b.clone())
                        .await
                        .unwrap();
                    runs.push((i as u64, 1));
                }
            }
            let req = CompleteRequest {
                data_runs: runs,
                digest: digest(blocks),
            };
            s.ingest.complete_disk("h", vm, disk, &req).await.unwrap();
        }
    }

    /// The id of test log `n` (n > 0); log 0 is the nil id (no predecessor).
    pub(crate) fn log_id(n: u8) -> Guid {
        if n == 0 {
            Guid::NIL
        } else {
            Guid([n; 16])
        }
    }

    /// Sends log `n`, following log `after`, writing `data` at byte `offset`, as cycle `cycle`.
    pub(crate) async fn send_log(
        s: &Services,
        vm: &str,
        disk: &str,
        (n, after): (u8, u8),
        cycle: u64,
        (offset, data): (u64, &[u8]),
    ) -> crate::error::Result<LogAck> {
        let mut w = HrlWriter::in_memory(HrlWriterParams {
            unique_id: log_id(n),
            previous_unique_id: log_id(after),
            timestamp: 1,
            ..Default::default()
        })
        .unwrap();
        w.add_write(offset, data).unwrap();
        let log = w.finish_to_vec().unwrap();
        let len = log.len() as u64;
        let body = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(log))]);
        let meta = LogMeta {
            cycle: Some(cycle),
            app_consistent: false,
            final_log: false,
        };
        s.ingest
            .accept_log("h", vm, disk, &log_id(n).to_string(), meta, Some(len), body)
            .await
    }
}
