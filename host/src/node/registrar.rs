//! Keeps the replicated state true to this node's disk: its member record,
//! the replicas in `shards/` (registered Active), and Dead replicas (their
//! files removed, then forgotten).

use std::sync::Arc;
use std::time::Duration;

use crate::consensus::state::{Command, Member, ReplicaState};
use crate::node::Node;

/// How often the registrar runs without being woken.
const PERIOD: Duration = Duration::from_secs(10);

/// Runs until the node stops.
pub async fn run(node: Arc<Node>, stop: tokio_util::sync::CancellationToken) {
    let mut applied = node.consensus.applied_watch();
    loop {
        if let Err(e) = register(&node).await {
            tracing::debug!("registrar: {e}");
        }
        tokio::select! {
            _ = node.registrar.notified() => {}
            _ = applied.changed() => {}
            _ = tokio::time::sleep(PERIOD) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// The shards on this node's disk, as (engine, shard): real directories
/// whose names follow the rules (anything else can be neither served nor
/// registered, and is left alone).
pub fn local_shards(node: &Node) -> std::io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for engine in std::fs::read_dir(node.data.shards_root())? {
        let engine = engine?;
        if !engine.file_type()?.is_dir() {
            continue;
        }
        for shard in std::fs::read_dir(engine.path())? {
            let shard = shard?;
            if shard.file_type()?.is_dir() {
                let (engine, shard) = (engine.file_name(), shard.file_name());
                let (Some(engine), Some(shard)) = (engine.to_str(), shard.to_str()) else { continue };
                if node.data.shard(engine, shard).is_ok() {
                    out.push((engine.to_owned(), shard.to_owned()));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

async fn register(node: &Node) -> anyhow::Result<()> {
    // Staging that belongs to no running or live transfer (TiKV #10930).
    let mut keep = crate::node::live_here(&node.consensus);
    keep.extend(node.transfers.running());
    let removed = crate::node::remove_stale_staging(&node.data, &keep, Duration::from_secs(60))?;
    if removed > 0 {
        tracing::info!(removed, "swept staging directories of no live transfer");
    }
    let consensus = &node.consensus;
    let me = consensus.id;
    let state = consensus.state();
    let member = Member { name: consensus.name.clone(), addr: consensus.addr.clone() };
    if state.members.get(&me) != Some(&member) {
        consensus.propose(Command::SetMember { id: me, member }).await?;
    }
    let state = consensus.state();
    // Dead replicas here: remove their files, then forget them. Only a real
    // directory directly under shards/<engine>/ is ever removed; a name that
    // makes no such path (a record from before names were checked) names no
    // files of ours, so it is just forgotten.
    for ((engine, shard), replicas) in &state.replicas {
        if replicas.get(&me) != Some(&ReplicaState::Dead)
            || state.live_transfer(engine, shard).is_some_and(|t| t.target == me)
            || crate::node::cutover::retire_pending(node, engine, shard)
        {
            continue;
        }
        if node.data.shard(engine, shard).is_ok() {
            let (data, e, s) = (node.data.clone(), engine.clone(), shard.clone());
            match tokio::task::spawn_blocking(move || data.remove_shard(&e, &s)).await? {
                Ok(true) => tracing::info!(engine, shard, "removed the files of a dead replica"),
                Ok(false) => {}
                Err(e) => {
                    // Kept, and kept in the table: someone must look at it.
                    tracing::warn!(engine, shard, "not removing a dead replica: {e}");
                    continue;
                }
            }
        }
        let forget = Command::ForgetReplica { engine: engine.clone(), shard: shard.clone(), node: me };
        if let Err(e) = consensus.propose(forget).await {
            tracing::warn!(engine, shard, "cannot forget a dead replica: {e}");
        }
    }
    // Replicas on disk the table does not know: Active.
    let state = consensus.state();
    for (engine, shard) in local_shards(node)? {
        if state.replica(&engine, &shard, me).is_none()
            && state.live_transfer(&engine, &shard).is_none_or(|t| t.target != me)
        {
            let command = Command::RegisterReplica { engine: engine.clone(), shard: shard.clone(), node: me };
            if let Err(e) = consensus.propose(command).await {
                tracing::warn!(engine, shard, "cannot register replica: {e}");
            }
        }
    }
    Ok(())
}
