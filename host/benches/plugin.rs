//! Hook-call overhead of the plugin host, on the segment-log guest.
//!
//! - `instantiate`: a fresh instance from the pre-instantiated component (what
//!   every hook call pays; pooled when the machine allows it);
//! - `typed_call/describe`: one call on a warm instance (the call itself);
//! - `hook_call/describe`: a whole hook call as production makes it (fresh
//!   sandbox, instance, call, teardown).
//!
//! Needs the guests built: `tests/setup.sh`. Run: `cargo bench -p ferry --bench plugin`.

use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use ferry::plugin::{BenchInstance, PluginRuntime, RuntimeConfig};

fn guest() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/plugins/segment-log.wasm");
    assert!(path.exists(), "{} is missing: run tests/setup.sh first", path.display());
    path
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let runtime = PluginRuntime::new(RuntimeConfig::default()).unwrap();
    let plugin = rt.block_on(runtime.load(&guest())).unwrap();
    eprintln!("pooling allocator: {}", runtime.pooling());

    c.bench_function("instantiate", |b| {
        b.iter(|| rt.block_on(BenchInstance::new(&plugin)).unwrap());
    });
    let mut warm = rt.block_on(BenchInstance::new(&plugin)).unwrap();
    c.bench_function("typed_call/describe", |b| {
        b.iter(|| rt.block_on(warm.describe()).unwrap());
    });
    c.bench_function("hook_call/describe", |b| {
        b.iter(|| rt.block_on(plugin.describe()).unwrap());
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
