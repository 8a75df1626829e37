//! A cluster of real nodes: forming by join, status and the replica table
//! from any node, forwarding to the leader, leaving, restarts.

use std::time::Duration;

use ferry_tests::engines::{SegmentLog, Sqlite, TestEngine};
use ferry_tests::node::{NodeOptions, TestCluster};
use hyper::Method;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_a_cluster_and_agree_on_the_replica_table() {
    let cluster = TestCluster::start(&["n1", "n2", "n3"]).await;
    let status = cluster.wait_agreement(WITHIN).await;
    assert_eq!(status["members"].as_array().unwrap().len(), 3);
    assert!(status["members"].as_array().unwrap().iter().all(|m| m["voter"] == true));

    // Shards found on disk are registered, whichever node holds them (a
    // follower's registration is forwarded to the leader).
    SegmentLog.create(&cluster.nodes[1].shard_dir("segment-log", "a"), 1 << 20);
    Sqlite.create(&cluster.nodes[2].shard_dir("sqlite", "b"), 1 << 20);
    for node in &cluster.nodes {
        node.api().call::<Value>(Method::GET, "/v1/health", None).await.unwrap();
    }
    let want = json!([
        {"engine": "segment-log", "shard": "a", "replicas": {"n2": "active"}},
        {"engine": "sqlite", "shard": "b", "replicas": {"n3": "active"}},
    ]);
    cluster.wait_shards(&want, WITHIN).await;

    // A second join of a member, or a join to nowhere, is refused cleanly.
    let err = cluster.nodes[1]
        .api()
        .call::<Value>(Method::POST, "/v1/cluster/join", Some(&json!({"to": cluster.nodes[0].url})))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("already in a cluster"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_leaves_and_a_restarted_member_catches_up() {
    let mut cluster = TestCluster::start(&["m1", "m2", "m3"]).await;
    // A follower restarts (SIGKILL): its Raft state is on disk, it rejoins
    // on its own and catches up with what it missed.
    let status = cluster.wait_agreement(WITHIN).await;
    let leader = cluster.leader_index(&status);
    let follower = (leader + 1) % 3;
    cluster.nodes[follower].kill();
    SegmentLog.create(&cluster.nodes[leader].shard_dir("segment-log", "late"), 1 << 20);
    let want =
        json!([{"engine": "segment-log", "shard": "late", "replicas": {cluster.nodes[leader].name.clone(): "active"}}]);
    cluster.wait_shards(&want, WITHIN).await;
    let port = cluster.nodes[follower].port;
    cluster.nodes[follower].restart(NodeOptions { port: Some(port), ..Default::default() });
    cluster.wait_agreement(WITHIN).await;
    cluster.wait_shards(&want, WITHIN).await;

    // The last node leaves: two members remain; it is a cluster of one.
    let leaver = cluster.nodes.pop().unwrap();
    let alone: Value = leaver.api().call(Method::POST, "/v1/cluster/leave", None).await.unwrap();
    assert_eq!(alone["members"].as_array().unwrap().len(), 1, "{alone}");
    let status = cluster.wait_agreement(WITHIN).await;
    assert_eq!(status["members"].as_array().unwrap().len(), 2);
    let err = leaver.api().call::<Value>(Method::POST, "/v1/cluster/leave", None).await.unwrap_err().to_string();
    assert!(err.contains("alone"), "{err}");
}
