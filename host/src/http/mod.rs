//! HTTP plumbing shared by the server, the node-to-node client and the CLI:
//! the client (plain HTTP, or TLS against the cluster CA), requests with a
//! bearer token, bounded body reads, JSON error bodies.

pub mod api_client;
pub mod tls;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

pub use api_client::ApiClient;

pub const SNAPSHOT_ID_HEADER: &str = "ferry-snapshot-id";
/// A consensus transfer's id and epoch, on every snapshot request it makes.
pub const TRANSFER_ID_HEADER: &str = "ferry-transfer-id";
pub const TRANSFER_EPOCH_HEADER: &str = "ferry-transfer-epoch";

/// Response bodies: small JSON, or a streamed archive.
pub type Body = BoxBody<Bytes, std::io::Error>;
/// The client every node uses to talk to others (HTTP/1.1, pooled).
pub type Client = hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// How long a TCP connect may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A plain-HTTP client: `https://` URLs are refused at the handshake, since
/// it trusts no certificate.
pub fn client() -> Client {
    build_client(tls::untrusting_client_config(), false)
}

/// A client that speaks only TLS, verifying servers with `config`: a node
/// with TLS never sends a credential in clear text.
pub fn tls_client(config: rustls::ClientConfig) -> Client {
    build_client(config, true)
}

fn build_client(config: rustls::ClientConfig, https_only: bool) -> Client {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.enforce_http(false);
    let schemes = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config);
    let connector = if https_only { schemes.https_only() } else { schemes.https_or_http() };
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector.enable_http1().wrap_connector(http))
}

/// Checks that `url` is an `http://` or `https://` URL with a host and no
/// credentials in it (they would be logged and echoed back).
pub fn check_url(url: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err("only http://host:port and https://host:port URLs are supported".into());
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("credentials do not go in a URL".into());
    }
    Ok(uri)
}

/// A base URL (`http[s]://host:port`, no path, no credentials) in the one
/// form it is compared in: scheme and host lower case, no trailing `/`.
pub fn base_url(url: &str) -> Result<String, String> {
    let uri = check_url(url).map_err(|e| format!("is not a base URL like http://host:port: {e}"))?;
    if !uri.path().trim_end_matches('/').is_empty() || uri.query().is_some() {
        return Err("is not a base URL like http://host:port".into());
    }
    let authority = uri.authority().expect("checked").as_str().to_ascii_lowercase();
    Ok(format!("{}://{authority}", uri.scheme_str().expect("checked")))
}

/// `url` fit for a message or a log: any `user:password@` replaced by `***@`.
pub fn redacted(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => url.to_owned(),
    }
}

/// A request with the bearer token and, if given, a JSON body.
pub fn request(method: Method, url: &str, token: &str, json: Option<Bytes>) -> Result<Request<Full<Bytes>>, String> {
    let uri = check_url(url)?;
    let mut builder =
        Request::builder().method(method).uri(uri).header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
    if json.is_some() {
        builder = builder.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    builder.body(Full::new(json.unwrap_or_default())).map_err(|e| e.to_string())
}

/// The error body every endpoint answers with.
#[derive(Debug, Serialize, Deserialize)]
pub struct ApiError {
    pub error: ApiErrorBody,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ApiErrorBody {
    pub code: String,
    pub message: String,
}

impl ApiError {
    /// The message of an error body, or the body itself if it is not one.
    pub fn message_of(body: &[u8]) -> String {
        match serde_json::from_slice::<ApiError>(body) {
            Ok(e) => e.error.message,
            Err(_) => String::from_utf8_lossy(&body[..body.len().min(500)]).into_owned(),
        }
    }
}

/// Why a body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the body did not arrive within {0:?}")]
    Timeout(Duration),
    #[error("reading the body: {0}")]
    Read(String),
}

/// Reads a whole body, at most `limit` bytes, within `within`: an answer from
/// another node is as untrusted as a request. The bytes go into one buffer
/// (sized from the declared length), never collected and then copied, so a
/// body costs its size once.
pub async fn read_bounded<B>(body: B, limit: usize, within: Duration) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use bytes::{Buf, BufMut};
    let read = async {
        let mut body = std::pin::pin!(body);
        let declared = body.size_hint().exact().map(|n| n as usize);
        if declared.is_some_and(|n| n > limit) {
            return Err(BodyError::TooLarge(limit));
        }
        let mut out = bytes::BytesMut::with_capacity(declared.unwrap_or(0));
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| BodyError::Read(e.into().to_string()))?;
            if let Ok(mut data) = frame.into_data() {
                if out.len() + data.remaining() > limit {
                    return Err(BodyError::TooLarge(limit));
                }
                while data.has_remaining() {
                    let chunk = data.chunk();
                    out.put_slice(chunk);
                    let n = chunk.len();
                    data.advance(n);
                }
            }
        }
        Ok(out.freeze())
    };
    tokio::time::timeout(within, read).await.map_err(|_| BodyError::Timeout(within))?
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|e: Infallible| match e {}).boxed()
}

pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let body = serde_json::to_vec_pretty(value).expect("responses serialize");
    Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(full(body))
        .expect("valid response")
}

pub fn error_response(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Body> {
    json_response(status, &ApiError { error: ApiErrorBody { code: code.into(), message: message.into() } })
}

/// `outer: inner: …` of an error and its sources.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_normalised_and_checked() {
        assert_eq!(base_url("HTTP://Node-A:7070/").unwrap(), "http://node-a:7070");
        assert_eq!(base_url("https://10.0.0.5:7070").unwrap(), "https://10.0.0.5:7070");
        assert!(base_url("http://user:pw@host:1").unwrap_err().contains("credentials"));
        assert!(base_url("http://host:1/v1").is_err());
        assert!(base_url("ftp://host:1").is_err());
    }

    #[test]
    fn credentials_are_redacted() {
        assert_eq!(redacted("http://user:secret@host:1/x@y"), "http://***@host:1/x@y");
        assert_eq!(redacted("http://host:1/a@b"), "http://host:1/a@b");
        assert_eq!(redacted("user:pw@host"), "://***@host");
    }
}
