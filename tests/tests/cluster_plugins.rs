//! Which build of each plugin every member runs: `GET /v1/cluster/plugins`
//! and `ferry plugin list`, with one member running another build of
//! segment-log (a mutant: same engine name and version, other bytes).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry::transfer::TransferStatus;
use ferry_tests::node::{NodeOptions, TestCluster};
use ferry_tests::{ferry_bin, plugins};
use hyper::Method;
use serde_json::Value;

fn blake3_of(path: &str) -> String {
    blake3::hash(&std::fs::read(path).unwrap()).to_hex().to_string()
}

fn engine<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["engines"].as_array().unwrap().iter().find(|e| e["engine"] == name).unwrap_or_else(|| panic!("{view}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_shows_which_build_of_each_plugin_every_member_runs() {
    let mut cluster = TestCluster::start(&["p1", "p2", "p3"]).await;
    let view: Value = cluster.nodes[0].api().call(Method::GET, "/v1/cluster/plugins", None).await.unwrap();
    for (name, file) in [("segment-log", plugins::SEGMENT_LOG), ("sqlite", plugins::SQLITE)] {
        let row = engine(&view, name);
        assert_eq!(row["consistent"], true, "{row}");
        assert_eq!(row["members"].as_object().unwrap().len(), 3, "{row}");
        assert!(row["members"].as_object().unwrap().values().all(|m| m["hash"] == blake3_of(file)), "{row}");
    }

    // p3 comes back with another build of segment-log.
    let mutant =
        Path::new(plugins::SEGMENT_LOG).parent().unwrap().join("mutants/segment-log-validate-accepts-anything.wasm");
    cluster.nodes[2].kill();
    std::fs::copy(&mutant, cluster.nodes[2].plugins_dir.join("segment-log.wasm")).unwrap();
    cluster.nodes[2].restart(NodeOptions::default());
    cluster.wait_agreement(Duration::from_secs(60)).await;
    let view: Value = cluster.nodes[1].api().call(Method::GET, "/v1/cluster/plugins", None).await.unwrap();
    let row = engine(&view, "segment-log");
    assert_eq!(row["consistent"], false, "{row}");
    assert_eq!(row["members"]["p3"]["hash"], blake3_of(mutant.to_str().unwrap()), "{row}");
    assert_eq!(row["members"]["p1"]["hash"], blake3_of(plugins::SEGMENT_LOG), "{row}");
    assert_eq!(engine(&view, "sqlite")["consistent"], true);

    // A transfer's status names the build its target runs it with.
    let source = cluster.nodes[0].shard_dir("segment-log", "b");
    ferry_tests::segment_log::Generator { segment_size: 1 << 20, term: 1, seed: 4 }.create(&source, 2 << 20).unwrap();
    cluster.wait_replicas("segment-log", "b", serde_json::json!({"p1": "active"}), Duration::from_secs(60)).await;
    let body =
        serde_json::json!({"engine": "segment-log", "shard": "b", "source": "p1", "target": "p2", "kind": "replicate"});
    let started: TransferStatus =
        cluster.nodes[0].api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();
    let done = cluster.nodes[1].wait_transfer(&started.id, Duration::from_secs(120)).await;
    let build = done.plugin.as_ref().unwrap_or_else(|| panic!("no plugin build in {done:?}"));
    assert_eq!((build.version.as_str(), build.hash.clone()), ("0.1.0", blake3_of(plugins::SEGMENT_LOG)), "{done:?}");

    // The operator's view.
    let node = &cluster.nodes[0];
    let out = Command::new(ferry_bin())
        .args(["plugin", "list", "--node", &node.url, "--token-file"])
        .arg(&node.token_file)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("segment-log: DIFFERS") && text.contains("sqlite: same build everywhere"), "{text}");

    // A member that does not answer is named, not waited for.
    cluster.nodes[2].kill();
    let view: Value = cluster.nodes[0].api().call(Method::GET, "/v1/cluster/plugins", None).await.unwrap();
    assert!(view["unreachable"]["p3"].is_string(), "{view}");
    assert_eq!(engine(&view, "sqlite")["consistent"], false, "a member that did not answer cannot vouch: {view}");
}
