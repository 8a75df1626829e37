//! The sandbox holds against the misbehave guest: deadlines, memory limit,
//! panics, path escapes, read-only preopens, output floods, garbage replies,
//! a fresh instance per call, and queues (per engine, node-wide instance
//! slots, memory budget) instead of a pool that runs out.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry::plugin::{EngineError, HookDeadlines, HookErrorKind, Plugin, PluginRuntime, Queue, RuntimeConfig};
use ferry_tests::plugins;

const DEADLINE: Duration = Duration::from_millis(400);
/// Deadlines fire on a 10 ms epoch tick; this leaves room for a loaded machine.
const SLACK: Duration = Duration::from_millis(1000);
const MEMORY_LIMIT: usize = 64 << 20;

fn config() -> RuntimeConfig {
    let deadlines = HookDeadlines {
        create_snapshot: DEADLINE,
        shard_status: DEADLINE,
        term_check: Duration::from_millis(150),
        ..HookDeadlines::default()
    };
    RuntimeConfig { deadlines, memory_limit: MEMORY_LIMIT, ..RuntimeConfig::default() }
}

async fn misbehave(config: RuntimeConfig) -> (PluginRuntime, Arc<Plugin>) {
    let runtime = PluginRuntime::new(config).unwrap();
    let plugin = runtime.load(Path::new(plugins::MISBEHAVE)).await.unwrap();
    (runtime, Arc::new(plugin))
}

#[tokio::test]
async fn deadline_stops_an_endless_loop_and_the_host_keeps_serving() {
    let (_rt, plugin) = misbehave(config()).await;
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let err = plugin.create_snapshot("loop", dir.path()).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err.kind, HookErrorKind::Deadline(d) if d == DEADLINE), "{err}");
    assert!(took >= DEADLINE, "fired early: {took:?}");
    assert!(took < DEADLINE + SLACK, "fired late: {took:?}");
    assert!(err.to_string().contains("misbehave") && err.to_string().contains("create-snapshot"), "{err}");

    // term-check has its own, shorter deadline.
    let meta = ferry::plugin::SnapshotMeta { term: 1, position: 1, attributes: vec![] };
    let started = Instant::now();
    let err = plugin.term_check("loop", dir.path(), &meta).await.unwrap_err();
    assert!(matches!(err.kind, HookErrorKind::Deadline(d) if d == Duration::from_millis(150)), "{err}");
    assert!(started.elapsed() < Duration::from_millis(150) + SLACK);

    // The same plugin still serves, concurrently with another runaway.
    let runaway = {
        let plugin = plugin.clone();
        let dir = dir.path().to_owned();
        tokio::spawn(async move { plugin.shard_status("loop", &dir).await })
    };
    plugin.create_snapshot("fine", dir.path()).await.unwrap();
    assert!(runaway.await.unwrap().is_err());
}

#[tokio::test]
async fn memory_limit_traps_unbounded_allocation() {
    let (_rt, plugin) = misbehave(config()).await;
    let dir = tempfile::tempdir().unwrap();
    let err = plugin.create_snapshot("alloc", dir.path()).await.unwrap_err();
    assert!(matches!(err.kind, HookErrorKind::MemoryLimit { limit } if limit == MEMORY_LIMIT), "{err}");
    assert!(err.to_string().contains("memory limit of 67108864 bytes"), "{err}");
    plugin.create_snapshot("fine", dir.path()).await.unwrap();
}

#[tokio::test]
async fn panic_shows_its_message() {
    let (_rt, plugin) = misbehave(config()).await;
    let dir = tempfile::tempdir().unwrap();
    let err = plugin.validate("panic", dir.path(), &meta()).await.unwrap_err();
    match &err.kind {
        HookErrorKind::Panic(msg) => assert!(msg.contains("misbehave: deliberate panic in validate"), "{msg}"),
        other => panic!("expected a panic, got {other}"),
    }
}

#[tokio::test]
async fn paths_outside_the_preopen_are_denied() {
    let (_rt, plugin) = misbehave(config()).await;
    let dir = tempfile::tempdir().unwrap();
    let err = plugin.create_snapshot("escape", dir.path()).await.unwrap_err();
    match &err.kind {
        HookErrorKind::Engine(EngineError::Io(msg)) => {
            assert!(msg.starts_with("denied:"), "{msg}");
            assert!(msg.contains("/etc/passwd") && msg.contains("write /tmp"), "{msg}");
        }
        other => panic!("the guest got out: {other}"),
    }
    assert!(!Path::new("/tmp/ferry-misbehave-escape").exists());
}

#[tokio::test]
async fn read_only_hooks_cannot_write_and_apply_can() {
    let (_rt, plugin) = misbehave(config()).await;
    let dir = tempfile::tempdir().unwrap();
    for result in [
        plugin.create_snapshot("write", dir.path()).await.map(|_| ()),
        plugin.term_check("write", dir.path(), &meta()).await,
        plugin.validate("write", dir.path(), &meta()).await.map(|_| ()),
    ] {
        let err = result.unwrap_err();
        assert!(matches!(&err.kind, HookErrorKind::Engine(EngineError::Io(m)) if m.contains("write denied")), "{err}");
    }
    assert!(ferry_tests::tree(dir.path()).is_empty());
    // apply gets the directory read-write: the guest's write lands.
    let err = plugin.apply("write", dir.path(), &meta()).await.unwrap_err();
    assert!(matches!(&err.kind, HookErrorKind::Engine(EngineError::Other(m)) if m.contains("wrote")), "{err}");
    assert_eq!(ferry_tests::tree(dir.path()), ["intruder"]);
}

#[tokio::test]
async fn garbage_plans_are_refused() {
    // Building a 17 MiB or a 200,000-entry plan takes a while on a busy
    // machine: the default deadline, not the test's short one.
    let (_rt, plugin) = misbehave(RuntimeConfig { memory_limit: MEMORY_LIMIT, ..RuntimeConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    for (kind, want) in [
        ("absolute", "is absolute"),
        ("dotdot", "'..' component"),
        ("dot", "'.' component"),
        ("duplicate", "twice"),
        ("empty-path", "is empty"),
        ("backslash", "backslash"),
        ("big-inline", "inline entry of 17825792 bytes"),
        ("many-entries", "200000 entries"),
    ] {
        let err = plugin.create_snapshot(&format!("garbage-{kind}"), dir.path()).await.unwrap_err();
        match &err.kind {
            HookErrorKind::BadReply(reason) => assert!(reason.to_string().contains(want), "{kind}: {reason}"),
            other => panic!("{kind}: expected a refused reply, got {other}"),
        }
    }
}

#[tokio::test]
async fn output_flood_is_bounded_and_harmless() {
    // 10 MiB in 1 KiB writes: give it the default deadline, not the test's short one.
    let (_rt, plugin) = misbehave(RuntimeConfig { memory_limit: MEMORY_LIMIT, ..RuntimeConfig::default() }).await;
    let dir = tempfile::tempdir().unwrap();
    plugin.create_snapshot("stderr-flood", dir.path()).await.unwrap();
}

#[tokio::test]
async fn every_call_gets_a_fresh_instance() {
    let (_rt, plugin) = misbehave(config()).await;
    let dir = tempfile::tempdir().unwrap();
    for _ in 0..3 {
        let pos = plugin.shard_status("count", dir.path()).await.unwrap();
        assert_eq!(pos.position, 1, "state leaked between calls");
    }
}

#[tokio::test]
async fn a_missing_directory_is_a_sandbox_error() {
    let (_rt, plugin) = misbehave(config()).await;
    let err = plugin.shard_status("fine", Path::new("/nonexistent/ferry/shard")).await.unwrap_err();
    assert!(matches!(err.kind, HookErrorKind::Sandbox(_)), "{err}");
}

#[tokio::test]
async fn on_demand_allocation_enforces_the_same_limits() {
    let (rt, plugin) = misbehave(RuntimeConfig { pooling: false, ..config() }).await;
    assert!(!rt.pooling());
    let dir = tempfile::tempdir().unwrap();
    let err = plugin.create_snapshot("alloc", dir.path()).await.unwrap_err();
    assert!(matches!(err.kind, HookErrorKind::MemoryLimit { .. }), "{err}");
    let err = plugin.create_snapshot("loop", dir.path()).await.unwrap_err();
    assert!(matches!(err.kind, HookErrorKind::Deadline(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_engine_cannot_starve_another() {
    // Four instance slots for the node, two per engine: twelve runaway calls
    // of misbehave once made every other call fail on a full pool.
    let config = RuntimeConfig { max_instances: 4, max_calls_per_engine: 2, ..config() };
    let (runtime, plugin) = misbehave(config).await;
    let other = runtime.load(Path::new(plugins::SEGMENT_LOG)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let loops: Vec<_> = (0..12)
        .map(|_| {
            let (plugin, dir) = (plugin.clone(), dir.path().to_owned());
            tokio::spawn(async move { plugin.create_snapshot("loop", &dir).await })
        })
        .collect();
    // The other engine is served the whole time the runaways are queued or
    // running.
    let mut served = 0;
    while !loops.iter().all(|l| l.is_finished()) || served == 0 {
        assert_eq!(other.describe().await.unwrap().name, "segment-log");
        served += 1;
    }
    let mut queued = 0;
    for l in loops {
        let err = l.await.unwrap().unwrap_err();
        match err.kind {
            HookErrorKind::Deadline(d) => assert_eq!(d, DEADLINE),
            HookErrorKind::Queued { deadline, queue, .. } => {
                assert_eq!((deadline, queue), (DEADLINE, Queue::EngineCalls(2)), "{err}");
                queued += 1;
            }
            _ => panic!("a runaway ended with something else than its deadline: {err}"),
        }
    }
    assert!(queued > 0, "no call waited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_call_counts_its_wait_against_its_deadline() {
    // One call slot: a runaway create-snapshot holds it for 1.5 s, and a
    // shard-status behind it has 1 s in all.
    let mut config = RuntimeConfig { max_calls_per_engine: 1, ..config() };
    config.deadlines.create_snapshot = Duration::from_millis(1500);
    config.deadlines.shard_status = Duration::from_millis(1000);
    let (_rt, plugin) = misbehave(config).await;
    let dir = tempfile::tempdir().unwrap();
    let timed = async {
        let started = Instant::now();
        let result = plugin.shard_status("loop", dir.path()).await;
        (result, started.elapsed())
    };
    // `join!` polls the first future first: it takes the slot.
    let (running, (waiting, waited)) = tokio::join!(plugin.create_snapshot("loop", dir.path()), timed);
    let running = running.unwrap_err();
    assert!(matches!(running.kind, HookErrorKind::Deadline(d) if d == Duration::from_millis(1500)), "{running}");
    let waiting = waiting.unwrap_err();
    assert!(matches!(waiting.kind, HookErrorKind::Queued { behind: 1, queue: Queue::EngineCalls(1), .. }), "{waiting}");
    assert!(
        waiting.to_string().contains(
            "shard-status: deadline of 1s exceeded while queued behind 1 other calls for one of this engine's 1 call slots"
        ),
        "{waiting}"
    );
    // It gave up at its own deadline, not after the slot came free.
    assert!(waited >= Duration::from_millis(1000) && waited < Duration::from_millis(1000) + SLACK, "{waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_bounds_all_instances_together() {
    // Room for two instances at their limit; six calls that each grow to it,
    // slowly, so that unqueued they would all hold memory at once.
    let limit = 32 << 20;
    let budget = 2 * limit;
    let mut config = RuntimeConfig { memory_limit: limit, memory_budget: budget, ..config() };
    config.deadlines.create_snapshot = Duration::from_secs(60);
    let (runtime, plugin) = misbehave(config).await;
    let dir = tempfile::tempdir().unwrap();
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let (plugin, dir) = (plugin.clone(), dir.path().to_owned());
            tokio::spawn(async move { plugin.create_snapshot("alloc-slow", &dir).await })
        })
        .collect();
    for call in calls {
        let err = call.await.unwrap().unwrap_err();
        assert!(matches!(err.kind, HookErrorKind::MemoryLimit { limit: l } if l == limit), "{err}");
    }
    let memory = runtime.memory();
    assert_eq!(memory.budget, budget);
    assert!(memory.reserved_peak <= budget, "{memory:?}");
    assert!(memory.in_use_peak <= budget, "instances held more than the budget: {memory:?}");
    // Two did run at once (or the test proves nothing).
    assert!(memory.in_use_peak > limit, "{memory:?}");
    assert_eq!((memory.reserved, memory.in_use), (0, 0), "{memory:?}");
}

#[tokio::test]
async fn a_budget_below_the_memory_limit_is_refused() {
    let config = RuntimeConfig { memory_limit: 64 << 20, memory_budget: 32 << 20, ..config() };
    let err = PluginRuntime::new(config).err().expect("refused");
    assert!(err.to_string().contains("memory budget"), "{err}");
}

fn meta() -> ferry::plugin::SnapshotMeta {
    ferry::plugin::SnapshotMeta { term: 1, position: 1, attributes: vec![] }
}

/// The hook-call benchmark's warm instance (`cargo bench --bench plugin`)
/// gives each call a deadline of its own: before, the deadline set at
/// instantiation expired while criterion kept calling, and the benchmark
/// died with `wasm trap: interrupt` (issue 13).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_benchmark_instance_gets_a_deadline_per_call() {
    let deadlines = HookDeadlines { describe: Duration::from_millis(100), ..HookDeadlines::default() };
    let runtime = PluginRuntime::new(RuntimeConfig { deadlines, ..RuntimeConfig::default() }).unwrap();
    let plugin = runtime.load(Path::new(plugins::SEGMENT_LOG)).await.unwrap();
    let mut warm = ferry::plugin::BenchInstance::new(&plugin).await.unwrap();
    // Well past the deadline the instance was made with.
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..3 {
        assert_eq!(warm.describe().await.unwrap(), "segment-log");
    }
}
