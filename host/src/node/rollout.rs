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

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::consensus::state::{Command, PluginRollout};
use crate::node::Node;

/// Largest plugin component accepted.
pub const MAX_PLUGIN_BYTES: usize = 64 << 20;

fn store(node: &Node) -> PathBuf {
    node.data.root().join("state").join("plugin-store")
}

fn blob(node: &Node, hash: &str) -> PathBuf {
    store(node).join(format!("{hash}.wasm"))
}

/// Loads `wasm`, keeps it by hash, and proposes it as its engine's
/// rollout; the rollout as proposed.
pub async fn install(node: &Node, wasm: Vec<u8>) -> Result<PluginRollout, String> {
    let hash = blake3::hash(&wasm).to_hex().to_string();
    let path = blob(node, &hash);
    let plugin = node.runtime.load_bytes(&path, wasm.clone()).await.map_err(|e| e.to_string())?;
    keep(&path, &wasm).map_err(|e| format!("storing the plugin: {e}"))?;
    let (engine, version) = (plugin.info().name.clone(), plugin.info().plugin_version.clone());
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
    node.consensus.state().plugins.get(&engine).cloned().ok_or_else(|| "the rollout vanished".to_owned())
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

/// Brings this node's plugins in line with the cluster's rollouts.
pub async fn reconcile(node: &Node) {
    let state = node.consensus.state();
    let me = node.consensus.id;
    for (engine, rollout) in &state.plugins {
        if !rollout.ready.contains(&me) {
            match fetch(node, rollout).await {
                Ok(()) => {
                    let ready = Command::PluginReady { engine: engine.clone(), hash: rollout.hash.clone(), node: me };
                    if let Err(e) = node.consensus.propose(ready).await {
                        tracing::warn!(%engine, hash = %rollout.hash, "plugin ready, not recorded: {e}");
                    }
                }
                Err(e) => tracing::warn!(%engine, hash = %rollout.hash, "cannot get the plugin build: {e}"),
            }
            continue;
        }
        let current = node.plugins.get(engine).map(|p| p.hash().to_owned());
        if rollout.active && current.as_deref() != Some(rollout.hash.as_str()) {
            let path = blob(node, &rollout.hash);
            let loaded = match tokio::fs::read(&path).await {
                Ok(wasm) => node.runtime.load_bytes(&path, wasm).await.map_err(|e| e.to_string()),
                Err(e) => Err(format!("{}: {e}", path.display())),
            };
            match loaded {
                Ok(plugin) if plugin.info().name == *engine => {
                    node.plugins.replace(Arc::new(plugin));
                    tracing::info!(%engine, hash = %rollout.hash, version = %rollout.version, "plugin build active");
                }
                Ok(plugin) => tracing::warn!(%engine, "the stored build is of engine {}", plugin.info().name),
                Err(e) => tracing::warn!(%engine, "cannot load the active build: {e}"),
            }
        }
    }
}

/// Gets the rollout's build from a member that holds it, verifies its hash,
/// loads it (compiling it into the cache) and stores it.
async fn fetch(node: &Node, rollout: &PluginRollout) -> Result<(), String> {
    let path = blob(node, &rollout.hash);
    let wasm = match tokio::fs::read(&path).await {
        Ok(wasm) => wasm,
        Err(_) => {
            let state = node.consensus.state();
            let mut last = "no member holds it".to_owned();
            let mut found = None;
            for id in &rollout.ready {
                let Some(member) = state.members.get(id) else { continue };
                let url = format!("{}/v1/plugins/blobs/{}", member.addr.trim_end_matches('/'), rollout.hash);
                match get_blob(node, &url).await {
                    Ok(bytes) => {
                        found = Some(bytes);
                        break;
                    }
                    Err(e) => last = format!("{}: {e}", member.name),
                }
            }
            found.ok_or(last)?
        }
    };
    let hash = blake3::hash(&wasm).to_hex().to_string();
    if hash != rollout.hash {
        return Err(format!("the bytes have BLAKE3 {hash}, not {}", rollout.hash));
    }
    node.runtime.load_bytes(&path, wasm.clone()).await.map_err(|e| e.to_string())?;
    keep(&path, &wasm).map_err(|e| format!("storing the plugin: {e}"))
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
