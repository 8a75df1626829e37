//! Hostile plugins against real `ferry serve` processes: the misbehave guest
//! floods its log, forges log lines, and makes symlinks in `apply`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry::plugin::LOG_MAX_MESSAGES;
use ferry::transfer::State;
use ferry_tests::node::{NodeOptions, TestNode};
use ferry_tests::{plugins, tree};
use hyper::Method;

const ENGINE: &str = "misbehave";

/// A node with misbehave loaded, its log in `log`, and `config` as its TOML.
fn node(name: &str, dir: &Path, config: &str, log_filter: &str) -> (TestNode, PathBuf) {
    let config_file = dir.join(format!("{name}.toml"));
    std::fs::write(&config_file, config).unwrap();
    let log = dir.join(format!("{name}.log"));
    let options = NodeOptions {
        args: vec!["--config".into(), config_file.display().to_string(), "--log".into(), log_filter.into()],
        extra_plugins: vec![plugins::MISBEHAVE.into()],
        log_file: Some(log.clone()),
        ..Default::default()
    };
    (TestNode::start(name, options), log)
}

/// Asks the node for the shard's status, which runs the plugin's
/// `shard-status` on a directory made for it.
async fn shard_status(node: &TestNode, shard: &str) -> anyhow::Result<serde_json::Value> {
    std::fs::create_dir_all(node.shard_dir(ENGINE, shard)).unwrap();
    Ok(node.api().call(Method::GET, &format!("/v1/engines/{ENGINE}/shards/{shard}/status"), None).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_plugin_gets_a_bounded_log_and_cannot_forge_lines() {
    let dir = tempfile::tempdir().unwrap();
    // Three seconds of flooding: unbounded, that was hundreds of MiB.
    let (node, log) =
        node("flood", dir.path(), "[plugin.deadlines]\nshard_status = 3000\n", "warn,openraft=off,ferry::guest=info");

    let err = shard_status(&node, "log-flood").await.unwrap_err().to_string();
    assert!(err.contains("deadline of 3s exceeded"), "{err}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.len() < 1 << 20, "{} bytes of log for one call", text.len());
    let floods = text.lines().filter(|l| l.contains("flood message")).count() as u64;
    assert!(floods > 0 && floods <= LOG_MAX_MESSAGES, "{floods} flood lines");
    let report = text
        .lines()
        .find(|l| l.contains("guest log over its per-call limit"))
        .unwrap_or_else(|| panic!("no line says what was dropped:\n{}", tail(&text)));
    // Inside the call's span, saying how much was dropped.
    assert!(report.contains("plugin=misbehave") && report.contains("shard-status"), "{report}");
    let dropped: u64 = report
        .split("dropped ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {report}"));
    assert!(dropped > floods, "{report}");

    // A newline, a CR or an escape sequence in a message or on stderr
    // stays inside its own line, escaped.
    shard_status(&node, "log-newline").await.unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    for forged in ["FORGED ERROR", "FORGED-CR", "FORGED-STDERR"] {
        let line = text.lines().find(|l| l.contains(forged)).unwrap_or_else(|| panic!("{forged} not logged"));
        assert!(line.contains("plugin=misbehave") && line.contains("ferry::guest"), "{forged} left its span: {line}");
    }
    assert!(text.contains(r"one message\nFORGED ERROR ferry: a host line\rFORGED-CR"), "{}", tail(&text));
    assert!(text.contains(r"one stderr line\rFORGED-STDERR\u{1b}[2K"), "{}", tail(&text));
    assert!(!text.contains('\r') && !text.contains('\u{1b}'), "raw control characters in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_made_by_apply_is_never_published() {
    let dir = tempfile::tempdir().unwrap();
    let (source, _) = node("source", dir.path(), "", "warn,openraft=off");
    let (target, target_log) = node("target", dir.path(), "", "warn,openraft=off");
    std::fs::create_dir_all(source.shard_dir(ENGINE, "apply-symlink")).unwrap();

    let started = target.start_transfer(ENGINE, "apply-symlink", &source.url).await.unwrap();
    let done = target.wait_transfer(&started.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, State::Failed, "{done:?}");
    let error = done.error.unwrap_or_default();
    // WASI let the guest make the relative link (not the absolute one).
    let named = r#"applying: "link" is a symlink to "../../../../etc/passwd""#;
    assert!(error.starts_with(named), "{error}");
    assert!(error.contains("only regular files and directories"), "{error}");
    assert!(!target.shard_dir(ENGINE, "apply-symlink").exists(), "published");
    assert!(tree(&target.staging()).is_empty(), "staging left: {:?}", tree(&target.staging()));
    let log = std::fs::read_to_string(&target_log).unwrap();
    // One line for the end, with the transfer's fields and the error.
    let end = log.lines().find(|l| l.contains("transfer failed")).unwrap_or_else(|| panic!("{}", tail(&log)));
    assert!(end.contains(&format!("transfer={}", started.id)) && end.contains("error=applying:"), "{end}");
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
