//! The LMDB engine plugin written in Python (`guests/lmdb-py`, built by its
//! own `build.sh` into `target/plugins/lang/lmdb.wasm`): it passes the
//! conformance kit on a real LMDB environment made by `mdb_load`, and two
//! real nodes replicate such a shard so that `mdb_dump` of the copy equals
//! `mdb_dump` of the source.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ferry::transfer::{State, TransferStatus};
use ferry_tests::node::{NodeOptions, TestCluster};
use ferry_tests::{contents, kit, tree};
use hyper::Method;
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(300);

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// The plugin, which `cargo` does not build: fail (not skip) without it.
fn plugin() -> PathBuf {
    let path = root().join("target/plugins/lang/lmdb.wasm");
    assert!(path.exists(), "{} is missing: run guests/lmdb-py/build.sh first", path.display());
    for tool in ["mdb_load", "mdb_dump"] {
        let found = Command::new(tool).arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
        assert!(found, "{tool} is missing: run guests/lmdb-py/build.sh (it installs lmdb-utils)");
    }
    path
}

/// Compiled plugins shared by the kit and the nodes of these tests, so the
/// (slow) compile of the 18 MB component happens once, not once per node.
fn cache_dir() -> PathBuf {
    kit::shared_cache("lmdb-py-compiled")
}

/// An LMDB environment in `dir` made by `mdb_load`: 3000 keys, values from
/// 5 bytes to 12 KiB (every 50th one > 2 KiB, on overflow pages).
fn lmdb_shard(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let mut input = String::from("VERSION=3\nformat=print\ntype=btree\nmapsize=268435456\nHEADER=END\n");
    let mut seed: u64 = 7;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) as usize
    };
    for i in 0..3000 {
        let len = if i % 50 == 0 { [2500, 5000, 12000][next() % 3] } else { [5, 40, 300, 1500][next() % 4] };
        let value: String = (0..len).map(|_| (b'a' + (next() % 26) as u8) as char).collect();
        input.push_str(&format!(" key-{i:06}\n {value}\n"));
    }
    input.push_str("DATA=END\n");
    let mut child = Command::new("mdb_load").arg(dir).stdin(Stdio::piped()).spawn().expect("mdb_load");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "mdb_load into {}", dir.display());
}

/// `mdb_dump` of the main database of the environment in `dir` (the sample
/// has no named databases; `-a` would print only those), read from a scratch
/// copy of its `data.mdb` (so that no `lock.mdb` is created in `dir`).
fn dump(dir: &Path) -> Vec<u8> {
    let scratch = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("data.mdb"), scratch.path().join("data.mdb")).unwrap();
    let out = Command::new("mdb_dump").arg(scratch.path()).output().expect("mdb_dump");
    assert!(out.status.success(), "mdb_dump {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.len() > 1_000_000, "the dump is too small: {} bytes", out.stdout.len());
    out.stdout
}

#[test]
fn the_kit_passes_on_an_lmdb_environment_and_leaves_it_unchanged() {
    let plugin = plugin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sample");
    lmdb_shard(&dir);
    let before = contents(&dir);
    let mutate = "printf 'kit-key\\nkit-value\\n' | mdb_load -T \"$FERRY_SHARD_DIR\"";
    let (passed, _, checks) = kit::run(&plugin, &dir, Some(mutate), &cache_dir());
    assert!(passed, "the kit failed: {checks:#?}");
    assert!(checks.len() >= 7, "every check ran: {checks:#?}");
    assert!(checks.iter().all(|(_, outcome, _)| outcome == "passed"), "{checks:#?}");
    for name in ["refuses a damaged one", "term-check fails after a write", "moves between two nodes"] {
        assert!(checks.iter().any(|(check, _, _)| check.contains(name)), "no check {name:?}: {checks:#?}");
    }
    assert!(contents(&dir) == before, "the kit changed the sample shard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_replicate_an_lmdb_shard_and_the_copy_dumps_the_same() {
    let plugin = plugin();
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("node.toml");
    std::fs::write(&config, format!("[plugin]\ncache_dir = {:?}\n", cache_dir().display().to_string())).unwrap();
    let options = NodeOptions {
        extra_plugins: vec![plugin],
        args: vec!["--config".into(), config.display().to_string()],
        ..Default::default()
    };
    let cluster = TestCluster::start_with(&["n1", "n2"], options).await;
    let [n1, n2] = [&cluster.nodes[0], &cluster.nodes[1]];

    // Made beside the node, then renamed in whole: the node never sees a
    // half-loaded environment. The source keeps its lock.mdb.
    let build = tmp.path().join("s1");
    lmdb_shard(&build);
    let source = n1.shard_dir("lmdb", "s1");
    std::fs::create_dir_all(source.parent().unwrap()).unwrap();
    if std::fs::rename(&build, &source).is_err() {
        lmdb_shard(&source);
    }
    cluster.wait_replicas("lmdb", "s1", json!({"n1": "active"}), WITHIN).await;

    let body = json!({"engine": "lmdb", "shard": "s1", "target": "n2", "source": "n1"});
    let started: TransferStatus = n1.api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();
    let done = n1.wait_transfer(&started.id, WITHIN).await;
    assert_eq!(done.state, State::Succeeded, "{done:?}");
    cluster.wait_replicas("lmdb", "s1", json!({"n1": "active", "n2": "active"}), WITHIN).await;

    let copy = n2.shard_dir("lmdb", "s1");
    assert_eq!(tree(&copy), vec!["data.mdb".to_string()], "only data.mdb travels (lock.mdb is runtime state)");
    assert!(dump(&copy) == dump(&source), "mdb_dump of the copy differs from the source's");
    for node in &cluster.nodes {
        assert!(tree(&node.staging()).is_empty());
    }
}
