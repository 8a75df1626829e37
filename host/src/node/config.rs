//! A node's configuration: a TOML file, overridden by flags, over embedded
//! defaults that run a single local node with no configuration at all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::plugin::{DEFAULT_MEMORY_LIMIT, HookDeadlines, RuntimeConfig};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node_id: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Default: `<data-dir>/plugins`.
    pub plugins_dir: Option<PathBuf>,
    /// Default: `<data-dir>/state/token`, created with a random token.
    pub token_file: Option<PathBuf>,
    /// Node-wide byte rate, in and out; `0` or absent: unlimited.
    pub rate_limit: Option<u64>,
    pub max_incoming: usize,
    pub max_outgoing: usize,
    /// Failed attempts in a row before a transfer gives up.
    pub max_attempts: u32,
    pub plugin: PluginSettings,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginSettings {
    pub memory_limit: usize,
    /// Per-hook deadlines in milliseconds.
    pub deadlines: HookDeadlines,
}

impl Default for PluginSettings {
    fn default() -> Self {
        PluginSettings { memory_limit: DEFAULT_MEMORY_LIMIT, deadlines: HookDeadlines::default() }
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
            rate_limit: None,
            max_incoming: 2,
            max_outgoing: 2,
            max_attempts: 8,
            plugin: PluginSettings::default(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config {}", path.display()))
    }

    pub fn check(&self) -> anyhow::Result<()> {
        crate::consensus::state::check_member_name(&self.node_id).map_err(anyhow::Error::msg)?;
        anyhow::ensure!(self.max_incoming >= 1, "max_incoming must be at least 1");
        anyhow::ensure!(self.max_outgoing >= 1, "max_outgoing must be at least 1");
        anyhow::ensure!(self.max_attempts >= 1, "max_attempts must be at least 1");
        anyhow::ensure!(self.plugin.memory_limit >= 1 << 20, "plugin.memory_limit must be at least 1 MiB");
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
            cache_dir: Some(self.data_dir.join("state").join("compiled")),
            ..RuntimeConfig::default()
        }
    }
}

/// Reads the token from `path`; when `create` and the file is missing,
/// writes a new random one (mode 0600). The token is never logged.
pub fn read_token(path: &Path, create: bool) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim().to_owned();
            anyhow::ensure!(token.len() >= 16, "token in {} is shorter than 16 characters", path.display());
            anyhow::ensure!(
                token.bytes().all(|b| b.is_ascii_graphic()),
                "token in {} has characters that cannot go in a header",
                path.display()
            );
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("creating token file {}", path.display()))?;
            file.write_all(token.as_bytes())?;
            file.sync_all()?;
            Ok(token)
        }
        Err(e) => Err(e).with_context(|| format!("reading token file {}", path.display())),
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
    fn token_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/token");
        let token = read_token(&path, true).unwrap();
        assert_eq!(read_token(&path, false).unwrap(), token);
        std::fs::write(&path, "short").unwrap();
        assert!(read_token(&path, false).is_err());
        assert!(read_token(&dir.path().join("none"), false).is_err());
    }
}
