//! `ferry plugin check` and `ferry plugin run-hook`, run as a user would.

use std::path::Path;
use std::process::{Command, Output};

use ferry_tests::segment_log::Generator;
use ferry_tests::{ferry_bin, plugins};
use serde_json::Value;

fn ferry(args: &[&str], cache: &Path) -> Output {
    Command::new(ferry_bin()).args(args).arg("--cache-dir").arg(cache).output().expect("running ferry")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_prints_what_the_plugin_is() {
    let cache = tempfile::tempdir().unwrap();
    let out = ferry(&["plugin", "check", plugins::SEGMENT_LOG], cache.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for want in [
        "engine           segment-log",
        "contract         ferry:engine@0.2.0",
        "create-snapshot, term-check",
        "apply, changes-since, delta-check, apply-changes, fence, unfence, retire",
    ] {
        assert!(text.contains(want), "{want:?} in {text}");
    }

    let out = ferry(&["plugin", "check", plugins::MISBEHAVE, "--json"], cache.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["engine"], "misbehave");
    assert_eq!(json["contract"], "ferry:engine@0.1.0");
    assert_eq!(json["hooks"].as_array().unwrap().len(), 6);

    // The second check of a file comes from the compiled cache.
    let out = ferry(&["plugin", "check", plugins::MISBEHAVE, "--json"], cache.path());
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["from_cache"], true);
}

#[test]
fn check_rejects_bad_files_with_a_clear_message() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("text.wasm", b"hello".to_vec(), "is not a WebAssembly file"),
        ("core.wasm", wat::parse_str("(module)").unwrap(), "is a core WebAssembly module, not a component"),
        ("empty.wasm", wat::parse_str("(component)").unwrap(), "exports no Ferry engine interface"),
        ("half.wasm", std::fs::read(plugins::SEGMENT_LOG).unwrap()[..4000].to_vec(), "is not a valid component"),
    ];
    for (name, bytes, want) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let out = ferry(&["plugin", "check", path.to_str().unwrap()], cache.path());
        assert!(!out.status.success(), "{name} accepted");
        let err = stderr(&out);
        assert!(err.contains(want) && err.contains(name), "{name}: {err}");
        assert!(!err.contains("panicked"), "{name}: {err}");
    }
    let out = ferry(&["plugin", "check", "/nonexistent/x.wasm"], cache.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cannot read it"), "{}", stderr(&out));
}

#[test]
fn run_hook_walks_a_shard_through_every_hook() {
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let shard = work.path().join("shard-7");
    let control = Generator { segment_size: 64 << 10, term: 5, seed: 3 }.create(&shard, 400_000).unwrap();
    let shard_dir = shard.to_str().unwrap();
    let seg = plugins::SEGMENT_LOG;

    let out = ferry(&["plugin", "run-hook", seg, "describe", "--json"], cache.path());
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(serde_json::from_str::<Value>(&stdout(&out)).unwrap()["ok"]["name"], "segment-log");

    let out = ferry(&["plugin", "run-hook", seg, "shard-status", "--shard-dir", shard_dir, "--json"], cache.path());
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["ok"]["term"], 5);
    assert_eq!(json["ok"]["position"], control.flush);

    let out = ferry(&["plugin", "run-hook", seg, "create-snapshot", "--shard-dir", shard_dir, "--json"], cache.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let plan_file = work.path().join("plan.json");
    std::fs::write(&plan_file, &out.stdout).unwrap();
    let plan: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(plan["ok"]["entries"][0]["kind"], "inline");
    assert_eq!(plan["ok"]["entries"][1]["kind"], "file");

    // --meta-file takes the whole run-hook output of create-snapshot.
    let plan_only = work.path().join("plan-only.json");
    std::fs::write(&plan_only, plan["ok"].to_string()).unwrap();
    let meta_file = plan_only.to_str().unwrap();
    let out = ferry(
        &["plugin", "run-hook", seg, "term-check", "--shard-dir", shard_dir, "--meta-file", meta_file],
        cache.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("term-check: ok"));

    // Validate and apply on a copy made from the plan.
    let staging = work.path().join("staging");
    let parsed: ferry::plugin::SnapshotPlan = serde_json::from_value(plan["ok"].clone()).unwrap();
    ferry_tests::materialize(&parsed, &shard, &staging).unwrap();
    let staging_dir = staging.to_str().unwrap();
    for hook in ["validate", "apply"] {
        let out = ferry(
            &["plugin", "run-hook", seg, hook, "--shard-dir", staging_dir, "--meta-file", meta_file, "--json"],
            cache.path(),
        );
        assert!(out.status.success(), "{hook}: {}{}", stdout(&out), stderr(&out));
    }
    ferry_tests::segment_log::check_shard(&staging).unwrap();

    // Live hooks: a round after more writes, then fence, as an operator
    // would drive them by hand.
    let grown = Generator { segment_size: 64 << 10, term: 5, seed: 4 }.append(&shard, control, 10_000).unwrap();
    let since = format!("5:{}", control.flush);
    let out = ferry(
        &["plugin", "run-hook", seg, "changes-since", "--shard-dir", shard_dir, "--since", &since, "--json"],
        cache.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let delta: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(delta["ok"]["meta"]["until"], grown.flush);
    assert_eq!(delta["ok"]["entries"][0]["kind"], "range");
    let delta_file = work.path().join("delta.json");
    std::fs::write(&delta_file, &out.stdout).unwrap();
    let out =
        ferry(&["plugin", "run-hook", seg, "delta-check", "--shard-dir", shard_dir, "--delta-meta-file"], cache.path());
    assert_eq!(out.status.code(), Some(2), "--delta-meta-file wants a value");
    let out = ferry(
        &[
            "plugin",
            "run-hook",
            seg,
            "delta-check",
            "--shard-dir",
            shard_dir,
            "--delta-meta-file",
            delta_file.to_str().unwrap(),
        ],
        cache.path(),
    );
    assert!(out.status.success() && stdout(&out).contains("delta-check: ok"), "{}", stderr(&out));
    let out =
        ferry(&["plugin", "run-hook", seg, "fence", "--shard-dir", shard_dir, "--epoch", "3", "--json"], cache.path());
    assert!(out.status.success(), "{}", stderr(&out));
    let fence: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(fence["ok"]["last"]["term"], 6);
    assert_eq!(fence["ok"]["locks"][0]["path"], "control.lock");
    let out = ferry(&["plugin", "run-hook", seg, "unfence", "--shard-dir", shard_dir, "--epoch", "4"], cache.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("fenced: fenced by transfer epoch 3"), "{}", stderr(&out));

    // A failing hook: exit 1, and the engine's error in the JSON.
    std::fs::remove_file(staging.join("control")).unwrap();
    let out = ferry(&["plugin", "run-hook", seg, "shard-status", "--shard-dir", staging_dir, "--json"], cache.path());
    assert_eq!(out.status.code(), Some(1));
    let json: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(json["engine_error"]["kind"], "io");
}

#[test]
fn run_hook_reports_sandbox_failures_and_usage_errors() {
    let cache = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let loop_dir = work.path().join("loop");
    std::fs::create_dir(&loop_dir).unwrap();
    let out = ferry(
        &[
            "plugin",
            "run-hook",
            plugins::MISBEHAVE,
            "create-snapshot",
            "--shard-dir",
            loop_dir.to_str().unwrap(),
            "--deadline",
            "create-snapshot=200",
        ],
        cache.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("deadline of 200ms exceeded"), "{}", stderr(&out));

    let out = ferry(&["plugin", "run-hook", plugins::MISBEHAVE, "teleport"], cache.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown hook \"teleport\""), "{}", stderr(&out));

    let out = ferry(&["plugin", "run-hook", plugins::MISBEHAVE, "validate", "--shard-dir", "/"], cache.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("validate needs --meta"), "{}", stderr(&out));

    let out = ferry(&["plugin", "run-hook", plugins::MISBEHAVE, "shard-status"], cache.path());
    assert!(stderr(&out).contains("shard-status needs --shard-dir"), "{}", stderr(&out));

    // Live hooks: their arguments, and a 0.1.0 plugin that has none.
    let out = ferry(&["plugin", "run-hook", plugins::SEGMENT_LOG, "fence", "--shard-dir", "/"], cache.path());
    assert!(stderr(&out).contains("fence needs --epoch"), "{}", stderr(&out));
    let out = ferry(
        &[
            "plugin",
            "run-hook",
            plugins::MISBEHAVE,
            "fence",
            "--shard-dir",
            work.path().to_str().unwrap(),
            "--epoch",
            "1",
        ],
        cache.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unsupported by contract ferry:engine@0.1.0"), "{}", stderr(&out));

    let out = ferry(
        &["plugin", "run-hook", plugins::MISBEHAVE, "apply", "--shard-dir", "/", "--meta", "{not json"],
        cache.path(),
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("neither a snapshot meta"), "{}", stderr(&out));
}
