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

/// A connection to one drvault server with one token.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
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
            base: base.trim_end_matches('/').to_string(),
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

    pub fn base(&self) -> &str {
        &self.base
    }

    fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}{}", self.base, path))
            .bearer_auth(&self.token);
        if let Some(h) = &self.acting_host {
            r = r.header(ACTING_HOST_HEADER, h);
        }
        r
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, ClientError> {
        let resp = rb
            .send()
            .await
            .map_err(|e| ClientError::Transport(error_chain(&e)))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = resp.text().await.unwrap_or_default();
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
        Err(ClientError::Api {
            status,
            body,
            retry_after,
        })
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
