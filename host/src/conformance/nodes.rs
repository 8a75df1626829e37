//! Two real nodes in this process, on loopback: the code of `ferry serve`
//! (plugin runtime, sandbox, limits, stream, install) moves the kit's shard
//! from one to the other.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::node::Node;
use crate::node::config::Config;
use crate::plugin::RuntimeConfig;

pub struct KitNode {
    pub node: Arc<Node>,
    pub url: String,
    stop: CancellationToken,
}

impl KitNode {
    /// A node whose data lives in `dir`, loading the one plugin in
    /// `plugins`, serving HTTP on a free loopback port; the kit's nodes
    /// share one token.
    pub async fn start(
        name: &str,
        dir: &Path,
        plugins: &Path,
        token_file: &Path,
        runtime: &RuntimeConfig,
    ) -> anyhow::Result<KitNode> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding a loopback port")?;
        let addr = listener.local_addr()?;
        let mut config = Config {
            node_id: name.into(),
            listen: addr,
            data_dir: dir.to_owned(),
            plugins_dir: Some(plugins.to_owned()),
            token_file: Some(token_file.to_owned()),
            ..Config::default()
        };
        config.plugin.memory_limit = runtime.memory_limit;
        config.plugin.memory_budget = runtime.memory_budget.max(runtime.memory_limit);
        config.plugin.deadlines = runtime.deadlines;
        config.plugin.cache_dir = runtime.cache_dir.clone();
        let node = Arc::new(Node::open(config, addr).await.with_context(|| format!("starting kit node {name}"))?);
        let stop = CancellationToken::new();
        let url = node.addr().to_owned();
        tokio::spawn(crate::api::server::serve(node.clone(), listener, stop.clone()));
        Ok(KitNode { node, url, stop })
    }

    pub fn shard_dir(&self, engine: &str, shard: &str) -> PathBuf {
        self.node.data.shard(engine, shard).expect("the kit's names are valid")
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.node.consensus.shutdown().await;
    }
}
