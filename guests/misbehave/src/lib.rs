//! A test-only plugin that misbehaves on demand, to prove the host's sandbox.
//!
//! The shard name picks the behaviour, in every hook:
//! - `loop`: spins forever (the deadline must stop it);
//! - `alloc`: allocates without bound (the memory limit must stop it);
//! - `alloc-slow`: the same, 1 MiB every 10 ms, so that calls overlap;
//! - `panic`: panics with a message the host must show;
//! - `escape`: tries to read and write outside `/shard`; returns `io` with what
//!   was denied, or a plan holding what it could read if anything got out;
//! - `write`: tries to create a file in `/shard`;
//! - `stderr-flood`: writes 10 MiB to stderr, then succeeds;
//! - `log-flood`: calls `log` at level error in a tight loop, forever (the
//!   host must bound and count what reaches its log; the deadline stops it);
//! - `log-newline`: logs a message, and writes a stderr line, holding
//!   "\nFORGED ..." (and a CR), then succeeds: neither may forge a log line;
//! - `apply-symlink`: `create-snapshot` plans one small inline entry
//!   (`control`), `validate` succeeds, and `apply` makes a relative symlink
//!   `link -> ../../../../etc/passwd` in `/shard`, tries an absolute one
//!   `abs -> /etc/passwd` and a hard link `hard` to `control`, logs which it
//!   made, then succeeds (`io` if the relative link was refused). With
//!   wasmtime-wasi 48 the relative link and the hard link are made, the
//!   absolute link is refused; FIFOs, devices and sockets cannot be made
//!   through WASI at all;
//! - `count`: `shard-status` returns how many calls this instance has seen
//!   (always 1 when every call gets a fresh instance);
//! - `garbage-<kind>`: returns a plan the host must reject (`absolute`,
//!   `dotdot`, `duplicate`, `empty-path`, `big-inline`, `many-entries`,
//!   `backslash`, `dot`);
//! - anything else: behaves, with an empty plan.

// For `std::os::wasi::fs::symlink_path` (guests build with RUSTC_BOOTSTRAP).
#![feature(wasi_ext, wasip2)]

wit_bindgen::generate!({
    world: "engine",
    path: "../../wit/v0.1.0",
});

use std::fs;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use exports::ferry::engine::hooks::Guest;
use ferry::engine::log::{Level, log};
use ferry::engine::types::{
    EngineError, EngineInfo, Entry, FileEntry, InlineEntry, ShardPosition, SnapshotMeta, SnapshotPlan,
};

struct Misbehave;

fn meta() -> SnapshotMeta {
    SnapshotMeta { term: 1, position: 1, attributes: Vec::new() }
}

fn inline(path: &str, size: usize) -> Entry {
    Entry::Inline(InlineEntry { path: path.into(), contents: vec![b'x'; size] })
}

fn file(path: &str) -> Entry {
    Entry::File(FileEntry { path: path.into(), offset: 0, length: None })
}

/// Runs the misbehaviour named by `shard`; returns only for the benign ones.
fn misbehave(shard: &str, hook: &str) -> Result<(), EngineError> {
    match shard {
        "loop" => {
            log(Level::Info, &format!("{hook}: looping forever"));
            let mut x: u64 = 0;
            loop {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        "alloc" => {
            log(Level::Info, &format!("{hook}: allocating without bound"));
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "alloc-slow" => {
            log(Level::Info, &format!("{hook}: allocating 1 MiB every 10 ms"));
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                std::hint::black_box(&hoard);
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        "log-flood" => {
            let padding = "x".repeat(100);
            let mut n: u64 = 0;
            loop {
                n += 1;
                log(Level::Error, &format!("{hook}: flood message {n} {padding}"));
            }
        }
        "log-newline" => {
            log(Level::Error, &format!("{hook}: one message\nFORGED ERROR ferry: a host line\rFORGED-CR"));
            eprintln!("{hook}: one stderr line\rFORGED-STDERR\u{1b}[2K");
            Ok(())
        }
        "panic" => panic!("misbehave: deliberate panic in {hook}"),
        "escape" => escape(),
        "write" => match fs::write("/shard/intruder", b"written") {
            Ok(()) => Err(EngineError::Other("wrote /shard/intruder".into())),
            Err(e) => Err(EngineError::Io(format!("write denied: {e}"))),
        },
        "stderr-flood" => {
            let line = [b'e'; 1023];
            let mut stderr = std::io::stderr();
            for _ in 0..10 * 1024 {
                let _ = stderr.write_all(&line);
                let _ = stderr.write_all(b"\n");
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Tries every way out of the preopen it knows. Anything read outside is
/// returned, so a test sees it.
fn escape() -> Result<(), EngineError> {
    let attempts = ["/etc/passwd", "/shard/../../../../etc/passwd", "../etc/passwd", "/", "/shard/.."];
    let mut denied = Vec::new();
    for path in attempts {
        match fs::read(path) {
            Ok(bytes) => {
                return Err(EngineError::Other(format!("ESCAPED: read {} bytes of {path}", bytes.len())));
            }
            Err(e) => denied.push(format!("read {path}: {e}")),
        }
        if let Ok(entries) = fs::read_dir(path) {
            let names: Vec<String> =
                entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            if path != "/shard" && !names.is_empty() {
                return Err(EngineError::Other(format!("ESCAPED: listed {path}: {names:?}")));
            }
        }
    }
    match fs::write("/tmp/ferry-misbehave-escape", b"x") {
        Ok(()) => return Err(EngineError::Other("ESCAPED: wrote /tmp".into())),
        Err(e) => denied.push(format!("write /tmp: {e}")),
    }
    Err(EngineError::Io(format!("denied: {}", denied.join("; "))))
}

/// Makes what `apply-symlink` promises; logs which links WASI let it make.
fn apply_links() -> Result<(), EngineError> {
    use std::os::wasi::fs::symlink_path;
    symlink_path("../../../../etc/passwd", "/shard/link")
        .map_err(|e| EngineError::Io(format!("symlink denied: {e}")))?;
    let absolute = symlink_path("/etc/passwd", "/shard/abs");
    let hard = fs::hard_link("/shard/control", "/shard/hard");
    log(Level::Info, &format!("apply: made link; abs: {absolute:?}; hard: {hard:?}"));
    Ok(())
}

fn garbage_plan(kind: &str) -> Option<SnapshotPlan> {
    let entries = match kind {
        "absolute" => vec![file("/etc/passwd")],
        "dotdot" => vec![file("data/../../outside")],
        "dot" => vec![inline("./control", 1)],
        "duplicate" => vec![inline("control", 1), inline("control", 2)],
        "empty-path" => vec![inline("", 1)],
        "backslash" => vec![inline("a\\..\\b", 1)],
        "big-inline" => vec![inline("control", 17 << 20)],
        "many-entries" => (0..200_000).map(|i| inline(&format!("f{i}"), 0)).collect(),
        _ => return None,
    };
    Some(SnapshotPlan { meta: meta(), entries })
}

impl Guest for Misbehave {
    fn describe() -> EngineInfo {
        EngineInfo { name: "misbehave".into(), plugin_version: env!("CARGO_PKG_VERSION").into(), snapshot_format: 1 }
    }

    fn shard_status(shard: String) -> Result<ShardPosition, EngineError> {
        static CALLS: AtomicU64 = AtomicU64::new(0);
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        misbehave(&shard, "shard-status")?;
        Ok(ShardPosition { term: 1, position: calls })
    }

    fn create_snapshot(shard: String) -> Result<SnapshotPlan, EngineError> {
        if let Some(plan) = shard.strip_prefix("garbage-").and_then(garbage_plan) {
            return Ok(plan);
        }
        if shard == "apply-symlink" {
            return Ok(SnapshotPlan { meta: meta(), entries: vec![inline("control", 9)] });
        }
        misbehave(&shard, "create-snapshot")?;
        Ok(SnapshotPlan { meta: meta(), entries: Vec::new() })
    }

    fn term_check(shard: String, _meta: SnapshotMeta) -> Result<(), EngineError> {
        misbehave(&shard, "term-check")
    }

    fn validate(shard: String, _meta: SnapshotMeta) -> Result<ShardPosition, EngineError> {
        misbehave(&shard, "validate")?;
        Ok(ShardPosition { term: 1, position: 1 })
    }

    fn apply(shard: String, _meta: SnapshotMeta) -> Result<(), EngineError> {
        if shard == "apply-symlink" {
            return apply_links();
        }
        misbehave(&shard, "apply")
    }
}

export!(Misbehave);
