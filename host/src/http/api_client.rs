//! A small JSON client of a node's API: the CLI's, and each node's for its
//! peers. Every call has a deadline and every answer a size bound, so a peer
//! that stops answering (or answers for ever) costs a bounded wait.

use std::time::Duration;

use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;

use super::{ApiError, Client};

/// Largest answer a call reads (the replica table of 10,000 shards is a few MiB).
pub const MAX_ANSWER: usize = 64 << 20;
/// A call's deadline unless set otherwise: connect, head and body.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct ApiClient {
    client: Client,
    base: String,
    token: String,
    timeout: Duration,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The node answered with an error status.
    #[error("{status}: {message}{hint}")]
    Status { status: StatusCode, message: String, hint: &'static str },
    /// No answer (refused, reset, timed out) or an unreadable one.
    #[error("{0}")]
    Transport(String),
}

impl CallError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            CallError::Status { status, .. } => Some(*status),
            CallError::Transport(_) => None,
        }
    }
}

impl ApiClient {
    /// A client with its own connection pool, plain HTTP (the CLI's).
    pub fn new(base: &str, token: String) -> ApiClient {
        ApiClient::with_client(super::client(), base, token)
    }

    /// A client on a shared connection pool (a node's, TLS or not).
    pub fn with_client(client: Client, base: &str, token: String) -> ApiClient {
        ApiClient { client, base: base.trim_end_matches('/').to_owned(), token, timeout: DEFAULT_TIMEOUT }
    }

    /// The same client with another deadline per call.
    pub fn timeout(mut self, timeout: Duration) -> ApiClient {
        self.timeout = timeout;
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, CallError> {
        self.call_with(method, path, body, &[]).await
    }

    /// [`call`](Self::call) with extra headers (a transfer's id and epoch).
    pub async fn call_with<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        headers: &[(&str, String)],
    ) -> Result<T, CallError> {
        let body = body.map(|b| Bytes::from(serde_json::to_vec(b).expect("JSON serializes")));
        self.send(method, path, body, headers).await
    }

    /// [`call`](Self::call) with a body of raw bytes (a plugin component).
    pub async fn call_bytes<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> Result<T, CallError> {
        self.send(method, path, Some(body), &[]).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&str, String)],
    ) -> Result<T, CallError> {
        let url = format!("{}{path}", self.base);
        let transport = |why: String| CallError::Transport(format!("{url}: {why}"));
        let mut request = super::request(method, &url, &self.token, body).map_err(transport)?;
        for (name, value) in headers {
            let name = hyper::header::HeaderName::from_bytes(name.as_bytes()).map_err(|e| transport(e.to_string()))?;
            let value = value.parse().map_err(|_| transport(format!("bad value for header {name}")))?;
            request.headers_mut().insert(name, value);
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        let response = tokio::time::timeout_at(deadline, self.client.request(request))
            .await
            .map_err(|_| transport(format!("no answer within {:?}", self.timeout)))?
            .map_err(|e| transport(super::error_chain(&e)))?;
        let status = response.status();
        let within = deadline.saturating_duration_since(tokio::time::Instant::now());
        let bytes = super::read_bounded(response.into_body(), MAX_ANSWER, within)
            .await
            .map_err(|e| transport(e.to_string()))?;
        if !status.is_success() {
            let hint = if status == StatusCode::UNAUTHORIZED { " (check --token-file)" } else { "" };
            return Err(CallError::Status { status, message: ApiError::message_of(&bytes), hint });
        }
        serde_json::from_slice(&bytes).map_err(|e| transport(format!("unexpected answer: {e}")))
    }
}
