//! Webhooks: `[[webhooks]]` in the server configuration names endpoints that get a signed POST
//! when a job ends (`job.succeeded`, `job.failed`) or a VM's health level changes
//! (`vm.health`). The body and the signature are described in [`crate::wire::webhooks`].
//!
//! Nothing here may slow down the work it reports on. Jobs hand finished jobs to a broadcast
//! channel that never waits ([`Jobs::subscribe_finished`]); health is polled from the same view
//! `/v1/vms` shows. One listener turns them into deliveries, at most [`MAX_IN_FLIGHT`] at once;
//! while they are all busy the channel fills, and what overflows it is dropped, counted
//! (`drvault_webhook_deliveries_total{result="dropped"}`) and logged. A delivery that fails
//! with a network error, a timeout, 408, 429 or 5xx is retried with a doubling wait (1 s, 2 s,
//! 4 s, ... at most [`MAX_RETRY_WAIT`]) up to [`MAX_ATTEMPTS`] attempts; any other answer is
//! final. Redirects are not followed: they could lead a plain-HTTP delivery off the loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use hmac::{KeyInit, Mac};
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::Semaphore;

use crate::jobs::Jobs;
use crate::overview::Overview;
use crate::tasks::Tasks;
use crate::wire::{
    Health, Job, JobState, VmHealthChange, WebhookEvent, EVENT_JOB_FAILED, EVENT_JOB_SUCCEEDED,
    EVENT_VM_HEALTH, WEBHOOK_DELIVERY_HEADER, WEBHOOK_EVENTS, WEBHOOK_EVENT_HEADER,
    WEBHOOK_SIGNATURE_HEADER, WEBHOOK_TIMESTAMP_HEADER,
};

/// Attempts per delivery, the first included.
pub const MAX_ATTEMPTS: u32 = 6;
/// The wait before the first retry; it doubles after each failed attempt.
pub const FIRST_RETRY_WAIT: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
pub const MAX_RETRY_WAIT: Duration = Duration::from_secs(60);
/// One attempt, connection and answer together.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deliveries under way at once (each to one endpoint, waits between retries included).
pub const MAX_IN_FLIGHT: usize = 64;
/// How often VM health is compared with what it was.
pub const HEALTH_POLL: Duration = Duration::from_secs(10);

/// The deliveries counter and its `result` label values.
const DELIVERIES: &str = "drvault_webhook_deliveries_total";

/// One `[[webhooks]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `https://…`, or `http://` to a loopback address (127.0.0.0/8, ::1, localhost).
    pub url: String,
    /// The HMAC key the receiver checks signatures with.
    pub secret: Secret,
    /// Which events this endpoint gets: `job.succeeded`, `job.failed`, `vm.health`.
    pub events: Vec<String>,
}

/// A webhook secret: never shown by `Debug` (the configuration is logged in places).
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A `[[webhooks]]` entry the server refuses to start with.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhooks[{index}].url {url:?}: {reason}")]
    Url {
        index: usize,
        url: String,
        reason: String,
    },
    #[error("webhooks[{index}].secret is empty: each endpoint needs a secret its receiver checks the signatures with")]
    EmptySecret { index: usize },
    #[error("webhooks[{index}].events is empty: name at least one of {}", WEBHOOK_EVENTS.join(", "))]
    NoEvents { index: usize },
    #[error("webhooks[{index}].events: unknown event {name:?} (known: {})", WEBHOOK_EVENTS.join(", "))]
    UnknownEvent { index: usize, name: String },
    #[error("webhooks: HTTP client: {0}")]
    Client(String),
}

/// Checks every entry: a URL that parses, https or plain http to a loopback address only
/// (a secret and the events sent in clear must not cross a network), a secret, known events.
pub fn validate(hooks: &[WebhookConfig]) -> Result<(), WebhookError> {
    for (index, h) in hooks.iter().enumerate() {
        check_url(&h.url).map_err(|reason| WebhookError::Url {
            index,
            url: h.url.clone(),
            reason,
        })?;
        if h.secret.0.trim().is_empty() {
            return Err(WebhookError::EmptySecret { index });
        }
        if h.events.is_empty() {
            return Err(WebhookError::NoEvents { index });
        }
        if let Some(name) = h
            .events
            .iter()
            .find(|e| !WEBHOOK_EVENTS.contains(&e.as_str()))
        {
            return Err(WebhookError::UnknownEvent {
                index,
                name: name.clone(),
            });
        }
    }
    Ok(())
}

fn check_url(url: &str) -> Result<(), String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    let host = u.host_str().filter(|h| !h.is_empty()).ok_or("no host")?;
    match u.scheme() {
        "https" => Ok(()),
        "http" => {
            // The URL parser has already normalised the host: IPv6 in brackets, IPv4 dotted.
            let ip = host.trim_start_matches('[').trim_end_matches(']');
            let loopback = match ip.parse::<IpAddr>() {
                Ok(ip) => ip.is_loopback(),
                Err(_) => host.eq_ignore_ascii_case("localhost"),
            };
            if loopback {
                Ok(())
            } else {
                Err("plain http is allowed only to a loopback address (127.0.0.1, ::1, localhost): use https".into())
            }
        }
        other => Err(format!("scheme {other}: use https")),
    }
}

/// `sha256=<hex>` of HMAC-SHA256(`secret`, "`timestamp`.`body`").
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail; an empty secret is
    // refused at startup anyway.
    let mut mac = match hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

struct Endpoint {
    index: usize,
    url: String,
    secret: Secret,
    events: BTreeSet<String>,
}

/// The running webhook sender.
#[derive(Clone)]
struct Sender {
    endpoints: Arc<Vec<Endpoint>>,
    http: reqwest::Client,
    in_flight: Arc<Semaphore>,
    tasks: Tasks,
}

/// Starts the listeners for the configured endpoints (none configured: nothing runs).
pub fn start(
    hooks: &[WebhookConfig],
    jobs: &Jobs,
    overview: &Overview,
    tasks: &Tasks,
) -> Result<(), WebhookError> {
    validate(hooks)?;
    if hooks.is_empty() {
        return Ok(());
    }
    let http = reqwest::Client::builder()
        .connect_timeout(ATTEMPT_TIMEOUT)
        .timeout(ATTEMPT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("drvault/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| WebhookError::Client(e.to_string()))?;
    let sender = Sender {
        endpoints: Arc::new(
            hooks
                .iter()
                .enumerate()
                .map(|(index, h)| Endpoint {
                    index,
                    url: h.url.clone(),
                    secret: h.secret.clone(),
                    events: h.events.iter().cloned().collect(),
                })
                .collect(),
        ),
        http,
        in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        tasks: tasks.clone(),
    };
    let wants = |event: &str| sender.endpoints.iter().any(|e| e.events.contains(event));
    if wants(EVENT_JOB_SUCCEEDED) || wants(EVENT_JOB_FAILED) {
        let mut finished = jobs.subscribe_finished();
        let s = sender.clone();
        tasks.spawn("webhooks-jobs", async move {
            loop {
                let next = tokio::select! {
                    _ = s.tasks.cancelled() => return,
                    next = finished.recv() => next,
                };
                match next {
                    Ok(job) => s.publish(job_event(job)).await,
                    Err(RecvError::Lagged(missed)) => dropped(missed, "job outcomes"),
                    Err(RecvError::Closed) => return,
                }
            }
        });
    }
    if wants(EVENT_VM_HEALTH) {
        let s = sender.clone();
        let overview = overview.clone();
        tasks.spawn("webhooks-health", async move {
            let mut last = health_levels(&overview).await;
            let mut timer = tokio::time::interval(HEALTH_POLL);
            timer.tick().await;
            loop {
                tokio::select! {
                    _ = s.tasks.cancelled() => return,
                    _ = timer.tick() => {}
                }
                let now = overview.list().await;
                for v in now {
                    let previous = last.insert(v.name.clone(), v.health);
                    // A VM seen for the first time has no change to report.
                    if let Some(previous) = previous.filter(|p| *p != v.health) {
                        let change = VmHealthChange {
                            vm: v.name.clone(),
                            previous,
                            health: v.health,
                            findings: v.health_findings.clone(),
                        };
                        s.publish(event(EVENT_VM_HEALTH, None, Some(change))).await;
                    }
                }
            }
        });
    }
    // Exported at 0 so rules and dashboards see the series before the first delivery.
    for result in ["delivered", "retried", "failed", "dropped"] {
        metrics::counter!(DELIVERIES, "result" => result).increment(0);
    }
    tracing::info!(endpoints = hooks.len(), "webhooks on");
    Ok(())
}

async fn health_levels(overview: &Overview) -> BTreeMap<String, Health> {
    overview
        .list()
        .await
        .into_iter()
        .map(|v| (v.name, v.health))
        .collect()
}

fn job_event(job: Job) -> WebhookEvent {
    let name = match job.state {
        JobState::Succeeded => EVENT_JOB_SUCCEEDED,
        _ => EVENT_JOB_FAILED,
    };
    event(name, Some(job), None)
}

fn event(name: &str, job: Option<Job>, vm_health: Option<VmHealthChange>) -> WebhookEvent {
    WebhookEvent {
        id: uuid::Uuid::new_v4().to_string(),
        event: name.to_string(),
        at: crate::util::rfc3339(crate::util::unix_now()),
        job,
        vm_health,
    }
}

/// Events that could not be queued: counted and logged, never waited for.
fn dropped(n: u64, what: &str) {
    metrics::counter!(DELIVERIES, "result" => "dropped").increment(n);
    tracing::warn!(
        missed = n,
        "webhooks: {what} dropped, the delivery queue was full (receivers slow or down)"
    );
}

impl Sender {
    /// Starts one delivery per endpoint that wants the event; waits only for a free delivery
    /// slot (meanwhile new events queue in the channel, and overflow is dropped there).
    async fn publish(&self, ev: WebhookEvent) {
        let body = match serde_json::to_vec(&ev) {
            Ok(b) => Arc::new(b),
            Err(e) => {
                tracing::error!(error = %e, "webhooks: event not encodable; not sent");
                return;
            }
        };
        for (i, endpoint) in self.endpoints.iter().enumerate() {
            if !endpoint.events.contains(&ev.event) {
                continue;
            }
            let permit = tokio::select! {
                _ = self.tasks.cancelled() => return,
                p = self.in_flight.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let s = self.clone();
            let (body, name, id) = (body.clone(), ev.event.clone(), ev.id.clone());
            self.tasks.spawn("webhook-delivery", async move {
                s.deliver(i, &name, &id, &body).await;
                drop(permit);
            });
        }
    }

    /// Sends one event to one endpoint, retrying what may succeed later.
    async fn deliver(&self, i: usize, name: &str, id: &str, body: &[u8]) {
        let ep = &self.endpoints[i];
        let mut wait = FIRST_RETRY_WAIT;
        for attempt in 1..=MAX_ATTEMPTS {
            let ts = crate::util::unix_now();
            let sent = self
                .http
                .post(&ep.url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(WEBHOOK_EVENT_HEADER, name)
                .header(WEBHOOK_DELIVERY_HEADER, id)
                .header(WEBHOOK_TIMESTAMP_HEADER, ts.to_string())
                .header(
                    WEBHOOK_SIGNATURE_HEADER,
                    signature(ep.secret.0.as_bytes(), ts, body),
                )
                .body(body.to_vec())
                .send()
                .await;
            let (retry, why) = match sent {
                Ok(r) if r.status().is_success() => {
                    metrics::counter!(DELIVERIES, "result" => "delivered").increment(1);
                    tracing::debug!(
                        endpoint = ep.index,
                        event = name,
                        attempt,
                        "webhook delivered"
                    );
                    return;
                }
                Ok(r) => {
                    let st = r.status();
                    let retry = st.is_server_error()
                        || st == reqwest::StatusCode::REQUEST_TIMEOUT
                        || st == reqwest::StatusCode::TOO_MANY_REQUESTS;
                    (retry, format!("answered {st}"))
                }
                Err(e) => (true, format!("{e}")),
            };
            if !retry || attempt == MAX_ATTEMPTS {
                metrics::counter!(DELIVERIES, "result" => "failed").increment(1);
                tracing::warn!(
                    endpoint = ep.index,
                    url = %ep.url,
                    event = name,
                    delivery = id,
                    attempts = attempt,
                    "webhook not delivered: {why}"
                );
                return;
            }
            metrics::counter!(DELIVERIES, "result" => "retried").increment(1);
            tracing::info!(
                endpoint = ep.index,
                event = name,
                attempt,
                retry_in_s = wait.as_secs(),
                "webhook attempt failed ({why}); retrying"
            );
            tokio::select! {
                // Shutdown does not wait out a back-off: the event is lost, and said so.
                _ = self.tasks.cancelled() => {
                    metrics::counter!(DELIVERIES, "result" => "failed").increment(1);
                    tracing::warn!(endpoint = ep.index, event = name, "webhook abandoned at shutdown");
                    return;
                }
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(MAX_RETRY_WAIT);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(url: &str, secret: &str, events: &[&str]) -> WebhookConfig {
        WebhookConfig {
            url: url.into(),
            secret: Secret(secret.into()),
            events: events.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn urls_https_anywhere_http_only_to_loopback() {
        for ok in [
            "https://hooks.example.com/drvault",
            "http://127.0.0.1:9000/x",
            "http://127.8.9.10/x",
            "http://[::1]:8080/",
            "http://localhost:1234/hook",
        ] {
            assert!(validate(&[hook(ok, "s", &["job.failed"])]).is_ok(), "{ok}");
        }
        for (bad, says) in [
            ("http://10.0.0.5/hook", "loopback"),
            ("http://hooks.example.com/", "loopback"),
            ("hooks.example.com/x", "not a URL"),
            ("https://", "not a URL"),
            ("ftp://127.0.0.1/x", "scheme ftp"),
        ] {
            let e = validate(&[hook(bad, "s", &["job.failed"])])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("webhooks[0].url") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn secrets_and_events_are_checked() {
        let e = validate(&[
            hook("https://a.example/", "s", &["vm.health"]),
            hook("https://b.example/", "  ", &["vm.health"]),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("webhooks[1].secret is empty"), "{e}");
        let e = validate(&[hook("https://a.example/", "s", &["job.done"])]).unwrap_err();
        assert!(e.to_string().contains("unknown event \"job.done\""), "{e}");
        let e = validate(&[hook("https://a.example/", "s", &[])]).unwrap_err();
        assert!(e.to_string().contains("events is empty"), "{e}");
    }

    /// The secret never shows in logs of the configuration.
    #[test]
    fn the_secret_is_not_debug_printed() {
        let h = hook("https://a.example/", "hunter2", &["vm.health"]);
        assert!(!format!("{h:?}").contains("hunter2"));
    }

    /// A receiver computes HMAC-SHA256 over "<timestamp>.<body>" with the shared secret; the
    /// expected value comes from Python's hmac module, not from this code.
    #[test]
    fn signature_is_hmac_sha256_over_timestamp_dot_body() {
        assert_eq!(
            signature(b"s3cret", 1_700_000_000, br#"{"event":"job.failed"}"#),
            "sha256=7ab874ee8533ab6eecfd6f0cdbfe8fef645d74294cd337d711d6168da0fc7ee0"
        );
    }

    /// The commented example in config/drvault.example.toml, uncommented, is a valid entry.
    #[test]
    fn the_example_config_entry_is_valid() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/drvault.example.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let start = text
            .find("# [[webhooks]]")
            .expect("example [[webhooks]] entry");
        let example: String = text[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| format!("{}\n", l.trim_start_matches('#').trim_start()))
            .collect();
        #[derive(Deserialize)]
        struct Only {
            webhooks: Vec<WebhookConfig>,
        }
        let parsed: Only = toml::from_str(&example).unwrap_or_else(|e| panic!("{example}: {e}"));
        assert!(!parsed.webhooks.is_empty());
        validate(&parsed.webhooks).unwrap();
    }
}
