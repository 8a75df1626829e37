//! Plugins installed into the running cluster, no restart (Envoy's wasm
//! extensions: fetched by hash, warmed before they take traffic):
//!
//! 1. [`install`]: an operator's bytes go to one node, which loads them
//!    through the production path (a valid plugin or a clear error), keeps
//!    them in its store by BLAKE3, and proposes `InstallPlugin`.
//! 2. [`reconcile`], on every member: a rollout this node does not hold yet
//!    is fetched by hash from a member that does, verified, compiled and
//!    stored, then `PluginReady` is proposed.
//! 3. Once every member is ready the rollout is active, and each node puts
//!    the build in its registry's place for the engine. Calls and transfers
//!    under way finish on the build they hold; new ones use the new build.
//!    A restarted node takes the active builds from its store.
//! 4. A transfer is pinned to the build active when it started: both ends
//!    run it with that build ([`pinned`]), through restarts, and the build
//!    cannot be removed while the transfer lives. `activate` rolls an older
//!    build out again; `remove` forgets one, and members delete its bytes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::consensus::state::{Command, EnginePlugins};
use crate::node::Node;
use crate::plugin::Plugin;

/// Largest plugin component accepted.
pub const MAX_PLUGIN_BYTES: usize = 64 << 20;

/// A stored build that no engine names any more is deleted once it is this
/// old (a build just stored by an install is not named yet).
const ORPHAN_AGE: Duration = Duration::from_secs(600);

fn store(node: &Node) -> PathBuf {
    node.data.root().join("state").join("plugin-store")
}

fn blob(node: &Node, hash: &str) -> PathBuf {
    store(node).join(format!("{hash}.wasm"))
}

/// How an install names an engine that already has a plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Install {
    /// The engine must be new to the cluster and to this node: a build whose
    /// engine name collides with another plugin's is refused.
    New,
    /// A new build of an engine that has one.
    Upgrade,
}

/// What an install answers.
#[derive(Debug, serde::Serialize)]
pub struct Installed {
    pub engine: String,
    /// BLAKE3 of the build.
    pub hash: String,
    /// The engine's builds as this node applied the install.
    pub plugins: EnginePlugins,
}

/// Loads `wasm`, keeps it by hash, and proposes it as its engine's
/// rollout.
pub async fn install(node: &Node, wasm: Vec<u8>, how: Install) -> Result<Installed, String> {
    let hash = blake3::hash(&wasm).to_hex().to_string();
    let path = blob(node, &hash);
    let plugin = node.runtime.load_bytes(&path, wasm.clone()).await.map_err(|e| e.to_string())?;
    let (engine, version) = (plugin.info().name.clone(), plugin.info().plugin_version.clone());
    let state = node.consensus.state();
    let known = state.plugins.get(&engine);
    if how == Install::New && known.is_none_or(|p| !p.builds.contains_key(&hash)) {
        let current = node.plugins.get(&engine).map(|p| (p.info().plugin_version.clone(), p.hash().to_owned()));
        let installed = known.and_then(|p| p.wanted()).map(|h| (p_version(known, h), h.clone()));
        if let Some((other_version, other_hash)) = installed.or(current) {
            return Err(format!(
                "engine name {engine:?} collides with the plugin that serves it (version {other_version}, \
                 BLAKE3 {other_hash}): to roll this build out in its place, install it as an upgrade (--upgrade)"
            ));
        }
    }
    keep(&path, &wasm).map_err(|e| format!("storing the plugin: {e}"))?;
    node.plugins.keep(Arc::new(plugin));
    let me = node.consensus.id;
    let command = Command::InstallPlugin {
        engine: engine.clone(),
        hash: hash.clone(),
        version,
        node: me,
        now: super::conductor::unix_now(),
    };
    let applied = node.consensus.propose(command).await.map_err(|e| format!("proposing the install: {e}"))?;
    // Committed by the leader; this node answers from its own state.
    node.consensus.wait_applied(applied.index, Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
    tracing::info!(%engine, %hash, "plugin build installed; rolling out");
    let plugins = node.consensus.state().plugins.get(&engine).cloned().ok_or("the rollout vanished")?;
    Ok(Installed { engine, hash, plugins })
}

fn p_version(plugins: Option<&EnginePlugins>, hash: &str) -> String {
    plugins.and_then(|p| p.builds.get(hash)).map_or_else(String::new, |b| b.version.clone())
}

/// Proposes `command` (an activate or a remove) and answers the engine's
/// builds once this node applied it.
pub async fn change(node: &Node, engine: &str, command: Command) -> Result<Option<EnginePlugins>, String> {
    let applied = node.consensus.propose(command).await.map_err(|e| e.to_string())?;
    node.consensus.wait_applied(applied.index, Duration::from_secs(10)).await.map_err(|e| e.to_string())?;
    Ok(node.consensus.state().plugins.get(engine).cloned())
}

/// Writes a blob durably under its final name.
fn keep(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(path.parent().expect("blobs live in the store"))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// A stored build's bytes, for a peer (`None`: not here).
pub fn read_blob(node: &Node, hash: &str) -> Option<Vec<u8>> {
    crate::consensus::state::check_plugin_hash(hash).ok()?;
    std::fs::read(blob(node, hash)).ok()
}

/// The build a transfer pinned to `pin` runs with on this node (see
/// [`crate::plugin::Registry::resolve`]), loaded from this node's store, or
/// fetched from a member that holds it, when it is not loaded yet.
pub async fn pinned(node: &Node, engine: &str, pin: Option<&str>) -> Result<Arc<Plugin>, String> {
    if let Some(plugin) = node.plugins.resolve(engine, pin) {
        return Ok(plugin);
    }
    let Some(hash) = pin else { return Err(format!("no plugin for engine {engine:?} on this node")) };
    let plugin = Arc::new(obtain(node, engine, hash).await.map_err(|e| format!("plugin build {hash}: {e}"))?);
    if plugin.info().name != engine {
        return Err(format!("plugin build {hash} is of engine {}, not {engine}", plugin.info().name));
    }
    node.plugins.keep(plugin.clone());
    Ok(plugin)
}

/// The plugin build a live transfer of `engine`/`shard` is pinned to, on
/// this node (the node's current build when the shard has no live transfer).
pub async fn for_shard(node: &Node, engine: &str, shard: &str) -> Result<Arc<Plugin>, String> {
    let pin = node.consensus.state().live_transfer(engine, shard).map(|t| t.plugin.clone());
    match pin {
        Some(pin) => pinned(node, engine, pin.as_deref()).await,
        None => node.plugins.get(engine).ok_or_else(|| format!("no plugin for engine {engine:?} on this node")),
    }
}

/// Brings this node's plugins in line with the cluster's builds: holds every
/// build an engine wants or a live transfer of this node is pinned to, runs
/// each engine's active build, and deletes the bytes of removed builds.
pub async fn reconcile(node: &Node) {
    let state = node.consensus.state();
    let me = node.consensus.id;
    for (engine, plugins) in &state.plugins {
        let pins = state
            .transfers
            .values()
            .filter(|t| t.stage.is_live() && t.engine == *engine && (t.source == me || t.target == me));
        let needed: std::collections::BTreeSet<&String> =
            plugins.wanted().into_iter().chain(pins.filter_map(|t| t.plugin.as_ref())).collect();
        for hash in needed {
            let Some(build) = plugins.builds.get(hash) else { continue };
            if build.ready.contains(&me) {
                continue;
            }
            match obtain(node, engine, hash).await {
                Ok(plugin) => {
                    node.plugins.keep(Arc::new(plugin));
                    let ready = Command::PluginReady { engine: engine.clone(), hash: hash.clone(), node: me };
                    if let Err(e) = node.consensus.propose(ready).await {
                        tracing::warn!(%engine, %hash, "plugin ready, not recorded: {e}");
                    }
                }
                Err(e) => tracing::warn!(%engine, %hash, "cannot get the plugin build: {e}"),
            }
        }
        let current = node.plugins.get(engine).map(|p| p.hash().to_owned());
        if let Some(active) = &plugins.active
            && current.as_deref() != Some(active.as_str())
        {
            match pinned(node, engine, Some(active)).await {
                Ok(plugin) => {
                    node.plugins.replace(plugin);
                    let version = p_version(Some(plugins), active);
                    tracing::info!(%engine, hash = %active, %version, "plugin build active");
                }
                Err(e) => tracing::warn!(%engine, "cannot load the active build: {e}"),
            }
        }
    }
    // An engine whose installed builds were all removed runs its plugins
    // directory's build again.
    for plugin in node.plugins.iter() {
        let engine = &plugin.info().name;
        if state.active_plugin(engine).is_none()
            && let Some(local) = node.plugins.local(engine)
            && local.hash() != plugin.hash()
        {
            node.plugins.replace(local);
        }
    }
    forget_removed(node, &state);
}

/// Deletes stored builds that no engine names (and that are not new).
fn forget_removed(node: &Node, state: &crate::consensus::state::ClusterState) {
    let Ok(entries) = std::fs::read_dir(store(node)) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(hash) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".wasm")) else {
            continue;
        };
        if state.plugins.values().any(|p| p.builds.contains_key(hash)) {
            continue;
        }
        let old = entry.metadata().and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|a| a > ORPHAN_AGE));
        let pinned_here = state.transfers.values().any(|t| t.stage.is_live() && t.plugin.as_deref() == Some(hash));
        if old && !pinned_here {
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(%hash, "removed plugin build deleted"),
                Err(e) => tracing::warn!(%hash, "cannot delete removed plugin build: {e}"),
            }
        }
        if !pinned_here {
            node.plugins.forget(hash);
        }
    }
}

/// A build's component from this node's store, or from a member that holds
/// it; its hash verified, loaded (compiled into the cache) and stored.
async fn obtain(node: &Node, engine: &str, hash: &str) -> Result<Plugin, String> {
    let path = blob(node, hash);
    let wasm = match tokio::fs::read(&path).await {
        Ok(wasm) => wasm,
        Err(_) => {
            let state = node.consensus.state();
            let holders = state.plugins.get(engine).and_then(|p| p.builds.get(hash)).map(|b| b.ready.clone());
            let mut last = "no member holds it".to_owned();
            let mut found = None;
            for id in holders.unwrap_or_default().iter().filter(|id| **id != node.consensus.id) {
                let Some(member) = state.members.get(id) else { continue };
                let url = format!("{}/v1/plugins/blobs/{hash}", member.addr.trim_end_matches('/'));
                match get_blob(node, &url).await {
                    Ok(bytes) if blake3::hash(&bytes).to_hex().as_str() == hash => {
                        found = Some(bytes);
                        break;
                    }
                    Ok(bytes) => {
                        last = format!(
                            "{} sent bytes with BLAKE3 {}, not {hash}",
                            member.name,
                            blake3::hash(&bytes).to_hex()
                        )
                    }
                    Err(e) => last = format!("{}: {e}", member.name),
                }
            }
            found.ok_or(last)?
        }
    };
    let actual = blake3::hash(&wasm).to_hex().to_string();
    if actual != hash {
        return Err(format!("the stored bytes have BLAKE3 {actual}, not {hash}"));
    }
    let plugin = node.runtime.load_bytes(&path, wasm.clone()).await.map_err(|e| e.to_string())?;
    keep(&path, &wasm).map_err(|e| format!("storing the plugin: {e}"))?;
    Ok(plugin)
}

async fn get_blob(node: &Node, url: &str) -> Result<Vec<u8>, String> {
    let request =
        crate::http::request(hyper::Method::GET, url, &node.token, None).map_err(|e| format!("bad URL: {e}"))?;
    let within = Duration::from_secs(60);
    let response = tokio::time::timeout(within, node.client.request(request))
        .await
        .map_err(|_| format!("no answer in {within:?}"))?
        .map_err(|e| crate::http::error_chain(&e))?;
    if response.status() != hyper::StatusCode::OK {
        return Err(format!("answered {}", response.status()));
    }
    let body =
        crate::http::read_bounded(response.into_body(), MAX_PLUGIN_BYTES, within).await.map_err(|e| e.to_string())?;
    Ok(body.to_vec())
}
