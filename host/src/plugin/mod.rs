//! Engine plugins: WebAssembly components that implement the WIT contract in
//! `wit/` (`ferry:engine`).
//!
//! Lifecycle, explicitly:
//! 1. [`PluginRuntime::new`] builds one wasmtime engine for the node (epoch
//!    deadlines, pooling allocator where possible) and its linker.
//! 2. [`PluginRuntime::load`] reads a file, compiles it (or takes it from the
//!    compiled cache), finds which contract version it implements, checks its
//!    exports and imports, pre-instantiates it and calls `describe`.
//! 3. [`Registry`] maps engine names to loaded plugins.
//! 4. Each hook call ([`Plugin::create_snapshot`], …) queues for a call slot
//!    of its plugin, an instance slot and memory out of the node's budget,
//!    then runs in a fresh instance that sees only the call's directory, under
//!    a deadline (queueing included) and a memory limit, its log bounded.

mod bindings;
mod cache;
mod error;
mod limits;
#[allow(clippy::module_inception)]
mod plugin;
mod registry;
mod runtime;
mod sandbox;
pub mod types;

pub use error::{Hook, HookError, HookErrorKind, LoadError, LoadErrorKind};
pub use limits::{MemoryUsage, Queue};
pub use plugin::{BenchInstance, CONTRACTS, ContractVersion, MAX_CHECK_PATHS, Plugin};
pub use registry::Registry;
pub use runtime::{
    DEFAULT_MAX_CALLS_PER_ENGINE, DEFAULT_MEMORY_BUDGET, DEFAULT_MEMORY_LIMIT, EPOCH_TICK, HookDeadlines,
    PluginRuntime, RuntimeConfig, RuntimeError,
};
pub use sandbox::{GUEST_SHARD_DIR, LOG_BURST, LOG_MAX_BYTES, LOG_MAX_MESSAGES, LOG_RATE};
pub use types::{
    DeltaEntry, DeltaMeta, DeltaPlan, EngineError, EngineInfo, FenceInfo, FileLock, PlanEntry, ShardPosition,
    SnapshotMeta, SnapshotPlan,
};
