//! Engine name → plugin, for every plugin a node has loaded. A plugin can
//! be replaced while the node runs (a cluster-wide install): callers get an
//! `Arc<Plugin>` and keep the build they started with until they let go.
//!
//! Besides the build new work uses, the registry keeps each engine's build
//! from the plugins directory (`local`) and every other build it loaded, by
//! BLAKE3, so that a transfer pinned to a build finds it again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::error::{LoadError, LoadErrorKind};
use super::plugin::Plugin;
use super::runtime::PluginRuntime;

#[derive(Default)]
pub struct Registry {
    plugins: RwLock<BTreeMap<String, Arc<Plugin>>>,
    /// Each engine's build from the plugins directory.
    local: RwLock<BTreeMap<String, Arc<Plugin>>>,
    /// Every build loaded, by BLAKE3.
    builds: RwLock<BTreeMap<String, Arc<Plugin>>>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Loads every `*.wasm` file in `dir`, in name order. The first bad file
    /// stops the load: a node must not start with a plugin silently missing.
    pub async fn load_dir(runtime: &PluginRuntime, dir: &Path) -> Result<Registry, LoadError> {
        let read_err = |e| LoadError { path: dir.to_owned(), kind: LoadErrorKind::Read(e) };
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(read_err)?
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|ext| ext == "wasm") && p.is_file())
            .collect();
        files.sort();
        let registry = Registry::new();
        for file in files {
            registry.insert(runtime.load(&file).await?)?;
        }
        Ok(registry)
    }

    /// Adds a plugin; two plugins of one engine name are refused.
    pub fn insert(&self, plugin: Plugin) -> Result<Arc<Plugin>, LoadError> {
        let name = plugin.info().name.clone();
        let mut plugins = self.write();
        if let Some(other) = plugins.get(&name) {
            return Err(LoadError {
                path: plugin.path().to_owned(),
                kind: LoadErrorKind::Duplicate { name, other: other.path().to_owned() },
            });
        }
        let plugin = Arc::new(plugin);
        plugins.insert(name.clone(), plugin.clone());
        write(&self.local).insert(name, plugin.clone());
        self.keep(plugin.clone());
        Ok(plugin)
    }

    /// Puts `plugin` in the place of its engine's (or adds it); calls under
    /// way finish on the build they hold.
    pub fn replace(&self, plugin: Arc<Plugin>) -> Option<Arc<Plugin>> {
        self.keep(plugin.clone());
        self.write().insert(plugin.info().name.clone(), plugin)
    }

    /// Keeps a loaded build findable by its hash, without making it the one
    /// new work uses.
    pub fn keep(&self, plugin: Arc<Plugin>) {
        write(&self.builds).insert(plugin.hash().to_owned(), plugin);
    }

    /// Forgets a build kept by hash (a removed build); the engine's current
    /// and local builds stay.
    pub fn forget(&self, hash: &str) {
        write(&self.builds).remove(hash);
    }

    /// The build a transfer pinned to `pin` runs with: that build when
    /// pinned (`None` when this node has not loaded it), else this node's own
    /// from its plugins directory, else the current one.
    pub fn resolve(&self, engine: &str, pin: Option<&str>) -> Option<Arc<Plugin>> {
        match pin {
            Some(hash) => read(&self.builds).get(hash).filter(|p| p.info().name == engine).cloned(),
            None => read(&self.local).get(engine).cloned().or_else(|| self.get(engine)),
        }
    }

    /// The engine's build from the plugins directory.
    pub fn local(&self, engine: &str) -> Option<Arc<Plugin>> {
        read(&self.local).get(engine).cloned()
    }

    pub fn get(&self, engine: &str) -> Option<Arc<Plugin>> {
        self.read().get(engine).cloned()
    }

    /// Every plugin now, by engine name.
    pub fn iter(&self) -> std::vec::IntoIter<Arc<Plugin>> {
        self.read().values().cloned().collect::<Vec<_>>().into_iter()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Plugin>>> {
        read(&self.plugins)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Plugin>>> {
        write(&self.plugins)
    }
}

type Map = RwLock<BTreeMap<String, Arc<Plugin>>>;

fn read(map: &Map) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Plugin>>> {
    map.read().unwrap_or_else(|e| e.into_inner())
}

fn write(map: &Map) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Plugin>>> {
    map.write().unwrap_or_else(|e| e.into_inner())
}
