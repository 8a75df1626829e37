//! A small JSON client of a node's API, for the CLI.

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use serde::de::DeserializeOwned;

use crate::http::{self, ApiError, Client};

pub struct ApiClient {
    client: Client,
    base: String,
    token: String,
}

impl ApiClient {
    pub fn new(base: &str, token: String) -> ApiClient {
        ApiClient { client: http::client(), base: base.trim_end_matches('/').to_owned(), token }
    }

    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<T> {
        let url = format!("{}{path}", self.base);
        let body = body.map(|b| Bytes::from(serde_json::to_vec(b).expect("JSON serializes")));
        let request = http::request(method, &url, &self.token, body).map_err(|e| anyhow::anyhow!("{url}: {e}"))?;
        let response =
            self.client.request(request).await.map_err(|e| anyhow::anyhow!("{url}: {}", http::error_chain(&e)))?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let hint = if status == StatusCode::UNAUTHORIZED { " (check --token-file)" } else { "" };
            anyhow::bail!("{status}: {}{hint}", ApiError::message_of(&bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| anyhow::anyhow!("{url}: unexpected answer: {e}"))
    }
}
