//! A fault-injecting [`ObjectStore`] wrapper for tests and failure drills.
//!
//! [`FaultyStore::wrap`] puts any [`Store`] behind a wrapper that consults a list of
//! [`FaultRule`]s before each operation. A rule names the operation class it applies to
//! ([`FaultOp`]), a key prefix, what to inject ([`FaultKind`]) and optionally how many times it
//! may fire. Rules are changed at run time through the [`FaultHandle`] returned with the store,
//! so a test can let a writer get half-way and then break the backend under it.
//!
//! Decisions the brief left open, taken here:
//!
//! * Rules are evaluated in order. `Latency` rules add up and never stop the evaluation; the
//!   first `Error`, `Torn` or `LostAfterAck` rule that fires decides the outcome and ends it.
//! * Every matching `Error` rule draws one number from the seeded generator, even at
//!   probability 0 or 1, so the sequence of draws depends only on the sequence of calls: the
//!   same seed and the same (sequential) calls give the same faults. Concurrent callers race
//!   for the generator, so only sequential runs reproduce exactly.
//! * `prefix` is a plain string prefix of the object key (`chunks/a` matches `chunks/ab/..`);
//!   for listings it is matched against the listed prefix, for deletes against each key.
//! * `Put` means an overwriting put and `PutIfAbsent` a create-only one; `Any` means both and
//!   every other operation. `Torn` and `LostAfterAck` only make sense for puts: `set_rules`
//!   refuses them on read, list or delete rules, and an `Any` rule of those kinds fires on puts
//!   only. Multipart uploads, copies and renames (unused by [`Store`]) are forwarded and see
//!   only `Any` rules of kind `Error` and `Latency`.
//! * Injected failures are `object_store::Error::Generic`, which [`Store`] reports as
//!   [`super::StoreError::Unavailable`]: to the caller they look like a transient backend
//!   outage, which is what they model. `NoSpace` carries an `io::Error` of kind `StorageFull`
//!   inside, exactly as the local backend reports a real ENOSPC, so it surfaces as
//!   [`super::StoreError::Full`].
//! * Every rule also has a `probability` (default 1): a rule of any kind fires only when a draw
//!   falls under it, so torn puts or lost writes can be sprinkled over a run like errors.
//!
//! ## Configuring a real server (test only)
//!
//! `drvault serve` wraps its store when `DRVAULT_FAULTS` is set ([`from_env`]), so integration
//! tests can break the store under a real server process. The value is a spec, or `@FILE` naming
//! a file holding one that is re-read whenever it changes (a test can then break the store and
//! heal it again without a restart). Replace the file atomically (write another file, rename it
//! over): a file rewritten in place can be read empty or half-written, and those rules would be
//! taken. The log line `fault rules replaced version=N` acknowledges a spec that says
//! `version=N`. A spec is entries separated by `;` or new lines, each `key=value` words; `#`
//! starts a comment:
//!
//! ```text
//! seed=42
//! op=put_if_absent prefix=chunks/ kind=error p=0.2
//! op=any kind=latency ms=20 p=0.5
//! op=put prefix=records/ kind=torn p=0.05 times=3
//! kind=nospace                       # every put fails as if the disk were full
//! version=3                          # the writer's number for this spec, logged when taken
//! ```
//!
//! `op` is one of `put`, `put_if_absent`, `get`, `get_range`, `head`, `delete`, `list`, `any`
//! (default `any`); `kind` one of `error`, `latency` (needs `ms`), `torn`, `lost`
//! (lost-after-ack), `nospace`; `p` defaults to 1 and `times` to unlimited. This is a test
//! facility: the server logs a warning at start when it is on, and counts every injected fault
//! in the `drvault_faults_injected_total{kind}` metric.

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, StreamExt};
use object_store::path::Path as OsPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};

use super::Store;

/// The operation class a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOp {
    /// Overwriting put ([`Store::put`]).
    Put,
    /// Create-only put ([`Store::put_if_absent`]).
    PutIfAbsent,
    /// Whole-object read.
    Get,
    /// Byte-range read.
    GetRange,
    /// Metadata read.
    Head,
    Delete,
    List,
    /// Every operation.
    Any,
}

/// What a rule injects when it fires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultKind {
    /// Fail the call with probability `p` (0.0..=1.0) without touching the backend.
    Error(f64),
    /// Delay the call, then carry on (other rules may still fail it).
    Latency(Duration),
    /// The put never completes: nothing becomes visible and the caller gets an error.
    Torn,
    /// The put reports success but nothing is written (a lying or crashed backend).
    LostAfterAck,
    /// The put fails as a full disk does (`io::ErrorKind::StorageFull`); nothing is written.
    NoSpace,
}

impl FaultKind {
    fn name(&self) -> &'static str {
        match self {
            FaultKind::Error(_) => "error",
            FaultKind::Latency(_) => "latency",
            FaultKind::Torn => "torn",
            FaultKind::LostAfterAck => "lost-after-ack",
            FaultKind::NoSpace => "nospace",
        }
    }

    fn put_only(&self) -> bool {
        matches!(
            self,
            FaultKind::Torn | FaultKind::LostAfterAck | FaultKind::NoSpace
        )
    }
}

/// One fault rule; see the module docs for how rules combine.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRule {
    pub op: FaultOp,
    /// Plain string prefix of the key; empty matches every key.
    pub prefix: String,
    pub kind: FaultKind,
    /// How many more times the rule may fire; `None` is unlimited.
    pub remaining: Option<u64>,
    /// Chance that a matching call is affected (0.0..=1.0), on top of `Error`'s own.
    pub probability: f64,
}

impl FaultRule {
    /// A rule on every key, unlimited.
    pub fn new(op: FaultOp, kind: FaultKind) -> FaultRule {
        FaultRule {
            op,
            prefix: String::new(),
            kind,
            remaining: None,
            probability: 1.0,
        }
    }

    /// Makes the rule fire only with probability `p` per matching call.
    pub fn sometimes(mut self, p: f64) -> FaultRule {
        self.probability = p;
        self
    }

    /// Restricts the rule to keys starting with `prefix`.
    pub fn under(mut self, prefix: &str) -> FaultRule {
        self.prefix = prefix.to_string();
        self
    }

    /// Lets the rule fire at most `n` times.
    pub fn times(mut self, n: u64) -> FaultRule {
        self.remaining = Some(n);
        self
    }
}

/// How many faults were injected so far, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultStats {
    pub errors: u64,
    pub latencies: u64,
    pub torn: u64,
    pub lost_after_ack: u64,
    pub no_space: u64,
}

impl FaultStats {
    /// Every fault injected, latency included.
    pub fn total(&self) -> u64 {
        self.errors + self.latencies + self.torn + self.lost_after_ack + self.no_space
    }
}

/// Errors of this module: refused rules, and the error carried by an injected failure.
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("fault rule {rule}: error probability {value} is not within 0.0..=1.0")]
    BadProbability { rule: usize, value: f64 },
    #[error("fault rule {rule}: {kind} faults apply to puts only, not to {op:?}")]
    PutOnlyKind {
        rule: usize,
        kind: &'static str,
        op: FaultOp,
    },
    #[error("injected {kind} fault on {op} of {location:?}")]
    Injected {
        kind: &'static str,
        op: &'static str,
        location: String,
    },
    #[error("fault spec entry {entry} ({text:?}): {reason}")]
    Spec {
        entry: usize,
        text: String,
        reason: String,
    },
    #[error("fault spec file {path}: {source}")]
    SpecFile {
        path: String,
        source: std::io::Error,
    },
}

/// The operation actually being performed (finer than [`FaultOp`] for the forwarded extras).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpClass {
    Put,
    PutIfAbsent,
    Get,
    GetRange,
    Head,
    Delete,
    List,
    /// Operations [`Store`] never issues; only `Any` rules see them.
    Other(&'static str),
}

impl OpClass {
    fn name(self) -> &'static str {
        match self {
            OpClass::Put => "put",
            OpClass::PutIfAbsent => "put_if_absent",
            OpClass::Get => "get",
            OpClass::GetRange => "get_range",
            OpClass::Head => "head",
            OpClass::Delete => "delete",
            OpClass::List => "list",
            OpClass::Other(name) => name,
        }
    }

    fn is_put(self) -> bool {
        matches!(self, OpClass::Put | OpClass::PutIfAbsent)
    }
}

impl FaultOp {
    fn matches(self, class: OpClass) -> bool {
        match self {
            FaultOp::Any => true,
            FaultOp::Put => class == OpClass::Put,
            FaultOp::PutIfAbsent => class == OpClass::PutIfAbsent,
            FaultOp::Get => class == OpClass::Get,
            FaultOp::GetRange => class == OpClass::GetRange,
            FaultOp::Head => class == OpClass::Head,
            FaultOp::Delete => class == OpClass::Delete,
            FaultOp::List => class == OpClass::List,
        }
    }
}

/// SplitMix64: tiny, seedable, and good enough to decide coin flips reproducibly.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1): the top 53 bits make an exact f64 mantissa.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[derive(Debug)]
struct FaultState {
    rules: Vec<FaultRule>,
    rng: SplitMix64,
    stats: FaultStats,
}

/// What the wrapper does with one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Proceed,
    Fail,
    Torn,
    LostAfterAck,
    NoSpace,
}

/// Shared control over a [`FaultyStore`]'s rules. Cheap to clone.
#[derive(Debug, Clone)]
pub struct FaultHandle {
    state: Arc<Mutex<FaultState>>,
}

impl FaultHandle {
    fn lock(&self) -> MutexGuard<'_, FaultState> {
        // A panic while holding the lock cannot leave the state half-updated in a way that
        // matters for a test double, so a poisoned lock is simply taken over.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replaces all rules. Refuses probabilities outside 0..=1 and put-only kinds on
    /// non-put operations, leaving the previous rules in place.
    pub fn set_rules(&self, rules: Vec<FaultRule>) -> Result<(), FaultError> {
        for (i, rule) in rules.iter().enumerate() {
            if !(0.0..=1.0).contains(&rule.probability) {
                return Err(FaultError::BadProbability {
                    rule: i,
                    value: rule.probability,
                });
            }
            match rule.kind {
                FaultKind::Error(p) if !(0.0..=1.0).contains(&p) => {
                    return Err(FaultError::BadProbability { rule: i, value: p });
                }
                k if k.put_only()
                    && !matches!(rule.op, FaultOp::Put | FaultOp::PutIfAbsent | FaultOp::Any) =>
                {
                    return Err(FaultError::PutOnlyKind {
                        rule: i,
                        kind: rule.kind.name(),
                        op: rule.op,
                    });
                }
                _ => {}
            }
        }
        self.lock().rules = rules;
        Ok(())
    }

    /// Removes all rules: the store behaves like the wrapped one again.
    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    /// The current rules, with their remaining counts.
    pub fn rules(&self) -> Vec<FaultRule> {
        self.lock().rules.clone()
    }

    /// Faults injected since the store was wrapped.
    pub fn stats(&self) -> FaultStats {
        self.lock().stats
    }

    /// Decides one call. The lock is held only here, never across an await.
    fn decide(&self, class: OpClass, location: &str) -> (Duration, Verdict) {
        let mut guard = self.lock();
        let FaultState { rules, rng, stats } = &mut *guard;
        let mut delay = Duration::ZERO;
        for rule in rules.iter_mut() {
            if rule.remaining == Some(0)
                || !rule.op.matches(class)
                || !location.starts_with(rule.prefix.as_str())
            {
                continue;
            }
            if rule.kind.put_only() && !class.is_put() {
                continue;
            }
            // Errors always draw (see the module docs); other kinds only when they are chancy,
            // so rules without a probability leave the sequence of draws unchanged.
            let chance = match rule.kind {
                FaultKind::Error(p) => Some(p * rule.probability),
                _ if rule.probability < 1.0 => Some(rule.probability),
                _ => None,
            };
            if let Some(p) = chance {
                if rng.next_f64() >= p {
                    continue;
                }
            }
            let verdict = match rule.kind {
                FaultKind::Error(_) => {
                    stats.errors += 1;
                    Verdict::Fail
                }
                FaultKind::Latency(d) => {
                    stats.latencies += 1;
                    delay = delay.saturating_add(d);
                    Verdict::Proceed
                }
                FaultKind::Torn => {
                    stats.torn += 1;
                    Verdict::Torn
                }
                FaultKind::LostAfterAck => {
                    stats.lost_after_ack += 1;
                    Verdict::LostAfterAck
                }
                FaultKind::NoSpace => {
                    stats.no_space += 1;
                    Verdict::NoSpace
                }
            };
            metrics::counter!("drvault_faults_injected_total", "kind" => rule.kind.name())
                .increment(1);
            if let Some(n) = rule.remaining.as_mut() {
                *n -= 1;
            }
            if verdict != Verdict::Proceed {
                return (delay, verdict);
            }
        }
        (delay, Verdict::Proceed)
    }

    /// Decides a call and serves its latency; the verdict is left to the caller.
    async fn gate(&self, class: OpClass, location: &str) -> Verdict {
        let (delay, verdict) = self.decide(class, location);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        verdict
    }
}

fn injected(kind: &'static str, class: OpClass, location: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultyStore",
        source: Box::new(FaultError::Injected {
            kind,
            op: class.name(),
            location: location.to_string(),
        }),
    }
}

/// A full disk as the local backend reports it: an `io::Error` of kind `StorageFull` inside.
fn no_space(class: OpClass, location: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "FaultyStore",
        source: Box::new(std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            FaultError::Injected {
                kind: "nospace",
                op: class.name(),
                location: location.to_string(),
            },
        )),
    }
}

/// Turns a non-put verdict into the call's outcome: anything but `Proceed` is an error.
fn check(verdict: Verdict, class: OpClass, location: &str) -> object_store::Result<()> {
    match verdict {
        Verdict::Proceed => Ok(()),
        Verdict::Fail => Err(injected("error", class, location)),
        // `decide` only returns these for puts; keep them errors should that ever change.
        Verdict::Torn => Err(injected("torn", class, location)),
        Verdict::LostAfterAck => Err(injected("lost-after-ack", class, location)),
        Verdict::NoSpace => Err(no_space(class, location)),
    }
}

/// The wrapper itself. Build it with [`FaultyStore::wrap`].
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    handle: FaultHandle,
}

impl FaultyStore {
    /// Wraps `store`; the returned [`Store`] shares the backend with `store` (objects written
    /// through either are visible to both) and injects the faults set through the handle.
    pub fn wrap(store: &Store, seed: u64) -> (Store, FaultHandle) {
        let handle = FaultHandle {
            state: Arc::new(Mutex::new(FaultState {
                rules: Vec::new(),
                rng: SplitMix64(seed),
                stats: FaultStats::default(),
            })),
        };
        let faulty = FaultyStore {
            inner: Arc::clone(&store.inner),
            handle: handle.clone(),
        };
        (
            Store::from_object_store(Arc::new(faulty), store.url()),
            handle,
        )
    }
}

/// A parsed fault spec (see the module docs for the syntax).
#[derive(Debug, Clone, PartialEq)]
pub struct FaultSpec {
    /// `None` when the spec names no seed (the caller picks one).
    pub seed: Option<u64>,
    /// The writer's number for this spec (`version=N`), logged when the rules are taken so the
    /// writer knows which of its changes is in force.
    pub version: Option<u64>,
    pub rules: Vec<FaultRule>,
}

impl FaultSpec {
    /// Parses a spec; every mistake names its entry (1-based) and text.
    pub fn parse(text: &str) -> Result<FaultSpec, FaultError> {
        let mut spec = FaultSpec {
            seed: None,
            version: None,
            rules: Vec::new(),
        };
        let entries = text
            .split(['\n', ';'])
            .map(|e| e.split('#').next().unwrap_or("").trim())
            .filter(|e| !e.is_empty());
        for (i, entry) in entries.enumerate() {
            let bad = |reason: String| FaultError::Spec {
                entry: i + 1,
                text: entry.to_string(),
                reason,
            };
            let mut op = FaultOp::Any;
            let (mut prefix, mut kind, mut ms) = (String::new(), None::<&str>, None::<u64>);
            let (mut p, mut times, mut seed) = (1.0f64, None::<u64>, None::<u64>);
            let mut version = None::<u64>;
            for word in entry.split_whitespace() {
                let (k, v) = word
                    .split_once('=')
                    .ok_or_else(|| bad(format!("{word:?} is not key=value")))?;
                let num = |v: &str| {
                    v.parse::<u64>()
                        .map_err(|_| bad(format!("{k}={v:?} is not a whole number")))
                };
                match k {
                    "seed" => seed = Some(num(v)?),
                    "version" => version = Some(num(v)?),
                    "op" => {
                        op = match v {
                            "put" => FaultOp::Put,
                            "put_if_absent" => FaultOp::PutIfAbsent,
                            "get" => FaultOp::Get,
                            "get_range" => FaultOp::GetRange,
                            "head" => FaultOp::Head,
                            "delete" => FaultOp::Delete,
                            "list" => FaultOp::List,
                            "any" => FaultOp::Any,
                            _ => return Err(bad(format!("unknown op {v:?}"))),
                        }
                    }
                    "prefix" => prefix = v.to_string(),
                    "kind" => kind = Some(v),
                    "ms" => ms = Some(num(v)?),
                    "times" => times = Some(num(v)?),
                    "p" => {
                        p = v
                            .parse::<f64>()
                            .ok()
                            .filter(|p| (0.0..=1.0).contains(p))
                            .ok_or_else(|| bad(format!("p={v:?} is not within 0..=1")))?
                    }
                    _ => return Err(bad(format!("unknown key {k:?}"))),
                }
            }
            if seed.is_some() || version.is_some() {
                if kind.is_some() {
                    return Err(bad(
                        "seed= and version= stand alone, not inside a rule".into()
                    ));
                }
                spec.seed = seed.or(spec.seed);
                spec.version = version.or(spec.version);
                continue;
            }
            let kind = match (kind, ms) {
                (Some("error"), None) => FaultKind::Error(1.0),
                (Some("latency"), Some(ms)) => FaultKind::Latency(Duration::from_millis(ms)),
                (Some("latency"), None) => return Err(bad("latency needs ms=".into())),
                (Some("torn"), None) => FaultKind::Torn,
                (Some("lost"), None) => FaultKind::LostAfterAck,
                (Some("nospace"), None) => FaultKind::NoSpace,
                (Some(k), Some(_)) if k != "latency" => {
                    return Err(bad("ms= goes with kind=latency only".into()))
                }
                (Some(k), _) => return Err(bad(format!("unknown kind {k:?}"))),
                (None, _) => return Err(bad("kind= is required".into())),
            };
            if kind.put_only() && !matches!(op, FaultOp::Put | FaultOp::PutIfAbsent | FaultOp::Any)
            {
                return Err(bad(format!("kind {} applies to puts only", kind.name())));
            }
            spec.rules.push(FaultRule {
                op,
                prefix,
                kind,
                remaining: times,
                probability: p,
            });
        }
        Ok(spec)
    }
}

/// Environment variable that turns fault injection on in `drvault serve` (test only).
pub const FAULTS_ENV: &str = "DRVAULT_FAULTS";

/// Wraps `store` when `DRVAULT_FAULTS` is set (see the module docs); otherwise returns it as
/// is. With `@FILE`, a background task re-reads the file every 100 ms and replaces the rules
/// when its text changed; a file that does not parse keeps the previous rules (and is logged).
/// Must be called inside a tokio runtime when the value is `@FILE`.
pub fn from_env(store: Store) -> Result<(Store, Option<FaultHandle>), FaultError> {
    let Ok(value) = std::env::var(FAULTS_ENV) else {
        return Ok((store, None));
    };
    let (text, file) = match value.strip_prefix('@') {
        Some(path) => {
            let path = std::path::PathBuf::from(path);
            let text = std::fs::read_to_string(&path).map_err(|source| FaultError::SpecFile {
                path: path.display().to_string(),
                source,
            })?;
            (text, Some(path))
        }
        None => (value.clone(), None),
    };
    let spec = FaultSpec::parse(&text)?;
    let seed = spec.seed.unwrap_or_else(|| {
        let mut b = [0u8; 8];
        crate::util::fill_random(&mut b);
        u64::from_le_bytes(b)
    });
    let (faulty, handle) = FaultyStore::wrap(&store, seed);
    handle.set_rules(spec.rules)?;
    tracing::warn!(
        seed,
        spec = %text.trim(),
        "FAULT INJECTION ON ({FAULTS_ENV}): the vault store fails on purpose; for tests only"
    );
    if let Some(path) = file {
        let h = handle.clone();
        tokio::spawn(async move {
            let mut last = text;
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Ok(now) = tokio::fs::read_to_string(&path).await else {
                    continue;
                };
                if now == last {
                    continue;
                }
                match FaultSpec::parse(&now).and_then(|s| h.set_rules(s.rules).map(|()| s.version))
                {
                    Ok(version) => tracing::warn!(
                        version = version.unwrap_or(0),
                        spec = %now.trim(),
                        "fault rules replaced"
                    ),
                    Err(e) => tracing::error!(error = %e, "fault spec file refused; rules kept"),
                }
                last = now;
            }
        });
    }
    Ok((faulty, Some(handle)))
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

/// `ObjectStore` is an `#[async_trait]` trait; the signatures below are that macro's expansion
/// written out, so the crate needs no `async-trait` dependency just for a test double.
type Fut<'a, T> = BoxFuture<'a, object_store::Result<T>>;

#[deny(clippy::missing_trait_methods)]
impl ObjectStore for FaultyStore {
    fn put_opts<'s, 'l, 'f>(
        &'s self,
        location: &'l OsPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Fut<'f, PutResult>
    where
        's: 'f,
        'l: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let class = match opts.mode {
                PutMode::Create => OpClass::PutIfAbsent,
                PutMode::Overwrite | PutMode::Update(_) => OpClass::Put,
            };
            match self.handle.gate(class, location.as_ref()).await {
                Verdict::Proceed => self.inner.put_opts(location, payload, opts).await,
                Verdict::Fail => Err(injected("error", class, location.as_ref())),
                Verdict::Torn => Err(injected("torn", class, location.as_ref())),
                Verdict::NoSpace => Err(no_space(class, location.as_ref())),
                Verdict::LostAfterAck => Ok(PutResult {
                    e_tag: None,
                    version: None,
                    extensions: Default::default(),
                }),
            }
        })
    }

    fn put_multipart_opts<'s, 'l, 'f>(
        &'s self,
        location: &'l OsPath,
        opts: PutMultipartOptions,
    ) -> Fut<'f, Box<dyn MultipartUpload>>
    where
        's: 'f,
        'l: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let class = OpClass::Other("put_multipart");
            check(
                self.handle.gate(class, location.as_ref()).await,
                class,
                location.as_ref(),
            )?;
            self.inner.put_multipart_opts(location, opts).await
        })
    }

    fn get_opts<'s, 'l, 'f>(
        &'s self,
        location: &'l OsPath,
        options: GetOptions,
    ) -> Fut<'f, GetResult>
    where
        's: 'f,
        'l: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            // Store's head and get_range both arrive here; tell them apart by the options.
            let class = if options.head {
                OpClass::Head
            } else if options.range.is_some() {
                OpClass::GetRange
            } else {
                OpClass::Get
            };
            check(
                self.handle.gate(class, location.as_ref()).await,
                class,
                location.as_ref(),
            )?;
            self.inner.get_opts(location, options).await
        })
    }

    fn get_ranges<'s, 'l, 'r, 'f>(
        &'s self,
        location: &'l OsPath,
        ranges: &'r [Range<u64>],
    ) -> Fut<'f, Vec<Bytes>>
    where
        's: 'f,
        'l: 'f,
        'r: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let class = OpClass::GetRange;
            check(
                self.handle.gate(class, location.as_ref()).await,
                class,
                location.as_ref(),
            )?;
            self.inner.get_ranges(location, ranges).await
        })
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<OsPath>>,
    ) -> BoxStream<'static, object_store::Result<OsPath>> {
        let inner = Arc::clone(&self.inner);
        let handle = self.handle.clone();
        // One decision per key, so a rule can fail some deletes of a batch and not others;
        // the batching of the inner store is given up, which a test double can afford.
        locations
            .then(move |location| {
                let inner = Arc::clone(&inner);
                let handle = handle.clone();
                async move {
                    let location = location?;
                    let class = OpClass::Delete;
                    check(
                        handle.gate(class, location.as_ref()).await,
                        class,
                        location.as_ref(),
                    )?;
                    inner.delete(&location).await?;
                    Ok(location)
                }
            })
            .boxed()
    }

    fn list(
        &self,
        prefix: Option<&OsPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let inner = Arc::clone(&self.inner);
        let handle = self.handle.clone();
        let prefix = prefix.cloned();
        stream::once(async move {
            let at = prefix.as_ref().map(|p| p.as_ref()).unwrap_or("");
            match check(handle.gate(OpClass::List, at).await, OpClass::List, at) {
                Ok(()) => inner.list(prefix.as_ref()),
                Err(e) => stream::once(async move { Err(e) }).boxed(),
            }
        })
        .flatten()
        .boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&OsPath>,
        offset: &OsPath,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let inner = Arc::clone(&self.inner);
        let handle = self.handle.clone();
        let prefix = prefix.cloned();
        let offset = offset.clone();
        stream::once(async move {
            let at = prefix.as_ref().map(|p| p.as_ref()).unwrap_or("");
            match check(handle.gate(OpClass::List, at).await, OpClass::List, at) {
                Ok(()) => inner.list_with_offset(prefix.as_ref(), &offset),
                Err(e) => stream::once(async move { Err(e) }).boxed(),
            }
        })
        .flatten()
        .boxed()
    }

    fn list_with_delimiter<'s, 'p, 'f>(&'s self, prefix: Option<&'p OsPath>) -> Fut<'f, ListResult>
    where
        's: 'f,
        'p: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let at = prefix.map(|p| p.as_ref()).unwrap_or("");
            check(self.handle.gate(OpClass::List, at).await, OpClass::List, at)?;
            self.inner.list_with_delimiter(prefix).await
        })
    }

    fn copy_opts<'s, 'a, 'b, 'f>(
        &'s self,
        from: &'a OsPath,
        to: &'b OsPath,
        options: CopyOptions,
    ) -> Fut<'f, ()>
    where
        's: 'f,
        'a: 'f,
        'b: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let class = OpClass::Other("copy");
            check(
                self.handle.gate(class, to.as_ref()).await,
                class,
                to.as_ref(),
            )?;
            self.inner.copy_opts(from, to, options).await
        })
    }

    fn rename_opts<'s, 'a, 'b, 'f>(
        &'s self,
        from: &'a OsPath,
        to: &'b OsPath,
        options: RenameOptions,
    ) -> Fut<'f, ()>
    where
        's: 'f,
        'a: 'f,
        'b: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let class = OpClass::Other("rename");
            check(
                self.handle.gate(class, to.as_ref()).await,
                class,
                to.as_ref(),
            )?;
            self.inner.rename_opts(from, to, options).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Key, PutOutcome, StoreError};

    fn key(s: &str) -> Key {
        let parts: Vec<&str> = s.split('/').collect();
        Key::new(&parts).unwrap()
    }

    fn faulty(seed: u64) -> (Store, FaultHandle) {
        FaultyStore::wrap(&Store::open("memory://", &[]).unwrap(), seed)
    }

    #[test]
    fn splitmix_is_reproducible_and_in_unit_interval() {
        let mut a = SplitMix64(7);
        let mut b = SplitMix64(7);
        let mut c = SplitMix64(8);
        let xs: Vec<f64> = (0..1000).map(|_| a.next_f64()).collect();
        let ys: Vec<f64> = (0..1000).map(|_| b.next_f64()).collect();
        let zs: Vec<f64> = (0..1000).map(|_| c.next_f64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        // Not a statistics test: only that both halves of the interval are reached.
        assert!(xs.iter().any(|x| *x < 0.5) && xs.iter().any(|x| *x >= 0.5));
    }

    #[test]
    fn bad_probability_is_refused_and_old_rules_stay() {
        let (_s, h) = faulty(1);
        let good = vec![FaultRule::new(FaultOp::Get, FaultKind::Error(0.5))];
        h.set_rules(good.clone()).unwrap();
        for p in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
            let bad = vec![
                FaultRule::new(FaultOp::Head, FaultKind::Error(1.0)),
                FaultRule::new(FaultOp::Get, FaultKind::Error(p)),
            ];
            match h.set_rules(bad) {
                Err(FaultError::BadProbability { rule: 1, .. }) => {}
                other => panic!("probability {p} gave {other:?}"),
            }
        }
        assert_eq!(h.rules(), good);
    }

    #[test]
    fn put_only_kinds_are_refused_on_other_ops() {
        let (_s, h) = faulty(1);
        for op in [
            FaultOp::Get,
            FaultOp::GetRange,
            FaultOp::Head,
            FaultOp::Delete,
            FaultOp::List,
        ] {
            for kind in [FaultKind::Torn, FaultKind::LostAfterAck] {
                match h.set_rules(vec![FaultRule::new(op, kind)]) {
                    Err(FaultError::PutOnlyKind { rule: 0, op: o, .. }) => assert_eq!(o, op),
                    other => panic!("{op:?}/{kind:?} gave {other:?}"),
                }
            }
        }
        for op in [FaultOp::Put, FaultOp::PutIfAbsent, FaultOp::Any] {
            h.set_rules(vec![FaultRule::new(op, FaultKind::Torn)])
                .unwrap();
        }
    }

    #[tokio::test]
    async fn rules_match_op_class_and_prefix() {
        let (s, h) = faulty(3);
        let (a, b) = (key("chunks/ab/1"), key("vms/x"));
        s.put(&a, Bytes::from_static(b"a")).await.unwrap();
        s.put(&b, Bytes::from_static(b"b")).await.unwrap();
        h.set_rules(vec![
            FaultRule::new(FaultOp::Head, FaultKind::Error(1.0)).under("chunks/a")
        ])
        .unwrap();
        assert!(matches!(
            s.head(&a).await,
            Err(StoreError::Unavailable { op: "head", .. })
        ));
        // Other key, other operation: untouched.
        assert_eq!(s.head(&b).await.unwrap(), Some(1));
        assert_eq!(s.get(&a).await.unwrap(), Bytes::from_static(b"a"));
        assert_eq!(
            s.get_range(&a, 0..1).await.unwrap(),
            Bytes::from_static(b"a")
        );
        assert_eq!(
            h.stats(),
            FaultStats {
                errors: 1,
                ..Default::default()
            }
        );
    }

    #[tokio::test]
    async fn put_and_put_if_absent_are_distinct_classes() {
        let (s, h) = faulty(3);
        let k = key("m/v1");
        h.set_rules(vec![FaultRule::new(
            FaultOp::PutIfAbsent,
            FaultKind::Error(1.0),
        )])
        .unwrap();
        assert!(matches!(
            s.put_if_absent(&k, Bytes::from_static(b"1")).await,
            Err(StoreError::Unavailable {
                op: "put_if_absent",
                ..
            })
        ));
        s.put(&k, Bytes::from_static(b"2")).await.unwrap();
        h.set_rules(vec![FaultRule::new(FaultOp::Put, FaultKind::Error(1.0))])
            .unwrap();
        assert!(s.put(&k, Bytes::from_static(b"3")).await.is_err());
        assert_eq!(
            s.put_if_absent(&k, Bytes::from_static(b"4")).await.unwrap(),
            PutOutcome::Existed
        );
        assert_eq!(s.get(&k).await.unwrap(), Bytes::from_static(b"2"));
    }

    #[tokio::test]
    async fn errors_on_list_and_delete_are_transient() {
        let (s, h) = faulty(5);
        let k = key("l/a");
        s.put(&k, Bytes::from_static(b"x")).await.unwrap();
        h.set_rules(vec![
            FaultRule::new(FaultOp::List, FaultKind::Error(1.0)),
            FaultRule::new(FaultOp::Delete, FaultKind::Error(1.0)),
        ])
        .unwrap();
        assert!(matches!(
            s.list(&key("l")).await,
            Err(StoreError::Unavailable { op: "list", .. })
        ));
        assert!(matches!(
            s.delete(&k).await,
            Err(StoreError::Unavailable { op: "delete", .. })
        ));
        h.clear();
        assert_eq!(s.list(&key("l")).await.unwrap().len(), 1);
        s.delete(&k).await.unwrap();
        assert_eq!(s.head(&k).await.unwrap(), None);
    }

    #[tokio::test]
    async fn latency_does_not_change_results_and_is_counted() {
        let (s, h) = faulty(9);
        let k = key("t/x");
        h.set_rules(vec![FaultRule::new(
            FaultOp::Any,
            FaultKind::Latency(Duration::from_millis(1)),
        )
        .times(2)])
            .unwrap();
        s.put(&k, Bytes::from_static(b"x")).await.unwrap();
        assert_eq!(s.get(&k).await.unwrap(), Bytes::from_static(b"x"));
        assert_eq!(s.head(&k).await.unwrap(), Some(1));
        assert_eq!(
            h.stats(),
            FaultStats {
                latencies: 2,
                ..Default::default()
            }
        );
        assert_eq!(h.rules()[0].remaining, Some(0));
    }

    #[tokio::test]
    async fn any_rule_of_put_only_kind_leaves_reads_alone() {
        let (s, h) = faulty(9);
        let k = key("t/y");
        s.put(&k, Bytes::from_static(b"y")).await.unwrap();
        h.set_rules(vec![FaultRule::new(FaultOp::Any, FaultKind::Torn)])
            .unwrap();
        assert_eq!(s.get(&k).await.unwrap(), Bytes::from_static(b"y"));
        assert!(s.put(&k, Bytes::from_static(b"z")).await.is_err());
        assert_eq!(s.get(&k).await.unwrap(), Bytes::from_static(b"y"));
        assert_eq!(
            h.stats(),
            FaultStats {
                torn: 1,
                ..Default::default()
            }
        );
    }
    #[tokio::test]
    async fn nospace_fails_puts_as_a_full_disk_and_writes_nothing() {
        let (s, h) = faulty(11);
        let k = key("c/full");
        h.set_rules(vec![FaultRule::new(FaultOp::Any, FaultKind::NoSpace)])
            .unwrap();
        assert!(matches!(
            s.put_if_absent(&k, Bytes::from_static(b"x")).await,
            Err(StoreError::Full {
                op: "put_if_absent",
                ..
            })
        ));
        assert!(matches!(
            s.put(&k, Bytes::from_static(b"x")).await,
            Err(StoreError::Full { op: "put", .. })
        ));
        // Reads still work on a full disk.
        assert_eq!(s.head(&k).await.unwrap(), None);
        assert_eq!(h.stats().no_space, 2);
        h.clear();
        s.put(&k, Bytes::from_static(b"x")).await.unwrap();
    }

    #[tokio::test]
    async fn chancy_torn_puts_hit_some_and_spare_others() {
        let (s, h) = faulty(12);
        h.set_rules(vec![
            FaultRule::new(FaultOp::PutIfAbsent, FaultKind::Torn).sometimes(0.5)
        ])
        .unwrap();
        let mut landed = 0;
        for i in 0..64 {
            let k = key(&format!("t/{i}"));
            if s.put_if_absent(&k, Bytes::from_static(b"v")).await.is_ok() {
                landed += 1;
                assert!(s.head(&k).await.unwrap().is_some());
            } else {
                assert!(s.head(&k).await.unwrap().is_none(), "a torn put left {k}");
            }
        }
        assert!(landed > 0 && landed < 64, "{landed}");
        assert_eq!(h.stats().torn, 64 - landed);
    }

    #[test]
    fn bad_rule_probability_is_refused() {
        let (_s, h) = faulty(1);
        let r = FaultRule::new(FaultOp::Put, FaultKind::Torn).sometimes(2.0);
        assert!(matches!(
            h.set_rules(vec![r]),
            Err(FaultError::BadProbability { rule: 0, .. })
        ));
        let r = FaultRule::new(FaultOp::Get, FaultKind::NoSpace);
        assert!(matches!(
            h.set_rules(vec![r]),
            Err(FaultError::PutOnlyKind { .. })
        ));
    }

    #[test]
    fn spec_parses_every_kind() {
        let spec = FaultSpec::parse(
            "seed=42\n# comment\nop=put_if_absent prefix=chunks/ kind=error p=0.2; \
             op=any kind=latency ms=20 p=0.5\nop=put prefix=records/ kind=torn times=3\n\
             kind=lost p=0.01 # trailing comment\nop=put kind=nospace",
        )
        .unwrap();
        assert_eq!(spec.seed, Some(42));
        let want = vec![
            FaultRule::new(FaultOp::PutIfAbsent, FaultKind::Error(1.0))
                .under("chunks/")
                .sometimes(0.2),
            FaultRule::new(FaultOp::Any, FaultKind::Latency(Duration::from_millis(20)))
                .sometimes(0.5),
            FaultRule::new(FaultOp::Put, FaultKind::Torn)
                .under("records/")
                .times(3),
            FaultRule::new(FaultOp::Any, FaultKind::LostAfterAck).sometimes(0.01),
            FaultRule::new(FaultOp::Put, FaultKind::NoSpace),
        ];
        assert_eq!(spec.rules, want);
        assert_eq!(FaultSpec::parse("").unwrap().rules, vec![]);
        let versioned = FaultSpec::parse("version=7\nkind=error").unwrap();
        assert_eq!(versioned.version, Some(7));
        assert_eq!(versioned.rules.len(), 1);
    }

    #[test]
    fn spec_mistakes_name_their_entry() {
        for (text, entry, what) in [
            ("kind=error; op=fly kind=error", 2, "unknown op"),
            ("kind=boom", 1, "unknown kind"),
            ("op=get", 1, "kind= is required"),
            ("kind=latency", 1, "needs ms="),
            ("kind=error ms=5", 1, "ms= goes with"),
            ("kind=error p=1.5", 1, "within 0..=1"),
            ("kind=error p=x", 1, "within 0..=1"),
            ("kind=error times=-1", 1, "whole number"),
            ("kind=error colour=red", 1, "unknown key"),
            ("kind=error oops", 1, "not key=value"),
            ("seed=1 kind=error", 1, "stand alone"),
            ("kind=error version=2", 1, "stand alone"),
            ("op=get kind=torn", 1, "puts only"),
            ("op=list kind=nospace", 1, "puts only"),
        ] {
            match FaultSpec::parse(text) {
                Err(FaultError::Spec {
                    entry: e, reason, ..
                }) => {
                    assert_eq!(e, entry, "{text}");
                    assert!(reason.contains(what), "{text}: {reason}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
