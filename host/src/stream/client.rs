//! The HTTP side of pulling a snapshot.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::BodyExt;
use hyper::StatusCode;
use tokio::io::AsyncRead;
use tokio_util::io::StreamReader;

use super::blockdiff::{BlockFile, FileDigests};
use super::manifest::ResumeRequest;
use crate::http::{self, ApiError, Client};
use crate::plugin::ShardPosition;

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

/// Most of an error answer's body that is read; the rest is not waited for.
pub const MAX_ERROR_BODY: usize = 64 << 10;
/// Most bytes of a changes request's JSON answer (a list of files).
pub const MAX_CHANGES_ANSWER: usize = 16 << 20;
/// How long the source may take to answer at all (it plans the snapshot
/// first).
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks `source` for a snapshot of `engine`/`shard`, saying what we hold.
/// An error answer's body is read up to [`MAX_ERROR_BODY`] bytes and for at
/// most `body_timeout`.
#[allow(clippy::too_many_arguments)]
pub async fn fetch_snapshot(
    client: &Client,
    source: &str,
    token: &str,
    engine: &str,
    shard: &str,
    resume: &ResumeRequest,
    extra_headers: &[(&str, String)],
    body_timeout: Duration,
) -> Result<SnapshotResponse, FetchError> {
    let url = format!("{}/v1/engines/{engine}/shards/{shard}/snapshot", source.trim_end_matches('/'));
    let body = serde_json::to_vec(resume).expect("resume request serializes");
    let response = post(client, &url, token, body, extra_headers, body_timeout).await.map_err(|e| e.error)?;
    let snapshot_id = response.headers().get(http::SNAPSHOT_ID_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let stream = response.into_body().into_data_stream().map_err(io::Error::other);
    Ok(SnapshotResponse { snapshot_id, body: Box::new(StreamReader::new(stream)) })
}

/// Why a changes request did not start streaming, with the error answer's
/// stable `code` when there was one (`history-gone`, `term-changed`,
/// `unsupported`, `stale-epoch`…).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct ChangesFetchError {
    pub error: FetchError,
    pub code: Option<String>,
}

/// Asks `source` for the changes of `engine`/`shard` after `request.since`
/// (one catch-up round): the round's archive, or the files whose digests
/// the source needs first.
#[allow(clippy::too_many_arguments)]
pub async fn fetch_changes(
    client: &Client,
    source: &str,
    token: &str,
    engine: &str,
    shard: &str,
    request: &ChangesRequest,
    extra_headers: &[(&str, String)],
    body_timeout: Duration,
) -> Result<Changes, ChangesFetchError> {
    let url = format!("{}/v1/engines/{engine}/shards/{shard}/changes", source.trim_end_matches('/'));
    let body = serde_json::to_vec(request).expect("changes request serializes");
    let response = post(client, &url, token, body, extra_headers, body_timeout).await?;
    let is_json = response
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        let refused = |message: String| ChangesFetchError { error: FetchError::Refused(message), code: None };
        let bytes = http::read_bounded(response.into_body(), MAX_CHANGES_ANSWER, body_timeout)
            .await
            .map_err(|e| refused(format!("{url}: the answer: {e}")))?;
        let answer: ChangesAnswer =
            serde_json::from_slice(&bytes).map_err(|e| refused(format!("{url}: the answer: {e}")))?;
        let ChangesAnswer::NeedDigests { files } = answer;
        return Ok(Changes::NeedDigests(files));
    }
    let stream = response.into_body().into_data_stream().map_err(io::Error::other);
    Ok(Changes::Archive(Box::new(StreamReader::new(stream))))
}

/// Body of a changes request.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangesRequest {
    /// The position the receiver holds.
    pub since: ShardPosition,
    /// The receiver's digests of the files the source compares block by
    /// block (as a previous answer asked).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub digests: Vec<FileDigests>,
}

/// A changes request's answer when it is not the round's archive (which is
/// `application/x-tar`): JSON.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "answer", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ChangesAnswer {
    /// The round compares these files block by block: ask again with the
    /// receiver's digests of each.
    NeedDigests { files: Vec<BlockFile> },
}

/// What a changes request got.
pub enum Changes {
    /// The round's archive.
    Archive(Box<dyn AsyncRead + Send + Unpin>),
    NeedDigests(Vec<BlockFile>),
}

/// POSTs `body` to `url`; an answer other than 200 is an error, with its
/// message and code.
async fn post(
    client: &Client,
    url: &str,
    token: &str,
    body: Vec<u8>,
    extra_headers: &[(&str, String)],
    body_timeout: Duration,
) -> Result<hyper::Response<hyper::body::Incoming>, ChangesFetchError> {
    let refused = |message: String| ChangesFetchError { error: FetchError::Refused(message), code: None };
    let mut request = http::request(hyper::Method::POST, url, token, Some(Bytes::from(body)))
        .map_err(|e| refused(format!("bad source URL {url:?}: {e}")))?;
    for (name, value) in extra_headers {
        let value = value.parse().map_err(|_| refused(format!("bad header value for {name}")))?;
        request.headers_mut().insert(hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap(), value);
    }
    let transient = |message: String| ChangesFetchError { error: FetchError::Transient(message), code: None };
    let response = tokio::time::timeout(HEAD_TIMEOUT, client.request(request))
        .await
        .map_err(|_| transient(format!("{url}: no response in {HEAD_TIMEOUT:?}")))?
        .map_err(|e| transient(format!("{url}: {}", http::error_chain(&e))))?;
    let status = response.status();
    if status != StatusCode::OK {
        let (code, text) = error_text(response.into_body(), body_timeout).await;
        let message = format!("source answered {status}: {text}");
        let error = if status == StatusCode::SERVICE_UNAVAILABLE || status.is_server_error() {
            FetchError::Transient(message)
        } else {
            FetchError::Refused(message)
        };
        return Err(ChangesFetchError { error, code });
    }
    Ok(response)
}

/// The code and message of an error answer: its first [`MAX_ERROR_BODY`]
/// bytes, read within `within`, with a note when the body was cut, broke or
/// stalled. Dropping the rest closes the connection rather than draining it.
async fn error_text<B>(body: B, within: Duration) -> (Option<String>, String)
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut body = body;
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = Vec::new();
    let note = loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => break Some(format!("no complete body within {within:?}")),
            Ok(None) => break None,
            Ok(Some(Err(e))) => break Some(format!("body broke off: {e}")),
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else { continue };
                let room = MAX_ERROR_BODY - buf.len();
                buf.extend_from_slice(&data[..data.len().min(room)]);
                if data.len() > room {
                    break Some(format!("body longer than {} KiB, not read further", MAX_ERROR_BODY >> 10));
                }
            }
        }
    };
    let code = serde_json::from_slice::<ApiError>(&buf).ok().map(|e| e.error.code);
    let mut text = ApiError::message_of(&buf);
    if let Some((cut, _)) = text.char_indices().nth(1000) {
        text.truncate(cut);
        text.push('…');
    }
    let text = match note {
        Some(note) if text.is_empty() => format!("({note})"),
        Some(note) => format!("{text} ({note})"),
        None => text,
    };
    (code, text)
}
