//! Loading plugins: every way a file can be wrong is refused with an error
//! that names the file and the problem; the compiled cache; the registry.

use std::path::{Path, PathBuf};

use ferry::plugin::{
    ContractVersion, Hook, HookErrorKind, LoadError, LoadErrorKind, PluginRuntime, Registry, RuntimeConfig,
    ShardPosition,
};
use ferry_tests::plugins;

/// A component that exports an instance `name` holding functions `funcs`,
/// each `func() -> u32` (the wrong type for every real hook).
pub fn component_exporting(name: &str, funcs: &[&str]) -> Vec<u8> {
    let exports: String = funcs.iter().map(|f| format!("(export \"{f}\" (func $f))")).collect();
    wat::parse_str(format!(
        r#"(component
            (core module $m (func (export "f") (result i32) i32.const 0))
            (core instance $i (instantiate $m))
            (func $f (result u32) (canon lift (core func $i "f")))
            (instance $hooks {exports})
            (export "{name}" (instance $hooks)))"#
    ))
    .unwrap()
}

/// A component that exports instances `(name, funcs)`, each function
/// `func() -> u32` (the wrong type for every real hook).
pub fn component_exporting_all(instances: &[(&str, &[&str])]) -> Vec<u8> {
    let exports: String = instances
        .iter()
        .enumerate()
        .map(|(i, (name, funcs))| {
            let funcs: String = funcs.iter().map(|f| format!("(export \"{f}\" (func $f))")).collect();
            format!("(instance $i{i} {funcs}) (export \"{name}\" (instance $i{i}))")
        })
        .collect();
    wat::parse_str(format!(
        r#"(component
            (core module $m (func (export "f") (result i32) i32.const 0))
            (core instance $i (instantiate $m))
            (func $f (result u32) (canon lift (core func $i "f")))
            {exports})"#
    ))
    .unwrap()
}

const LIVE_HOOKS: [&str; 6] = ["changes-since", "delta-check", "apply-changes", "fence", "unfence", "retire"];

const ALL_HOOKS: [&str; 6] = ["describe", "shard-status", "create-snapshot", "term-check", "validate", "apply"];

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

async fn load_err(bytes: &[u8]) -> LoadError {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "bad.wasm", bytes);
    let runtime = PluginRuntime::new(RuntimeConfig::default()).unwrap();
    let err = runtime.load(&path).await.err().expect("the plugin must be refused");
    assert!(err.to_string().contains("bad.wasm"), "error names the file: {err}");
    err
}

#[tokio::test]
async fn not_wasm() {
    let err = load_err(b"#!/bin/sh\necho hi\n").await;
    assert!(matches!(err.kind, LoadErrorKind::NotWasm), "{err}");
    let err = load_err(b"").await;
    assert!(matches!(err.kind, LoadErrorKind::NotWasm), "{err}");
}

#[tokio::test]
async fn core_module() {
    let err = load_err(&wat::parse_str("(module (func (export \"f\")))").unwrap()).await;
    assert!(matches!(err.kind, LoadErrorKind::CoreModule), "{err}");
    assert!(err.to_string().contains("not a component"), "{err}");
}

#[tokio::test]
async fn truncated_component() {
    let wasm = std::fs::read(plugins::SEGMENT_LOG).unwrap();
    let err = load_err(&wasm[..wasm.len() / 2]).await;
    assert!(matches!(err.kind, LoadErrorKind::Compile(_)), "{err}");
}

#[tokio::test]
async fn unknown_binary_version() {
    let err = load_err(b"\0asm\x02\x00\x00\x00rest").await;
    assert!(matches!(err.kind, LoadErrorKind::UnknownBinaryVersion(_)), "{err}");
}

#[tokio::test]
async fn component_of_another_world() {
    let err = load_err(&wat::parse_str("(component)").unwrap()).await;
    assert!(matches!(&err.kind, LoadErrorKind::NoHooks { exports, .. } if exports == "nothing"), "{err}");
    let err = load_err(&component_exporting("wasi:cli/run@0.2.0", &["run"])).await;
    assert!(err.to_string().contains("exports no Ferry engine interface"), "{err}");
    assert!(err.to_string().contains("wasi:cli/run@0.2.0"), "{err}");
}

#[tokio::test]
async fn another_contract_version() {
    let err = load_err(&component_exporting("ferry:engine/hooks@0.0.9", &ALL_HOOKS)).await;
    match &err.kind {
        LoadErrorKind::UnsupportedVersion { found, supported } => {
            assert_eq!(found, "ferry:engine/hooks@0.0.9");
            assert_eq!(*supported, "ferry:engine/hooks@0.2.0, ferry:engine/hooks@0.1.0");
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn missing_exports() {
    let err = load_err(&component_exporting("ferry:engine/hooks@0.1.0", &["describe", "validate"])).await;
    match &err.kind {
        LoadErrorKind::MissingExports { missing, .. } => {
            assert_eq!(missing, &["shard-status", "create-snapshot", "term-check", "apply"]);
        }
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn contract_0_2_0_loads_with_its_live_hooks() {
    let runtime = PluginRuntime::new(RuntimeConfig::default()).unwrap();
    let live = runtime.load(Path::new(plugins::SEGMENT_LOG)).await.unwrap();
    assert_eq!(live.contract(), ContractVersion::V0_2_0);
    assert_eq!(live.contract().package(), "ferry:engine@0.2.0");
    assert_eq!(live.contract().hooks(), &Hook::V0_2_0);
    assert!(live.contract().has(Hook::Fence) && live.contract().has(Hook::ChangesSince));
    // It implements world `engine-with-file-checks`: the optional
    // interface is found and typed at load.
    assert!(live.checks_files());
    assert_eq!(live.hooks(), Hook::ALL.to_vec());

    // A 0.1.0 plugin loads as before and says, typed, that it has no live
    // hooks; nothing runs.
    let old = runtime.load(Path::new(plugins::MISBEHAVE)).await.unwrap();
    assert_eq!(old.contract(), ContractVersion::V0_1_0);
    assert_eq!(old.contract().hooks(), &Hook::HOOKS);
    assert!(!old.checks_files());
    let dir = tempfile::tempdir().unwrap();
    let err = old.fence("s1", dir.path(), 1).await.unwrap_err();
    assert!(matches!(err.kind, HookErrorKind::Unsupported { contract: "ferry:engine@0.1.0" }), "{err}");
    assert!(err.to_string().contains("fence: unsupported by contract ferry:engine@0.1.0"), "{err}");
    let meta = ferry::plugin::SnapshotMeta { term: 1, position: 0, attributes: Vec::new() };
    let err = old.check_files("s1", dir.path(), &meta, &["a".to_owned()]).await.unwrap_err();
    assert!(matches!(err.kind, HookErrorKind::Unsupported { .. }), "{err}");
    let err = old.changes_since("s1", dir.path(), ShardPosition { term: 1, position: 0 }).await.unwrap_err();
    assert!(matches!(err.kind, HookErrorKind::Unsupported { .. }), "{err}");
    assert!(ferry_tests::tree(dir.path()).is_empty());
}

#[tokio::test]
async fn contract_0_2_0_without_a_live_export_is_refused() {
    let err = load_err(&component_exporting_all(&[("ferry:engine/hooks@0.2.0", &ALL_HOOKS)])).await;
    match &err.kind {
        LoadErrorKind::MissingInterface { contract, interface } => {
            assert_eq!((*contract, *interface), ("ferry:engine@0.2.0", "ferry:engine/live@0.2.0"));
        }
        other => panic!("{other}"),
    }

    let wasm = component_exporting_all(&[
        ("ferry:engine/hooks@0.2.0", &ALL_HOOKS),
        ("ferry:engine/live@0.2.0", &LIVE_HOOKS[..5]),
    ]);
    let err = load_err(&wasm).await;
    match &err.kind {
        LoadErrorKind::MissingExports { interface, missing } => {
            assert_eq!(interface, "ferry:engine/live@0.2.0");
            assert_eq!(missing, &["retire"]);
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("without retire"), "{err}");

    // All there, but of the wrong types: refused when loaded.
    let wasm =
        component_exporting_all(&[("ferry:engine/hooks@0.2.0", &ALL_HOOKS), ("ferry:engine/live@0.2.0", &LIVE_HOOKS)]);
    assert!(matches!(load_err(&wasm).await.kind, LoadErrorKind::Mismatch(_)));
}

#[tokio::test]
async fn wrong_hook_types() {
    let err = load_err(&component_exporting("ferry:engine/hooks@0.1.0", &ALL_HOOKS)).await;
    assert!(matches!(err.kind, LoadErrorKind::Mismatch(_)), "{err}");
}

#[tokio::test]
async fn imports_the_host_does_not_provide() {
    let exports: String = ALL_HOOKS.iter().map(|f| format!("(export \"{f}\" (func $f))")).collect();
    let wasm = wat::parse_str(format!(
        r#"(component
            (import "wasi:http/outgoing-handler@0.2.0" (instance $http (export "handle" (func))))
            (core module $m (func (export "f") (result i32) i32.const 0))
            (core instance $i (instantiate $m))
            (func $f (result u32) (canon lift (core func $i "f")))
            (instance $hooks {exports})
            (export "ferry:engine/hooks@0.1.0" (instance $hooks)))"#
    ))
    .unwrap();
    let err = load_err(&wasm).await;
    assert!(matches!(err.kind, LoadErrorKind::Imports(_)), "{err}");
    assert!(err.to_string().contains("wasi:http/outgoing-handler"), "{err}");
}

#[tokio::test]
async fn compiled_cache_hits_and_survives_a_damaged_entry() {
    let cache = tempfile::tempdir().unwrap();
    let config = RuntimeConfig { cache_dir: Some(cache.path().to_owned()), ..RuntimeConfig::default() };
    let runtime = PluginRuntime::new(config.clone()).unwrap();
    let first = runtime.load(Path::new(plugins::SEGMENT_LOG)).await.unwrap();
    assert!(!first.from_cache());
    let entries = ferry_tests::tree(cache.path());
    assert_eq!(entries.len(), 1, "{entries:?}");

    // A restarted node (a new runtime) loads the compiled form.
    let runtime = PluginRuntime::new(config.clone()).unwrap();
    let second = runtime.load(Path::new(plugins::SEGMENT_LOG)).await.unwrap();
    assert!(second.from_cache());
    second.describe().await.unwrap();

    // A damaged entry is recompiled and replaced, not trusted.
    let entry = cache.path().join(&entries[0]);
    std::fs::write(&entry, b"not a compiled component").unwrap();
    let runtime = PluginRuntime::new(config).unwrap();
    let third = runtime.load(Path::new(plugins::SEGMENT_LOG)).await.unwrap();
    assert!(!third.from_cache());
    third.describe().await.unwrap();
    assert_ne!(std::fs::read(&entry).unwrap(), b"not a compiled component");
}

#[tokio::test]
async fn registry_loads_a_directory_and_refuses_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(plugins::SEGMENT_LOG, dir.path().join("a.wasm")).unwrap();
    std::fs::copy(plugins::MISBEHAVE, dir.path().join("b.wasm")).unwrap();
    std::fs::write(dir.path().join("README.txt"), "not a plugin").unwrap();
    let runtime = PluginRuntime::new(RuntimeConfig::default()).unwrap();
    let registry = Registry::load_dir(&runtime, dir.path()).await.unwrap();
    assert_eq!(registry.len(), 2);
    assert!(registry.get("segment-log").is_some() && registry.get("misbehave").is_some());

    std::fs::copy(plugins::SEGMENT_LOG, dir.path().join("c.wasm")).unwrap();
    let err = Registry::load_dir(&runtime, dir.path()).await.err().unwrap();
    assert!(matches!(&err.kind, LoadErrorKind::Duplicate { name, .. } if name == "segment-log"), "{err}");
    assert!(err.to_string().contains("c.wasm") && err.to_string().contains("a.wasm"), "{err}");
}
