//! A Ferry node: its data directory, plugins, limits and transfers.

pub mod config;

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::Semaphore;

pub use config::Config;

use crate::consensus::Consensus;
use crate::install::DataDir;
use crate::plugin::{PluginRuntime, Registry};
use crate::stream::RateLimiter;
use crate::transfer::{RetryPolicy, Shared, TransferManager};

pub mod conductor;
pub mod registrar;

pub struct Node {
    pub config: Config,
    pub data: DataDir,
    pub plugins: Arc<Registry>,
    pub transfers: TransferManager,
    pub token: Arc<str>,
    pub rate: Arc<RateLimiter>,
    /// Outgoing snapshot streams this node serves at once.
    pub outgoing: Arc<Semaphore>,
    pub consensus: Arc<Consensus>,
    /// Wakes the registrar (after a join, a leave, a publish).
    pub registrar: Arc<tokio::sync::Notify>,
    /// Consensus transfers this node is conducting as their target.
    pub conducting: conductor::Conducting,
    /// Owns the wasmtime engine and its epoch ticker.
    _runtime: PluginRuntime,
}

impl Node {
    /// Opens the data directory, loads every plugin, removes staging
    /// directories that no live transfer owns (a crash leaves them behind),
    /// and starts consensus; `addr` is the base URL other nodes reach us at.
    pub async fn open(config: Config, addr: &str) -> anyhow::Result<Node> {
        config.check()?;
        let data = DataDir::open(&config.data_dir)
            .with_context(|| format!("opening data dir {}", config.data_dir.display()))?;
        let token: Arc<str> = config::read_token(&config.token_file(), config.token_file.is_none())?.into();
        let runtime = PluginRuntime::new(config.runtime_config())?;
        let plugins_dir = config.plugins_dir();
        std::fs::create_dir_all(&plugins_dir)
            .with_context(|| format!("creating plugins dir {}", plugins_dir.display()))?;
        let plugins = Arc::new(Registry::load_dir(&runtime, &plugins_dir).await?);
        for plugin in plugins.iter() {
            tracing::info!(engine = %plugin.info().name, path = %plugin.path().display(), "plugin loaded");
        }
        let rate = Arc::new(RateLimiter::new(config.rate_limit));
        let client = crate::http::client();
        let consensus = Arc::new(
            Consensus::open(&data.state(), &config.node_id, addr, client.clone(), token.clone())
                .await
                .context("starting consensus")?,
        );
        let removed = remove_stale_staging(&data, &live_here(&consensus), std::time::Duration::ZERO)?;
        if removed > 0 {
            tracing::info!(removed, "removed staging directories left by an earlier run");
        }
        let registrar = Arc::new(tokio::sync::Notify::new());
        let transfers = TransferManager::new(Shared {
            data: data.clone(),
            plugins: plugins.clone(),
            client,
            published: Some(registrar.clone()),
            stopping: Default::default(),
            token: token.clone(),
            rate: rate.clone(),
            incoming: Arc::new(Semaphore::new(config.max_incoming)),
            retry: RetryPolicy { max_attempts: config.max_attempts, ..RetryPolicy::default() },
        });
        Ok(Node {
            outgoing: Arc::new(Semaphore::new(config.max_outgoing)),
            consensus,
            registrar,
            conducting: conductor::Conducting::default(),
            config,
            data,
            plugins,
            transfers,
            token,
            rate,
            _runtime: runtime,
        })
    }
}

/// Ids of live consensus transfers that target this node: their staging is
/// kept, to resume.
pub fn live_here(consensus: &Consensus) -> Vec<String> {
    let me = consensus.id;
    consensus.state().transfers.values().filter(|t| t.target == me && t.stage.is_live()).map(|t| t.id.clone()).collect()
}

/// Removes staging directories whose transfer is not in `keep` and that are
/// at least `min_age` old (a transfer that starts while this runs is young).
pub fn remove_stale_staging(data: &DataDir, keep: &[String], min_age: std::time::Duration) -> anyhow::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(data.staging_root())? {
        let entry = entry?;
        if keep.iter().any(|id| entry.file_name().to_str() == Some(id)) {
            continue;
        }
        let age = entry.metadata()?.modified()?.elapsed().unwrap_or_default();
        if age < min_age {
            continue;
        }
        // Only ever the entry itself: a symlink goes, never what it points to.
        if data
            .remove_staging_entry(&entry.file_name())
            .with_context(|| format!("removing {}", entry.path().display()))?
        {
            removed += 1;
        }
    }
    Ok(removed)
}
