//! Transfers through consensus on a 3-node cluster: replicate and move for
//! both engines, the replica table on every member, fencing, one transfer
//! per shard, never to an Active replica.

use std::time::Duration;

use ferry::transfer::{State, TransferStatus};
use ferry_tests::engines::{self, TestEngine};
use ferry_tests::node::{TestCluster, TestNode};
use ferry_tests::tree;
use hyper::Method;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(120);

async fn start(node: &TestNode, body: Value) -> anyhow::Result<TransferStatus> {
    Ok(node.api().call(Method::POST, "/v1/transfers", Some(&body)).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicate_then_move_for_both_engines() {
    let cluster = TestCluster::start(&["n1", "n2", "n3"]).await;
    let [n1, n2, n3] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    for engine in engines::all() {
        let name = engine.name();
        engine.create(&n1.shard_dir(name, "s"), 3 << 20);
        cluster.wait_replicas(name, "s", json!({"n1": "active"}), WITHIN).await;

        // Replicate n1 -> n2, proposed on n3 (any node), donor chosen by position.
        let started = start(n3, json!({"engine": name, "shard": "s", "target": "n2"})).await.unwrap();
        let record = started.consensus.clone().unwrap();
        assert!(record.epoch > 0);
        let done = n3.wait_transfer(&started.id, WITHIN).await;
        assert_eq!(done.state, State::Succeeded, "{name}: {done:?}");
        assert_eq!(done.bytes_done, done.bytes_total, "byte progress from the target: {done:?}");
        engine.assert_same(&n1.shard_dir(name, "s"), &n2.shard_dir(name, "s"));
        cluster.wait_replicas(name, "s", json!({"n1": "active", "n2": "active"}), WITHIN).await;

        // Never to a node that already holds an Active replica (Qdrant #2805).
        let err = start(n1, json!({"engine": name, "shard": "s", "target": "n2", "source": "n1"})).await.unwrap_err();
        assert!(err.to_string().contains("already has an active replica"), "{err}");

        // Move n1 -> n3: n3 Active, n1 Dead, then its files go and it is forgotten.
        let moved = start(n2, json!({"engine": name, "shard": "s", "target": "n3", "source": "n1", "kind": "move"}))
            .await
            .unwrap();
        assert_eq!(n2.wait_transfer(&moved.id, WITHIN).await.state, State::Succeeded);
        engine.assert_same(&n2.shard_dir(name, "s"), &n3.shard_dir(name, "s"));
        cluster.wait_replicas(name, "s", json!({"n2": "active", "n3": "active"}), WITHIN).await;
        assert!(!n1.shard_dir(name, "s").exists(), "the moved-away replica's files remain");
        for node in &cluster.nodes {
            assert!(tree(&node.staging()).is_empty());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transfer_per_shard_and_stale_epochs_are_refused() {
    let cluster = TestCluster::start(&["f1", "f2", "f3"]).await;
    let [f1, f2, f3] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    engines::SegmentLog.create(&f1.shard_dir("segment-log", "s"), 64 << 20);
    let registered = json!([{"engine": "segment-log", "shard": "s", "replicas": {"f1": "active"}}]);
    cluster.wait_shards(&registered, WITHIN).await;

    let first =
        start(f2, json!({"engine": "segment-log", "shard": "s", "target": "f2", "source": "f1"})).await.unwrap();
    let err =
        start(f3, json!({"engine": "segment-log", "shard": "s", "target": "f3", "source": "f1"})).await.unwrap_err();
    assert!(err.to_string().contains("is in progress"), "{err}");

    // A request with a stale or foreign epoch is refused by the source.
    let epoch = first.consensus.as_ref().unwrap().epoch;
    for (id, epoch) in [(first.id.as_str(), epoch + 1000), ("someone-else", epoch)] {
        let url = format!("{}/v1/engines/segment-log/shards/s/snapshot", f1.url);
        let request = hyper::Request::builder()
            .method("POST")
            .uri(&url)
            .header("authorization", format!("Bearer {}", ferry_tests::node::TOKEN))
            .header("ferry-transfer-id", id)
            .header("ferry-transfer-epoch", epoch.to_string())
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let response = ferry::http::client().request(request).await.unwrap();
        assert_eq!(response.status(), 409, "{id} {epoch}");
    }

    assert_eq!(f2.wait_transfer(&first.id, WITHIN).await.state, State::Succeeded);
    // Once ended, the shard can move again.
    let second = start(f3, json!({"engine": "segment-log", "shard": "s", "target": "f3"})).await.unwrap();
    assert_eq!(f3.wait_transfer(&second.id, WITHIN).await.state, State::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_through_consensus_leaves_nothing_partial() {
    let cluster = TestCluster::start(&["c1", "c2", "c3"]).await;
    let [c1, c2] = [&cluster.nodes[0], &cluster.nodes[1]];
    engines::SegmentLog.create(&c1.shard_dir("segment-log", "s"), 256 << 20);
    let registered = json!([{"engine": "segment-log", "shard": "s", "replicas": {"c1": "active"}}]);
    cluster.wait_shards(&registered, WITHIN).await;
    let started =
        start(c1, json!({"engine": "segment-log", "shard": "s", "target": "c2", "source": "c1"})).await.unwrap();
    c2.wait_until(&started.id, WITHIN, |s| s.bytes_done > 0).await;
    let _: TransferStatus =
        cluster.nodes[2].api().call(Method::DELETE, &format!("/v1/transfers/{}", started.id), None).await.unwrap();
    let done = c1.wait_transfer(&started.id, WITHIN).await;
    assert_eq!(done.state, State::Cancelled, "{done:?}");
    // The target's replica never became Active; Dead replicas are forgotten.
    cluster.wait_shards(&registered, WITHIN).await;
    assert!(!c2.shard_dir("segment-log", "s").exists());
    // The target stops its writer and removes staging promptly (the record
    // may say aborted a moment before).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = tree(&c2.staging());
        if left.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "staging left behind: {left:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
