//! Consensus under attack from a token holder on 127.0.0.1: forged
//! state-machine commands, forged Raft messages, invented epochs, and a
//! cluster that lost its quorum. Each is refused with a clear error, nothing
//! outside the data dir is touched, and consensus keeps working.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::engines::{SegmentLog, TestEngine};
use ferry_tests::node::{NodeOptions, TOKEN, TestCluster, TestNode};
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(60);

/// A raw request with the node's token; the status and the JSON body.
async fn call(
    node: &TestNode,
    method: &str,
    path: &str,
    body: Option<&Value>,
    headers: &[(&str, String)],
) -> (u16, Value) {
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("{}{path}", node.url))
        .header("authorization", format!("Bearer {TOKEN}"));
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let body = body.map(|b| serde_json::to_vec(b).unwrap()).unwrap_or_default();
    let request = request.body(http_body_util::Full::new(bytes::Bytes::from(body))).unwrap();
    let response = ferry::http::client().request(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes))))
}

async fn cluster_status(node: &TestNode) -> Value {
    node.api().call(Method::GET, "/v1/cluster", None).await.unwrap()
}

/// The error message of a refusal, asserting its status.
fn refusal(status: u16, body: &Value, want: u16) -> String {
    assert_eq!(status, want, "{body}");
    body["error"]["message"].as_str().unwrap_or_else(|| panic!("no error message: {body}")).to_owned()
}

/// A directory outside the data dir with a file in it.
fn victim(dir: &Path) -> std::path::PathBuf {
    std::fs::create_dir_all(dir.join("inner")).unwrap();
    std::fs::write(dir.join("inner/precious"), b"keep me").unwrap();
    dir.to_owned()
}

fn assert_intact(dir: &Path) {
    assert_eq!(std::fs::read(dir.join("inner/precious")).unwrap(), b"keep me", "{} was touched", dir.display());
}

/// Waits until the node's replica table shows `shard` active on it: a
/// registration, which is a write through consensus.
async fn wait_registered(node: &TestNode, shard: &str) {
    let deadline = Instant::now() + WITHIN;
    loop {
        let table: Value = node.api().call(Method::GET, "/v1/shards", None).await.unwrap();
        let row = table.as_array().unwrap().iter().find(|r| r["shard"] == shard).cloned();
        if row.is_some_and(|r| r["replicas"][&node.name] == "active") {
            return;
        }
        assert!(Instant::now() < deadline, "{shard} was not registered: {table}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_commands_are_refused_and_delete_nothing_outside_the_data_dir() {
    let node = TestNode::start("prop", NodeOptions::default());
    // "../../x" from shards/ is a sibling of the data dir; "/abs" anywhere.
    let relative = victim(&node.data_dir.parent().unwrap().join("x"));
    let outside = tempfile::tempdir().unwrap();
    let absolute = victim(outside.path());
    SegmentLog.create(&node.shard_dir("segment-log", "real"), 1 << 20);
    wait_registered(&node, "real").await;
    let me = cluster_status(&node).await["id"].as_u64().unwrap();
    let last_log = || async { cluster_status(&node).await["last_log_index"].as_u64().unwrap() };
    let before = last_log().await;

    let engines = [absolute.to_str().unwrap(), "../../x"];
    for engine in engines {
        // The chain of the attack: register a replica under that "engine",
        // start a transfer of it, abort it (the target's registrar then
        // removed the Dead replica's "directory").
        let register = json!({"op": "register-replica", "engine": engine, "shard": "inner", "node": me});
        let (status, body) = call(&node, "POST", "/v1/raft/propose", Some(&register), &[]).await;
        assert!(refusal(status, &body, 409).contains("engine name"), "{body}");
        let start = json!({"op": "start-transfer", "id": "t1", "engine": engine, "shard": "inner",
                           "source": me, "target": me, "kind": "move", "now": 0});
        let (status, body) = call(&node, "POST", "/v1/raft/propose", Some(&start), &[]).await;
        assert!(refusal(status, &body, 409).contains("engine name"), "{body}");
    }
    for shard in ["..", "../../x", "/abs"] {
        let register = json!({"op": "register-replica", "engine": "segment-log", "shard": shard, "node": me});
        let (status, body) = call(&node, "POST", "/v1/raft/propose", Some(&register), &[]).await;
        assert!(refusal(status, &body, 409).contains("shard id"), "{body}");
    }
    let start = json!({"op": "start-transfer", "id": "../../x", "engine": "segment-log", "shard": "real",
                       "source": me, "target": 1, "kind": "move", "now": 0});
    let (status, body) = call(&node, "POST", "/v1/raft/propose", Some(&start), &[]).await;
    assert!(refusal(status, &body, 409).contains("transfer id"), "{body}");
    let member = json!({"op": "set-member", "id": me, "member": {"name": "prop", "addr": "file:///etc"}});
    let (status, body) = call(&node, "POST", "/v1/raft/propose", Some(&member), &[]).await;
    assert!(refusal(status, &body, 409).contains("address"), "{body}");

    // A 20 MiB shard name is refused, and never enters the log.
    let huge = json!({"op": "register-replica", "engine": "segment-log", "shard": "x".repeat(20 << 20), "node": me});
    let (status, body) = call(&node, "POST", "/v1/raft/propose", Some(&huge), &[]).await;
    let message = refusal(status, &body, 409);
    assert!(message.contains("shard id") && message.len() < 1000, "{} bytes", message.len());
    assert_eq!(last_log().await, before, "a refused proposal was written to the log");

    // Nothing outside the data dir was touched; writes still work.
    assert_intact(&relative);
    assert_intact(&absolute);
    let table: Value = node.api().call(Method::GET, "/v1/shards", None).await.unwrap();
    assert_eq!(table, json!([{"engine": "segment-log", "shard": "real", "replicas": {"prop": "active"}}]));
    SegmentLog.create(&node.shard_dir("segment-log", "later"), 1 << 20);
    wait_registered(&node, "later").await;
    assert_intact(&relative);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_raft_messages_are_refused_and_consensus_survives_a_restart() {
    let mut node = TestNode::start("rafty", NodeOptions::default());
    let status = cluster_status(&node).await;
    let me = status["id"].as_u64().unwrap();
    let term = status["term"].as_u64().unwrap();

    // A committed vote at term u64::MAX, from the member itself.
    let vote = |term: u64, from: u64, committed: bool| json!({"leader_id": {"term": term, "node_id": from}, "committed": committed});
    let append = json!({"vote": vote(u64::MAX, me, true), "prev_log_id": null, "entries": [], "leader_commit": null});
    let (status, body) = call(&node, "POST", "/v1/raft/append", Some(&append), &[]).await;
    assert!(refusal(status, &body, 400).contains("beyond"), "{body}");
    let request = json!({"vote": vote(u64::MAX, me, false), "last_log_id": null});
    let (status, body) = call(&node, "POST", "/v1/raft/vote", Some(&request), &[]).await;
    assert!(refusal(status, &body, 400).contains("beyond"), "{body}");
    // Indexes near overflow, senders that are not members, a term far ahead.
    let prev = json!({"leader_id": {"term": term, "node_id": me}, "index": u64::MAX});
    let append = json!({"vote": vote(term, me, true), "prev_log_id": prev, "entries": [], "leader_commit": null});
    let (status, body) = call(&node, "POST", "/v1/raft/append", Some(&append), &[]).await;
    assert!(refusal(status, &body, 400).contains("index"), "{body}");
    let request = json!({"vote": vote(term + 1, 12345, false), "last_log_id": null});
    let (status, body) = call(&node, "POST", "/v1/raft/vote", Some(&request), &[]).await;
    assert!(refusal(status, &body, 400).contains("not a member"), "{body}");
    let request = json!({"vote": vote(1 << 40, me, false), "last_log_id": null});
    let (status, body) = call(&node, "POST", "/v1/raft/vote", Some(&request), &[]).await;
    assert!(refusal(status, &body, 400).contains("above"), "{body}");

    // Writes still work, and so does a restart.
    SegmentLog.create(&node.shard_dir("segment-log", "after"), 1 << 20);
    wait_registered(&node, "after").await;
    let status = cluster_status(&node).await;
    assert!(status["term"].as_u64().unwrap() < 1 << 20, "{status}");
    let port = node.port;
    node.restart(NodeOptions { port: Some(port), ..Default::default() });
    SegmentLog.create(&node.shard_dir("segment-log", "restarted"), 1 << 20);
    wait_registered(&node, "restarted").await;
    let (status, body) = call(&node, "GET", "/v1/health", None, &[]).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invented_epoch_is_refused_without_waiting_for_it() {
    let node = TestNode::start("fence", NodeOptions::default());
    SegmentLog.create(&node.shard_dir("segment-log", "s"), 1 << 20);
    wait_registered(&node, "s").await;
    let last = cluster_status(&node).await["last_log_index"].as_u64().unwrap();
    let headers =
        [("ferry-transfer-id", "invented".to_owned()), ("ferry-transfer-epoch", (last + 1_000_000).to_string())];
    let (status, body) = call(&node, "POST", "/v1/engines/segment-log/shards/s/snapshot", None, &headers).await;
    // Refused for what it is (beyond the log), not after waiting for it to
    // be applied and then not finding the transfer.
    let message = refusal(status, &body, 409);
    assert!(message.contains("beyond the leader's log"), "{message}");
}

/// Polls `/v1/health` until it answers `want`; the body.
async fn wait_health(node: &TestNode, want: u16, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = call(node, "GET", "/v1/health", None, &[]).await;
        if status == want {
            return body;
        }
        assert!(Instant::now() < deadline, "health stayed {status}, not {want}: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_consensus_and_a_lost_quorum() {
    let mut cluster = TestCluster::start(&["h1", "h2", "h3"]).await;
    let status = cluster.wait_agreement(WITHIN).await;
    let leader = status["leader"]["name"].as_str().unwrap().to_owned();
    for node in &cluster.nodes {
        let body = wait_health(node, 200, WITHIN).await;
        assert_eq!(body["node_id"], node.name.as_str(), "{body}");
        assert_eq!(body["consensus"]["leader"], leader.as_str(), "{body}");
        assert!(body["consensus"]["term"].as_u64().unwrap() >= 1, "{body}");
    }

    // Two of three gone: the survivor cannot serve writes, and says so.
    cluster.nodes[1].kill();
    cluster.nodes[2].kill();
    let body = wait_health(&cluster.nodes[0], 503, WITHIN).await;
    assert_eq!(body["node_id"], "h1", "{body}");
    let why = body["error"]["message"].as_str().unwrap();
    assert!(why.contains("no leader known") || why.contains("no quorum"), "{why}");

    // One comes back: a quorum again, healthy again.
    let port = cluster.nodes[1].port;
    cluster.nodes[1].restart(NodeOptions { port: Some(port), ..Default::default() });
    wait_health(&cluster.nodes[0], 200, WITHIN).await;
    wait_health(&cluster.nodes[1], 200, WITHIN).await;
}
