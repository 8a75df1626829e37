//! The HTTP API's edges: authentication, unknown engines and shards, bad
//! requests, one transfer per shard, plugins and shards listings.

use std::time::Duration;

use ferry::transfer::State;
use ferry_tests::engines::{SegmentLog, TestEngine};
use ferry_tests::node::{NodeOptions, TestNode};
use ferry_tests::tree;
use hyper::Method;
use serde_json::{Value, json};

/// A raw request with an optional `Authorization` header value.
async fn raw(method: &str, url: &str, auth: Option<&str>, body: &str) -> (u16, String) {
    let mut request = hyper::Request::builder().method(method).uri(url);
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    let request = request.body(http_body_util::Full::new(bytes::Bytes::from(body.to_owned()))).unwrap();
    let response = ferry::http::client().request(request).await.unwrap();
    let status = response.status().as_u16();
    use http_body_util::BodyExt;
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_needs_the_token_and_does_no_work_without_it() {
    let node = TestNode::start("auth", NodeOptions::default());
    SegmentLog.create(&node.shard_dir("segment-log", "s1"), 1 << 20);
    let endpoints = [
        ("GET", "/v1/health", ""),
        ("GET", "/v1/plugins", ""),
        ("GET", "/v1/shards", ""),
        ("GET", "/v1/transfers", ""),
        ("GET", "/v1/engines/segment-log/shards/s1/snapshot", ""),
        ("POST", "/v1/transfers", r#"{"engine":"segment-log","shard":"s2","source":"http://127.0.0.1:1"}"#),
        ("DELETE", "/v1/transfers/x", ""),
        ("GET", "/nope", ""),
    ];
    for auth in [None, Some("Bearer wrong-token-wrong-token"), Some("Basic dGVzdA=="), Some("Bearer ")] {
        for (method, path, body) in endpoints {
            let (status, text) = raw(method, &format!("{}{path}", node.url), auth, body).await;
            assert_eq!(status, 401, "{method} {path} with {auth:?}: {text}");
            assert!(text.contains("unauthorized"), "{text}");
        }
    }
    let list: Vec<Value> = node.api().call(Method::GET, "/v1/transfers", None).await.unwrap();
    assert!(list.is_empty(), "a refused request started a transfer");
    assert!(tree(&node.staging()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_engines_shards_and_bad_requests_are_clean_errors() {
    let source = TestNode::start("source", NodeOptions::default());
    let target = TestNode::start("target", NodeOptions::default());
    let api = target.api();

    let plugins: Vec<Value> = api.call(Method::GET, "/v1/plugins", None).await.unwrap();
    let names: Vec<&str> = plugins.iter().map(|p| p["engine"].as_str().unwrap()).collect();
    assert_eq!(names, ["segment-log", "sqlite"]);

    let err = target.start_transfer("cassandra", "s1", &source.url).await.unwrap_err().to_string();
    assert!(err.starts_with("404") && err.contains("no plugin for engine \"cassandra\""), "{err}");
    let err = target.start_transfer("sqlite", "../etc", &source.url).await.unwrap_err().to_string();
    assert!(err.starts_with("400") && err.contains("shard id"), "{err}");
    let err = target.start_transfer("sqlite", "s1", "ftp://x").await.unwrap_err().to_string();
    assert!(err.starts_with("400") && err.contains("not a base URL"), "{err}");
    for body in [json!({"engine": "sqlite"}), json!({"engine": "sqlite", "shard": "s", "source": "http://a:1", "x": 1})]
    {
        let err = api.call::<Value>(Method::POST, "/v1/transfers", Some(&body)).await.unwrap_err().to_string();
        assert!(err.starts_with("400"), "{err}");
    }
    let (status, text) = raw("GET", &format!("{}/v1/transfers/nope", target.url), Some(&bearer()), "").await;
    assert_eq!(status, 404, "{text}");

    // The source says 404 for a shard it does not have; the transfer fails saying so.
    let (status, text) =
        raw("GET", &format!("{}/v1/engines/sqlite/shards/nope/snapshot", source.url), Some(&bearer()), "").await;
    assert_eq!(status, 404);
    assert!(text.contains("no shard sqlite/nope"), "{text}");
    let started = target.start_transfer("sqlite", "nope", &source.url).await.unwrap();
    let done = target.wait_transfer(&started.id, Duration::from_secs(30)).await;
    assert_eq!(done.state, State::Failed);
    let error = done.error.unwrap();
    assert!(error.starts_with("connecting:") && error.contains("404"), "{error}");
    assert!(tree(&target.staging()).is_empty());

    // An unreachable source: retried, then a clean failure.
    let node = TestNode::start(
        "lonely",
        NodeOptions { args: vec!["--max-attempts".into(), "2".into()], ..Default::default() },
    );
    let started = node.start_transfer("sqlite", "s1", "http://127.0.0.1:9").await.unwrap();
    let done = node.wait_transfer(&started.id, Duration::from_secs(30)).await;
    assert_eq!(done.state, State::Failed);
    assert!(done.error.as_deref().unwrap().contains("gave up after 2 failed attempts"), "{done:?}");
    assert_eq!(done.attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transfer_per_shard_at_a_time() {
    let source =
        TestNode::start("source", NodeOptions { args: vec!["--rate-limit".into(), "2M".into()], ..Default::default() });
    let target = TestNode::start("target", NodeOptions::default());
    SegmentLog.create(&source.shard_dir("segment-log", "s1"), 4 << 20);
    let first = target.start_transfer("segment-log", "s1", &source.url).await.unwrap();
    let err = target.start_transfer("segment-log", "s1", &source.url).await.unwrap_err().to_string();
    assert!(err.starts_with("409") && err.contains(&first.id), "{err}");
    let done = target.wait_transfer(&first.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, State::Succeeded);
    // Once it has ended, the shard can be transferred again.
    let again = target.start_transfer("segment-log", "s1", &source.url).await.unwrap();
    assert_eq!(target.wait_transfer(&again.id, Duration::from_secs(60)).await.state, State::Succeeded);

    // The published replica is registered in the target's replica table.
    let want = vec![json!({"engine": "segment-log", "shard": "s1", "replicas": {"target": "active"}})];
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let shards: Vec<Value> = target.api().call(Method::GET, "/v1/shards", None).await.unwrap();
        if shards == want {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{shards:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn bearer() -> String {
    format!("Bearer {}", ferry_tests::node::TOKEN)
}
