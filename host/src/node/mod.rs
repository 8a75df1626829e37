//! A Ferry node: its data directory, plugins, limits and transfers.

pub mod config;
pub mod credentials;

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::Semaphore;

pub use config::Config;

use crate::consensus::Consensus;
use crate::http::{ApiClient, Client};
use crate::install::DataDir;
use crate::plugin::{PluginRuntime, Registry};
use crate::stream::RateLimiter;
use crate::transfer::{RetryPolicy, Shared, TransferManager};
use credentials::Credentials;

pub mod conductor;
pub mod cutover;
pub mod fences;
pub mod live;
pub mod metrics;
pub mod registrar;
pub mod rollout;
pub mod shard_watch;

/// Request bodies being read at once, in bytes, node-wide.
pub const REQUEST_BODY_BUDGET: usize = 256 << 20;

pub struct Node {
    pub config: Config,
    pub data: DataDir,
    pub plugins: Arc<Registry>,
    pub transfers: TransferManager,
    /// What each token may do.
    pub credentials: Credentials,
    /// The token this node presents to other nodes.
    pub token: Arc<str>,
    /// The client for other nodes (TLS against the cluster CA when
    /// configured), one connection pool for the whole node.
    pub client: Client,
    /// The server side of TLS, when configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Request bodies being read, in KiB, node-wide.
    pub request_budget: Arc<Semaphore>,
    pub rate: Arc<RateLimiter>,
    /// Outgoing snapshot streams this node serves at once.
    pub outgoing: Arc<Semaphore>,
    pub consensus: Arc<Consensus>,
    /// Wakes the registrar (after a publish, a retirement).
    pub registrar: Arc<tokio::sync::Notify>,
    /// Asks the registrar for a full pass (after a join or a leave).
    rescan: std::sync::atomic::AtomicBool,
    /// Consensus transfers this node is conducting as their target.
    pub conducting: conductor::Conducting,
    /// Locks held for fenced source replicas.
    pub fences: fences::Fences,
    /// Live moves whose source side this node has settled (unfence, retire).
    pub settled: cutover::Once,
    /// Live moves whose abort this node has asked for as their source.
    pub aborts_asked: cutover::Once,
    /// Owns the wasmtime engine and its epoch ticker; loads installed builds.
    pub runtime: PluginRuntime,
}

impl Node {
    /// Opens the data directory, loads every plugin, removes staging
    /// directories that no live transfer owns (a crash leaves them behind),
    /// and starts consensus; `listening` is the address the API is bound to
    /// (other nodes reach us at its base URL, `https://` with TLS).
    pub async fn open(config: Config, listening: std::net::SocketAddr) -> anyhow::Result<Node> {
        config.check()?;
        let data = DataDir::open(&config.data_dir)
            .with_context(|| format!("opening data dir {}", config.data_dir.display()))?;
        restrict(&data.state())?;
        let credentials = match &config.auth {
            Some(files) => Credentials::scoped(files)?,
            None => {
                tracing::warn!(
                    "one token grants every scope (read, admin, node); configure [auth] for scoped credentials"
                );
                Credentials::single(config::read_token(&config.token_file(), config.token_file.is_none())?)
            }
        };
        let token = credentials.node_token();
        let (client, tls) = match &config.tls {
            Some(files) => {
                let identity = Some((files.cert_file.as_path(), files.key_file.as_path()));
                let client = crate::http::tls_client(crate::http::tls::client_config(&files.ca_file, identity)?);
                (client, Some(crate::http::tls::server_config(files)?))
            }
            None => {
                if !listening.ip().is_loopback() {
                    tracing::warn!(
                        "no [tls]: tokens and data travel in clear text on {listening}; configure TLS for a network"
                    );
                }
                (crate::http::client(), None)
            }
        };
        let addr = format!("{}://{listening}", if tls.is_some() { "https" } else { "http" });
        let addr = addr.as_str();
        let runtime = PluginRuntime::new(config.runtime_config())?;
        let plugins_dir = config.plugins_dir();
        std::fs::create_dir_all(&plugins_dir)
            .with_context(|| format!("creating plugins dir {}", plugins_dir.display()))?;
        let plugins = Arc::new(Registry::load_dir(&runtime, &plugins_dir).await?);
        for plugin in plugins.iter() {
            tracing::info!(engine = %plugin.info().name, path = %plugin.path().display(), "plugin loaded");
        }
        let rate = Arc::new(RateLimiter::new(config.rate_limit));
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
            client: client.clone(),
            published: Some(registrar.clone()),
            stopping: Default::default(),
            token: token.clone(),
            rate: rate.clone(),
            incoming: Arc::new(Semaphore::new(config.max_incoming)),
            retry: RetryPolicy {
                max_attempts: config.max_attempts,
                stall_timeout: std::time::Duration::from_secs(config.stall_timeout),
                ..RetryPolicy::default()
            },
        });
        Ok(Node {
            outgoing: Arc::new(Semaphore::new(config.max_outgoing)),
            consensus,
            registrar,
            rescan: Default::default(),
            conducting: conductor::Conducting::default(),
            fences: fences::Fences::with_keepers(data.root().join("fences")),
            settled: Default::default(),
            aborts_asked: Default::default(),
            config,
            data,
            plugins,
            transfers,
            credentials,
            token,
            client,
            tls,
            request_budget: Arc::new(Semaphore::new(REQUEST_BODY_BUDGET / 1024)),
            rate,
            runtime,
        })
    }

    /// Has the registrar look at every shard and every row (this node's
    /// membership changed: the table it registers into is another).
    pub fn rescan_shards(&self) {
        self.rescan.store(true, std::sync::atomic::Ordering::Relaxed);
        self.registrar.notify_one();
    }

    /// Whether a full pass was asked for since the last call.
    pub fn rescan_requested(&self) -> bool {
        self.rescan.swap(false, std::sync::atomic::Ordering::Relaxed)
    }

    /// The base URL other nodes reach this node at.
    pub fn addr(&self) -> &str {
        &self.consensus.addr
    }

    /// A client of another node's API, with this node's credential.
    pub fn peer(&self, addr: &str) -> ApiClient {
        ApiClient::with_client(self.client.clone(), addr, self.token.to_string())
    }

    /// Whether a direct pull may name `source`: a member's address or one
    /// the configuration allows (a pull sends our credential to its source).
    pub fn check_source(&self, source: &str) -> Result<(), String> {
        let wanted =
            crate::http::base_url(source).map_err(|e| format!("source {:?} {e}", crate::http::redacted(source)))?;
        let state = self.consensus.state();
        let member = state.members.values().any(|m| crate::http::base_url(&m.addr).is_ok_and(|a| a == wanted));
        if member || self.config.allowed_sources.iter().any(|pattern| source_matches(pattern, &wanted)) {
            Ok(())
        } else {
            Err(format!("source {wanted} is neither a member of this cluster nor in allowed_sources (--allow-source)"))
        }
    }
}

/// Whether the base URL `wanted` matches an `allowed_sources` entry: a base
/// URL, or `scheme://host:*` for any port of that host.
pub fn source_matches(pattern: &str, wanted: &str) -> bool {
    match pattern.strip_suffix(":*") {
        Some(host) => crate::http::base_url(host).is_ok_and(|host| {
            wanted
                .strip_prefix(host.as_str())
                .and_then(|rest| rest.strip_prefix(':'))
                .is_some_and(|port| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        }),
        None => crate::http::base_url(pattern).is_ok_and(|allowed| allowed == wanted),
    }
}

/// Makes the node's own state directory (tokens, Raft storage, compiled
/// plugins) private to its user.
fn restrict(state: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(state, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private", state.display()))
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

#[cfg(test)]
mod tests {
    use super::source_matches;

    #[test]
    fn allowed_sources_match_exactly_or_by_host() {
        assert!(source_matches("http://10.0.0.5:7070/", "http://10.0.0.5:7070"));
        assert!(!source_matches("http://10.0.0.5:7070", "http://10.0.0.5:7071"));
        assert!(!source_matches("http://10.0.0.5:7070", "https://10.0.0.5:7070"));
        assert!(source_matches("http://127.0.0.1:*", "http://127.0.0.1:40000"));
        assert!(!source_matches("http://127.0.0.1:*", "http://127.0.0.10:40000"));
        assert!(!source_matches("http://127.0.0.1:*", "https://127.0.0.1:40000"));
    }
}
