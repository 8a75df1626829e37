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

/// A plugin build installed into the running cluster through one member:
/// every member fetches it by hash, verifies and compiles it, and it becomes
/// the engine's plugin everywhere without a restart; a restarted member
/// keeps it; transfers use it. Bad input changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_installed_into_the_running_cluster_becomes_active_on_every_member() {
    let mut cluster = TestCluster::start(&["i1", "i2", "i3"]).await;
    // Another build of segment-log (a mutant serves: other bytes, same engine).
    let build =
        Path::new(plugins::SEGMENT_LOG).parent().unwrap().join("mutants/segment-log-validate-accepts-anything.wasm");
    let hash = blake3_of(build.to_str().unwrap());
    let install = |node: &ferry_tests::node::TestNode, file: &Path, token: &Path| {
        Command::new(ferry_bin())
            .args(["plugin", "install"])
            .arg(file)
            .args(["--node", &node.url, "--wait", "60", "--token-file"])
            .arg(token)
            .output()
            .unwrap()
    };

    // Bad input: not a plugin; a wrong token. Nothing changes.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("junk.wasm"), b"\0asm not really").unwrap();
    std::fs::write(tmp.path().join("wrong-token"), "0123456789abcdef0123456789abcdef").unwrap();
    let node = &cluster.nodes[1];
    let junk = install(node, &tmp.path().join("junk.wasm"), &node.token_file);
    assert!(!junk.status.success(), "junk was installed");
    let stranger = install(node, &build, &tmp.path().join("wrong-token"));
    assert!(!stranger.status.success() && String::from_utf8_lossy(&stranger.stderr).contains("401"));
    let view: Value = node.api().call(Method::GET, "/v1/cluster/plugins", None).await.unwrap();
    assert!(engine(&view, "segment-log")["rollout"].is_null(), "{view}");

    // The install: active on every member when the command returns.
    let out = install(node, &build, &node.token_file);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("active on every member"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view: Value = cluster.nodes[0].api().call(Method::GET, "/v1/cluster/plugins", None).await.unwrap();
    let row = engine(&view, "segment-log");
    assert_eq!(row["consistent"], true, "{row}");
    assert_eq!(row["rollout"]["active"], true, "{row}");
    assert_eq!(row["rollout"]["ready"].as_array().unwrap().len(), 3, "{row}");
    assert!(row["members"].as_object().unwrap().values().all(|m| m["hash"] == hash.as_str()), "{row}");

    // New transfers run on it.
    let source = cluster.nodes[0].shard_dir("segment-log", "n");
    ferry_tests::segment_log::Generator { segment_size: 1 << 20, term: 1, seed: 8 }.create(&source, 1 << 20).unwrap();
    cluster.wait_replicas("segment-log", "n", serde_json::json!({"i1": "active"}), Duration::from_secs(60)).await;
    let body =
        serde_json::json!({"engine": "segment-log", "shard": "n", "source": "i1", "target": "i3", "kind": "replicate"});
    let started: TransferStatus =
        cluster.nodes[0].api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();
    let done = cluster.nodes[2].wait_transfer(&started.id, Duration::from_secs(120)).await;
    assert_eq!(done.state, ferry::transfer::State::Succeeded, "{done:?}");
    assert_eq!(done.plugin.as_ref().map(|b| b.hash.as_str()), Some(hash.as_str()), "{done:?}");

    // A restarted member comes back with the installed build, not its
    // plugins directory's.
    cluster.nodes[2].restart(NodeOptions::default());
    cluster.wait_agreement(Duration::from_secs(60)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let view: Value = cluster.nodes[2].api().call(Method::GET, "/v1/plugins", None).await.unwrap();
        let here = view.as_array().unwrap().iter().find(|p| p["engine"] == "segment-log").unwrap()["hash"].clone();
        if here == hash.as_str() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the restarted member runs {here}, not {hash}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
