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
            .args(["plugin", "install", "--upgrade"])
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
    // A build of an engine that has a plugin, not said to be an upgrade: its
    // engine name collides.
    let collide = Command::new(ferry_bin())
        .args(["plugin", "install"])
        .arg(&build)
        .args(["--node", &node.url, "--token-file"])
        .arg(&node.token_file)
        .output()
        .unwrap();
    let why = String::from_utf8_lossy(&collide.stderr);
    assert!(!collide.status.success() && why.contains("collides") && why.contains("--upgrade"), "{why}");
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

fn ferry(args: &[&str], node: &ferry_tests::node::TestNode) -> std::process::Output {
    Command::new(ferry_bin())
        .args(args)
        .args(["--node", &node.url, "--token-file"])
        .arg(&node.token_file)
        .output()
        .unwrap()
}

fn mutant(name: &str) -> std::path::PathBuf {
    Path::new(plugins::SEGMENT_LOG).parent().unwrap().join(format!("mutants/segment-log-{name}.wasm"))
}

/// The segment-log build `node` runs for new work.
async fn running(node: &ferry_tests::node::TestNode) -> String {
    let view: Value = node.api().call(Method::GET, "/v1/plugins", None).await.unwrap();
    let row = view.as_array().unwrap().iter().find(|p| p["engine"] == "segment-log").unwrap().clone();
    row["hash"].as_str().unwrap().to_owned()
}

/// Pinning, roll back, remove, and a rollout that a member restarting and a
/// peer's corrupt bytes hold back:
/// - a transfer started on build B finishes on B while C goes active, and B
///   cannot be removed meanwhile; the next transfer runs on C;
/// - `activate` rolls B out again; `remove` forgets C, and refuses the
///   active build;
/// - a build installed while a member is down is not active (B stays); the
///   member, restarted, refuses a peer's bytes that do not hash to the
///   build; once a peer holds the right bytes it fetches them and the build
///   goes active everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_keep_their_build_through_a_swap_and_builds_roll_back_and_are_removed() {
    let slow = || NodeOptions { args: vec!["--rate-limit".into(), "4M".into()], ..Default::default() };
    let mut cluster = TestCluster::start_with(&["r1", "r2", "r3"], slow()).await;
    let b = mutant("validate-accepts-anything");
    let c = Path::new(plugins::SEGMENT_LOG).to_path_buf();
    let d = mutant("read-only-hook-writes");
    let (hb, hc, hd) = (blake3_of(b.to_str().unwrap()), blake3_of(c.to_str().unwrap()), blake3_of(d.to_str().unwrap()));
    let out = ferry(&["plugin", "install", "--upgrade", b.to_str().unwrap(), "--wait", "60"], &cluster.nodes[0]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // A slow transfer pinned to B (24 MiB at 4 MiB/s).
    let source = &cluster.nodes[0].shard_dir("segment-log", "p");
    ferry_tests::segment_log::Generator { segment_size: 4 << 20, term: 1, seed: 5 }.create(source, 24 << 20).unwrap();
    cluster.wait_replicas("segment-log", "p", serde_json::json!({"r1": "active"}), Duration::from_secs(60)).await;
    let body =
        serde_json::json!({"engine": "segment-log", "shard": "p", "source": "r1", "target": "r2", "kind": "replicate"});
    let pinned: TransferStatus = cluster.nodes[0].api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();

    // C goes active meanwhile; B, pinned, cannot be removed; C, active, neither.
    let out = ferry(&["plugin", "install", "--upgrade", c.to_str().unwrap(), "--wait", "60"], &cluster.nodes[1]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for i in 0..3 {
        assert_eq!(running(&cluster.nodes[i]).await, hc, "member {i}");
    }
    let record: Value =
        cluster.nodes[0].api().call(Method::GET, &format!("/v1/transfers/{}", pinned.id), None).await.unwrap();
    assert_eq!(record["consensus"]["plugin"], hb.as_str(), "{record}");
    assert_eq!(record["plugin"]["hash"], hb.as_str(), "{record}");
    let still_live = ["snapshot", "partial"].contains(&record["consensus"]["stage"].as_str().unwrap_or(""));
    let refused = ferry(&["plugin", "remove", "segment-log", &hb], &cluster.nodes[2]);
    if still_live {
        let why = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && why.contains("in use by live transfer"), "{why}");
    }
    let refused = ferry(&["plugin", "remove", "segment-log", &hc[..12]], &cluster.nodes[2]);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("is active"));
    let done = cluster.nodes[1].wait_transfer(&pinned.id, Duration::from_secs(120)).await;
    assert_eq!(done.state, ferry::transfer::State::Succeeded, "{done:?}");
    assert_eq!(done.plugin.as_ref().map(|p| p.hash.as_str()), Some(hb.as_str()), "ran on its pinned build: {done:?}");
    assert!(still_live, "the transfer ended before the swap: make it slower");
    let body =
        serde_json::json!({"engine": "segment-log", "shard": "p", "source": "r1", "target": "r3", "kind": "replicate"});
    let next: TransferStatus = cluster.nodes[0].api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();
    let done = cluster.nodes[2].wait_transfer(&next.id, Duration::from_secs(120)).await;
    assert_eq!(done.plugin.as_ref().map(|p| p.hash.as_str()), Some(hc.as_str()), "{done:?}");

    // Roll back to B; then C can go.
    let out = ferry(&["plugin", "activate", "segment-log", &hb[..10], "--wait", "60"], &cluster.nodes[2]);
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    for i in 0..3 {
        assert_eq!(running(&cluster.nodes[i]).await, hb, "member {i} after the roll back");
    }
    let out = ferry(&["plugin", "remove", "segment-log", &hc], &cluster.nodes[0]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Read on a follower, which applies the removal a moment after the
    // leader answered.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let view: Value = cluster.nodes[1].api().call(Method::GET, "/v1/cluster/plugins", None).await.unwrap();
        let hashes: Vec<String> = engine(&view, "segment-log")["builds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["hash"].as_str().unwrap().to_owned())
            .collect();
        if hashes == [hb.clone()] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "C is still listed after 10 s: {view}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // D, installed while r3 is down, is not active: B stays everywhere.
    cluster.nodes[2].kill();
    let out = ferry(&["plugin", "install", "--upgrade", d.to_str().unwrap(), "--wait", "3"], &cluster.nodes[0]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stdout).contains("not active"));
    assert_eq!(running(&cluster.nodes[0]).await, hb);
    // Every peer's copy of D is corrupt: restarted, r3 refuses them.
    let stores: Vec<std::path::PathBuf> =
        cluster.nodes.iter().map(|n| n.data_dir.join(format!("state/plugin-store/{hd}.wasm"))).collect();
    let blob = |i: usize| stores[i].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !blob(1).exists() {
        assert!(std::time::Instant::now() < deadline, "r2 never fetched D");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in [0, 1] {
        std::fs::write(blob(i), b"\0asm\x0d\0\x01\0 not the build").unwrap();
    }
    let log = tempfile::NamedTempFile::new().unwrap();
    cluster.nodes[2].restart(NodeOptions { log_file: Some(log.path().to_owned()), ..slow() });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(log.path()).unwrap().contains(&format!("not {hd}")) {
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal logged: {}",
            std::fs::read_to_string(log.path()).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let view: Value = cluster.nodes[0].api().call(Method::GET, "/v1/cluster/plugins", None).await.unwrap();
    assert_eq!(engine(&view, "segment-log")["rollout"]["active"], false, "{view}");
    assert_eq!(running(&cluster.nodes[2]).await, hb, "the restarted member runs the active build");
    // A peer holds the right bytes again: the rollout completes.
    std::fs::copy(&d, blob(0)).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let view: Value = cluster.nodes[0].api().call(Method::GET, "/v1/cluster/plugins", None).await.unwrap();
        if engine(&view, "segment-log")["rollout"]["active"] == true && running(&cluster.nodes[2]).await == hd {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "D never went active: {view}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
