//! The wasmtime side of Ferry: one engine for all plugins, with epoch-based
//! deadlines, the pooling allocator where the machine allows it, and a cache of
//! compiled components. [`PluginRuntime::load`] turns a file into a [`Plugin`]
//! or says precisely why not.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

use super::bindings::{v0_1_0 as v1, v0_2_0 as v2};
use super::cache::CompiledCache;
use super::error::{Hook, LoadError, LoadErrorKind};
use super::limits::{Gate, MIB, MemoryUsage, Queue};
use super::plugin::{ContractVersion, Plugin, PluginShared, Pre};
use super::sandbox::CallState;

/// How often the epoch advances; deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Deadline of each hook call, instantiation included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HookDeadlines {
    #[serde(with = "millis")]
    pub describe: Duration,
    #[serde(with = "millis")]
    pub shard_status: Duration,
    #[serde(with = "millis")]
    pub create_snapshot: Duration,
    /// Short: it runs while a receiver waits for the end of the archive.
    #[serde(with = "millis")]
    pub term_check: Duration,
    /// Reads the whole received shard, so it scales with the shard's size.
    #[serde(with = "millis")]
    pub validate: Duration,
    #[serde(with = "millis")]
    pub apply: Duration,
    /// Plans a round: reads the control data of the live shard, like
    /// `create_snapshot` (the data bytes never pass through the guest).
    #[serde(with = "millis")]
    pub changes_since: Duration,
    /// Short, like `term_check`: the receiver waits for it.
    #[serde(with = "millis")]
    pub delta_check: Duration,
    /// Reads what one round wrote, like `apply` does a snapshot.
    #[serde(with = "millis")]
    pub apply_changes: Duration,
    /// Short: a fence runs inside the write pause.
    #[serde(with = "millis")]
    pub fence: Duration,
    #[serde(with = "millis")]
    pub unfence: Duration,
    #[serde(with = "millis")]
    pub retire: Duration,
    /// One batch of files, read while the snapshot streams.
    #[serde(with = "millis")]
    pub check_files: Duration,
}

impl Default for HookDeadlines {
    fn default() -> Self {
        HookDeadlines {
            describe: Duration::from_secs(5),
            shard_status: Duration::from_secs(10),
            create_snapshot: Duration::from_secs(120),
            term_check: Duration::from_secs(5),
            validate: Duration::from_secs(1800),
            apply: Duration::from_secs(600),
            changes_since: Duration::from_secs(120),
            delta_check: Duration::from_secs(5),
            apply_changes: Duration::from_secs(600),
            fence: Duration::from_secs(5),
            unfence: Duration::from_secs(5),
            retire: Duration::from_secs(5),
            check_files: Duration::from_secs(600),
        }
    }
}

impl HookDeadlines {
    pub fn get(&self, hook: Hook) -> Duration {
        match hook {
            Hook::Describe => self.describe,
            Hook::ShardStatus => self.shard_status,
            Hook::CreateSnapshot => self.create_snapshot,
            Hook::TermCheck => self.term_check,
            Hook::Validate => self.validate,
            Hook::Apply => self.apply,
            Hook::ChangesSince => self.changes_since,
            Hook::DeltaCheck => self.delta_check,
            Hook::ApplyChanges => self.apply_changes,
            Hook::Fence => self.fence,
            Hook::Unfence => self.unfence,
            Hook::Retire => self.retire,
            Hook::CheckFiles => self.check_files,
        }
    }

    pub fn set(&mut self, hook: Hook, deadline: Duration) {
        let slot = match hook {
            Hook::Describe => &mut self.describe,
            Hook::ShardStatus => &mut self.shard_status,
            Hook::CreateSnapshot => &mut self.create_snapshot,
            Hook::TermCheck => &mut self.term_check,
            Hook::Validate => &mut self.validate,
            Hook::Apply => &mut self.apply,
            Hook::ChangesSince => &mut self.changes_since,
            Hook::DeltaCheck => &mut self.delta_check,
            Hook::ApplyChanges => &mut self.apply_changes,
            Hook::Fence => &mut self.fence,
            Hook::Unfence => &mut self.unfence,
            Hook::Retire => &mut self.retire,
            Hook::CheckFiles => &mut self.check_files,
        };
        *slot = deadline;
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// Settings of the plugin runtime.
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub deadlines: HookDeadlines,
    /// Most linear memory one instance may grow to (all its memories).
    pub memory_limit: usize,
    /// Most memory all instances of the node may hold: each call reserves
    /// `memory_limit` of it before it instantiates, or waits. At least
    /// `memory_limit`.
    pub memory_budget: usize,
    /// Calls of one plugin that may run at once; more wait.
    pub max_calls_per_engine: usize,
    /// Where compiled components are kept; `None` compiles on every load.
    pub cache_dir: Option<PathBuf>,
    /// Use the pooling allocator when the machine allows it.
    pub pooling: bool,
    /// Instances that may be alive at once (pooling slots); more calls wait.
    pub max_instances: u32,
}

/// Default memory limit of one instance.
pub const DEFAULT_MEMORY_LIMIT: usize = 256 << 20;
/// Eight calls at the default memory limit.
pub const DEFAULT_MEMORY_BUDGET: usize = 2 << 30;
/// Half of what the default budget holds at the default limit, so one
/// engine's calls always leave room for another's.
pub const DEFAULT_MAX_CALLS_PER_ENGINE: usize = 4;

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            deadlines: HookDeadlines::default(),
            memory_limit: DEFAULT_MEMORY_LIMIT,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            max_calls_per_engine: DEFAULT_MAX_CALLS_PER_ENGINE,
            cache_dir: None,
            pooling: true,
            max_instances: 64,
        }
    }
}

/// Hosts plugins: owns the wasmtime engine, the linker and the epoch ticker.
pub struct PluginRuntime {
    shared: Arc<PluginShared>,
    linker: Arc<Linker<CallState>>,
    cache: Option<Arc<CompiledCache>>,
    pooling: bool,
    _ticker: EpochTicker,
}

/// Why the runtime could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the plugin runtime: {0}")]
pub struct RuntimeError(String);

impl PluginRuntime {
    pub fn new(config: RuntimeConfig) -> Result<PluginRuntime, RuntimeError> {
        // The budget is counted in whole MiB (see below).
        if config.memory_limit == 0 || config.memory_limit.div_ceil(MIB) > config.memory_budget / MIB {
            return Err(RuntimeError(format!(
                "the plugin memory budget ({} bytes) must hold at least one instance's memory limit ({} bytes), \
                 in whole MiB",
                config.memory_budget, config.memory_limit
            )));
        }
        if config.max_calls_per_engine == 0 || config.max_instances == 0 {
            return Err(RuntimeError("max_calls_per_engine and max_instances must be at least 1".into()));
        }
        let (engine, pooling) = build_engine(&config)?;
        let mut linker = Linker::<CallState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| RuntimeError(e.to_string()))?;
        // Every contract version's imports (`log`, `types`), side by side:
        // their names carry the version.
        v1::Engine::add_to_linker::<CallState, wasmtime::component::HasSelf<CallState>>(&mut linker, |s| s)
            .map_err(|e| RuntimeError(e.to_string()))?;
        v2::Engine::add_to_linker::<CallState, wasmtime::component::HasSelf<CallState>>(&mut linker, |s| s)
            .map_err(|e| RuntimeError(e.to_string()))?;
        let cache = config.cache_dir.clone().map(|dir| Arc::new(CompiledCache::new(dir, &engine)));
        let ticker = EpochTicker::start(engine.clone());
        // The memory gate counts whole MiB: a call takes its limit rounded
        // up, out of the budget rounded down, so reservations never add up
        // to more than the budget.
        let memory = Gate::new(config.memory_budget / MIB, Queue::Memory(config.memory_budget));
        let instances = Gate::new(config.max_instances as usize, Queue::Instances(config.max_instances as usize));
        Ok(PluginRuntime {
            shared: Arc::new(PluginShared { engine, config, instances, memory, account: Arc::default() }),
            linker: Arc::new(linker),
            cache,
            pooling,
            _ticker: ticker,
        })
    }

    /// Whether instances come from the pooling allocator.
    pub fn pooling(&self) -> bool {
        self.pooling
    }

    pub fn config(&self) -> &RuntimeConfig {
        &self.shared.config
    }

    /// Plugin memory reserved by calls and held by instances, now and at
    /// its peak.
    pub fn memory(&self) -> MemoryUsage {
        self.shared.memory_usage()
    }

    /// Starts the peaks of [`memory`](Self::memory) again from now (to
    /// measure one call).
    pub fn reset_memory_peak(&self) {
        self.shared.reset_memory_peaks();
    }

    /// Loads, checks and describes the plugin in `path`.
    pub async fn load(&self, path: &Path) -> Result<Plugin, LoadError> {
        let fail = |kind| LoadError { path: path.to_owned(), kind };
        let wasm = tokio::fs::read(path).await.map_err(|e| fail(LoadErrorKind::Read(e)))?;
        self.load_bytes(path, wasm).await
    }

    /// Like [`load`](Self::load), for bytes already in memory; `path` names
    /// them in errors.
    pub async fn load_bytes(&self, path: &Path, wasm: Vec<u8>) -> Result<Plugin, LoadError> {
        let fail = |kind| LoadError { path: path.to_owned(), kind };
        check_header(&wasm).map_err(fail)?;
        let hash = blake3::hash(&wasm).to_hex().to_string();

        let started = Instant::now();
        let engine = self.shared.engine.clone();
        let cache = self.cache.clone();
        // Compiling takes a while; keep it off the async worker threads.
        let compiled = tokio::task::spawn_blocking(move || match cache {
            Some(cache) => cache.load_or_compile(&engine, &wasm),
            None => Component::new(&engine, &wasm).map(|c| (c, false)),
        })
        .await
        .map_err(|e| fail(LoadErrorKind::Compile(format!("compiler task failed: {e}"))))?;
        let (component, cached) = compiled.map_err(|e| fail(LoadErrorKind::Compile(error_chain(&e))))?;
        let engine = &self.shared.engine;
        let compile_time = started.elapsed();
        let result = if cached { "hit" } else { "miss" };
        crate::metrics::global().compile_cache.get_or_create(&crate::metrics::CacheLabels { result }).inc();

        let (contract, file_checks) = find_contract(engine, &component).map_err(fail)?;
        let instance_pre =
            self.linker.instantiate_pre(&component).map_err(|e| fail(LoadErrorKind::Imports(error_chain(&e))))?;
        let mismatch = |e: wasmtime::Error| fail(LoadErrorKind::Mismatch(error_chain(&e)));
        let pre = match contract {
            ContractVersion::V0_1_0 => Pre::V1(v1::EnginePre::new(instance_pre).map_err(mismatch)?),
            ContractVersion::V0_2_0 => Pre::V2(v2::EnginePre::new(instance_pre).map_err(mismatch)?),
        };

        let plugin = Plugin::new(self.shared.clone(), path.to_owned(), contract, pre, compile_time, cached, hash)
            .with_file_checks(file_checks);
        let info = plugin.probe().await.map_err(fail)?;
        Ok(plugin.with_info(info))
    }
}

fn build_engine(config: &RuntimeConfig) -> Result<(Engine, bool), RuntimeError> {
    let mut base = Config::new();
    base.wasm_component_model(true);
    base.epoch_interruption(true);
    base.max_wasm_stack(1 << 20);
    if config.pooling {
        let mut pool = PoolingAllocationConfig::default();
        let instances = config.max_instances.max(1);
        // A component built by wasm-component-ld has a few core instances
        // (the program, the WASI adapter, shims), two memories and three
        // tables. Every total is the per-component maximum times the
        // instance slots: calls wait for a slot (see `limits`), and once they
        // have one the pool cannot run out of anything else.
        let (core, memories, tables) = (16, 4, 8);
        pool.total_component_instances(instances)
            .total_core_instances(instances * core)
            .max_core_instances_per_component(core)
            .total_memories(instances * memories)
            .max_memories_per_component(memories)
            .total_tables(instances * tables)
            .max_tables_per_component(tables)
            .total_stacks(instances)
            .max_memory_size(config.memory_limit);
        let mut pooled = base.clone();
        pooled.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        match Engine::new(&pooled) {
            Ok(engine) => return Ok((engine, true)),
            Err(e) => tracing::warn!("pooling allocator unavailable, allocating instances on demand: {e}"),
        }
    }
    let engine = Engine::new(&base).map_err(|e| RuntimeError(e.to_string()))?;
    Ok((engine, false))
}

fn check_header(wasm: &[u8]) -> Result<(), LoadErrorKind> {
    if wasm.len() < 8 || &wasm[0..4] != b"\0asm" {
        return Err(LoadErrorKind::NotWasm);
    }
    let version: [u8; 4] = wasm[4..8].try_into().expect("length checked");
    match version {
        [0x0d, 0x00, 0x01, 0x00] => Ok(()),
        [0x01, 0x00, 0x00, 0x00] => Err(LoadErrorKind::CoreModule),
        other => Err(LoadErrorKind::UnknownBinaryVersion(other)),
    }
}

/// The `hooks` interfaces this host loads, newest first.
const SUPPORTED: &str = "ferry:engine/hooks@0.2.0, ferry:engine/hooks@0.1.0";

/// Finds which contract version the component implements, and checks that
/// every hook of that version is exported; also says whether it exports the
/// optional interface `file-checks` (whole, if at all).
fn find_contract(engine: &Engine, component: &Component) -> Result<(ContractVersion, bool), LoadErrorKind> {
    let ty = component.component_type();
    let exports: Vec<(String, ComponentItem)> = ty.exports(engine).map(|(n, e)| (n.to_owned(), e.ty)).collect();
    let Some((name, item)) = exports.iter().find(|(n, _)| n.starts_with("ferry:engine/hooks@")) else {
        let names: Vec<&str> = exports.iter().map(|(n, _)| n.as_str()).collect();
        return Err(LoadErrorKind::NoHooks {
            want: SUPPORTED,
            exports: if names.is_empty() { "nothing".into() } else { names.join(", ") },
        });
    };
    let contract = match name.as_str() {
        v1::HOOKS_INTERFACE => ContractVersion::V0_1_0,
        v2::HOOKS_INTERFACE => ContractVersion::V0_2_0,
        found => {
            return Err(LoadErrorKind::UnsupportedVersion { found: found.to_owned(), supported: SUPPORTED });
        }
    };
    check_interface(engine, name, item, &Hook::HOOKS)?;
    if contract == ContractVersion::V0_2_0 {
        let Some((live, item)) = exports.iter().find(|(n, _)| n == v2::LIVE_INTERFACE) else {
            return Err(LoadErrorKind::MissingInterface {
                contract: contract.package(),
                interface: v2::LIVE_INTERFACE,
            });
        };
        check_interface(engine, live, item, &Hook::LIVE)?;
    }
    let file_checks = match exports.iter().find(|(n, _)| n.starts_with("ferry:engine/file-checks@")) {
        Some((name, item)) if contract == ContractVersion::V0_2_0 && name == v2::FILE_CHECKS_INTERFACE => {
            check_interface(engine, name, item, &Hook::FILE_CHECKS)?;
            true
        }
        Some((name, _)) => {
            return Err(LoadErrorKind::Mismatch(format!(
                "exports {name}, which goes with no contract this host supports beside {}",
                contract.package()
            )));
        }
        None => false,
    };
    Ok((contract, file_checks))
}

/// Checks that the exported instance `name` holds every one of `hooks`.
fn check_interface(engine: &Engine, name: &str, item: &ComponentItem, hooks: &[Hook]) -> Result<(), LoadErrorKind> {
    let ComponentItem::ComponentInstance(instance) = item else {
        return Err(LoadErrorKind::Mismatch(format!("{name} is exported, but not as an instance")));
    };
    let have: Vec<&str> = instance.exports(engine).map(|(n, _)| n).collect();
    let missing: Vec<String> =
        hooks.iter().map(|h| h.name()).filter(|h| !have.contains(h)).map(str::to_owned).collect();
    if !missing.is_empty() {
        return Err(LoadErrorKind::MissingExports { interface: name.to_owned(), missing });
    }
    Ok(())
}

/// `outer: inner: innermost` of a wasmtime error.
pub(crate) fn error_chain(e: &wasmtime::Error) -> String {
    e.chain().map(|c| c.to_string()).collect::<Vec<_>>().join(": ")
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("ferry-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch thread");
        EpochTicker { stop, thread: Some(thread) }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
