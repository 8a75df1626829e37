//! Crashes during transfers through consensus: the leader, the target at
//! random points, restarts with leftover staging. Never a partial shard in
//! `shards/`; every transfer ends (finished or cleanly aborted); every member
//! shows the same replica table.

use std::time::Duration;

use ferry::transfer::{State, TransferStatus};
use ferry_tests::engines::{SegmentLog, TestEngine};
use ferry_tests::node::{NodeOptions, TestCluster, TestNode};
use ferry_tests::tree;
use hyper::Method;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(180);

fn slow() -> NodeOptions {
    NodeOptions { args: vec!["--rate-limit".into(), "16M".into()], ..Default::default() }
}

async fn start(node: &TestNode, body: Value) -> TransferStatus {
    node.api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap()
}

/// Waits until a running node reports the transfer ended; its final status.
async fn ended(cluster: &TestCluster, id: &str) -> TransferStatus {
    let deadline = std::time::Instant::now() + WITHIN;
    loop {
        for node in cluster.nodes.iter().filter(|n| n.is_running()) {
            if let Ok(status) =
                node.api().call::<TransferStatus>(Method::GET, &format!("/v1/transfers/{id}"), None).await
                && status.state.is_final()
            {
                return status;
            }
        }
        assert!(std::time::Instant::now() < deadline, "transfer {id} did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_completes_after_its_leader_is_killed() {
    let mut cluster = TestCluster::start_with(&["l1", "l2", "l3"], slow()).await;
    let status = cluster.wait_agreement(WITHIN).await;
    let leader = cluster.leader_index(&status);
    let (source, target) = ((leader + 1) % 3, (leader + 2) % 3);
    let (source_name, target_name) = (cluster.nodes[source].name.clone(), cluster.nodes[target].name.clone());
    SegmentLog.create(&cluster.nodes[source].shard_dir("segment-log", "s"), 24 << 20);
    cluster.wait_replicas("segment-log", "s", json!({source_name.clone(): "active"}), WITHIN).await;

    let body = json!({"engine": "segment-log", "shard": "s", "target": target_name, "source": source_name});
    let started = start(&cluster.nodes[source], body).await;
    cluster.nodes[target].wait_until(&started.id, WITHIN, |s| s.bytes_done > 0).await;
    cluster.nodes[leader].kill();

    let done = ended(&cluster, &started.id).await;
    assert_eq!(done.state, State::Succeeded, "{done:?}");
    SegmentLog.assert_same(
        &cluster.nodes[source].shard_dir("segment-log", "s"),
        &cluster.nodes[target].shard_dir("segment-log", "s"),
    );
    let both = json!({source_name: "active", target_name: "active"});
    cluster.wait_replicas("segment-log", "s", both.clone(), WITHIN).await;

    // The old leader comes back and agrees.
    let port = cluster.nodes[leader].port;
    cluster.nodes[leader].restart(NodeOptions { port: Some(port), ..slow() });
    cluster.wait_agreement(WITHIN).await;
    cluster.wait_replicas("segment-log", "s", both, WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_killed_at_random_points_never_leaves_a_partial_shard() {
    let points: usize = std::env::var("FERRY_CRASH_POINTS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let mut cluster = TestCluster::start_with(&["k1", "k2", "k3"], slow()).await;
    let mut seed: u64 = 0x5EED_F00D;
    for point in 0..points {
        let shard = format!("s{point}");
        SegmentLog.create(&cluster.nodes[0].shard_dir("segment-log", &shard), 6 << 20);
        cluster.wait_replicas("segment-log", &shard, json!({"k1": "active"}), WITHIN).await;
        let started =
            start(&cluster.nodes[0], json!({"engine": "segment-log", "shard": shard, "target": "k2", "source": "k1"}))
                .await;

        // Kill the target somewhere between the start and a little after the end.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = Duration::from_millis(seed % 900);
        tokio::time::sleep(delay).await;
        cluster.nodes[1].kill();
        let target_dir = cluster.nodes[1].shard_dir("segment-log", &shard);
        if target_dir.exists() {
            // Whatever is published is complete (publish is atomic): every
            // record is there. Its term may still be behind: segment-log
            // moves live, and its replica is published (Partial) before the
            // round under the fence, which moved the source's term.
            SegmentLog.assert_same_data(&cluster.nodes[0].shard_dir("segment-log", &shard), &target_dir);
        }
        let port = cluster.nodes[1].port;
        cluster.nodes[1].restart(NodeOptions { port: Some(port), ..slow() });

        let done = ended(&cluster, &started.id).await;
        let want = match done.state {
            State::Succeeded => json!({"k1": "active", "k2": "active"}),
            _ => json!({"k1": "active"}),
        };
        cluster.wait_replicas("segment-log", &shard, want, WITHIN).await;
        if done.state == State::Succeeded {
            SegmentLog.assert_same(&cluster.nodes[0].shard_dir("segment-log", &shard), &target_dir);
        } else {
            assert!(!target_dir.exists(), "point {point} ({delay:?}): aborted but files remain");
        }
        assert!(tree(&cluster.nodes[1].staging()).is_empty() || done.state.is_final());
        eprintln!("crash point {point}: killed after {delay:?}: {:?}", done.state);
    }
    cluster.wait_agreement(WITHIN).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_removes_leftover_staging() {
    let mut node = TestNode::start("lonely", NodeOptions::default());
    let leftover = node.staging().join("0123abcd/data");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("half-a-file"), b"xx").unwrap();
    let port = node.port;
    node.restart(NodeOptions { port: Some(port), ..Default::default() });
    assert!(tree(&node.staging()).is_empty(), "{:?}", tree(&node.staging()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_target_resumes_without_pulling_verified_files_again() {
    // 4 MiB/s: the kill lands seconds before the end, even on a loaded machine.
    let slower = || NodeOptions { args: vec!["--rate-limit".into(), "4M".into()], ..Default::default() };
    let mut cluster = TestCluster::start_with(&["r1", "r2", "r3"], slower()).await;
    SegmentLog.create(&cluster.nodes[0].shard_dir("segment-log", "s"), 32 << 20);
    cluster.wait_replicas("segment-log", "s", json!({"r1": "active"}), WITHIN).await;
    let started =
        start(&cluster.nodes[0], json!({"engine": "segment-log", "shard": "s", "target": "r2", "source": "r1"})).await;
    cluster.nodes[1].wait_until(&started.id, WITHIN, |s| s.files_done >= 8).await;
    cluster.nodes[1].kill();
    let staging = cluster.nodes[1].staging().join(&started.id);
    assert!(staging.join("held.json").exists(), "no durable record of the received files");
    let journaled = std::fs::read_to_string(staging.join("records.jsonl")).unwrap_or_default().lines().count();
    assert!(journaled >= 8, "only {journaled} received files journaled");
    let port = cluster.nodes[1].port;
    cluster.nodes[1].restart(NodeOptions { port: Some(port), ..slower() });

    let done = ended(&cluster, &started.id).await;
    assert_eq!(done.state, State::Succeeded, "{done:?}");
    assert!(done.resumed_files >= 6, "verified files were pulled again: {done:?}");
    SegmentLog
        .assert_same(&cluster.nodes[0].shard_dir("segment-log", "s"), &cluster.nodes[1].shard_dir("segment-log", "s"));
    cluster.wait_replicas("segment-log", "s", json!({"r1": "active", "r2": "active"}), WITHIN).await;
    assert!(tree(&cluster.nodes[1].staging()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_source_aborts_the_transfer_cleanly() {
    let options = NodeOptions {
        args: vec!["--rate-limit".into(), "4M".into(), "--max-attempts".into(), "3".into()],
        ..Default::default()
    };
    let mut cluster = TestCluster::start_with(&["s1", "s2", "s3"], options).await;
    SegmentLog.create(&cluster.nodes[0].shard_dir("segment-log", "s"), 32 << 20);
    cluster.wait_replicas("segment-log", "s", json!({"s1": "active"}), WITHIN).await;
    let started =
        start(&cluster.nodes[1], json!({"engine": "segment-log", "shard": "s", "target": "s2", "source": "s1"})).await;
    cluster.nodes[1].wait_until(&started.id, WITHIN, |s| s.files_done >= 2).await;
    cluster.nodes[0].kill();

    let done = ended(&cluster, &started.id).await;
    assert_eq!(done.state, State::Failed, "{done:?}");
    let reason = done.error.unwrap_or_default();
    assert!(reason.contains("target:") && reason.contains("gave up"), "{reason}");
    // The target's replica never became Active and its files are gone; the
    // surviving members agree on the table.
    cluster.wait_replicas("segment-log", "s", json!({"s1": "active"}), WITHIN).await;
    assert!(!cluster.nodes[1].shard_dir("segment-log", "s").exists());
    assert!(tree(&cluster.nodes[1].staging()).is_empty());
}
