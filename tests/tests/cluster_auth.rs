//! Who may do what: scoped credentials (read, admin, node), TLS between
//! nodes against a cluster CA, and a join that verifies its peer before the
//! node gives up its own cluster.

use std::time::Duration;

use ferry::transfer::{State, TransferStatus};
use ferry_tests::engines;
use ferry_tests::node::{
    ADMIN_TOKEN, Credentials, NODE_TOKEN, NodeOptions, READ_TOKEN, TOKEN, TestCluster, TestNode, TestPki,
};
use hyper::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WITHIN: Duration = Duration::from_secs(120);

/// The HTTP status a call answered, or 0 when there was no answer.
async fn status_of(node: &TestNode, token: &str, method: Method, path: &str, body: Option<Value>) -> u16 {
    match node.api_as(token).call::<Value>(method, path, body.as_ref()).await {
        Ok(_) => 200,
        Err(e) => e.status().map(|s| s.as_u16()).unwrap_or(0),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_credential_does_only_what_its_scope_allows() {
    let node = TestNode::start("scoped", NodeOptions { credentials: Credentials::Scoped, ..Default::default() });
    // The node's own state (tokens, Raft log, compiled plugins) is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(node.data_dir.join("state")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "state/ is {mode:o}");
    let propose = json!({"op": "register-replica", "engine": "sqlite", "shard": "s", "node": 1});
    let vote = json!({"vote": {"leader_id": {"term": 1, "node_id": 1}, "committed": false}, "last_log_id": null});
    let transfer = json!({"engine": "sqlite", "shard": "s1", "source": "http://127.0.0.1:9"});
    let snapshot = "/v1/engines/sqlite/shards/s1/snapshot";
    // (token, method, path, body, expected status)
    let cases: Vec<(&str, Method, &str, Option<Value>, u16)> = vec![
        (READ_TOKEN, Method::GET, "/v1/cluster", None, 200),
        (READ_TOKEN, Method::GET, "/v1/transfers", None, 200),
        (READ_TOKEN, Method::POST, "/v1/transfers", Some(transfer.clone()), 403),
        (READ_TOKEN, Method::POST, "/v1/cluster/leave", None, 403),
        (READ_TOKEN, Method::POST, "/v1/raft/propose", Some(propose.clone()), 403),
        (READ_TOKEN, Method::GET, snapshot, None, 403),
        (ADMIN_TOKEN, Method::GET, "/v1/shards", None, 200),
        (ADMIN_TOKEN, Method::POST, "/v1/raft/propose", Some(propose.clone()), 403),
        (ADMIN_TOKEN, Method::POST, "/v1/raft/vote", Some(vote.clone()), 403),
        (ADMIN_TOKEN, Method::GET, snapshot, None, 403),
        (ADMIN_TOKEN, Method::GET, "/v1/cluster/proof?nonce=00", None, 403),
        // Admin reaches the handler: a pull from a source that is not there starts.
        (ADMIN_TOKEN, Method::POST, "/v1/transfers", Some(transfer.clone()), 200),
        (NODE_TOKEN, Method::GET, "/v1/cluster", None, 200),
        (NODE_TOKEN, Method::POST, "/v1/transfers", Some(transfer.clone()), 403),
        (NODE_TOKEN, Method::POST, "/v1/cluster/join", Some(json!({"to": "http://127.0.0.1:9"})), 403),
        (NODE_TOKEN, Method::GET, snapshot, None, 404),
        (TOKEN, Method::GET, "/v1/health", None, 401),
    ];
    for (token, method, path, body, want) in cases {
        let who = match token {
            READ_TOKEN => "read",
            ADMIN_TOKEN => "admin",
            NODE_TOKEN => "node",
            _ => "a stranger",
        };
        let got = status_of(&node, token, method.clone(), path, body).await;
        assert_eq!(got, want, "{who}: {method} {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_with_scoped_credentials_transfers_and_refuses_strangers() {
    let pki = TestPki::new();
    let options = NodeOptions { credentials: Credentials::Scoped, tls: Some(pki.clone()), ..Default::default() };
    let cluster = TestCluster::start_with(&["t1", "t2", "t3"], options).await;
    let [t1, t2, t3] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    assert!(t1.url.starts_with("https://127.0.0.1:"), "{}", t1.url);

    // Members talk to each other over TLS with the node credential: a
    // replicate through consensus works end to end.
    let engine = &engines::all()[0];
    let name = engine.name();
    engine.create(&t1.shard_dir(name, "s"), 2 << 20);
    cluster.wait_replicas(name, "s", json!({"t1": "active"}), WITHIN).await;
    let body = json!({"engine": name, "shard": "s", "target": "t3"});
    let started: TransferStatus = t2.api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();
    let done = t2.wait_transfer(&started.id, WITHIN).await;
    assert_eq!(done.state, State::Succeeded, "{done:?}");
    engine.assert_same(&t1.shard_dir(name, "s"), &t3.shard_dir(name, "s"));

    // The node credential without a client certificate from the CA is not a member.
    let vote = json!({"vote": {"leader_id": {"term": 1, "node_id": 1}, "committed": false}, "last_log_id": null});
    let err = t1.api_as(NODE_TOKEN).call::<Value>(Method::POST, "/v1/raft/vote", Some(&vote)).await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(403), "{err}");
    assert!(err.to_string().contains("client certificate"), "{err}");

    // Plain HTTP to a TLS port, and TLS that does not trust the cluster CA: no answer.
    let plain = t1.url.replace("https://", "http://");
    let err = ferry::http::ApiClient::new(&plain, ADMIN_TOKEN.into())
        .call::<Value>(Method::GET, "/v1/cluster", None)
        .await
        .unwrap_err();
    assert_eq!(err.status(), None, "plain HTTP got an answer: {err}");
    let err =
        ferry::http::ApiClient::new(&t1.url, ADMIN_TOKEN.into()).call::<Value>(Method::GET, "/v1/cluster", None).await;
    assert!(err.unwrap_err().to_string().to_lowercase().contains("certificate"), "an untrusting client got in");

    // The CLI verifies the node with --ca-file.
    let admin_file = t1.token_file.parent().unwrap().join("admin-token");
    let out = std::process::Command::new(ferry_tests::ferry_bin())
        .args(["cluster", "status", "--json", "--node", &t1.url])
        .arg("--token-file")
        .arg(&admin_file)
        .arg("--ca-file")
        .arg(pki.ca())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["members"].as_array().unwrap().len(), 3);
}

/// A fake "cluster" on loopback: answers every request 200 with `answer(path)`.
async fn fake_cluster(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 8192];
                loop {
                    let Ok(n) = conn.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buf[..n]);
                    if request.windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&request).into_owned();
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
                let body = answer(&path);
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(response.as_bytes()).await;
            });
        }
    });
    url
}

fn fake_status() -> String {
    json!({"node": "fake", "id": 7, "state": "leader", "leader": null, "term": 1, "last_applied": 1,
           "last_log_index": 1, "members": []})
    .to_string()
}

/// After a refused or failed join, the node is still the leader of its own
/// cluster, with its shard registered.
async fn assert_still_whole(node: &TestNode) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status: Value = node.api().call(Method::GET, "/v1/cluster", None).await.unwrap();
        let shards: Value = node.api().call(Method::GET, "/v1/shards", None).await.unwrap();
        let registered = shards.as_array().is_some_and(|rows| rows.iter().any(|r| r["shard"] == "kept"));
        if status["state"] == "leader" && status["leader"]["name"] == node.name.as_str() && registered {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "node is not whole again: {status} {shards}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_to_a_fake_cluster_neither_wipes_nor_strands_the_node() {
    let node = TestNode::start("joiner", NodeOptions::default());
    engines::all()[0].create(&node.shard_dir(engines::all()[0].name(), "kept"), 1 << 20);
    assert_still_whole(&node).await;
    // Push the log well past what a wiped node would rebuild, so a wipe shows.
    let status: Value = node.api().call(Method::GET, "/v1/cluster", None).await.unwrap();
    let me = json!({"op": "set-member", "id": status["id"], "member": {"name": node.name, "addr": node.url}});
    for _ in 0..20 {
        let _: Value = node.api().call(Method::POST, "/v1/raft/propose", Some(&me)).await.unwrap();
    }
    let before: Value = node.api().call(Method::GET, "/v1/cluster", None).await.unwrap();

    // 1. A fake that cannot prove it holds our node credential: refused
    //    before anything is wiped (the log is where it was).
    let fake = fake_cluster(|path| {
        if path.starts_with("/v1/cluster/proof") {
            json!({"node": "fake", "proof": "00".repeat(32)}).to_string()
        } else if path == "/v1/cluster/members" {
            json!({"index": 1, "error": null}).to_string()
        } else {
            fake_status()
        }
    })
    .await;
    let err = node.api().call::<Value>(Method::POST, "/v1/cluster/join", Some(&json!({"to": fake}))).await.unwrap_err();
    assert!(err.to_string().contains("node credential"), "{err}");
    let after: Value = node.api().call(Method::GET, "/v1/cluster", None).await.unwrap();
    let (before, after) = (before["last_log_index"].as_u64().unwrap(), after["last_log_index"].as_u64().unwrap());
    assert!(after >= before && before > 20, "the node's Raft log was wiped: {before} -> {after}");
    assert_still_whole(&node).await;

    // 2. A fake that knows the credential (so it passes the proof) but never
    //    replicates: the node does not stay stranded without a cluster.
    let fake = fake_cluster(|path| {
        if let Some(nonce) = path.strip_prefix("/v1/cluster/proof?nonce=") {
            let proof = ferry::consensus::membership_proof(TOKEN, nonce).unwrap();
            json!({"node": "fake", "proof": proof}).to_string()
        } else if path == "/v1/cluster/members" {
            json!({"index": 1, "error": null}).to_string()
        } else {
            fake_status()
        }
    })
    .await;
    let api = node.api().timeout(Duration::from_secs(120));
    let err = api.call::<Value>(Method::POST, "/v1/cluster/join", Some(&json!({"to": fake}))).await.unwrap_err();
    assert!(err.to_string().contains("did not replicate"), "{err}");
    assert_still_whole(&node).await;
}
