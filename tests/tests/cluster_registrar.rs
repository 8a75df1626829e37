//! The registrar at scale: shards found on disk are registered as they
//! appear (inotify, not a timer), those found together in batches, and a node killed after it
//! applied them comes back with all of them (its state machine is stored
//! with snapshots; the committed entries after it are applied again).

use std::time::{Duration, Instant};

use ferry_tests::engines::{SegmentLog, TestEngine};
use ferry_tests::node::{NodeOptions, TestCluster, TestNode};
use hyper::Method;
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(60);

async fn rows(node: &TestNode, query: &str) -> Vec<Value> {
    node.api().call(Method::GET, &format!("/v1/shards{query}"), None).await.unwrap()
}

async fn last_applied(node: &TestNode) -> u64 {
    let status: Value = node.api().call(Method::GET, "/v1/cluster", None).await.unwrap();
    status["last_applied"].as_u64().unwrap()
}

/// Makes a shard elsewhere and moves it into place whole, as a publish does.
fn place(node: &TestNode, work: &std::path::Path, shard: &str) {
    let tmp = work.join(shard);
    SegmentLog.create(&tmp, 16 << 10);
    let dst = node.shard_dir("segment-log", shard);
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::rename(&tmp, &dst).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_that_appears_on_an_idle_node_is_registered_at_once() {
    let cluster = TestCluster::start(&["r1", "r2", "r3"]).await;
    cluster.wait_agreement(WITHIN).await;
    let node = &cluster.nodes[1];
    let work = tempfile::tempdir_in(node.data_dir.parent().unwrap()).unwrap();
    // Nothing else happens in the cluster: no applied entry wakes the
    // registrar, and its safety rescan is a minute away. Only the watch of
    // shards/ can see these (an engine directory new to the node, too).
    for shard in ["first", "second"] {
        let start = Instant::now();
        place(node, work.path(), shard);
        loop {
            let row = rows(node, &format!("?engine=segment-log&shard={shard}")).await;
            if row.first().is_some_and(|r| r["replicas"]["r2"] == "active") {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{shard} not registered in 20 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("{shard} registered in {:?}", start.elapsed());
    }
    let want = json!([{"engine": "segment-log", "shard": "first", "replicas": {"r2": "active"}}]);
    for other in &cluster.nodes {
        let deadline = Instant::now() + WITHIN;
        while json!(rows(other, "?engine=segment-log&shard=first").await) != want {
            assert!(Instant::now() < deadline, "{} never saw the shard", other.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // The filters: one engine, one shard; bad queries are refused.
    assert_eq!(rows(node, "?engine=segment-log").await.len(), 2);
    assert!(rows(node, "?engine=sqlite").await.is_empty());
    assert!(rows(node, "?engine=segment-log&shard=none").await.is_empty());
    for bad in ["?shard=first", "?color=red"] {
        let err = node.api().call::<Value>(Method::GET, &format!("/v1/shards{bad}"), None).await.unwrap_err();
        assert!(err.to_string().contains("400"), "{bad}: {err}");
    }
    // And the CLI's.
    let out = std::process::Command::new(ferry_tests::ferry_bin())
        .args(["shards", "--node", &node.url, "--engine", "segment-log", "--shard", "second", "--token-file"])
        .arg(&node.token_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "segment-log/second  r2=active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_shards_are_registered_in_batches_and_survive_a_kill() {
    const SHARDS: usize = 2000;
    let mut cluster = TestCluster::start(&["b1", "b2", "b3"]).await;
    cluster.wait_agreement(WITHIN).await;
    let node = &cluster.nodes[0];
    let work = tempfile::tempdir_in(node.data_dir.parent().unwrap()).unwrap();
    let template = work.path().join("template");
    SegmentLog.create(&template, 8 << 10);
    // A whole engine directory of shards appears at once (a restore, say):
    // one event, and the registrar lists the directory.
    let engine_dir = work.path().join("segment-log");
    std::fs::create_dir(&engine_dir).unwrap();
    for i in 0..SHARDS {
        let shard = engine_dir.join(format!("s{i:05}"));
        std::fs::create_dir(&shard).unwrap();
        for file in std::fs::read_dir(&template).unwrap() {
            let file = file.unwrap();
            std::fs::copy(file.path(), shard.join(file.file_name())).unwrap();
        }
    }
    let before = last_applied(node).await;
    std::fs::rename(&engine_dir, node.data_dir.join("shards").join("segment-log")).unwrap();
    let deadline = Instant::now() + WITHIN;
    for other in &cluster.nodes {
        while rows(other, "?engine=segment-log").await.len() < SHARDS {
            assert!(Instant::now() < deadline, "{} has {} shards", other.name, rows(other, "").await.len());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // Batches of up to 512, not one entry per shard.
    let entries = last_applied(node).await - before;
    assert!(entries <= 10, "{entries} entries for {SHARDS} registrations");

    // Each node killed in turn, then restarted on its data: the table it
    // comes back with is whole (the state machine is stored with each
    // snapshot, not per entry: the entries after it are applied again).
    let table = rows(&cluster.nodes[0], "").await;
    for i in 0..3 {
        let port = cluster.nodes[i].port;
        cluster.nodes[i].kill();
        cluster.nodes[i].restart(NodeOptions { port: Some(port), ..Default::default() });
        cluster.wait_agreement(WITHIN).await;
        assert_eq!(rows(&cluster.nodes[i], "").await, table, "{} after its restart", cluster.nodes[i].name);
    }
}
