//! Typed errors of loading a plugin and of calling its hooks.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::limits::Queue;
use super::types::{EngineError, ReplyError};

/// A hook of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    Describe,
    ShardStatus,
    CreateSnapshot,
    TermCheck,
    Validate,
    Apply,
    ChangesSince,
    DeltaCheck,
    ApplyChanges,
    Fence,
    Unfence,
    Retire,
    CheckFiles,
}

impl Hook {
    /// The hooks of interface `hooks`, which every contract version has.
    pub const HOOKS: [Hook; 6] =
        [Hook::Describe, Hook::ShardStatus, Hook::CreateSnapshot, Hook::TermCheck, Hook::Validate, Hook::Apply];
    /// The hooks of interface `live` (contract 0.2.0).
    pub const LIVE: [Hook; 6] =
        [Hook::ChangesSince, Hook::DeltaCheck, Hook::ApplyChanges, Hook::Fence, Hook::Unfence, Hook::Retire];
    /// The hooks every 0.2.0 plugin exports: `hooks` and `live`.
    pub const V0_2_0: [Hook; 12] = join(&[&Hook::HOOKS, &Hook::LIVE]);
    /// The hooks of the optional interface `file-checks` (contract 0.2.0).
    pub const FILE_CHECKS: [Hook; 1] = [Hook::CheckFiles];
    /// Every hook of every contract version.
    pub const ALL: [Hook; 13] = join(&[&Hook::V0_2_0, &Hook::FILE_CHECKS]);

    /// The hook's name in WIT.
    pub fn name(self) -> &'static str {
        match self {
            Hook::Describe => "describe",
            Hook::ShardStatus => "shard-status",
            Hook::CreateSnapshot => "create-snapshot",
            Hook::TermCheck => "term-check",
            Hook::Validate => "validate",
            Hook::Apply => "apply",
            Hook::ChangesSince => "changes-since",
            Hook::DeltaCheck => "delta-check",
            Hook::ApplyChanges => "apply-changes",
            Hook::Fence => "fence",
            Hook::Unfence => "unfence",
            Hook::Retire => "retire",
            Hook::CheckFiles => "check-files",
        }
    }

    pub fn from_name(name: &str) -> Option<Hook> {
        Hook::ALL.into_iter().find(|h| h.name() == name)
    }
}

/// The hooks of `parts`, in order, as one array of exactly their number.
const fn join<const N: usize>(parts: &[&[Hook]]) -> [Hook; N] {
    let mut out = [Hook::Describe; N];
    let (mut at, mut part) = (0, 0);
    while part < parts.len() {
        let mut i = 0;
        while i < parts[part].len() {
            out[at] = parts[part][i];
            at += 1;
            i += 1;
        }
        part += 1;
    }
    assert!(at == N, "the parts hold another number of hooks");
    out
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A plugin file was refused.
#[derive(Debug, thiserror::Error)]
#[error("plugin {}: {kind}", path.display())]
pub struct LoadError {
    pub path: PathBuf,
    pub kind: LoadErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadErrorKind {
    #[error("cannot read it: {0}")]
    Read(std::io::Error),
    #[error("is not a WebAssembly file (no \\0asm header)")]
    NotWasm,
    #[error(
        "is a core WebAssembly module, not a component: build the plugin for wasm32-wasip2 \
         (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule,
    #[error("has an unknown WebAssembly binary version {0:02x?}")]
    UnknownBinaryVersion([u8; 4]),
    #[error("is not a valid component: {0}")]
    Compile(String),
    #[error("exports no Ferry engine interface (want {want}); it exports: {exports}")]
    NoHooks { want: &'static str, exports: String },
    #[error("implements contract {found}, which this host does not support (supported: {supported})")]
    UnsupportedVersion { found: String, supported: &'static str },
    /// A contract version's interface is not exported at all.
    #[error("implements {contract} but does not export {interface}")]
    MissingInterface { contract: &'static str, interface: &'static str },
    #[error("exports {interface} without {}", missing.join(", "))]
    MissingExports { interface: String, missing: Vec<String> },
    #[error("needs imports Ferry does not provide: {0}")]
    Imports(String),
    #[error("does not match the contract: {0}")]
    Mismatch(String),
    #[error("describe failed: {0}")]
    Describe(Box<HookError>),
    #[error("declares engine {name:?}, already loaded from {}", other.display())]
    Duplicate { name: String, other: PathBuf },
}

/// A hook call failed. Names the plugin and the hook.
#[derive(Debug, thiserror::Error)]
#[error("plugin {plugin}: {hook}: {kind}")]
pub struct HookError {
    pub plugin: String,
    pub hook: Hook,
    pub kind: HookErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum HookErrorKind {
    /// The engine said no, through the contract.
    #[error("{0}")]
    Engine(EngineError),
    #[error("deadline of {0:?} exceeded")]
    Deadline(Duration),
    /// The deadline passed before the call could start: it waited in a queue
    /// the whole time, behind `behind` other calls.
    #[error("deadline of {deadline:?} exceeded while queued behind {behind} other calls for {queue}")]
    Queued { deadline: Duration, behind: usize, queue: Queue },
    #[error("memory limit of {limit} bytes exceeded")]
    MemoryLimit { limit: usize },
    #[error("guest panicked: {0}")]
    Panic(String),
    #[error("guest trapped: {0}")]
    Trap(String),
    #[error("invalid reply: {0}")]
    BadReply(ReplyError),
    #[error("cannot prepare the sandbox: {0}")]
    Sandbox(String),
    /// The plugin's contract has no such hook (a live hook of a 0.1.0
    /// plugin); nothing was called.
    #[error("unsupported by contract {contract}")]
    Unsupported { contract: &'static str },
}

impl HookErrorKind {
    /// A short name of the failure, for metrics' `outcome` label.
    pub fn outcome(&self) -> &'static str {
        match self {
            HookErrorKind::Engine(_) => "engine_error",
            HookErrorKind::Deadline(_) => "deadline",
            HookErrorKind::Queued { .. } => "queued",
            HookErrorKind::MemoryLimit { .. } => "memory_limit",
            HookErrorKind::Panic(_) => "panic",
            HookErrorKind::Trap(_) => "trap",
            HookErrorKind::BadReply(_) => "bad_reply",
            HookErrorKind::Sandbox(_) => "sandbox",
            HookErrorKind::Unsupported { .. } => "unsupported",
        }
    }
}

impl HookError {
    /// The engine's own error, if the engine reported one.
    pub fn engine_error(&self) -> Option<&EngineError> {
        match &self.kind {
            HookErrorKind::Engine(e) => Some(e),
            _ => None,
        }
    }
}
