//! Failback: after a committed planned or unplanned failover the VM runs from the materialized
//! disks (`<output>/<disk>.vhd`). Failback brings the on-premises disk up to date with them by
//! the same hierarchical comparison as resync ([`crate::replica::sync`]), in the other
//! direction: the agent fetches the target's block hashes, then fine hashes inside differing
//! blocks, and downloads only the differing ranges (or everything with `--full`, for a lost on-premises disk). It writes its
//! file only with data whose whole-block hash it checked.
//!
//! When the agent finishes a disk it sends the digest over its (now updated) blocks; the server
//! compares it with the target's and records the disk as synchronized. `failback commit` then
//! re-protects the VM from the on-premises side without a second initial replication: the
//! target disks are taken into the vault (only blocks it lacks are stored: the rest are
//! deduplication hits), installed as a snapshot point at the next cycle, the log chain restarts
//! on that content and the VM is `protected` again. It refuses when a target disk changed after
//! its synchronization (the failed-over VM is still running): shut it down and sync again.
//!
//! Only the disk's original size fails back: the MiB padding materialization added is outside
//! the on-premises disk.
//!
//! When the failover wrote its disks to Azure storage, the page blob is where the VM ran from:
//! it is read with Get Page Ranges and ranged GETs of the written pages (unwritten pages are
//! zeros) into `<output>/<disk>.vhd`, again whenever the blob's ETag changes (the VM wrote),
//! and compared from there.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::definition::FailoverKind;
use super::service::{FailoverRecord, FailoverState, Failovers};
use crate::catalog::VmState;
use crate::chunk::PlainHash;
use crate::error::{Error, Result};
use crate::format::image::DiskImage;
use crate::jobs::{JobKind, JobState};
use crate::replica::blockmap::{block_count, block_len, BlockMap, MapEntry};
use crate::replica::resync::{DigestRequest, FineRequest};
use crate::replica::sync::{self, SyncSide};
use crate::vault::layout::{self, Family};
pub use crate::wire::{FailbackDiskView, FailbackRecord, RangeRequest, SyncedDisk};

/// (path, length, modification time in ns).
type FileVersion = (PathBuf, u64, i128);

/// Block hashes of target disks, by (path, length, modification time): a changed file is
/// hashed again.
#[derive(Clone, Default)]
pub struct TargetHashes {
    cache: Arc<tokio::sync::Mutex<HashMap<FileVersion, Arc<Vec<PlainHash>>>>>,
}

struct Target {
    disk: String,
    image: Arc<dyn DiskImage>,
    path: PathBuf,
    size: u64,
    block_size: u32,
    record: FailoverRecord,
}

/// The target's side of a failback: the materialized disk, read from its file.
impl SyncSide for Target {
    fn disk(&self) -> &str {
        &self.disk
    }

    fn blocks(&self) -> u64 {
        block_count(self.size, self.block_size)
    }

    async fn read_block(&self, index: u64) -> Result<Vec<u8>> {
        Failovers::read_target_block(self, index).await
    }
}

impl Failovers {
    /// The committed failover's materialized disk, opened for reading.
    async fn target(&self, host: Option<&str>, vm: &str, disk: &str) -> Result<Target> {
        let (v, d) = self.catalog.disk_for(host, vm, disk).await?;
        let rec = self.current(vm).await?.ok_or_else(|| {
            Error::conflict(
                "not_failed_over",
                format!("VM {vm} has no failover to fail back from"),
            )
        })?;
        if rec.kind == FailoverKind::Test || v.state != VmState::FailedOver {
            return Err(Error::conflict("not_failed_over", format!("VM {vm} is not failed over (a planned or unplanned failover, committed, runs the VM from the target): nothing to fail back")));
        }
        let path = match rec.target.as_deref() {
            Some(url) => self.fetch_blob_disk(&rec, url, disk).await?,
            None => Path::new(&rec.output_dir).join(format!("{disk}.vhd")),
        };
        let p = path.clone();
        let image = tokio::task::spawn_blocking(move || crate::format::image::open(&p))
            .await
            .map_err(|e| Error::internal(format!("opening the target disk: {e}")))?
            .map_err(|e| {
                Error::conflict(
                    "target_disk_unreadable",
                    format!("target disk {}: {e}", path.display()),
                )
            })?;
        if image.virtual_size() < d.size {
            return Err(Error::conflict(
                "target_disk_unreadable",
                format!(
                    "target disk {} holds {} bytes, the disk has {}",
                    path.display(),
                    image.virtual_size(),
                    d.size
                ),
            ));
        }
        Ok(Target {
            disk: disk.to_string(),
            image: Arc::from(image),
            path,
            size: d.size,
            block_size: d.block_size,
            record: rec,
        })
    }

    /// The local copy of a disk the failover wrote to Azure storage, downloaded again when the
    /// blob changed since the last copy (its ETag differs).
    async fn fetch_blob_disk(
        &self,
        rec: &FailoverRecord,
        folder_url: &str,
        disk: &str,
    ) -> Result<PathBuf> {
        let unreadable = |m: String| Error::conflict("target_disk_unreadable", m);
        let target = self.target.as_ref().ok_or_else(|| {
            unreadable(format!(
                "the failover wrote its disks to {folder_url}, but [failover] target is not set now"
            ))
        })?;
        let folder = target.blob_of_url(folder_url).ok_or_else(|| {
            unreadable(format!(
                "the failover wrote its disks to {folder_url}, not to the configured target {}",
                target.url()
            ))
        })?;
        let blob = format!("{folder}/{disk}.vhd");
        let path = Path::new(&rec.output_dir).join(format!("{disk}.vhd"));
        let tag_path = path.with_extension("vhd.etag");
        // One download at a time: concurrent requests for the same disk share it.
        let _one = self.blob_fetch.lock().await;
        let (size, etag) = target.properties(&blob).await?;
        let have = tokio::fs::read_to_string(&tag_path)
            .await
            .unwrap_or_default();
        if !etag.is_empty() && have == etag && path.exists() {
            return Ok(path);
        }
        let local = |e: std::io::Error| {
            super::output::output_error(&e, format!("copying {blob} to {}: {e}", path.display()))
        };
        let tmp = path.with_extension("vhd.download");
        let file = std::fs::File::create(&tmp).map_err(local)?;
        file.set_len(size).map_err(local)?;
        let file = Arc::new(file);
        for r in target.page_ranges(&blob).await? {
            let mut at = r.start;
            while at < r.end.min(size) {
                let n = (r.end.min(size) - at).min(super::azure_target::MAX_PUT_PAGE as u64);
                let data = target.read_range(&blob, at, n).await?;
                let f = file.clone();
                tokio::task::spawn_blocking(move || {
                    std::os::unix::fs::FileExt::write_all_at(f.as_ref(), &data, at)
                })
                .await
                .map_err(|e| Error::internal(e.to_string()))?
                .map_err(local)?;
                at += n;
            }
        }
        file.sync_all().map_err(local)?;
        let (_, after) = target.properties(&blob).await?;
        if after != etag {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::conflict(
                "target_changed",
                format!(
                    "{} changed while it was read: is the failed-over VM still running?",
                    target.blob_url(&blob)
                ),
            ));
        }
        std::fs::rename(&tmp, &path).map_err(local)?;
        std::fs::write(&tag_path, etag.as_bytes()).map_err(local)?;
        Ok(path)
    }

    async fn target_hashes(&self, t: &Target) -> Result<Arc<Vec<PlainHash>>> {
        let meta = tokio::fs::metadata(&t.path).await.map_err(|e| {
            Error::conflict(
                "target_disk_unreadable",
                format!("{}: {e}", t.path.display()),
            )
        })?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(-1);
        let key = (t.path.clone(), meta.len(), mtime);
        if let Some(h) = self.target_hashes.cache.lock().await.get(&key) {
            return Ok(h.clone());
        }
        let (image, size, bs) = (t.image.clone(), t.size, t.block_size);
        let hashes = self
            .vault_cpu()
            .run(move || -> Result<Vec<PlainHash>> {
                let mut out = Vec::with_capacity(block_count(size, bs) as usize);
                let mut buf = vec![0u8; bs as usize];
                for i in 0..block_count(size, bs) {
                    let len = block_len(size, bs, i) as usize;
                    image
                        .read_at(&mut buf[..len], i * bs as u64)
                        .map_err(|e| Error::conflict("target_disk_unreadable", e.to_string()))?;
                    out.push(PlainHash::of(&buf[..len]));
                }
                Ok(out)
            })
            .await?;
        let hashes = Arc::new(hashes);
        let mut c = self.target_hashes.cache.lock().await;
        c.retain(|k, _| k.0 != t.path);
        c.insert(key, hashes.clone());
        Ok(hashes)
    }

    async fn read_target_block(t: &Target, index: u64) -> Result<Vec<u8>> {
        if index >= block_count(t.size, t.block_size) {
            return Err(Error::invalid(
                "block_out_of_range",
                format!("block {index} is past the end of the disk"),
            ));
        }
        let len = block_len(t.size, t.block_size, index) as usize;
        let image = t.image.clone();
        let at = index * t.block_size as u64;
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            image.read_at(&mut buf, at).map(|_| buf)
        })
        .await
        .map_err(|e| Error::internal(format!("reading the target disk: {e}")))?
        .map_err(|e| Error::conflict("target_disk_unreadable", e.to_string()))
    }

    pub async fn failback_view(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
    ) -> Result<FailbackDiskView> {
        let t = self.target(Some(host), vm, disk).await?;
        Ok(FailbackDiskView {
            failover: t.record.id.clone(),
            point: t.record.point.clone(),
            size: t.size,
            block_size: t.block_size,
            blocks: block_count(t.size, t.block_size),
        })
    }

    /// The target's block hashes, 32 bytes per block.
    pub async fn failback_hashes(&self, host: &str, vm: &str, disk: &str) -> Result<Bytes> {
        let t = self.target(Some(host), vm, disk).await?;
        let h = self.target_hashes(&t).await?;
        Ok(sync::hashes_body(h.iter().copied()))
    }

    pub async fn failback_fine(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
        req: &FineRequest,
    ) -> Result<Bytes> {
        sync::check_fine_request(&req.blocks)?;
        let t = self.target(Some(host), vm, disk).await?;
        sync::fine_hashes(&t, self.vault_cpu(), &req.blocks).await
    }

    /// The bytes of the asked ranges of one target block, concatenated.
    pub async fn failback_ranges(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
        req: &RangeRequest,
    ) -> Result<Bytes> {
        let t = self.target(Some(host), vm, disk).await?;
        sync::ranges(&t, req.block, &req.ranges).await
    }

    /// The agent says its disk now equals the target: checked against the target's digest.
    pub async fn failback_complete(
        &self,
        host: &str,
        vm: &str,
        disk: &str,
        req: &DigestRequest,
    ) -> Result<FailbackRecord> {
        let claimed = sync::claimed_digest(&req.digest)?;
        let t = self.target(Some(host), vm, disk).await?;
        let h = self.target_hashes(&t).await?;
        let actual = sync::digest_of(&h);
        if !actual.ct_eq(&claimed) {
            return Err(Error::conflict("digest_mismatch", format!("disk {disk}: the on-premises disk digests to {}, the target disk to {}: run the failback again (is the failed-over VM still writing?)", claimed.to_hex(), actual.to_hex())));
        }
        let (v, _) = self.catalog.disk_for(None, vm, disk).await?;
        let fid = t.record.id.clone();
        let disk = disk.to_string();
        let vm_name = vm.to_string();
        let digest = actual.to_hex();
        let updated = self
            .vault()
            .records
            .update(
                &layout::record(Family::Failback, &v.id),
                move |cur: Option<&FailbackRecord>| {
                    let mut r = cur
                        .filter(|r| r.failover == fid)
                        .cloned()
                        .unwrap_or_else(|| FailbackRecord {
                            vm: vm_name.clone(),
                            failover: fid.clone(),
                            ..Default::default()
                        });
                    r.synced.insert(
                        disk.clone(),
                        SyncedDisk {
                            digest: digest.clone(),
                            synced_unix: crate::util::unix_now(),
                        },
                    );
                    Ok(Some(r))
                },
            )
            .await?
            .ok_or_else(|| Error::internal("failback record missing after update"))?;
        Ok(updated.value)
    }

    pub async fn failback_record(&self, vm: &str) -> Result<Option<FailbackRecord>> {
        let v = self.catalog.vm_for(None, vm).await?;
        Ok(self
            .vault()
            .records
            .load::<FailbackRecord>(&layout::record(Family::Failback, &v.id))
            .await?
            .map(|x| x.value))
    }

    /// Ends the failback: every disk synchronized and unchanged since, the target disks become
    /// the replica's newest point, and the VM is protected again from the on-premises side.
    pub async fn failback_commit(&self, vm: &str, force: bool) -> Result<FailbackRecord> {
        // Changes the VM: it runs on the server holding the VM's lease.
        self.catalog.hold(vm).await?;
        let v = self.catalog.vm_for(None, vm).await?;
        if v.state != VmState::FailedOver {
            if let Some(r) = self
                .failback_record(vm)
                .await?
                .filter(|r| r.committed_unix.is_some())
            {
                return Ok(r);
            }
        }
        let rec = self.failback_record(vm).await?.unwrap_or_default();
        let mut targets = Vec::new();
        for spec in &v.spec.disks {
            let t = self.target(None, vm, &spec.id).await?;
            if rec.failover != t.record.id && !force {
                return Err(Error::conflict("failback_not_synced", format!("no disk of VM {vm} was synchronized with drvault agent failback yet (or --force)")));
            }
            targets.push((spec.id.clone(), t));
        }
        let job = self
            .jobs()
            .create(
                JobKind::Failback,
                Some(vm),
                &[
                    "Check synchronization",
                    "Take the target disks into the vault",
                    "Re-protect",
                ],
                JobState::Running,
            )
            .await?;
        match self
            .failback_commit_run(vm, &rec, targets, force, &job.id)
            .await
        {
            Ok(r) => {
                self.jobs().succeed(&job.id).await?;
                Ok(r)
            }
            Err(e) => {
                let _ = self.jobs().fail(&job.id, &e).await;
                Err(e)
            }
        }
    }

    async fn failback_commit_run(
        &self,
        vm: &str,
        rec: &FailbackRecord,
        targets: Vec<(String, Target)>,
        force: bool,
        job: &str,
    ) -> Result<FailbackRecord> {
        for (disk, t) in &targets {
            let h = self.target_hashes(t).await?;
            let digest = sync::digest_of(&h).to_hex();
            match rec.synced.get(disk) {
                Some(s) if s.digest == digest => {}
                _ if force => {}
                Some(_) => return Err(Error::conflict("target_changed", format!("target disk {disk} changed after it was synchronized (is the failed-over VM still running?): shut it down and run drvault agent failback again"))),
                None => return Err(Error::conflict("failback_not_synced", format!("disk {disk} of VM {vm} was not synchronized: run drvault agent failback for it (or --force)"))),
            }
        }
        self.jobs()
            .step(job, "Check synchronization", JobState::Succeeded)
            .await?;
        let mut roots = BTreeMap::new();
        let fid = targets
            .first()
            .map(|(_, t)| t.record.id.clone())
            .unwrap_or_default();
        // Chunks and maps, then the journal entries that refer to them: one critical section
        // for garbage collection.
        let fenced = self.chunks().fence().writer().await;
        for (disk, t) in &targets {
            let map = self.ingest_target(t).await?;
            roots.insert(disk.clone(), map.save(self.chunks()).await?.to_hex());
        }
        self.jobs()
            .step(
                job,
                "Take the target disks into the vault",
                JobState::Succeeded,
            )
            .await?;
        let cycle = self
            .replicas
            .install_snapshots(vm, &format!("failback:{fid}"), &roots, None)
            .await?;
        drop(fenced);
        self.catalog.set_state(vm, VmState::Protected).await?;
        if let Some(mut f) = self.current(vm).await? {
            f.state = FailoverState::FailedBack;
            f.ended_unix = Some(crate::util::unix_now());
            self.put_record(&f).await?;
        }
        let v = self.catalog.vm_for(None, vm).await?;
        let now = crate::util::unix_now();
        let job_id = job.to_string();
        let vm_name = vm.to_string();
        let updated = self
            .vault()
            .records
            .update(
                &layout::record(Family::Failback, &v.id),
                move |cur: Option<&FailbackRecord>| {
                    let mut r = cur.cloned().unwrap_or_else(|| FailbackRecord {
                        vm: vm_name.clone(),
                        failover: fid.clone(),
                        ..Default::default()
                    });
                    r.committed_unix = Some(now);
                    r.cycle = Some(cycle);
                    r.job = Some(job_id.clone());
                    Ok(Some(r))
                },
            )
            .await?
            .ok_or_else(|| Error::internal("failback record missing after update"))?;
        self.jobs()
            .step(job, "Re-protect", JobState::Succeeded)
            .await?;
        tracing::info!(
            vm,
            cycle,
            "failback committed: VM protected again from on-premises"
        );
        Ok(updated.value)
    }

    /// Stores a target disk's blocks (deduplicated against the vault) as a block map.
    async fn ingest_target(&self, t: &Target) -> Result<BlockMap> {
        let mut map = BlockMap::zeroed(t.size, t.block_size);
        for i in 0..block_count(t.size, t.block_size) {
            let b = Self::read_target_block(t, i).await?;
            let put = self.chunks().put_block(Bytes::from(b), None).await?;
            if let Some(name) = put.name {
                map.set(
                    i,
                    MapEntry::Data {
                        name,
                        hash: put.hash,
                    },
                )?;
            }
        }
        Ok(map)
    }
}
