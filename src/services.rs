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
    /// This server among the servers sharing the vault (`None`: a server of its own, as tests
    /// use it).
    pub cluster: Option<crate::cluster::Cluster>,
}

impl Settings {
    pub fn new(block_size: u32) -> Settings {
        Settings {
            block_size,
            mapped_networks: BTreeSet::new(),
            max_log_bytes: crate::ingest::DEFAULT_MAX_LOG_BYTES,
            resync_window: None,
            health: HealthSettings::default(),
            cluster: None,
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
        let cluster = settings.cluster.unwrap_or_else(|| {
            crate::cluster::Cluster::new(
                vault.records.clone(),
                "local".into(),
                "https://localhost".into(),
                std::time::Duration::from_secs(30),
            )
        });
        let catalog = Catalog::load(
            vault.clone(),
            jobs,
            settings.block_size,
            settings.mapped_networks,
            cluster,
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

/// Two servers on one vault: the lease moves, and fencing stops the server that lost it.
#[cfg(test)]
mod fencing {
    use std::sync::Arc;
    use std::time::Duration;

    use super::testing::{block, protect, send_log};
    use super::{Services, Settings};
    use crate::chunk::{CpuPool, KeyRing};
    use crate::cluster::Cluster;
    use crate::error::Error;
    use crate::jobs::Jobs;
    use crate::store::Store;
    use crate::vault::layout::{self, Family};
    use crate::vault::Vault;

    /// A server of id `id` over the shared directory, with its own store handle.
    async fn server(
        dir: &std::path::Path,
        keys: &Arc<KeyRing>,
        id: &str,
        ttl: Duration,
    ) -> Services {
        let store = Store::open(&format!("file://{}", dir.display()), &[]).unwrap();
        let vault = Vault::open(store, keys.clone(), CpuPool::new(1), 1)
            .await
            .unwrap();
        let cluster = Cluster::new(
            vault.records.clone(),
            id.into(),
            format!("https://{id}"),
            ttl,
        );
        cluster.heartbeat().await.unwrap();
        let jobs = Jobs::load(vault.records.clone()).await.unwrap();
        jobs.set_server(id);
        let mut settings = Settings::new(super::testing::BS);
        settings.cluster = Some(cluster);
        Services::load(vault, jobs, crate::tasks::Tasks::new(), settings)
            .await
            .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_lost_the_lease_publishes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(KeyRing::random());
        // A keeps counting its leases for most of 30 s; B gives up on a silent server after
        // 1 s: A plays a server paused past its TTL (it never beats again).
        let a = server(dir.path(), &keys, "a", Duration::from_secs(30)).await;
        let b = server(dir.path(), &keys, "b", Duration::from_secs(1)).await;
        protect(&a, "web", &[("os", vec![Some(block(1)), None])]).await;
        send_log(&a, "web", "os", (1, 0), 1, (0, &[7u8; 512]))
            .await
            .unwrap();
        assert!(a.catalog.holds("web"));

        // While A is alive B sends the agent to it.
        b.catalog.cluster().heartbeat().await.unwrap();
        b.catalog.refresh().await.unwrap();
        match b.catalog.hold("web").await {
            Err(Error::LeaseHeld { message, owner_url }) => {
                assert_eq!(owner_url, "https://a");
                assert!(message.contains("server a "), "{message}");
            }
            other => panic!("expected lease_held, got {other:?}"),
        }
        // A stops beating; once B has not seen it for its TTL, B takes the VM over.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while b.catalog.cluster().alive("a") {
            assert!(
                std::time::Instant::now() < deadline,
                "A never looked dead to B"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            b.catalog.cluster().heartbeat().await.unwrap();
        }
        let epoch = b.catalog.hold("web").await.unwrap();
        assert_eq!(epoch, 2);
        let vault = b.catalog.vault().clone();
        let disk_key = layout::record(
            Family::Disk,
            &layout::disk_record_id(&b.catalog.vm_id("web"), &b.catalog.disk_id("web", "os")),
        );
        let before = vault
            .records
            .load::<crate::catalog::DiskRecord>(&disk_key)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            before.value.fence, 2,
            "the takeover stamped the disk record"
        );

        // A still thinks it holds the VM (its own heartbeat is recent) and tries to publish:
        // a log (disk record) and a policy change (VM record). Both are refused.
        assert!(a.catalog.holds("web"));
        let log = send_log(&a, "web", "os", (2, 1), 2, (512, &[8u8; 512])).await;
        assert!(
            matches!(log, Err(Error::LeaseLost { .. })),
            "log through A: {log:?}"
        );
        let policy = a
            .catalog
            .set_policy(
                "web",
                &crate::wire::PolicyChange {
                    retention_s: Some(7200),
                    ..Default::default()
                },
            )
            .await;
        assert!(
            matches!(policy, Err(Error::LeaseLost { .. })),
            "policy through A: {policy:?}"
        );
        let after = vault
            .records
            .load::<crate::catalog::DiskRecord>(&disk_key)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(after.version, before.version, "A wrote nothing");
        assert_eq!(after.value.chain_head, before.value.chain_head);

        // B carries on from where the chain stands.
        send_log(&b, "web", "os", (2, 1), 2, (512, &[8u8; 512]))
            .await
            .unwrap();
    }
}
