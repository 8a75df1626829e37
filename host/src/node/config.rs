//! A node's configuration: a TOML file, overridden by flags, over embedded
//! defaults that run a single local node with no configuration at all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::credentials::AuthFiles;
pub use super::credentials::read_token;
use crate::http::base_url;
use crate::http::tls::TlsFiles;
use crate::plugin::{
    DEFAULT_MAX_CALLS_PER_ENGINE, DEFAULT_MEMORY_BUDGET, DEFAULT_MEMORY_LIMIT, HookDeadlines, RuntimeConfig,
};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node_id: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Default: `<data-dir>/plugins`.
    pub plugins_dir: Option<PathBuf>,
    /// One token for every scope (the simple setup; see `auth` for scoped
    /// credentials). Default: `<data-dir>/state/token`, created with a random
    /// token, when `auth` is absent.
    pub token_file: Option<PathBuf>,
    /// Scoped credentials: `node`, `admin` and `read` token files.
    pub auth: Option<AuthFiles>,
    /// TLS for the API and between nodes; absent: plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Base URLs a direct pull may name as its source besides the cluster's
    /// members (a pull sends this node's credential to its source);
    /// `scheme://host:*` allows any port of a host.
    pub allowed_sources: Vec<String>,
    /// Open connections at most (also kept under half the fd limit).
    pub max_connections: usize,
    /// Seconds a request body may take to arrive.
    pub request_timeout: u64,
    /// A live move's write pause budget, in milliseconds: the source is
    /// fenced once the predicted final round fits half of it.
    pub pause_budget_ms: u64,
    /// Node-wide byte rate, in and out; `0` or absent: unlimited.
    pub rate_limit: Option<u64>,
    pub max_incoming: usize,
    pub max_outgoing: usize,
    /// Failed attempts in a row before a transfer gives up.
    pub max_attempts: u32,
    /// Seconds without data before a transfer's stream is given up, on both
    /// ends: a receiver's read waits no longer, a transfer that completes no
    /// file for this long fails, and a source ends a stream its receiver
    /// takes nothing of (freeing the outgoing slot).
    pub stall_timeout: u64,
    pub plugin: PluginSettings,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginSettings {
    pub memory_limit: usize,
    /// Bytes all plugin instances of the node may hold; each call reserves
    /// `memory_limit` of it, or waits.
    pub memory_budget: usize,
    /// Hook calls of one engine at once; more wait.
    pub max_calls_per_engine: usize,
    /// Per-hook deadlines in milliseconds.
    pub deadlines: HookDeadlines,
    /// Where compiled plugins are kept (default `<data_dir>/state/compiled`).
    pub cache_dir: Option<PathBuf>,
}

impl Default for PluginSettings {
    fn default() -> Self {
        PluginSettings {
            memory_limit: DEFAULT_MEMORY_LIMIT,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            max_calls_per_engine: DEFAULT_MAX_CALLS_PER_ENGINE,
            deadlines: HookDeadlines::default(),
            cache_dir: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: "node-1".into(),
            listen: "127.0.0.1:7070".parse().unwrap(),
            data_dir: PathBuf::from("ferry-data"),
            plugins_dir: None,
            token_file: None,
            auth: None,
            tls: None,
            allowed_sources: Vec::new(),
            max_connections: 1024,
            request_timeout: 30,
            pause_budget_ms: 250,
            rate_limit: None,
            max_incoming: 2,
            max_outgoing: 2,
            max_attempts: 8,
            stall_timeout: 60,
            plugin: PluginSettings::default(),
        }
    }
}

/// Where a node's configuration is looked for when none is named: the
/// environment's `FERRY_CONFIG` (which must exist), else the first of
/// `$XDG_CONFIG_HOME/ferry/ferry.toml` (`~/.config/ferry/ferry.toml`) and
/// `/etc/ferry/ferry.toml` that exists.
pub fn conventional_path() -> anyhow::Result<Option<PathBuf>> {
    if let Some(path) = std::env::var_os("FERRY_CONFIG") {
        let path = PathBuf::from(path);
        anyhow::ensure!(path.is_file(), "FERRY_CONFIG names {}, which is not a file", path.display());
        return Ok(Some(path));
    }
    let xdg = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")));
    let candidates =
        xdg.map(|dir| dir.join("ferry/ferry.toml")).into_iter().chain([PathBuf::from("/etc/ferry/ferry.toml")]);
    Ok(candidates.into_iter().find(|p| p.is_file()))
}

impl Config {
    /// The base URL a client on this machine reaches the node's API at: its
    /// listen address (a wildcard address as loopback), `https` with TLS.
    pub fn api_url(&self) -> anyhow::Result<String> {
        let mut addr = self.listen;
        anyhow::ensure!(addr.port() != 0, "the config listens on port 0: give the node's URL (--node)");
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() { [127, 0, 0, 1].into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        Ok(format!("{scheme}://{addr}"))
    }

    /// The token files a client on this machine may use, most capable first:
    /// the one-for-every-scope token (configured, or the node's own in its
    /// data dir), then the admin and the read token.
    pub fn client_token_files(&self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        match &self.auth {
            None => files.push(self.token_file.clone().unwrap_or_else(|| self.data_dir.join("state/token"))),
            Some(auth) => files.extend(auth.admin_token_file.iter().chain(&auth.read_token_file).cloned()),
        }
        files
    }

    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config {}", path.display()))
    }

    pub fn check(&self) -> anyhow::Result<()> {
        crate::consensus::state::check_member_name(&self.node_id).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(self.max_incoming >= 1, "max_incoming must be at least 1");
        anyhow::ensure!(self.max_outgoing >= 1, "max_outgoing must be at least 1");
        anyhow::ensure!(self.max_attempts >= 1, "max_attempts must be at least 1");
        anyhow::ensure!(self.stall_timeout >= 1, "stall_timeout must be at least 1 second");
        anyhow::ensure!(self.max_connections >= 16, "max_connections must be at least 16");
        anyhow::ensure!((1..=3600).contains(&self.request_timeout), "request_timeout must be 1 to 3600 seconds");
        anyhow::ensure!((10..=600_000).contains(&self.pause_budget_ms), "pause_budget_ms must be 10 to 600000");
        anyhow::ensure!(
            self.auth.is_none() || self.token_file.is_none(),
            "token_file and [auth] exclude each other: one token for every scope, or one per scope"
        );
        for source in &self.allowed_sources {
            base_url(source.strip_suffix(":*").unwrap_or(source))
                .map_err(|e| anyhow::anyhow!("allowed_sources: {source:?} {e}"))?;
        }
        let plugin = &self.plugin;
        anyhow::ensure!(plugin.memory_limit >= 1 << 20, "plugin.memory_limit must be at least 1 MiB");
        anyhow::ensure!(
            plugin.memory_budget >> 20 >= plugin.memory_limit.div_ceil(1 << 20),
            "plugin.memory_budget ({}) must be at least plugin.memory_limit ({}), in whole MiB",
            plugin.memory_budget,
            plugin.memory_limit
        );
        let slots = RuntimeConfig::default().max_instances as usize;
        anyhow::ensure!(
            (1..=slots).contains(&plugin.max_calls_per_engine),
            "plugin.max_calls_per_engine must be 1-{slots}"
        );
        if plugin.max_calls_per_engine.saturating_mul(plugin.memory_limit) >= plugin.memory_budget {
            tracing::warn!(
                "plugin.max_calls_per_engine x plugin.memory_limit fills plugin.memory_budget: \
                 one engine's calls can make every other engine's wait"
            );
        }
        Ok(())
    }

    pub fn plugins_dir(&self) -> PathBuf {
        self.plugins_dir.clone().unwrap_or_else(|| self.data_dir.join("plugins"))
    }

    pub fn token_file(&self) -> PathBuf {
        self.token_file.clone().unwrap_or_else(|| self.data_dir.join("state").join("token"))
    }

    pub fn runtime_config(&self) -> RuntimeConfig {
        RuntimeConfig {
            deadlines: self.plugin.deadlines,
            memory_limit: self.plugin.memory_limit,
            memory_budget: self.plugin.memory_budget,
            max_calls_per_engine: self.plugin.max_calls_per_engine,
            cache_dir: Some(
                self.plugin.cache_dir.clone().unwrap_or_else(|| self.data_dir.join("state").join("compiled")),
            ),
            ..RuntimeConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_refuses_unknown_keys() {
        let config: Config = toml::from_str(
            "node_id = \"a\"\nlisten = \"127.0.0.1:9000\"\nrate_limit = 1000\n[plugin.deadlines]\nterm_check = 250\n",
        )
        .unwrap();
        assert_eq!(config.node_id, "a");
        assert_eq!(config.max_incoming, 2);
        assert_eq!(config.plugin.deadlines.term_check, std::time::Duration::from_millis(250));
        assert!(toml::from_str::<Config>("colour = \"blue\"").is_err());
    }

    #[test]
    fn token_file_and_auth_exclude_each_other() {
        let config: Config = toml::from_str("token_file = \"t\"\n[auth]\nnode_token_file = \"n\"\n").unwrap();
        assert!(config.check().unwrap_err().to_string().contains("exclude"));
    }

    #[test]
    fn plugin_memory_budget_must_hold_one_limit() {
        let config: Config =
            toml::from_str("[plugin]\nmemory_limit = 67108864\nmemory_budget = 134217728\nmax_calls_per_engine = 1\n")
                .unwrap();
        config.check().unwrap();
        assert_eq!(config.runtime_config().memory_budget, 128 << 20);
        assert_eq!(config.runtime_config().max_calls_per_engine, 1);
        let small: Config = toml::from_str("[plugin]\nmemory_limit = 67108864\nmemory_budget = 33554432\n").unwrap();
        assert!(small.check().unwrap_err().to_string().contains("plugin.memory_budget"));
        let none: Config = toml::from_str("[plugin]\nmax_calls_per_engine = 0\n").unwrap();
        assert!(none.check().is_err());
        Config::default().check().unwrap();
    }
}
