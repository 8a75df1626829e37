//! What `ferry` logs: `serve` at `info` by default, one line per transfer
//! state change with its id, engine, shard, bytes and duration; JSON lines
//! with `--log-format json`, plugin lines keeping their plugin/hook/shard
//! span; the other commands quiet (`warn`). And `--version` names the
//! contracts the host loads.

use std::process::Command;
use std::time::Duration;

use ferry::transfer::State;
use ferry_tests::engines::{SegmentLog, TestEngine};
use ferry_tests::node::{NodeOptions, TestNode};
use ferry_tests::{ferry_bin, plugins};
use serde_json::Value;

const WITHIN: Duration = Duration::from_secs(60);

/// The node's log lines as JSON objects (every line must be one).
fn json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_logs_each_transfer_state_change_as_json_lines() {
    let logs = tempfile::tempdir().unwrap();
    let (source_log, target_log) = (logs.path().join("source.log"), logs.path().join("target.log"));
    // No --log: `serve` logs at info by default (the harness's FERRY_LOG is
    // cleared for these two).
    let json = |log: &std::path::Path| NodeOptions {
        args: vec!["--log-format".into(), "json".into()],
        log_file: Some(log.to_owned()),
        default_log_level: true,
        ..Default::default()
    };
    let source = TestNode::start("src", json(&source_log));
    let target = TestNode::start("dst", json(&target_log));
    SegmentLog.create(&source.shard_dir("segment-log", "logged"), 3 << 20);
    let started = target.start_transfer("segment-log", "logged", &source.url).await.unwrap();
    let done = target.wait_transfer(&started.id, WITHIN).await;
    assert_eq!(done.state, State::Succeeded, "{done:?}");

    let lines = json_lines(&target_log);
    let of = |message: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == message && l["fields"]["transfer"] == started.id.as_str())
            .unwrap_or_else(|| panic!("no {message:?} line for {} in {lines:#?}", started.id))
            .clone()
    };
    for message in ["transfer queued", "transfer running", "transfer succeeded"] {
        let line = of(message);
        assert_eq!(line["level"], "INFO", "{line}");
        assert_eq!(line["fields"]["engine"], "segment-log", "{line}");
        assert_eq!(line["fields"]["shard"], "logged", "{line}");
    }
    let end = of("transfer succeeded");
    assert!(end["fields"]["bytes"].as_u64().unwrap() >= 3 << 20, "{end}");
    assert!(end["fields"]["duration_ms"].is_u64(), "{end}");

    // The source's plugin lines carry their span: plugin, hook and shard.
    let lines = json_lines(&source_log);
    let snapshot = lines
        .iter()
        .find(|l| l["span"]["hook"] == "create-snapshot")
        .unwrap_or_else(|| panic!("no create-snapshot line in {lines:#?}"));
    assert_eq!(snapshot["span"]["plugin"], "segment-log", "{snapshot}");
    assert_eq!(snapshot["span"]["shard"], "logged", "{snapshot}");
}

#[test]
fn other_commands_log_only_warnings_and_the_version_names_the_contracts() {
    let mut check = Command::new(ferry_bin());
    let out = check.args(["plugin", "check", plugins::SEGMENT_LOG]).env_remove("FERRY_LOG").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("INFO"), "{stderr}");

    let out = Command::new(ferry_bin()).arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(version.contains("ferry:engine@0.1.0") && version.contains("ferry:engine@0.2.0"), "{version}");

    let out = Command::new(ferry_bin()).args(["--log-format", "xml", "--version"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("xml"));
}
