//! The stateful core, composed: one [`Services`] value loads the catalog and builds the services
//! that hold a handle on it, in dependency order (catalog → damage register → replicas →
//! resyncs → ingest), and finishes what a crash interrupted before anything is served.

use std::collections::BTreeSet;

use crate::catalog::Catalog;
use crate::error::Result;
use crate::ingest::Ingest;
use crate::jobs::Jobs;
use crate::overview::Overview;
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
}

impl Settings {
    pub fn new(block_size: u32) -> Settings {
        Settings {
            block_size,
            mapped_networks: BTreeSet::new(),
            max_log_bytes: crate::ingest::DEFAULT_MAX_LOG_BYTES,
            resync_window: None,
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
        );
        Ok(Services {
            catalog,
            ingest,
            replicas,
            resyncs,
            overview,
        })
    }
}
