//! Both engines end to end through the same code: a real source node, a real
//! receiver node, a transfer, the engine's own oracle on the copy.

use std::process::Command;
use std::time::Duration;

use ferry::transfer::{Stage, State};
use ferry_tests::engines::{self, TestEngine};
use ferry_tests::node::{NodeOptions, TestNode};
use ferry_tests::{ferry_bin, tree};

const SHARD_BYTES: u64 = 6 << 20;
const WITHIN: Duration = Duration::from_secs(120);

async fn replicate(engine: &dyn TestEngine) {
    let source = TestNode::start("source", NodeOptions::default());
    let target = TestNode::start("target", NodeOptions::default());
    let name = engine.name();
    engine.create(&source.shard_dir(name, "s1"), SHARD_BYTES);

    let started = target.start_transfer(name, "s1", &source.url).await.unwrap();
    let done = target.wait_transfer(&started.id, WITHIN).await;
    assert_eq!(done.state, State::Succeeded, "{name}: {done:?}");
    assert_eq!(done.stage, Stage::Done);
    assert_eq!(done.bytes_done, done.bytes_total);
    assert_eq!(done.files_done, done.files_total);
    assert!(done.bytes_total > 0);
    engine.assert_same(&source.shard_dir(name, "s1"), &target.shard_dir(name, "s1"));
    assert!(tree(&target.staging()).is_empty(), "staging left behind");

    // The replica is live on the target: it can serve it onward.
    let third = TestNode::start("third", NodeOptions::default());
    let onward = third.start_transfer(name, "s1", &target.url).await.unwrap();
    assert_eq!(third.wait_transfer(&onward.id, WITHIN).await.state, State::Succeeded);
    engine.assert_same(&source.shard_dir(name, "s1"), &third.shard_dir(name, "s1"));

    // A newer snapshot replaces the older replica atomically.
    engine.write(&source.shard_dir(name, "s1"));
    let again = target.start_transfer(name, "s1", &source.url).await.unwrap();
    assert_eq!(target.wait_transfer(&again.id, WITHIN).await.state, State::Succeeded);
    engine.assert_same(&source.shard_dir(name, "s1"), &target.shard_dir(name, "s1"));
    assert!(tree(&target.staging()).is_empty(), "old replica left behind");
    assert!(tree(&source.staging()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_log_replicates() {
    replicate(&engines::SegmentLog).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_replicates() {
    replicate(&engines::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_start_wait_reports_success_and_failure() {
    let source = TestNode::start("source", NodeOptions::default());
    let target = TestNode::start("target", NodeOptions::default());
    for engine in engines::all() {
        engine.create(&source.shard_dir(engine.name(), "cli"), 1 << 20);
        let out = Command::new(ferry_bin())
            .args(["transfer", "start", "--node", &target.url, "--engine", engine.name(), "--shard", "cli"])
            .args(["--source", &source.url, "--wait", "--json", "--token-file"])
            .arg(&target.token_file)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["state"], "succeeded");
        engine.assert_same(&source.shard_dir(engine.name(), "cli"), &target.shard_dir(engine.name(), "cli"));
    }

    // A shard the source does not have: exit 1, and the reason.
    let out = Command::new(ferry_bin())
        .args(["transfer", "start", "--node", &target.url, "--engine", "sqlite", "--shard", "nope"])
        .args(["--source", &source.url, "--wait", "--token-file"])
        .arg(&target.token_file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("failed") && text.contains("no shard sqlite/nope"), "{text}");

    // list shows both transfers; status of an unknown id is a clean error.
    let out = Command::new(ferry_bin())
        .args(["transfer", "list", "--node", &target.url, "--token-file"])
        .arg(&target.token_file)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("succeeded")).count(), 2);
    let out = Command::new(ferry_bin())
        .args(["transfer", "status", "nope", "--node", &target.url, "--token-file"])
        .arg(&target.token_file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no transfer nope"));
}

/// The target's successful `check-files` calls of the segment-log plugin,
/// from its `/metrics`.
async fn check_files_calls(node: &TestNode) -> u64 {
    let url = format!("{}/metrics", node.url);
    let request = ferry::http::request(hyper::Method::GET, &url, &node.token, None).unwrap();
    let response = ferry::http::client().request(request).await.unwrap();
    let body = ferry::http::read_bounded(response.into_body(), 16 << 20, WITHIN).await.unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    let series = "ferry_hook_calls_total{engine=\"segment-log\",hook=\"check-files\",outcome=\"ok\"} ";
    text.lines().find_map(|l| l.strip_prefix(series)).map_or(0, |n| n.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn segment_log_files_are_checked_while_the_snapshot_streams() {
    // 24 segments of 1 MiB at 8 MiB/s: the stream lasts about 3 s.
    let source = TestNode::start("source", NodeOptions::default());
    let options = NodeOptions { args: vec!["--rate-limit".into(), "8M".into()], ..NodeOptions::default() };
    let target = TestNode::start("target", options);
    engines::SegmentLog.create(&source.shard_dir("segment-log", "s1"), 24 << 20);

    let started = target.start_transfer("segment-log", "s1", &source.url).await.unwrap();
    let mut while_streaming = None;
    loop {
        let calls = check_files_calls(&target).await;
        let status = target.transfer(&started.id).await;
        if status.state.is_final() {
            break;
        }
        // Read after the count: the checks it counts ran before this point.
        if calls > 0 && status.stage == Stage::Streaming && status.bytes_done < status.bytes_total {
            while_streaming = Some((calls, status.bytes_done, status.bytes_total));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (calls, done, total) = while_streaming.expect("no check-files call ended while the snapshot streamed");
    let done_status = target.wait_transfer(&started.id, WITHIN).await;
    assert_eq!(done_status.state, State::Succeeded, "{done_status:?}");
    engines::SegmentLog.assert_same(&source.shard_dir("segment-log", "s1"), &target.shard_dir("segment-log", "s1"));
    eprintln!("{calls} check-files calls had passed with {done} of {total} bytes in");
    assert!(check_files_calls(&target).await >= calls);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_corrupt_at_the_source_fails_the_transfer_at_validating() {
    let source = TestNode::start("source", NodeOptions::default());
    let target = TestNode::start("target", NodeOptions::default());
    let dir = source.shard_dir("segment-log", "bad");
    engines::SegmentLog.create(&dir, 6 << 20);
    // A flipped byte inside a record of the third segment: the source
    // streams it faithfully (its checksum matches), the engine's check of
    // that one file refuses it.
    let victim = dir.join(ferry_tests::segment_log::segment_name(2));
    let mut bytes = std::fs::read(&victim).unwrap();
    bytes[4096] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();

    let started = target.start_transfer("segment-log", "bad", &source.url).await.unwrap();
    let done = target.wait_transfer(&started.id, WITHIN).await;
    assert_eq!(done.state, State::Failed, "{done:?}");
    let error = done.error.unwrap_or_default();
    assert!(error.starts_with("validating:") && error.contains("check-files") && error.contains("CRC"), "{error}");
    assert!(!target.shard_dir("segment-log", "bad").exists(), "a refused snapshot was published");
    assert!(tree(&target.staging()).is_empty(), "staging left behind");
}
