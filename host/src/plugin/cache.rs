//! Compiled components on disk, so a restart does not recompile.
//!
//! Key: BLAKE3 of the component's bytes, and of wasmtime's own compatibility
//! hash (its version, target and the engine settings that shape machine code).
//! Files are written to a temporary name, fsynced and renamed, so a crash
//! never leaves a torn entry under a real key; an entry that fails to load is
//! recompiled and replaced.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

pub struct CompiledCache {
    dir: PathBuf,
    engine_key: String,
}

/// Feeds a `Hash` value into BLAKE3, which, unlike `DefaultHasher`, is stable
/// across builds.
struct Blake3Hasher(blake3::Hasher);

impl Hasher for Blake3Hasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let hash = self.0.finalize();
        u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap())
    }
}

impl CompiledCache {
    pub fn new(dir: PathBuf, engine: &Engine) -> CompiledCache {
        let mut hasher = Blake3Hasher(blake3::Hasher::new());
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = hasher.0.finalize().to_hex()[..16].to_owned();
        CompiledCache { dir, engine_key }
    }

    fn entry(&self, wasm: &[u8]) -> PathBuf {
        let content = blake3::hash(wasm).to_hex();
        self.dir.join(format!("{content}-{}.cwasm", self.engine_key))
    }

    /// Loads the compiled form of `wasm`, compiling and storing it on a miss.
    /// Returns the component and whether it came from the cache.
    pub fn load_or_compile(&self, engine: &Engine, wasm: &[u8]) -> wasmtime::Result<(Component, bool)> {
        let entry = self.entry(wasm);
        if let Ok(bytes) = fs::read(&entry) {
            // Read, not mapped: a mapped file truncated by someone else would
            // bring the node down with SIGBUS.
            // SAFETY: the entry was written by `Component::serialize` of this
            // cache (the key includes the engine's compatibility hash), under
            // the node's own state directory, which Ferry trusts like its
            // binary. A damaged entry fails wasmtime's header checks and is
            // recompiled below.
            match unsafe { Component::deserialize(engine, &bytes) } {
                Ok(component) => return Ok((component, true)),
                Err(e) => tracing::warn!(entry = %entry.display(), "compiled cache entry unusable, recompiling: {e}"),
            }
        }
        let component = Component::new(engine, wasm)?;
        if let Err(e) = self.store(&entry, &component) {
            tracing::warn!(dir = %self.dir.display(), "cannot write the compiled cache: {e}");
        }
        Ok((component, false))
    }

    fn store(&self, entry: &Path, component: &Component) -> anyhow::Result<()> {
        let bytes = component.serialize().map_err(|e| anyhow::anyhow!("{e}"))?;
        fs::create_dir_all(&self.dir)?;
        let tmp = entry.with_extension(format!("tmp.{}", std::process::id()));
        let mut file = fs::File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, entry)?;
        Ok(())
    }
}
