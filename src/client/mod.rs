//! HTTPS client for the `/v1/` API, used by the operator CLI and the reference agent (and by
//! anyone writing another agent in Rust). It trusts the server certificate given in the
//! credentials (self-signed by default), decodes `{code, message, recoverable}` errors, and
//! classifies every failure as recoverable or not for the agent's back-off.

use std::time::Duration;

use bytes::Bytes;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::wire::{ErrorBody, ACTING_HOST_HEADER};

mod encode;
pub mod export;
mod routes;
mod servers;
pub use encode::{LogUpload, UploadBody, UPLOAD_ZSTD_LEVEL};
pub use routes::{BlockDownload, SyncFlow};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server refused ({status}): {} [{}]", body.message, body.code)]
    Api {
        status: StatusCode,
        body: ErrorBody,
        retry_after: Option<Duration>,
    },
    #[error("cannot reach the server: {0}")]
    Transport(String),
    #[error("unexpected response: {0}")]
    Decode(String),
    #[error("client setup: {0}")]
    Setup(String),
}

impl ClientError {
    /// Whether retrying later may succeed (network trouble, overload, store unavailable).
    pub fn recoverable(&self) -> bool {
        match self {
            ClientError::Api { body, status, .. } => {
                body.recoverable
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || *status == StatusCode::SERVICE_UNAVAILABLE
            }
            ClientError::Transport(_) => true,
            ClientError::Decode(_) | ClientError::Setup(_) => false,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { body, .. } => Some(&body.code),
            _ => None,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ClientError::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// A connection to drvault with one token: one server URL, or several of servers sharing a
/// vault (see [`Client::with_servers`]).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// The server URLs and the preferred one, shared by clones.
    route: servers::Route,
    token: String,
    acting_host: Option<String>,
    /// zstd level of upload bodies; `None` sends them as they are.
    upload_zstd: Option<i32>,
}

impl Client {
    /// `ca_pem`: certificate(s) to trust in addition to (or, for self-signed servers, instead
    /// of) the system roots.
    pub fn new(base: &str, token: &str, ca_pem: Option<&str>) -> Result<Client, ClientError> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(300))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .user_agent(concat!("drvault/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| ClientError::Setup(format!("CA certificate: {e}")))?;
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        let http = b.build().map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(Client {
            http,
            route: servers::Route::new(base, &[]),
            token: token.to_string(),
            acting_host: None,
            upload_zstd: Some(UPLOAD_ZSTD_LEVEL),
        })
    }

    /// For provider credentials: the host each request acts for.
    pub fn acting_for(mut self, host: Option<String>) -> Client {
        self.acting_host = host;
        self
    }

    /// More URLs of servers on the same vault (a credentials file's `servers`), tried in order
    /// after the first when a request gets no answer from it.
    pub fn with_servers(mut self, more: &[String]) -> Client {
        let (_, first) = self.route.preferred();
        self.route = servers::Route::new(&first, more);
        self
    }

    /// The URL requests go to first: the last one that answered.
    pub fn base(&self) -> String {
        self.route.preferred().1
    }

    /// Every server URL this client knows, in order.
    pub fn urls(&self) -> Vec<String> {
        self.route.urls()
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}{}", self.base(), path))
            .bearer_auth(&self.token);
        if let Some(h) = &self.acting_host {
            r = r.header(ACTING_HOST_HEADER, h);
        }
        r
    }

    /// Sends a request, moving on to another server URL when it gets no answer or a
    /// `lease_held` one naming the owner. A request whose body cannot be sent again (a stream)
    /// returns that error instead, with the preferred URL moved: the caller's retry goes there.
    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let mut request = rb
            .build()
            .map_err(|e| ClientError::Setup(error_chain(&e)))?;
        // Built against a URL of the route: which one, and the path to send elsewhere.
        let (mut tried, path) = match self.route.locate(request.url().as_str()) {
            Some((at, path)) => (vec![at], path),
            // Not a URL of the route (`req` never builds one): sent there only.
            None => (Vec::new(), String::new()),
        };
        let mut followed = false;
        let mut unanswered: Vec<String> = Vec::new();
        loop {
            let again = request.try_clone();
            let resp = match self.http.execute(request).await {
                Ok(resp) => resp,
                Err(e) => {
                    unanswered.push(error_chain(&e));
                    let next = self
                        .route
                        .advance(&tried, followed, servers::Failure::Unreachable);
                    match (next, again) {
                        (Some((i, base)), Some(retry)) => {
                            request = moved(retry, &base, &path)?;
                            tried.push(i);
                            continue;
                        }
                        _ => return Err(ClientError::Transport(unanswered.join("; "))),
                    }
                }
            };
            if resp.status().is_success() {
                return Ok(resp);
            }
            let (status, headers) = (resp.status(), resp.headers().clone());
            let text = resp.text().await.unwrap_or_default();
            if status == StatusCode::CONFLICT {
                if let Some(owner_url) = lease_owner(&text) {
                    let next = self.route.advance(
                        &tried,
                        followed,
                        servers::Failure::LeaseHeld {
                            owner_url: &owner_url,
                        },
                    );
                    if let (Some((i, base)), Some(retry)) = (next, again) {
                        request = moved(retry, &base, &path)?;
                        tried.push(i);
                        followed = true;
                        continue;
                    }
                }
            }
            return Err(api_error(status, &headers, text));
        }
    }

    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let r = self.send(self.req(Method::GET, path)).await?;
        r.json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn send_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let r = self.send(self.req(method, path).json(body)).await?;
        r.json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// A request without a body; JSON answer.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, ClientError> {
        let r = self.send(self.req(method, path)).await?;
        r.json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.send(self.req(Method::DELETE, path)).await.map(|_| ())
    }

    /// PUT raw bytes with extra headers; JSON answer.
    pub async fn put_bytes<T: DeserializeOwned>(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: Bytes,
    ) -> Result<T, ClientError> {
        let mut rb = self.req(Method::PUT, path).body(body);
        for (k, v) in headers {
            rb = rb.header(*k, v);
        }
        let r = self.send(rb).await?;
        r.json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// PUT an upload body (identity or zstd) with extra headers; JSON answer.
    pub async fn put_body<T: DeserializeOwned>(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: &UploadBody,
    ) -> Result<T, ClientError> {
        let mut rb = self.req(Method::PUT, path).body(body.bytes());
        for (k, v) in headers {
            rb = rb.header(*k, v);
        }
        if let Some(e) = body.encoding() {
            rb = rb.header(reqwest::header::CONTENT_ENCODING, e);
        }
        let r = self.send(rb).await?;
        r.json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Sends a streamed body (with its length when known); JSON answer.
    pub async fn send_stream<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: reqwest::Body,
        len: Option<u64>,
    ) -> Result<T, ClientError> {
        let mut rb = self
            .req(method, path)
            .body(body)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream");
        if let Some(l) = len {
            rb = rb.header(reqwest::header::CONTENT_LENGTH, l);
        }
        let r = self.send(rb).await?;
        r.json()
            .await
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// POST a JSON body; raw bytes back.
    pub async fn post_json_bytes<B: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<Bytes, ClientError> {
        let r = self.send(self.req(Method::POST, path).json(body)).await?;
        r.bytes()
            .await
            .map_err(|e| ClientError::Transport(error_chain(&e)))
    }

    /// GET raw bytes and the response headers.
    pub async fn get_bytes(
        &self,
        path: &str,
    ) -> Result<(Bytes, reqwest::header::HeaderMap), ClientError> {
        let r = self.send(self.req(Method::GET, path)).await?;
        let headers = r.headers().clone();
        let b = r
            .bytes()
            .await
            .map_err(|e| ClientError::Transport(error_chain(&e)))?;
        Ok((b, headers))
    }
}

/// `request` sent to the server at `base` instead.
fn moved(
    mut request: reqwest::Request,
    base: &str,
    path: &str,
) -> Result<reqwest::Request, ClientError> {
    *request.url_mut() = reqwest::Url::parse(&format!("{base}{path}"))
        .map_err(|e| ClientError::Setup(format!("server URL {base}: {e}")))?;
    Ok(request)
}

/// The error of an answer that is not a success.
fn api_error(
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    text: String,
) -> ClientError {
    let retry_after = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = serde_json::from_str::<ErrorBody>(&text).unwrap_or(ErrorBody {
        code: format!("http_{}", status.as_u16()),
        message: if text.is_empty() {
            status.to_string()
        } else {
            text
        },
        recoverable: status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS,
        owner_url: None,
    });
    ClientError::Api {
        status,
        body,
        retry_after,
    }
}

/// The owner's URL of a `lease_held` error body: the server holding the VM's lease.
fn lease_owner(text: &str) -> Option<String> {
    let b: ErrorBody = serde_json::from_str(text).ok()?;
    (b.code == "lease_held").then_some(b.owner_url).flatten()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
