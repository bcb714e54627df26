//! Where a disk's change logs come from: the [`LogSource`] trait and its two sources.
//!
//! - [`SpoolSource`]: a directory per disk into which the host's change tracking drops closed
//!   MS-HRL logs (files named `*.hrl`; drop them whole: write elsewhere, then rename into the
//!   directory). Sending order: each log goes right after the log its header names as its
//!   predecessor (`PreviousUniqueId`); logs whose predecessor is not in the spool go first, by
//!   file name. A log stays until the server acknowledges it, then it is removed.
//! - [`ImageDiffSource`]: for hosts without Hyper-V (and the tests): each cut compares the disk
//!   image with the last cut's per-piece hashes and writes an MS-HRL log of the pieces that
//!   changed with the library writer.
//!
//! Restart safety: every state change is written to a new file and renamed over the old one
//! (after fsync), so a kill at any moment leaves either the state before or the state after.
//! A log is removed only after its acknowledgement; a log sent again after a kill carries the
//! same UniqueId, which the server recognises (`already_accepted`), so nothing is lost and
//! nothing is applied twice.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::format::hrl::{self, Guid, HrlWriter, HrlWriterParams};
use crate::format::image::SourceFormat;
use crate::wire::DiskBacklog;

/// A closed log waiting to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingLog {
    pub disk: String,
    pub path: PathBuf,
    pub unique_id: Guid,
    pub bytes: u64,
    pub closed_unix: u64,
    /// The VM cycle the log belongs to (None: the server numbers it after the disk's last).
    pub cycle: Option<u64>,
    pub app_consistent: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A spool log that cannot be read or is not a valid closed MS-HRL log: nothing of this
    /// disk is sent until an operator removes or replaces it.
    #[error("spool log {path}: {message}")]
    InvalidLog { path: String, message: String },
    #[error("disk {path}: {message}")]
    Disk { path: String, message: String },
    /// The agent's own files (state directory, spool directory listing).
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("disk {disk}: {message}")]
    NoBaseline { disk: String, message: String },
}

impl SourceError {
    pub fn code(&self) -> &'static str {
        match self {
            SourceError::InvalidLog { .. } => "invalid_spool_log",
            SourceError::Disk { .. } => "disk_unreadable",
            SourceError::Io { .. } => "agent_io",
            SourceError::NoBaseline { .. } => "agent_state_missing",
        }
    }

    /// Whether the next interval may succeed without an operator: local I/O trouble may pass
    /// (a full disk freed, a mount back); a bad log or a lost baseline will not.
    pub fn recoverable(&self) -> bool {
        matches!(self, SourceError::Io { .. } | SourceError::Disk { .. })
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> SourceError {
    SourceError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Where one disk's logs come from.
pub trait LogSource: Send {
    fn disk(&self) -> &str;
    /// Whether the source knows the state the server holds (image-diff: a baseline was taken).
    fn has_baseline(&self) -> bool;
    /// Takes the disk as it is now as the state the server holds, dropping every pending log
    /// (before initial replication, and before a resync, whose replica contains their
    /// changes); the next log starts a new chain with cycle `next_cycle`.
    fn restart_chain(&mut self, next_cycle: u64) -> Result<(), SourceError>;
    /// Before an initial replication (started or resumed): what the server will hold is the
    /// disk as it is from now on. The spool keeps its logs: the host's change tracking
    /// started with the replication.
    fn take_baseline(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
    /// The cycle the next cut would take (None: numbered by the server).
    fn next_cycle(&self) -> Option<u64>;
    /// Makes the next cut's cycle at least `at_least` (after a resync committed as a cycle).
    fn raise_cycle(&mut self, _at_least: u64) -> Result<(), SourceError> {
        Ok(())
    }
    /// Closes the changes up to now into logs for `cycle`.
    fn cut(&mut self, cycle: u64, app_consistent: bool) -> Result<(), SourceError>;
    /// Every log not yet acknowledged, in sending order.
    fn pending(&mut self) -> Result<Vec<PendingLog>, SourceError>;
    /// The server acknowledged `log` (or refused it for good as already contained in a
    /// resync): it is removed and never sent again.
    fn acknowledged(&mut self, log: &PendingLog) -> Result<(), SourceError>;
    fn backlog(&mut self) -> DiskBacklog {
        let pending = self.pending().unwrap_or_default();
        DiskBacklog {
            disk: self.disk().to_string(),
            backlog_bytes: pending.iter().map(|l| l.bytes).sum(),
            pending_logs: pending.len() as u64,
            oldest_pending_unix: pending.iter().map(|l| l.closed_unix).min(),
        }
    }
}

/// Writes `bytes` to `path` so that a crash leaves the old or the new content, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), SourceError> {
    let tmp = path.with_extension("partial");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io_err(path, e))?;
    sync_dir(path)
}

fn sync_dir(path: &Path) -> Result<(), SourceError> {
    if let Some(dir) = path.parent() {
        let d = std::fs::File::open(dir).map_err(|e| io_err(dir, e))?;
        d.sync_all().map_err(|e| io_err(dir, e))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Spool

#[derive(Debug, Default, Serialize, Deserialize)]
struct SpoolState {
    /// UniqueIds of logs cut as app-consistent and not yet acknowledged.
    #[serde(default)]
    app_consistent: Vec<String>,
}

pub struct SpoolSource {
    disk: String,
    dir: PathBuf,
    disk_size: u64,
    state_path: PathBuf,
    state: SpoolState,
}

impl SpoolSource {
    pub fn open(
        disk: &str,
        dir: &Path,
        disk_size: u64,
        state_dir: &Path,
    ) -> Result<SpoolSource, SourceError> {
        let state_path = state_dir.join(format!("{disk}.spool.json"));
        let state = match std::fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| io_err(&state_path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => SpoolState::default(),
            Err(e) => return Err(io_err(&state_path, e)),
        };
        Ok(SpoolSource {
            disk: disk.to_string(),
            dir: dir.to_path_buf(),
            disk_size,
            state_path,
            state,
        })
    }

    fn save(&self) -> Result<(), SourceError> {
        let bytes = serde_json::to_vec(&self.state).map_err(|e| io_err(&self.state_path, e))?;
        write_atomic(&self.state_path, &bytes)
    }

    /// Every `*.hrl` in the spool, validated (the whole log structure, against the disk's
    /// size), in sending order.
    fn scan(&self) -> Result<Vec<(PathBuf, hrl::HrlHeader, u64, u64)>, SourceError> {
        let mut found = Vec::new();
        let entries = std::fs::read_dir(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        for e in entries {
            let e = e.map_err(|e| io_err(&self.dir, e))?;
            let path = e.path();
            let is_log = path
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| x.eq_ignore_ascii_case("hrl"));
            if !is_log {
                continue;
            }
            let invalid = |message: String| SourceError::InvalidLog {
                path: path.display().to_string(),
                message,
            };
            let f = std::fs::File::open(&path).map_err(|e| invalid(e.to_string()))?;
            let meta = f.metadata().map_err(|e| invalid(e.to_string()))?;
            if !meta.is_file() {
                return Err(invalid("not a regular file".into()));
            }
            let log = hrl::read_log(&f, self.disk_size)
                .map_err(|e| invalid(format!("not a valid closed MS-HRL log: {e}")))?;
            let closed = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            found.push((path, log.header, meta.len(), closed));
        }
        found.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(chain_order(found, |x| {
            (x.1.unique_id, x.1.previous_unique_id)
        }))
    }
}

/// Orders logs so each follows the one it names as predecessor; logs whose predecessor is not
/// among them start a run, in their given order.
pub fn chain_order<T>(items: Vec<T>, ids: impl Fn(&T) -> (Guid, Guid)) -> Vec<T> {
    let present: std::collections::HashSet<Guid> = items.iter().map(|x| ids(x).0).collect();
    let mut rest: Vec<Option<T>> = items.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(rest.len());
    loop {
        // The first remaining root, then its successors.
        let root = rest.iter().position(|x| {
            x.as_ref().is_some_and(|x| {
                let (id, prev) = ids(x);
                prev == Guid::NIL || !present.contains(&prev) || prev == id
            })
        });
        // A cycle of logs naming each other: take the rest in the given order.
        let Some(mut at) = root.or_else(|| rest.iter().position(Option::is_some)) else {
            break;
        };
        while let Some(x) = rest[at].take() {
            let id = ids(&x).0;
            out.push(x);
            match rest
                .iter()
                .position(|y| y.as_ref().is_some_and(|y| ids(y).1 == id && ids(y).0 != id))
            {
                Some(next) => at = next,
                None => break,
            }
        }
    }
    out
}

impl LogSource for SpoolSource {
    fn disk(&self) -> &str {
        &self.disk
    }

    fn has_baseline(&self) -> bool {
        true
    }

    fn restart_chain(&mut self, _next_cycle: u64) -> Result<(), SourceError> {
        // The logs in the spool predate the resync (their changes are in its replica): the
        // server refuses them, so they go. Only files that look like logs are touched.
        for e in std::fs::read_dir(&self.dir).map_err(|e| io_err(&self.dir, e))? {
            let path = e.map_err(|e| io_err(&self.dir, e))?.path();
            if path
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| x.eq_ignore_ascii_case("hrl"))
            {
                std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
            }
        }
        self.state.app_consistent.clear();
        self.save()
    }

    fn next_cycle(&self) -> Option<u64> {
        None
    }

    fn cut(&mut self, _cycle: u64, app_consistent: bool) -> Result<(), SourceError> {
        // The host's change tracking closes the logs; an app-consistent cut marks the newest
        // log present once the pre-freeze hook has run (the hook is where the host closes one).
        if app_consistent {
            if let Some(last) = self.scan()?.last() {
                let id = last.1.unique_id.to_string();
                if !self.state.app_consistent.contains(&id) {
                    self.state.app_consistent.push(id);
                    self.save()?;
                }
            }
        }
        Ok(())
    }

    fn pending(&mut self) -> Result<Vec<PendingLog>, SourceError> {
        Ok(self
            .scan()?
            .into_iter()
            .map(|(path, h, bytes, closed)| PendingLog {
                disk: self.disk.clone(),
                app_consistent: self.state.app_consistent.contains(&h.unique_id.to_string()),
                path,
                unique_id: h.unique_id,
                bytes,
                closed_unix: closed,
                cycle: None,
            })
            .collect())
    }

    fn acknowledged(&mut self, log: &PendingLog) -> Result<(), SourceError> {
        match std::fs::remove_file(&log.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&log.path, e)),
        }
        sync_dir(&log.path)?;
        let id = log.unique_id.to_string();
        if self.state.app_consistent.contains(&id) {
            self.state.app_consistent.retain(|x| *x != id);
            self.save()?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Image diff

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredLog {
    file: String,
    unique_id: String,
    cycle: u64,
    app_consistent: bool,
    bytes: u64,
    closed_unix: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DiffState {
    size: u64,
    /// Bytes per hashed piece.
    piece: u64,
    data_write_guid: String,
    /// UniqueId of the newest log written (nil: the next log starts a chain).
    last_id: String,
    /// The hashes of the disk as of the newest log, one 32-byte BLAKE3 per piece.
    hashes_file: String,
    next_cycle: u64,
    pending: Vec<StoredLog>,
}

pub struct ImageDiffSource {
    disk: String,
    image_path: PathBuf,
    format: SourceFormat,
    dir: PathBuf,
    state_path: PathBuf,
    state: Option<DiffState>,
}

/// Pieces of 64 KiB up to 64 GiB disks (a 32 MB hash file), larger pieces beyond.
fn piece_size(size: u64) -> u64 {
    let mut p = 64 * 1024u64;
    while size / p > (1 << 20) {
        p *= 2;
    }
    p
}

impl ImageDiffSource {
    /// Opens the source's state in `state_dir` (a directory of its own per VM); files left
    /// by a cut that a kill interrupted are removed.
    pub fn open(
        disk: &str,
        image_path: &Path,
        format: SourceFormat,
        state_dir: &Path,
    ) -> Result<ImageDiffSource, SourceError> {
        let dir = state_dir.join(format!("{disk}.diff"));
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let state_path = state_dir.join(format!("{disk}.diff.json"));
        let state: Option<DiffState> = match std::fs::read(&state_path) {
            Ok(b) => Some(serde_json::from_slice(&b).map_err(|e| io_err(&state_path, e))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&state_path, e)),
        };
        let s = ImageDiffSource {
            disk: disk.to_string(),
            image_path: image_path.to_path_buf(),
            format,
            dir,
            state_path,
            state,
        };
        s.remove_strays()?;
        Ok(s)
    }

    fn remove_strays(&self) -> Result<(), SourceError> {
        let mut keep: Vec<String> = Vec::new();
        if let Some(s) = &self.state {
            keep.push(s.hashes_file.clone());
            keep.extend(s.pending.iter().map(|l| l.file.clone()));
        }
        for e in std::fs::read_dir(&self.dir).map_err(|e| io_err(&self.dir, e))? {
            let e = e.map_err(|e| io_err(&self.dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                let p = e.path();
                std::fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
            }
        }
        Ok(())
    }

    fn disk_err(&self, e: impl std::fmt::Display) -> SourceError {
        SourceError::Disk {
            path: self.image_path.display().to_string(),
            message: e.to_string(),
        }
    }

    /// Reads the image and hashes every piece; `each` sees the pieces whose hash differs from
    /// `old` (all of them when `old` is None).
    fn hash_image(
        &self,
        piece: u64,
        old: Option<&[u8]>,
        mut each: impl FnMut(u64, &[u8]) -> Result<(), SourceError>,
    ) -> Result<(u64, Vec<u8>), SourceError> {
        let image = crate::format::image::open_as(&self.image_path, self.format)
            .map_err(|e| self.disk_err(e))?;
        let size = image.virtual_size();
        let mut hashes = Vec::with_capacity((size.div_ceil(piece) * 32) as usize);
        let mut buf = vec![0u8; piece as usize];
        let mut at = 0u64;
        while at < size {
            let n = (size - at).min(piece) as usize;
            image
                .read_at(&mut buf[..n], at)
                .map_err(|e| self.disk_err(e))?;
            let h = blake3::hash(&buf[..n]);
            let i = hashes.len();
            hashes.extend_from_slice(h.as_bytes());
            if old.is_none_or(|o| o.get(i..i + 32) != Some(h.as_bytes().as_slice())) {
                each(at, &buf[..n])?;
            }
            at += n as u64;
        }
        Ok((size, hashes))
    }

    fn save(&mut self, state: DiffState) -> Result<(), SourceError> {
        let bytes = serde_json::to_vec_pretty(&state).map_err(|e| io_err(&self.state_path, e))?;
        write_atomic(&self.state_path, &bytes)?;
        self.state = Some(state);
        self.remove_strays()
    }

    fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), SourceError> {
        write_atomic(&self.dir.join(name), bytes)
    }
}

impl LogSource for ImageDiffSource {
    fn disk(&self) -> &str {
        &self.disk
    }

    fn has_baseline(&self) -> bool {
        self.state.is_some()
    }

    fn restart_chain(&mut self, next_cycle: u64) -> Result<(), SourceError> {
        let size = crate::format::image::open_as(&self.image_path, self.format)
            .map_err(|e| self.disk_err(e))?
            .virtual_size();
        let piece = piece_size(size);
        let (size, hashes) = self.hash_image(piece, Some(&[]), |_, _| Ok(()))?;
        let name = format!("base-{}.hashes", uuid::Uuid::new_v4());
        self.write_file(&name, &hashes)?;
        let data_write_guid = self
            .state
            .as_ref()
            .map(|s| s.data_write_guid.clone())
            .unwrap_or_else(|| Guid::new_random().to_string());
        self.save(DiffState {
            size,
            piece,
            data_write_guid,
            last_id: Guid::NIL.to_string(),
            hashes_file: name,
            next_cycle,
            pending: Vec::new(),
        })
    }

    fn take_baseline(&mut self) -> Result<(), SourceError> {
        self.restart_chain(1)
    }

    fn next_cycle(&self) -> Option<u64> {
        self.state.as_ref().map(|s| s.next_cycle)
    }

    fn raise_cycle(&mut self, at_least: u64) -> Result<(), SourceError> {
        match self.state.clone() {
            Some(mut s) if s.next_cycle < at_least => {
                s.next_cycle = at_least;
                self.save(s)
            }
            _ => Ok(()),
        }
    }

    fn cut(&mut self, cycle: u64, app_consistent: bool) -> Result<(), SourceError> {
        let Some(mut state) = self.state.clone() else {
            return Err(SourceError::NoBaseline {
                disk: self.disk.clone(),
                message: "no baseline in the state directory".into(),
            });
        };
        let old_path = self.dir.join(&state.hashes_file);
        let old = std::fs::read(&old_path).map_err(|e| io_err(&old_path, e))?;
        let parse = |s: &str, what: &str| {
            s.parse::<Guid>()
                .map_err(|e| io_err(&self.state_path, format!("{what}: {e}")))
        };
        let unique = Guid::new_random();
        let params = HrlWriterParams {
            unique_id: unique,
            previous_unique_id: parse(&state.last_id, "last_id")?,
            vhd2_data_write_guid: parse(&state.data_write_guid, "data_write_guid")?,
            timestamp: hrl::hrl_timestamp(SystemTime::now()),
            ..Default::default()
        };
        let name = format!("{unique}.hrl");
        let log_path = self.dir.join(&name);
        let tmp = log_path.with_extension("partial");
        let file = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        let hrl_err = |e: hrl::HrlError| io_err(&tmp, e);
        let mut w = HrlWriter::new(params, std::io::BufWriter::with_capacity(1 << 20, file))
            .map_err(hrl_err)?;
        let (size, hashes) = self.hash_image(state.piece, Some(&old), |at, data| {
            w.add_write(at, data).map_err(hrl_err)
        })?;
        if size != state.size {
            return Err(SourceError::Disk {
                path: self.image_path.display().to_string(),
                message: format!(
                    "virtual size changed from {} to {size}: a resized disk needs a new initial replication",
                    state.size
                ),
            });
        }
        let out = w.finish().map_err(hrl_err)?;
        let file = out.into_inner().map_err(|e| io_err(&tmp, e.error()))?;
        file.sync_all().map_err(|e| io_err(&tmp, e))?;
        let bytes = file.metadata().map_err(|e| io_err(&tmp, e))?.len();
        drop(file);
        std::fs::rename(&tmp, &log_path).map_err(|e| io_err(&log_path, e))?;
        let hashes_name = format!("{unique}.hashes");
        self.write_file(&hashes_name, &hashes)?;
        let cycle = cycle.max(state.next_cycle);
        state.pending.push(StoredLog {
            file: name,
            unique_id: unique.to_string(),
            cycle,
            app_consistent,
            bytes,
            closed_unix: unix_now(),
        });
        state.last_id = unique.to_string();
        state.hashes_file = hashes_name;
        state.next_cycle = cycle + 1;
        // The commit point: until this rename the cut did not happen.
        self.save(state)
    }

    fn pending(&mut self) -> Result<Vec<PendingLog>, SourceError> {
        let Some(s) = &self.state else {
            return Ok(Vec::new());
        };
        s.pending
            .iter()
            .map(|l| {
                Ok(PendingLog {
                    disk: self.disk.clone(),
                    path: self.dir.join(&l.file),
                    unique_id: l
                        .unique_id
                        .parse()
                        .map_err(|e| io_err(&self.state_path, e))?,
                    bytes: l.bytes,
                    closed_unix: l.closed_unix,
                    // 0: after a resync whose cycle the agent could not learn, the server
                    // numbers the log (after the resync's cycle).
                    cycle: (l.cycle > 0).then_some(l.cycle),
                    app_consistent: l.app_consistent,
                })
            })
            .collect()
    }

    fn acknowledged(&mut self, log: &PendingLog) -> Result<(), SourceError> {
        let Some(mut state) = self.state.clone() else {
            return Ok(());
        };
        let id = log.unique_id.to_string();
        state.pending.retain(|l| l.unique_id != id);
        self.save(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("drvault-src-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(path: &Path, at: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(data, at).unwrap();
    }

    /// Applies a log to a copy of the old image: the result must be the new image.
    fn apply(log: &Path, base: &mut [u8]) {
        let f = std::fs::File::open(log).unwrap();
        let l = hrl::read_log(&f, base.len() as u64).unwrap();
        for e in &l.extents {
            let mut buf = vec![0u8; e.length as usize];
            crate::format::ReadAt::read_exact_at(&f, &mut buf, e.log_offset).unwrap();
            base[e.disk_offset as usize..][..buf.len()].copy_from_slice(&buf);
        }
    }

    #[test]
    fn image_diff_writes_the_changes_chains_logs_and_survives_reopening() {
        let d = tmp();
        let img = d.join("os.raw");
        std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
        let state = d.join("state");
        std::fs::create_dir_all(&state).unwrap();
        let mut s = ImageDiffSource::open("os", &img, SourceFormat::Raw, &state).unwrap();
        assert!(!s.has_baseline());
        s.restart_chain(1).unwrap();
        let mut model = std::fs::read(&img).unwrap();
        write(&img, 70_000 - 70_000 % 512, &[7u8; 1024]);
        s.cut(1, false).unwrap();
        write(&img, 512 * 1024, &[9u8; 512]);
        // A reopen between cuts (a restart) keeps the baseline, the chain and the pending log.
        let mut s = ImageDiffSource::open("os", &img, SourceFormat::Raw, &state).unwrap();
        s.cut(1, true).unwrap();
        let p = s.pending().unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(
            (p[0].cycle, p[1].cycle),
            (Some(1), Some(2)),
            "cycles never repeat"
        );
        assert!(!p[0].app_consistent && p[1].app_consistent);
        let h0 = crate::agent::replicate::log_header(&p[0].path).unwrap();
        let h1 = crate::agent::replicate::log_header(&p[1].path).unwrap();
        assert_eq!(
            h0.previous_unique_id,
            Guid::NIL,
            "the first log starts the chain"
        );
        assert_eq!(h1.previous_unique_id, h0.unique_id);
        assert_eq!(h0.vhd2_data_write_guid, h1.vhd2_data_write_guid);
        for l in &p {
            apply(&l.path, &mut model);
        }
        assert_eq!(model, std::fs::read(&img).unwrap());
        let b = s.backlog();
        assert_eq!(b.pending_logs, 2);
        assert_eq!(b.backlog_bytes, p.iter().map(|l| l.bytes).sum::<u64>());
        s.acknowledged(&p[0]).unwrap();
        assert!(!p[0].path.exists(), "an acknowledged log is removed");
        let mut s = ImageDiffSource::open("os", &img, SourceFormat::Raw, &state).unwrap();
        assert_eq!(s.pending().unwrap(), vec![p[1].clone()]);
        // Files of a cut killed before its commit are removed on open.
        std::fs::write(state.join("os.diff").join("x.hrl.partial"), b"x").unwrap();
        let mut s = ImageDiffSource::open("os", &img, SourceFormat::Raw, &state).unwrap();
        assert_eq!(std::fs::read_dir(state.join("os.diff")).unwrap().count(), 2);
        // A restart of the chain drops what is pending and starts from nil again.
        s.restart_chain(9).unwrap();
        assert!(s.pending().unwrap().is_empty());
        s.cut(0, false).unwrap();
        let p = s.pending().unwrap();
        assert_eq!(p[0].cycle, Some(9));
        let h = crate::agent::replicate::log_header(&p[0].path).unwrap();
        assert_eq!(h.previous_unique_id, Guid::NIL);
        let f = std::fs::File::open(&p[0].path).unwrap();
        assert!(
            hrl::read_log(&f, 1 << 20).unwrap().extents.is_empty(),
            "nothing changed"
        );
    }

    fn spool_log(dir: &Path, name: &str, prev: Guid) -> Guid {
        let id = Guid::new_random();
        let mut w = HrlWriter::in_memory(HrlWriterParams {
            unique_id: id,
            previous_unique_id: prev,
            ..Default::default()
        })
        .unwrap();
        w.add_write(0, &[1u8; 512]).unwrap();
        std::fs::write(dir.join(name), w.finish_to_vec().unwrap()).unwrap();
        id
    }

    #[test]
    fn spool_sends_in_chain_order_and_refuses_invalid_logs() {
        let d = tmp();
        let spool = d.join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        // Names in the opposite order of the chain: the chain decides.
        let a = spool_log(&spool, "c.hrl", Guid::NIL);
        let b = spool_log(&spool, "b.hrl", a);
        let c = spool_log(&spool, "a.hrl", b);
        std::fs::write(spool.join("notes.txt"), b"not a log").unwrap();
        let mut s = SpoolSource::open("os", &spool, 1 << 20, &d).unwrap();
        s.cut(0, true).unwrap();
        let p = s.pending().unwrap();
        let ids: Vec<Guid> = p.iter().map(|l| l.unique_id).collect();
        assert_eq!(ids, vec![a, b, c]);
        assert_eq!(
            p.iter().map(|l| l.app_consistent).collect::<Vec<_>>(),
            vec![false, false, true],
            "an app-consistent cut marks the newest log"
        );
        s.acknowledged(&p[0]).unwrap();
        assert!(!spool.join("c.hrl").exists());
        let mut s = SpoolSource::open("os", &spool, 1 << 20, &d).unwrap();
        assert_eq!(s.pending().unwrap().len(), 2);
        assert!(
            s.pending().unwrap()[1].app_consistent,
            "kept across a restart"
        );
        std::fs::write(spool.join("z.hrl"), b"garbage").unwrap();
        let e = s.pending().unwrap_err();
        assert_eq!(e.code(), "invalid_spool_log");
        assert!(!e.recoverable());
        assert!(e.to_string().contains("z.hrl"), "{e}");
    }

    #[test]
    fn chain_order_handles_roots_gaps_and_loops() {
        let g: Vec<Guid> = (0..5).map(|_| Guid::new_random()).collect();
        // Two runs: g0 <- g1, and g3 (predecessor g2 missing) <- g4; given out of order.
        let items = vec![(g[4], g[3]), (g[1], g[0]), (g[3], g[2]), (g[0], Guid::NIL)];
        let out = chain_order(items, |x| *x);
        let ids: Vec<Guid> = out.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![g[3], g[4], g[0], g[1]]);
        let looped = vec![(g[0], g[1]), (g[1], g[0])];
        assert_eq!(chain_order(looped, |x| *x).len(), 2);
    }
}
