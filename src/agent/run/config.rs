//! The agent configuration file (`drvault agent run --config agent.toml`); every field is
//! documented in `config/agent.example.toml`.
//!
//! Validation happens before the agent contacts the server: a missing disk, a spool directory
//! that is not a directory, a bandwidth schedule that does not parse or a duplicate name is
//! refused with the field that is wrong, so nothing half-configured reaches the server.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::schedule::BandwidthSchedule;
use crate::format::image::SourceFormat;
use crate::wire::{NicSpec, Policy};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {message}")]
    Read { path: String, message: String },
    #[error("config {path}: {field}: {message}")]
    Field {
        path: String,
        field: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    creds: Option<PathBuf>,
    server: Option<String>,
    token_file: Option<PathBuf>,
    ca_cert: Option<PathBuf>,
    host: Option<String>,
    state_dir: PathBuf,
    heartbeat_s: Option<u64>,
    #[serde(default = "default_compress")]
    compress: bool,
    #[serde(default)]
    bandwidth: BTreeMap<String, f64>,
    #[serde(default, rename = "vm")]
    vms: Vec<RawVm>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: String,
    #[serde(default = "default_generation")]
    generation: u8,
    #[serde(default = "default_cpus")]
    cpus: u32,
    #[serde(default = "default_memory")]
    memory_mib: u64,
    #[serde(default)]
    nics: Vec<NicSpec>,
    interval_s: Option<u64>,
    retention_s: Option<u64>,
    app_consistent_every_s: Option<u64>,
    #[serde(default)]
    pre_freeze: Vec<String>,
    #[serde(default)]
    post_thaw: Vec<String>,
    #[serde(default = "default_hook_timeout")]
    hook_timeout_s: u64,
    #[serde(default, rename = "disk")]
    disks: Vec<RawDisk>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    id: Option<String>,
    path: PathBuf,
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    source: Option<String>,
    spool: Option<PathBuf>,
}

fn default_compress() -> bool {
    true
}
fn default_generation() -> u8 {
    2
}
fn default_cpus() -> u32 {
    2
}
fn default_memory() -> u64 {
    4096
}
fn default_hook_timeout() -> u64 {
    300
}

/// How the agent reaches the server.
#[derive(Debug, Clone)]
pub enum Connection {
    /// A credentials file written by `drvault host add` / `drvault provider add`.
    Creds(PathBuf),
    /// The same three things given separately.
    Direct {
        server: String,
        token_file: PathBuf,
        ca_cert: Option<PathBuf>,
    },
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub connection: Connection,
    /// With provider credentials: the host to act for.
    pub host: Option<String>,
    pub state_dir: PathBuf,
    /// None: the shortest replication interval of the configured VMs.
    pub heartbeat_s: Option<u64>,
    /// zstd-compress block, patch and log bodies on the wire (default); off sends them as they
    /// are.
    pub compress: bool,
    pub bandwidth: BandwidthSchedule,
    pub vms: Vec<VmConfig>,
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub name: String,
    pub generation: u8,
    pub cpus: u32,
    pub memory_mib: u64,
    pub nics: Vec<NicSpec>,
    /// The policy sent when the agent enables protection (None: the server's default). Once
    /// protected, the agent follows the policy the server holds.
    pub policy: Option<Policy>,
    pub pre_freeze: Vec<String>,
    pub post_thaw: Vec<String>,
    pub hook_timeout_s: u64,
    pub disks: Vec<DiskConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceKind {
    /// Closed MS-HRL logs dropped into this directory by the host's change tracking.
    Spool(PathBuf),
    /// Logs the agent writes itself from what changed in the image since the last cycle.
    ImageDiff,
}

#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub id: String,
    pub path: PathBuf,
    pub format: SourceFormat,
    pub source: SourceKind,
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: p.clone(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        AgentConfig::parse(&text, &p, base)
    }

    /// Parses and validates `text`; relative paths are taken from `base` (the directory of
    /// the config file), so the agent does not depend on where it was started.
    pub fn parse(text: &str, path: &str, base: &Path) -> Result<AgentConfig, ConfigError> {
        let field = |field: &str, message: String| ConfigError::Field {
            path: path.to_string(),
            field: field.to_string(),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Read {
            path: path.to_string(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let abs = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let connection = match (raw.creds, raw.server, raw.token_file) {
            (Some(c), None, None) => {
                if raw.ca_cert.is_some() {
                    return Err(field(
                        "ca_cert",
                        "the credentials file already holds the CA certificate".into(),
                    ));
                }
                Connection::Creds(abs(&c))
            }
            (None, Some(server), Some(token_file)) => Connection::Direct {
                server,
                token_file: abs(&token_file),
                ca_cert: raw.ca_cert.as_deref().map(abs),
            },
            (Some(_), _, _) => {
                return Err(field(
                    "creds",
                    "give either creds or server + token_file, not both".into(),
                ))
            }
            (None, _, _) => {
                return Err(field(
                    "creds",
                    "missing: give creds (a credentials file from `drvault host add`) or server + token_file".into(),
                ))
            }
        };
        if raw.heartbeat_s == Some(0) {
            return Err(field("heartbeat_s", "must be at least 1 second".into()));
        }
        let bandwidth = BandwidthSchedule::from_table(&raw.bandwidth)
            .map_err(|(key, message)| field(&format!("bandwidth.{key:?}"), message))?;
        if raw.vms.is_empty() {
            return Err(field("vm", "no [[vm]] to protect".into()));
        }
        let mut vms = Vec::new();
        for (i, v) in raw.vms.into_iter().enumerate() {
            let at = format!("vm[{i}]");
            if !crate::vault::registry::valid_name(&v.name) {
                return Err(field(
                    &format!("{at}.name"),
                    format!("{:?}: use 1-64 characters from A-Z a-z 0-9 . _ -", v.name),
                ));
            }
            let at = format!("vm {:?}", v.name);
            if vms.iter().any(|x: &VmConfig| x.name == v.name) {
                return Err(field(&at, "listed twice".into()));
            }
            let policy = match (v.interval_s, v.retention_s, v.app_consistent_every_s) {
                (None, None, None) => None,
                (i, r, a) => {
                    let d = Policy::default();
                    Some(Policy {
                        interval_s: i.unwrap_or(d.interval_s),
                        retention_s: r.unwrap_or(d.retention_s),
                        app_consistent_every_s: a.unwrap_or(d.app_consistent_every_s),
                    })
                }
            };
            if policy.as_ref().is_some_and(|p| p.interval_s == 0) {
                return Err(field(
                    &format!("{at}.interval_s"),
                    "must be at least 1 second".into(),
                ));
            }
            if v.disks.is_empty() {
                return Err(field(&format!("{at}.disk"), "no [[vm.disk]]".into()));
            }
            let mut disks: Vec<DiskConfig> = Vec::new();
            for (j, d) in v.disks.into_iter().enumerate() {
                let dat = format!("{at}.disk[{j}]");
                let path = abs(&d.path);
                match std::fs::metadata(&path) {
                    Ok(m) if m.is_file() => {}
                    Ok(_) => {
                        return Err(field(
                            &format!("{dat}.path"),
                            format!("{} is not a file", path.display()),
                        ))
                    }
                    Err(e) => {
                        return Err(field(
                            &format!("{dat}.path"),
                            format!("{}: {e}", path.display()),
                        ))
                    }
                }
                let id = match d.id {
                    Some(id) => id,
                    None => path
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .map(String::from)
                        .unwrap_or_default(),
                };
                if !crate::vault::registry::valid_name(&id) {
                    return Err(field(
                        &format!("{dat}.id"),
                        format!("{id:?}: use 1-64 characters from A-Z a-z 0-9 . _ -"),
                    ));
                }
                if disks.iter().any(|x| x.id == id) {
                    return Err(field(&format!("{dat}.id"), format!("{id:?} listed twice")));
                }
                let format = match d.format.as_deref() {
                    None => SourceFormat::Auto,
                    Some(f) => f
                        .parse()
                        .map_err(|e: String| field(&format!("{dat}.format"), e))?,
                };
                let source = match (d.source.as_deref(), d.spool) {
                    (None | Some("spool"), Some(dir)) => {
                        let dir = abs(&dir);
                        if !dir.is_dir() {
                            return Err(field(
                                &format!("{dat}.spool"),
                                format!("{} is not a directory", dir.display()),
                            ));
                        }
                        SourceKind::Spool(dir)
                    }
                    (Some("spool"), None) => {
                        return Err(field(
                            &format!("{dat}.spool"),
                            "source = \"spool\" needs spool = DIRECTORY".into(),
                        ))
                    }
                    (None | Some("image-diff"), None) => SourceKind::ImageDiff,
                    (Some("image-diff"), Some(_)) => {
                        return Err(field(
                            &format!("{dat}.spool"),
                            "an image-diff source has no spool directory".into(),
                        ))
                    }
                    (Some(other), _) => {
                        return Err(field(
                            &format!("{dat}.source"),
                            format!("{other:?}: expected \"spool\" or \"image-diff\""),
                        ))
                    }
                };
                disks.push(DiskConfig {
                    id,
                    path,
                    format,
                    source,
                });
            }
            vms.push(VmConfig {
                name: v.name,
                generation: v.generation,
                cpus: v.cpus,
                memory_mib: v.memory_mib,
                nics: v.nics,
                policy,
                pre_freeze: v.pre_freeze,
                post_thaw: v.post_thaw,
                hook_timeout_s: v.hook_timeout_s.max(1),
                disks,
            });
        }
        Ok(AgentConfig {
            connection,
            host: raw.host,
            state_dir: abs(&raw.state_dir),
            heartbeat_s: raw.heartbeat_s,
            compress: raw.compress,
            bandwidth,
            vms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_disk() -> (PathBuf, String) {
        let dir = std::env::temp_dir().join(format!("drvault-agentcfg-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("spool")).unwrap();
        std::fs::write(dir.join("os.raw"), vec![0u8; 4096]).unwrap();
        std::fs::write(dir.join("c.json"), "{}").unwrap();
        (
            dir,
            "creds = \"c.json\"\nstate_dir = \"state\"\n".to_string(),
        )
    }

    fn err(text: &str, base: &Path) -> String {
        AgentConfig::parse(text, "agent.toml", base)
            .expect_err("must be refused")
            .to_string()
    }

    #[test]
    fn a_full_config_parses_with_paths_from_the_config_directory() {
        let (dir, head) = dir_with_disk();
        let text = format!(
            "{head}heartbeat_s = 5\n[bandwidth]\n\"Mon-Fri 08:00-18:00\" = 20\n\
             [[vm]]\nname = \"web01\"\ninterval_s = 30\npre_freeze = [\"sync\"]\n\
             [[vm.disk]]\npath = \"os.raw\"\n[[vm.disk]]\nid = \"data\"\npath = \"os.raw\"\nspool = \"spool\"\n"
        );
        let c = AgentConfig::parse(&text, "agent.toml", &dir).unwrap();
        assert_eq!(c.state_dir, dir.join("state"));
        assert_eq!(c.vms[0].disks[0].id, "os");
        assert_eq!(c.vms[0].disks[0].source, SourceKind::ImageDiff);
        assert_eq!(
            c.vms[0].disks[1].source,
            SourceKind::Spool(dir.join("spool"))
        );
        assert_eq!(c.vms[0].policy.as_ref().unwrap().interval_s, 30);
        assert_eq!(c.heartbeat_s, Some(5));
    }

    #[test]
    fn errors_name_the_field_and_the_problem() {
        let (dir, head) = dir_with_disk();
        let missing = err(
            &format!("{head}[[vm]]\nname = \"web01\"\n[[vm.disk]]\npath = \"nope.raw\"\n"),
            &dir,
        );
        assert!(
            missing.contains("vm \"web01\".disk[0].path") && missing.contains("nope.raw"),
            "{missing}"
        );
        let sched = err(
            &format!("{head}[bandwidth]\n\"Mon-Fry 08:00-18:00\" = 20\n[[vm]]\nname = \"w\"\n[[vm.disk]]\npath = \"os.raw\"\n"),
            &dir,
        );
        assert!(
            sched.contains("bandwidth") && sched.contains("Fry"),
            "{sched}"
        );
        let unknown = err(&format!("{head}colour = 1\n"), &dir);
        assert!(unknown.contains("colour"), "{unknown}");
        let spool = err(
            &format!(
                "{head}[[vm]]\nname = \"w\"\n[[vm.disk]]\npath = \"os.raw\"\nspool = \"os.raw\"\n"
            ),
            &dir,
        );
        assert!(
            spool.contains("disk[0].spool") && spool.contains("not a directory"),
            "{spool}"
        );
        let twice = err(
            &format!("{head}[[vm]]\nname = \"w\"\n[[vm.disk]]\npath = \"os.raw\"\n[[vm.disk]]\npath = \"os.raw\"\n"),
            &dir,
        );
        assert!(twice.contains("listed twice"), "{twice}");
        let nocreds = err("state_dir = \"s\"\n", &dir);
        assert!(nocreds.contains("creds"), "{nocreds}");
    }
}
