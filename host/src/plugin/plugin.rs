//! A loaded plugin and its hook calls.
//!
//! Every call gets a fresh instance from the pre-instantiated component, so
//! nothing leaks between shards or calls; the instance sees only the call's
//! directory and dies with the call. Before it instantiates, a call queues
//! for a call slot of its plugin, an instance slot of the node and its memory
//! limit out of the node's budget (see `limits`); the wait counts against its
//! deadline.
//!
//! # Cancel safety
//! Every hook method is cancel safe: dropping its future drops the instance
//! and its store. A hook that was writing (`apply`) may have written part of
//! its files, which is why the host only ever runs it on a staging directory.
//! The live hooks that write (`apply-changes`, `fence`, `unfence`, `retire`)
//! are idempotent by contract: a dropped call is repeated, not undone.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::Instrument;
use wasmtime::component::{Instance, InstancePre};
use wasmtime::{Store, Trap, UpdateDeadline};

use super::bindings::{v0_1_0 as v1, v0_2_0 as v2};
use super::error::{Hook, HookError, HookErrorKind, LoadErrorKind};
use super::limits::{Gate, MIB, MemoryAccount, MemoryUsage, Queue, Reservation, Slot};
use super::runtime::{RuntimeConfig, error_chain};
use super::sandbox::{Access, CallState, MemoryLimitExceeded, log_output_tail, panic_message};
use super::types::{
    DeltaMeta, DeltaPlan, EngineError, EngineInfo, FenceInfo, ShardPosition, SnapshotMeta, SnapshotPlan,
    escape_guest_text,
};

/// Most paths one `check-files` call gets (the contract's bound).
pub const MAX_CHECK_PATHS: usize = 4096;

/// The contract versions this host implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContractVersion {
    V0_1_0,
    /// Adds interface `live`: catch-up deltas, fence, unfence, retire.
    V0_2_0,
}

/// Every contract version this host loads, as `ferry --version` and the
/// `ferry_build_info` metric show them.
pub const CONTRACTS: &str = "ferry:engine@0.1.0,ferry:engine@0.2.0";

impl ContractVersion {
    pub const ALL: [ContractVersion; 2] = [ContractVersion::V0_1_0, ContractVersion::V0_2_0];

    pub fn package(self) -> &'static str {
        match self {
            ContractVersion::V0_1_0 => "ferry:engine@0.1.0",
            ContractVersion::V0_2_0 => "ferry:engine@0.2.0",
        }
    }

    /// The hooks a plugin of this version exports.
    pub fn hooks(self) -> &'static [Hook] {
        match self {
            ContractVersion::V0_1_0 => &Hook::HOOKS,
            ContractVersion::V0_2_0 => &Hook::V0_2_0,
        }
    }

    /// Whether plugins of this version have `hook`.
    pub fn has(self, hook: Hook) -> bool {
        self.hooks().contains(&hook)
    }
}

/// A pre-instantiated component of one contract version.
pub(super) enum Pre {
    V1(v1::EnginePre<CallState>),
    V2(v2::EnginePre<CallState>),
}

impl Pre {
    fn instance_pre(&self) -> &InstancePre<CallState> {
        match self {
            Pre::V1(pre) => pre.instance_pre(),
            Pre::V2(pre) => pre.instance_pre(),
        }
    }
}

/// A live instance's typed exports, of its contract version.
enum Bindings {
    V1(v1::Engine),
    V2(v2::Engine),
}

/// The 0.2.0 exports of a call that [`Plugin::instantiate_live`] made.
fn live(bindings: &Bindings) -> &v2::Engine {
    match bindings {
        Bindings::V2(b) => b,
        Bindings::V1(_) => unreachable!("live hooks are refused for contract 0.1.0 before instantiating"),
    }
}

/// Runs `$body` with `$b` bound to the call's typed exports and `v` naming
/// the bindings module of its contract version, for a hook every version has.
/// The body converts the guest's reply to host types.
macro_rules! each_version {
    ($call:ident, |$b:ident| $body:expr) => {
        match &$call.bindings {
            Bindings::V1($b) => {
                #[allow(unused_imports)]
                use super::bindings::v0_1_0 as v;
                $body
            }
            Bindings::V2($b) => {
                #[allow(unused_imports)]
                use super::bindings::v0_2_0 as v;
                $body
            }
        }
    };
}

/// What every plugin of one runtime shares.
pub(super) struct PluginShared {
    pub engine: wasmtime::Engine,
    pub config: RuntimeConfig,
    /// The node's instance slots.
    pub instances: Gate,
    /// The node's memory budget, in MiB.
    pub memory: Gate,
    pub account: Arc<MemoryAccount>,
}

impl PluginShared {
    /// See [`PluginRuntime::memory`](super::PluginRuntime::memory).
    pub fn memory_usage(&self) -> MemoryUsage {
        self.account.usage(self.config.memory_budget)
    }

    pub fn reset_memory_peaks(&self) {
        self.account.reset_peaks();
    }
}

/// A loaded, checked plugin. Cheap to share (`Arc`) across tasks.
pub struct Plugin {
    shared: Arc<PluginShared>,
    path: PathBuf,
    contract: ContractVersion,
    pre: Pre,
    info: Option<EngineInfo>,
    compile_time: Duration,
    cached: bool,
    /// BLAKE3 of the component's bytes: which build this is.
    hash: String,
    /// This plugin's call slots.
    calls: Gate,
    /// Whether it exports the optional interface `file-checks` (0.2.0).
    file_checks: bool,
}

/// A live instance for one call.
struct Call {
    store: Store<CallState>,
    instance: Instance,
    bindings: Bindings,
    /// Declared last, so dropped after the store: its slots are free by then.
    _slot: Slot,
}

impl Plugin {
    pub(super) fn new(
        shared: Arc<PluginShared>,
        path: PathBuf,
        contract: ContractVersion,
        pre: Pre,
        compile_time: Duration,
        cached: bool,
        hash: String,
    ) -> Plugin {
        let slots = shared.config.max_calls_per_engine;
        let calls = Gate::new(slots, Queue::EngineCalls(slots));
        Plugin { shared, path, contract, pre, info: None, compile_time, cached, hash, calls, file_checks: false }
    }

    pub(super) fn with_file_checks(mut self, file_checks: bool) -> Plugin {
        self.file_checks = file_checks;
        self
    }

    /// Whether the plugin checks single files while a snapshot streams
    /// (it exports `file-checks`); its `validate` then relies on them.
    pub fn checks_files(&self) -> bool {
        self.file_checks
    }

    /// The hooks this plugin exports: its contract's, and `check-files` if
    /// it has it.
    pub fn hooks(&self) -> Vec<Hook> {
        let mut hooks = self.contract.hooks().to_vec();
        if self.file_checks {
            hooks.extend(Hook::FILE_CHECKS);
        }
        hooks
    }

    /// BLAKE3 (hex) of the component's bytes: two nodes run the same build
    /// of a plugin when their hashes agree.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    pub(super) fn with_info(mut self, info: EngineInfo) -> Plugin {
        self.info = Some(info);
        self
    }

    /// The plugin's identity, as `describe` returned it when loaded.
    pub fn info(&self) -> &EngineInfo {
        self.info.as_ref().expect("a loaded plugin has been described")
    }

    /// The engine name; during loading, the file name.
    pub fn name(&self) -> String {
        match &self.info {
            Some(info) => info.name.clone(),
            None => self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contract(&self) -> ContractVersion {
        self.contract
    }

    /// How long compiling (or loading from the cache) took.
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// Whether the compiled component came from the on-disk cache.
    pub fn from_cache(&self) -> bool {
        self.cached
    }

    fn error(&self, hook: Hook, kind: HookErrorKind) -> HookError {
        HookError { plugin: self.name(), hook, kind }
    }

    /// The span of a call: every line of the call, the guest's included, is
    /// inside it. At level ERROR so that any filter that lets a line of the
    /// call through also keeps the span: without it a guest's line would
    /// not say whose it is.
    fn span(&self, hook: Hook, shard: &str) -> tracing::Span {
        tracing::error_span!("plugin", plugin = %self.name(), hook = hook.name(), shard)
    }

    /// Runs one hook call in its span, and counts its outcome and time.
    async fn observed<T>(
        &self,
        hook: Hook,
        shard: &str,
        call: impl std::future::Future<Output = Result<T, HookError>>,
    ) -> Result<T, HookError> {
        let started = Instant::now();
        let result = call.instrument(self.span(hook, shard)).await;
        let outcome = result.as_ref().map_or_else(|e| e.kind.outcome(), |_| "ok");
        crate::metrics::global().hook_call(&self.name(), hook.name(), outcome, started.elapsed());
        result
    }

    /// A fresh instance whose deadline covers queueing, instantiation and
    /// the call.
    async fn instantiate(&self, hook: Hook, dir: Option<(&Path, Access)>) -> Result<Call, HookError> {
        // Locals drop in reverse order: the store before the slot.
        let (slot, mut store, instance) = self.instantiate_raw(hook, dir).await?;
        match self.bindings(&mut store, &instance) {
            Ok(bindings) => Ok(Call { store, instance, bindings, _slot: slot }),
            Err(e) => Err(self.trap(hook, &store, e)),
        }
    }

    fn bindings(&self, store: &mut Store<CallState>, instance: &Instance) -> wasmtime::Result<Bindings> {
        Ok(match self.contract {
            ContractVersion::V0_1_0 => Bindings::V1(v1::Engine::new(store, instance)?),
            ContractVersion::V0_2_0 => Bindings::V2(v2::Engine::new(store, instance)?),
        })
    }

    /// Waits for this plugin's call slot, the node's instance slot and the
    /// call's memory, in that order (so a call holds node-wide units only
    /// once its engine let it through), until `deadline`.
    async fn admit(&self, hook: Hook, deadline: Instant) -> Result<Slot, HookError> {
        let shared = &self.shared;
        let queued = |(queue, behind)| {
            self.error(hook, HookErrorKind::Queued { deadline: shared.config.deadlines.get(hook), behind, queue })
        };
        let engine = self.calls.enter(1, deadline).await.map_err(queued)?;
        let instance = shared.instances.enter(1, deadline).await.map_err(queued)?;
        let limit = shared.config.memory_limit;
        let units = u32::try_from(limit.div_ceil(MIB)).unwrap_or(u32::MAX);
        let memory = shared.memory.enter(units, deadline).await.map_err(queued)?;
        let memory = Reservation::new(memory, shared.account.clone(), limit);
        Ok(Slot { _engine: engine, _instance: instance, _memory: memory })
    }

    /// Returns the slot with the store; the caller must drop the store first.
    async fn instantiate_raw(
        &self,
        hook: Hook,
        dir: Option<(&Path, Access)>,
    ) -> Result<(Slot, Store<CallState>, Instance), HookError> {
        let config = &self.shared.config;
        let deadline = Instant::now() + config.deadlines.get(hook);
        let slot = self.admit(hook, deadline).await?;
        let state = CallState::new(dir, config.memory_limit, self.shared.account.clone())
            .map_err(|e| self.error(hook, HookErrorKind::Sandbox(e.to_string())))?;
        let mut store = Store::new(&self.shared.engine, state);
        store.limiter(|state| &mut state.limiter);
        set_deadline(&mut store, deadline);
        match self.pre.instance_pre().instantiate_async(&mut store).await {
            Ok(instance) => Ok((slot, store, instance)),
            Err(e) => {
                let err = self.trap(hook, &store, e);
                drop(store);
                drop(slot);
                Err(err)
            }
        }
    }

    /// At load: checks every hook's signature on a probe instance, then asks
    /// the plugin who it is.
    pub(super) async fn probe(&self) -> Result<EngineInfo, LoadErrorKind> {
        let hook = Hook::Describe;
        let describe_failed = |e| LoadErrorKind::Describe(Box::new(e));
        async {
            let (slot, mut store, instance) = self.instantiate_raw(hook, None).await.map_err(describe_failed)?;
            match self.contract {
                ContractVersion::V0_1_0 => v1::typecheck(&mut store, &instance),
                ContractVersion::V0_2_0 => v2::typecheck(&mut store, &instance),
            }
            .map_err(LoadErrorKind::Mismatch)?;
            if self.file_checks {
                v2::typecheck_file_checks(&mut store, &instance).map_err(LoadErrorKind::Mismatch)?;
            }
            let bindings =
                self.bindings(&mut store, &instance).map_err(|e| LoadErrorKind::Mismatch(error_chain(&e)))?;
            let call = Call { store, instance, bindings, _slot: slot };
            self.call_describe(call).await.map_err(describe_failed)
        }
        .instrument(self.span(hook, ""))
        .await
    }

    /// Turns a wasmtime error into what went wrong, in words an operator can use.
    fn trap(&self, hook: Hook, store: &Store<CallState>, err: wasmtime::Error) -> HookError {
        let state = store.data();
        let limit = self.shared.config.memory_limit;
        if err.downcast_ref::<MemoryLimitExceeded>().is_some() || state.limiter.exceeded.is_some() {
            return self.error(hook, HookErrorKind::MemoryLimit { limit });
        }
        if let Some(Trap::Interrupt) = err.downcast_ref::<Trap>() {
            return self.error(hook, HookErrorKind::Deadline(self.shared.config.deadlines.get(hook)));
        }
        let (stderr, _) = state.stderr.text();
        // What the guest printed goes into errors, and so into the node's
        // log: escaped, like its log messages.
        if let Some(message) = panic_message(&stderr) {
            return self.error(hook, HookErrorKind::Panic(escape_guest_text(&message).into_owned()));
        }
        let mut message = error_chain(&err);
        let last_lines: Vec<&str> = stderr.lines().rev().take(5).collect();
        if !last_lines.is_empty() {
            message.push_str("; stderr: ");
            let lines: Vec<_> = last_lines.into_iter().rev().map(escape_guest_text).collect();
            message.push_str(&lines.join(" | "));
        }
        self.error(hook, HookErrorKind::Trap(message))
    }

    /// Logs what the guest printed and what of its log was dropped, then
    /// maps the call's outcome.
    fn finish<T, R>(
        &self,
        hook: Hook,
        mut call: Call,
        result: wasmtime::Result<Result<T, EngineError>>,
        convert: impl FnOnce(T) -> Result<R, HookErrorKind>,
    ) -> Result<R, HookError> {
        log_output_tail("stdout", &call.store.data().stdout);
        log_output_tail("stderr", &call.store.data().stderr);
        call.store.data_mut().log.report();
        match result {
            Ok(Ok(value)) => convert(value).map_err(|kind| self.error(hook, kind)),
            Ok(Err(engine_error)) => Err(self.error(hook, HookErrorKind::Engine(engine_error))),
            Err(e) => Err(self.trap(hook, &call.store, e)),
        }
    }

    /// The plugin's identity.
    pub async fn describe(&self) -> Result<EngineInfo, HookError> {
        let hook = Hook::Describe;
        self.observed(hook, "", async {
            let call = self.instantiate(hook, None).await?;
            self.call_describe(call).await
        })
        .await
    }

    async fn call_describe(&self, mut call: Call) -> Result<EngineInfo, HookError> {
        let result = each_version!(call, |b| {
            b.ferry_engine_hooks().call_describe(&mut call.store).await.map(|info| Ok(EngineInfo::from(info)))
        });
        self.finish(Hook::Describe, call, result, |info| info.check().map_err(HookErrorKind::BadReply))
    }

    /// The shard's current term and position; `dir` is the live shard.
    pub async fn shard_status(&self, shard: &str, dir: &Path) -> Result<ShardPosition, HookError> {
        let hook = Hook::ShardStatus;
        self.observed(hook, shard, async {
            let mut call = self.instantiate(hook, Some((dir, Access::ReadOnly))).await?;
            let result = each_version!(call, |b| {
                let result = b.ferry_engine_hooks().call_shard_status(&mut call.store, shard).await;
                result.map(|r| r.map(ShardPosition::from).map_err(EngineError::from))
            });
            self.finish(hook, call, result, Ok)
        })
        .await
    }

    /// Plans a snapshot of the live shard in `dir`.
    pub async fn create_snapshot(&self, shard: &str, dir: &Path) -> Result<SnapshotPlan, HookError> {
        let hook = Hook::CreateSnapshot;
        self.observed(hook, shard, async {
            let mut call = self.instantiate(hook, Some((dir, Access::ReadOnly))).await?;
            let result = each_version!(call, |b| {
                let result = b.ferry_engine_hooks().call_create_snapshot(&mut call.store, shard).await;
                result.map(|r| r.map(v::plan).map_err(EngineError::from))
            });
            self.finish(hook, call, result, |plan| plan.map_err(HookErrorKind::BadReply))
        })
        .await
    }

    /// Checks that the snapshot `meta` of the live shard in `dir` still holds.
    pub async fn term_check(&self, shard: &str, dir: &Path, meta: &SnapshotMeta) -> Result<(), HookError> {
        let hook = Hook::TermCheck;
        self.observed(hook, shard, async {
            let mut call = self.instantiate(hook, Some((dir, Access::ReadOnly))).await?;
            let result = each_version!(call, |b| {
                let meta = meta.into();
                let result = b.ferry_engine_hooks().call_term_check(&mut call.store, shard, &meta).await;
                result.map(|r| r.map_err(EngineError::from))
            });
            self.finish(hook, call, result, Ok)
        })
        .await
    }

    /// Checks the received snapshot in the staging directory `dir`.
    pub async fn validate(&self, shard: &str, dir: &Path, meta: &SnapshotMeta) -> Result<ShardPosition, HookError> {
        let hook = Hook::Validate;
        self.observed(hook, shard, async {
            let mut call = self.instantiate(hook, Some((dir, Access::ReadOnly))).await?;
            let result = each_version!(call, |b| {
                let meta = meta.into();
                let result = b.ferry_engine_hooks().call_validate(&mut call.store, shard, &meta).await;
                result.map(|r| r.map(ShardPosition::from).map_err(EngineError::from))
            });
            self.finish(hook, call, result, Ok)
        })
        .await
    }

    /// Checks the files `paths` of the staging directory `dir`, each complete
    /// while others may still be arriving (optional interface `file-checks`;
    /// a typed `Unsupported` error, before anything runs, without it). At
    /// most [`MAX_CHECK_PATHS`] paths per call.
    pub async fn check_files(
        &self,
        shard: &str,
        dir: &Path,
        meta: &SnapshotMeta,
        paths: &[String],
    ) -> Result<(), HookError> {
        let hook = Hook::CheckFiles;
        if !self.file_checks {
            return Err(self.error(hook, HookErrorKind::Unsupported { contract: self.contract.package() }));
        }
        assert!(paths.len() <= MAX_CHECK_PATHS, "at most {MAX_CHECK_PATHS} paths per check-files call");
        self.observed(hook, shard, async {
            let mut call = self.instantiate(hook, Some((dir, Access::ReadOnly))).await?;
            let result = v2::call_check_files(&mut call.store, &call.instance, shard, &meta.into(), paths).await;
            self.finish(hook, call, result.map(|r| r.map_err(EngineError::from)), Ok)
        })
        .await
    }

    /// Checks a whole received snapshot in `dir` as a transfer would: every
    /// path through `check-files` (if the plugin has it), then `validate`.
    /// For callers that hold every file at once (the conformance kit, the
    /// CLI, tests).
    pub async fn check_and_validate(
        &self,
        shard: &str,
        dir: &Path,
        meta: &SnapshotMeta,
        paths: &[String],
    ) -> Result<ShardPosition, HookError> {
        if self.file_checks {
            for batch in paths.chunks(MAX_CHECK_PATHS) {
                self.check_files(shard, dir, meta, batch).await?;
            }
        }
        self.validate(shard, dir, meta).await
    }

    /// Makes the validated staging directory `dir` ready to publish.
    pub async fn apply(&self, shard: &str, dir: &Path, meta: &SnapshotMeta) -> Result<(), HookError> {
        let hook = Hook::Apply;
        self.observed(hook, shard, async {
            let mut call = self.instantiate(hook, Some((dir, Access::ReadWrite))).await?;
            let result = each_version!(call, |b| {
                let meta = meta.into();
                let result = b.ferry_engine_hooks().call_apply(&mut call.store, shard, &meta).await;
                result.map(|r| r.map_err(EngineError::from))
            });
            self.finish(hook, call, result, Ok)
        })
        .await
    }

    /// A fresh instance for a hook of interface `live`, with its 0.2.0
    /// exports; a typed `Unsupported` error, before anything runs, for a
    /// plugin of an older contract.
    async fn instantiate_live(&self, hook: Hook, dir: &Path, access: Access) -> Result<Call, HookError> {
        if !self.contract.has(hook) {
            return Err(self.error(hook, HookErrorKind::Unsupported { contract: self.contract.package() }));
        }
        self.instantiate(hook, Some((dir, access))).await
    }

    /// Source: plans the changes of the live shard in `dir` after `since`,
    /// the position the receiver holds (contract 0.2.0).
    pub async fn changes_since(&self, shard: &str, dir: &Path, since: ShardPosition) -> Result<DeltaPlan, HookError> {
        let hook = Hook::ChangesSince;
        self.observed(hook, shard, async {
            let mut call = self.instantiate_live(hook, dir, Access::ReadOnly).await?;
            let result =
                live(&call.bindings).ferry_engine_live().call_changes_since(&mut call.store, shard, since.into()).await;
            let result = result.map(|r| r.map(v2::delta_plan).map_err(EngineError::from));
            self.finish(hook, call, result, |plan| plan.map_err(HookErrorKind::BadReply))
        })
        .await
    }

    /// Source: checks, after a round's last entry was sent, that the delta
    /// `meta` still describes the live shard in `dir`.
    pub async fn delta_check(&self, shard: &str, dir: &Path, meta: &DeltaMeta) -> Result<(), HookError> {
        let hook = Hook::DeltaCheck;
        self.observed(hook, shard, async {
            let mut call = self.instantiate_live(hook, dir, Access::ReadOnly).await?;
            let result =
                live(&call.bindings).ferry_engine_live().call_delta_check(&mut call.store, shard, &meta.into()).await;
            self.finish(hook, call, result.map(|r| r.map_err(EngineError::from)), Ok)
        })
        .await
    }

    /// Receiver: makes its replica in `dir`, where the host wrote the round's
    /// entries durably, say `meta.until`; returns the replica's position.
    pub async fn apply_changes(&self, shard: &str, dir: &Path, meta: &DeltaMeta) -> Result<ShardPosition, HookError> {
        let hook = Hook::ApplyChanges;
        self.observed(hook, shard, async {
            let mut call = self.instantiate_live(hook, dir, Access::ReadWrite).await?;
            let result =
                live(&call.bindings).ferry_engine_live().call_apply_changes(&mut call.store, shard, &meta.into()).await;
            let result = result.map(|r| r.map(ShardPosition::from).map_err(EngineError::from));
            self.finish(hook, call, result, Ok)
        })
        .await
    }

    /// Source: stops the engine's writers of the live shard in `dir` for
    /// transfer epoch `epoch`; returns the last position and the locks the
    /// host must hold.
    pub async fn fence(&self, shard: &str, dir: &Path, epoch: u64) -> Result<FenceInfo, HookError> {
        let hook = Hook::Fence;
        self.observed(hook, shard, async {
            let mut call = self.instantiate_live(hook, dir, Access::ReadWrite).await?;
            let result = live(&call.bindings).ferry_engine_live().call_fence(&mut call.store, shard, epoch).await;
            let result = result.map(|r| r.map(v2::fence_info).map_err(EngineError::from));
            self.finish(hook, call, result, |info| info.map_err(HookErrorKind::BadReply))
        })
        .await
    }

    /// Source: lifts the fence of `epoch` from the live shard in `dir`.
    pub async fn unfence(&self, shard: &str, dir: &Path, epoch: u64) -> Result<(), HookError> {
        let hook = Hook::Unfence;
        self.observed(hook, shard, async {
            let mut call = self.instantiate_live(hook, dir, Access::ReadWrite).await?;
            let result = live(&call.bindings).ferry_engine_live().call_unfence(&mut call.store, shard, epoch).await;
            self.finish(hook, call, result.map(|r| r.map_err(EngineError::from)), Ok)
        })
        .await
    }

    /// Source, after a move committed: the replica in `dir` refuses writes
    /// for ever.
    pub async fn retire(&self, shard: &str, dir: &Path, epoch: u64) -> Result<(), HookError> {
        let hook = Hook::Retire;
        self.observed(hook, shard, async {
            let mut call = self.instantiate_live(hook, dir, Access::ReadWrite).await?;
            let result = live(&call.bindings).ferry_engine_live().call_retire(&mut call.store, shard, epoch).await;
            self.finish(hook, call, result.map(|r| r.map_err(EngineError::from)), Ok)
        })
        .await
    }
}

/// Every epoch tick the guest yields to the async runtime (so a long
/// validate never holds a worker thread), until `deadline` passes; then it
/// traps.
fn set_deadline(store: &mut Store<CallState>, deadline: Instant) {
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        Ok(if Instant::now() >= deadline { UpdateDeadline::Interrupt } else { UpdateDeadline::Yield(1) })
    });
}

/// A live instance kept across calls, for measuring call overhead apart from
/// instantiation. Production code never reuses instances.
#[doc(hidden)]
pub struct BenchInstance(Call, std::time::Duration);

impl BenchInstance {
    /// Instantiates the plugin once (what every hook call pays first).
    pub async fn new(plugin: &Plugin) -> Result<BenchInstance, HookError> {
        let deadline = plugin.shared.config.deadlines.get(Hook::Describe);
        Ok(BenchInstance(plugin.instantiate(Hook::Describe, None).await?, deadline))
    }

    /// One typed call of `describe` on this warm instance, with a deadline
    /// of its own: a production call's deadline starts at its instantiation,
    /// and a warm instance outlives it (a benchmark calls it for seconds).
    pub async fn describe(&mut self) -> wasmtime::Result<String> {
        let Call { store, bindings, .. } = &mut self.0;
        set_deadline(store, Instant::now() + self.1);
        Ok(match bindings {
            Bindings::V1(b) => b.ferry_engine_hooks().call_describe(store).await?.name,
            Bindings::V2(b) => b.ferry_engine_hooks().call_describe(store).await?.name,
        })
    }
}
