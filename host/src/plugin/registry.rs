//! Engine name → plugin, for every plugin a node has loaded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::error::{LoadError, LoadErrorKind};
use super::plugin::Plugin;
use super::runtime::PluginRuntime;

#[derive(Default)]
pub struct Registry {
    plugins: BTreeMap<String, Arc<Plugin>>,
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
        let mut registry = Registry::new();
        for file in files {
            registry.insert(runtime.load(&file).await?)?;
        }
        Ok(registry)
    }

    /// Adds a plugin; two plugins of one engine name are refused.
    pub fn insert(&mut self, plugin: Plugin) -> Result<Arc<Plugin>, LoadError> {
        let name = plugin.info().name.clone();
        if let Some(other) = self.plugins.get(&name) {
            return Err(LoadError {
                path: plugin.path().to_owned(),
                kind: LoadErrorKind::Duplicate { name, other: other.path().to_owned() },
            });
        }
        let plugin = Arc::new(plugin);
        self.plugins.insert(name, plugin.clone());
        Ok(plugin)
    }

    pub fn get(&self, engine: &str) -> Option<&Arc<Plugin>> {
        self.plugins.get(engine)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Plugin>> {
        self.plugins.values()
    }

    pub fn len(&self) -> usize {
        self.plugins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plugins.is_empty()
    }
}
