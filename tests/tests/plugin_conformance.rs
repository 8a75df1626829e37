//! The conformance kit, `ferry plugin test`, run as a vendor would: the
//! project's own plugins pass it (and their sample shards are left as they
//! were), and deliberately broken builds of a real plugin (mutants, built by
//! `guests/build.sh` into `target/plugins/mutants/`) fail it at the check
//! that names what is broken.

use std::path::{Path, PathBuf};
use std::process::Command;

use ferry_tests::engines::{Sqlite, TestEngine};
use ferry_tests::segment_log::Generator;
use ferry_tests::{contents, ferry_bin, plugins};
use serde_json::Value;

/// Runs the kit; its exit status and JSON report.
fn kit(plugin: &str, shard: &Path, mutate: Option<&str>, cache: &Path) -> (bool, Value) {
    let (passed, report, _) = ferry_tests::kit::run(Path::new(plugin), shard, mutate, cache);
    (passed, report)
}

fn outcomes(report: &Value) -> Vec<(String, String, String)> {
    ferry_tests::kit::outcomes(report)
}

fn shardgen() -> PathBuf {
    ferry_bin().with_file_name("shardgen")
}

fn segment_log_shard(dir: &Path) {
    Generator { segment_size: 1 << 20, term: 2, seed: 11 }.create(dir, 3 << 20).unwrap();
}

#[test]
fn the_projects_plugins_pass_the_kit_and_their_shards_stay_as_they_were() {
    let (tmp, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (segments, databases) = (tmp.path().join("segment-log"), tmp.path().join("sqlite"));
    segment_log_shard(&segments);
    Sqlite.create(&databases, 2 << 20);
    let term = format!("{} term \"$FERRY_SHARD_DIR\"", shardgen().display());
    let insert = "sqlite3 \"$FERRY_SHARD_DIR/users.db\" \"INSERT INTO users VALUES ('kit', 1)\"";
    for (plugin, dir, mutate) in
        [(plugins::SEGMENT_LOG, &segments, term.as_str()), (plugins::SQLITE, &databases, insert)]
    {
        let before = contents(dir);
        let (passed, report) = kit(plugin, dir, Some(mutate), cache.path());
        let checks = outcomes(&report);
        assert!(passed, "{plugin}: {checks:#?}");
        assert!(checks.iter().all(|(_, outcome, _)| outcome == "passed"), "{plugin}: {checks:#?}");
        assert_eq!(checks.len(), 8, "{plugin}: every check ran: {checks:#?}");
        let hooks: Vec<&str> =
            report["hooks"].as_array().unwrap().iter().map(|h| h["hook"].as_str().unwrap()).collect();
        for hook in [
            "describe",
            "shard-status",
            "create-snapshot",
            "term-check",
            "validate",
            "changes-since",
            "fence",
            "retire",
        ] {
            assert!(hooks.contains(&hook), "{plugin}: {hook} not measured: {hooks:?}");
        }
        assert!(report["hooks"].as_array().unwrap().iter().all(|h| h["peak_memory"].as_u64().unwrap() > 0));
        assert!(contents(dir) == before, "{plugin}: the kit changed the sample shard");
    }

    // Without --mutate that check is skipped, not passed; a missing shard
    // directory is a usage error.
    let (passed, report) = kit(plugins::SQLITE, &databases, None, cache.path());
    assert!(passed);
    assert!(
        outcomes(&report).iter().any(|(check, outcome, _)| check.starts_with("term-check") && outcome == "skipped")
    );
    let out = Command::new(ferry_bin())
        .args(["plugin", "test", plugins::SQLITE, "--shard-dir"])
        .arg(tmp.path().join("nope"))
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("is not a directory"));
}

#[test]
fn the_kit_fails_broken_plugins_at_the_check_that_names_the_fault() {
    let (tmp, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dir = tmp.path().join("shard");
    segment_log_shard(&dir);
    let mutants = Path::new(plugins::SEGMENT_LOG).parent().unwrap().join("mutants");
    for (mutant, failing) in [
        ("validate-accepts-anything", "validate accepts the snapshot and refuses a damaged one"),
        ("plan-drops-a-file", "the shard moves between two nodes"),
        ("read-only-hook-writes", "read-only hooks change nothing and agree"),
    ] {
        let plugin = mutants.join(format!("segment-log-{mutant}.wasm"));
        let (passed, report) = kit(plugin.to_str().unwrap(), &dir, None, cache.path());
        let checks = outcomes(&report);
        assert!(!passed, "{mutant} passed the kit: {checks:#?}");
        let failed: Vec<&(String, String, String)> = checks.iter().filter(|(_, o, _)| o == "failed").collect();
        assert!(failed.iter().any(|(check, _, _)| check == failing), "{mutant}: {failing:?} did not fail: {checks:#?}");
        eprintln!("{mutant}: caught by {:?}", failed.iter().map(|(c, _, d)| format!("{c}: {d}")).collect::<Vec<_>>());
    }
}

/// Where the project's scripts install their tools (`tests/setup.sh`).
fn tools_dir() -> PathBuf {
    match std::env::var_os("FERRY_TOOLS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".local/share/ferry/tools"),
    }
}

/// `ferry plugin new my-files --lang LANG` writes a plugin that builds with
/// `build` (given its directory; prints the `.wasm` path last) and passes
/// the kit as written, on its own sample shard, with the `--mutate` its
/// README gives. The three languages write the same engine.
fn a_new_plugin_passes_the_kit(lang: &str, build: impl FnOnce(&Path) -> Command) {
    let (tmp, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let dir = tmp.path().join("my-files");
    let new = Command::new(ferry_bin()).args(["plugin", "new", "my-files", "--lang", lang, "--dir"]).arg(&dir).output();
    let new = new.unwrap();
    assert!(new.status.success(), "{lang}: {}", String::from_utf8_lossy(&new.stderr));
    let mutate = "rm \"$FERRY_SHARD_DIR/b.log\"";
    let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
    assert!(readme.contains(&format!("--mutate '{mutate}'")), "{lang}: the README's kit command changed");

    let built = build(&dir).output().unwrap();
    assert!(built.status.success(), "{lang}: {}", String::from_utf8_lossy(&built.stderr));
    let stdout = String::from_utf8(built.stdout).unwrap();
    let wasm = stdout.lines().last().unwrap_or_default().trim();
    let (passed, report) = kit(wasm, &dir.join("sample"), Some(mutate), cache.path());
    let checks = outcomes(&report);
    assert!(passed && checks.iter().all(|(_, o, _)| o == "passed"), "{lang}: {checks:#?}");
    assert_eq!(report["engine"], "my-files", "{lang}");
    assert_eq!(report["contract"], "ferry:engine@0.2.0", "{lang}");

    // Refusals: the directory exists, a name that is not an engine name.
    for (args, want) in [(vec!["my-files"], "exists already"), (vec!["My_Files"], "engine name")] {
        let mut again = Command::new(ferry_bin());
        again.args(["plugin", "new", "--lang", lang]).args(&args).arg("--dir").arg(&dir);
        let out = again.output().unwrap();
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains(want), "{lang}: {args:?}");
    }
}

/// Rust: built with the project's guest toolchain (`guests/build-crate.sh`).
#[test]
fn a_new_rust_plugin_builds_and_passes_the_kit() {
    a_new_plugin_passes_the_kit("rust", |dir| {
        let mut cmd = Command::new("bash");
        cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/build-crate.sh")).arg(dir);
        cmd
    });
}

/// Python: its own `build.sh`, with the componentize-py the setup installed.
#[test]
fn a_new_python_plugin_builds_and_passes_the_kit() {
    a_new_plugin_passes_the_kit("python", |dir| {
        let mut cmd = Command::new(dir.join("build.sh"));
        cmd.env("COMPONENTIZE_PY", tools_dir().join("py/bin/componentize-py"));
        cmd
    });
}

/// JavaScript: its own `build.sh`, with the componentize-js (the same lock)
/// the setup installed for `guests/redis-rdb-js`.
#[test]
fn a_new_javascript_plugin_builds_and_passes_the_kit() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guests/redis-rdb-js/node_modules");
    let modules = [here, tools_dir().join("js/node_modules")]
        .into_iter()
        .find(|m| m.join(".bin/componentize-js").exists())
        .expect("componentize-js is installed (tests/setup.sh)");
    a_new_plugin_passes_the_kit("js", |dir| {
        let mut cmd = Command::new(dir.join("build.sh"));
        cmd.env("FERRY_JS_MODULES", modules);
        cmd
    });
}
