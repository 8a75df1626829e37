//! The HTTP side of pulling a snapshot.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::BodyExt;
use hyper::StatusCode;
use tokio::io::AsyncRead;
use tokio_util::io::StreamReader;

use super::manifest::ResumeRequest;
use crate::http::{self, ApiError, Client};

/// Why a snapshot request did not start streaming.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Worth retrying: the source is busy, unreachable or restarting.
    #[error("{0}")]
    Transient(String),
    /// Not worth retrying: the source said no (unknown shard, bad token…).
    #[error("{0}")]
    Refused(String),
}

/// The start of a snapshot response.
pub struct SnapshotResponse {
    pub snapshot_id: Option<String>,
    pub body: Box<dyn AsyncRead + Send + Unpin>,
}

/// Asks `source` for a snapshot of `engine`/`shard`, saying what we hold.
pub async fn fetch_snapshot(
    client: &Client,
    source: &str,
    token: &str,
    engine: &str,
    shard: &str,
    resume: &ResumeRequest,
    extra_headers: &[(&str, String)],
) -> Result<SnapshotResponse, FetchError> {
    let url = format!("{}/v1/engines/{engine}/shards/{shard}/snapshot", source.trim_end_matches('/'));
    let body = serde_json::to_vec(resume).expect("resume request serializes");
    let mut request = http::request(hyper::Method::POST, &url, token, Some(Bytes::from(body)))
        .map_err(|e| FetchError::Refused(format!("bad source URL {url:?}: {e}")))?;
    for (name, value) in extra_headers {
        let value = value.parse().map_err(|_| FetchError::Refused(format!("bad header value for {name}")))?;
        request.headers_mut().insert(hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap(), value);
    }
    let response = tokio::time::timeout(Duration::from_secs(30), client.request(request))
        .await
        .map_err(|_| FetchError::Transient(format!("{url}: no response in 30 s")))?
        .map_err(|e| FetchError::Transient(format!("{url}: {}", http::error_chain(&e))))?;
    let status = response.status();
    if status != StatusCode::OK {
        let text = match response.into_body().collect().await {
            Ok(body) => ApiError::message_of(&body.to_bytes()),
            Err(e) => e.to_string(),
        };
        let message = format!("source answered {status}: {text}");
        return Err(if status == StatusCode::SERVICE_UNAVAILABLE || status.is_server_error() {
            FetchError::Transient(message)
        } else {
            FetchError::Refused(message)
        });
    }
    let snapshot_id = response.headers().get(http::SNAPSHOT_ID_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let stream = response.into_body().into_data_stream().map_err(io::Error::other);
    Ok(SnapshotResponse { snapshot_id, body: Box::new(StreamReader::new(stream)) })
}
