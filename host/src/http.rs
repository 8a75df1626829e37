//! HTTP plumbing shared by the server, the node-to-node client and the CLI.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};

pub const SNAPSHOT_ID_HEADER: &str = "ferry-snapshot-id";
/// A consensus transfer's id and epoch, on every snapshot request it makes.
pub const TRANSFER_ID_HEADER: &str = "ferry-transfer-id";
pub const TRANSFER_EPOCH_HEADER: &str = "ferry-transfer-epoch";

/// Response bodies: small JSON, or a streamed archive.
pub type Body = BoxBody<Bytes, std::io::Error>;
/// The client every node uses to talk to others (HTTP/1.1, pooled).
pub type Client = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

pub fn client() -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(10)));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// A request with the bearer token and, if given, a JSON body.
pub fn request(method: Method, url: &str, token: &str, json: Option<Bytes>) -> Result<Request<Full<Bytes>>, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{e}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err("only http://host:port URLs are supported".into());
    }
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
