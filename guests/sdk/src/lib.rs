//! Ferry's guest SDK: write an engine plugin for contract
//! `ferry:engine@0.2.0` (`wit/v0.2.0/engine.wit`) without generating
//! bindings yourself.
//!
//! ```ignore
//! use ferry_plugin_sdk::{EngineError, EngineInfo, Hooks, Live, ShardPosition, ...};
//!
//! struct MyEngine;
//! impl Hooks for MyEngine { /* describe, shard-status, create-snapshot, ... */ }
//! impl Live for MyEngine { /* changes-since, ..., fence, unfence, retire */ }
//! impl FileChecks for MyEngine { /* check-files */ }
//! ferry_plugin_sdk::export_engine!(MyEngine);
//! ```
//!
//! The SDK builds world `engine-with-file-checks`: `check-files` checks
//! single files of a received snapshot while the rest still streams, and
//! `validate` then checks only what spans files. An engine whose checks all
//! need the whole shard accepts every path there and checks in `validate`.
//!
//! Every hook call runs in a fresh instance with the shard directory at
//! [`SHARD`]; what must last goes to the engine's own files.

use std::fmt::Display;
use std::path::Path;

wit_bindgen::generate!({
    world: "engine-with-file-checks",
    path: "../../wit/v0.2.0",
    pub_export_macro: true,
    export_macro_name: "export_engine",
    default_bindings_module: "ferry_plugin_sdk",
});

pub use exports::ferry::engine::file_checks::Guest as FileChecks;
pub use exports::ferry::engine::hooks::Guest as Hooks;
pub use exports::ferry::engine::live::Guest as Live;
pub use ferry::engine::log::Level;
pub use ferry::engine::types::{
    BlockDiffEntry, DeltaEntry, DeltaMeta, DeltaPlan, EngineError, EngineInfo, Entry, FenceInfo, FileEntry, FileLock,
    InlineEntry, RangeEntry, ShardPosition, SnapshotMeta, SnapshotPlan,
};

/// Where every hook sees the shard (read-only, except where the contract
/// says read-write).
pub const SHARD: &str = "/shard";

/// The shard directory of this call.
pub fn shard() -> &'static Path {
    Path::new(SHARD)
}

/// Reading or writing `name` failed.
pub fn io_error(name: &str, e: std::io::Error) -> EngineError {
    EngineError::Io(format!("{name}: {e}"))
}

/// The shard's file `name` is not what the engine expects.
pub fn invalid(name: &str, what: impl Display) -> EngineError {
    EngineError::Invalid(format!("{name}: {what}"))
}

/// The value of a meta's attribute `key` (snapshot and delta metas carry
/// them as key/value pairs).
pub fn attribute<'a>(attributes: &'a [(String, String)], key: &str) -> Option<&'a str> {
    attributes.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// A line in the host's log, in the span of this plugin, hook and shard.
pub fn log(level: Level, message: &str) {
    ferry::engine::log::log(level, message);
}

pub fn info(message: &str) {
    log(Level::Info, message);
}
