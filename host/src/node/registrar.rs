//! Keeps the replicated state true to this node's disk: its member record,
//! the replicas in `shards/` (registered Active), and Dead replicas (their
//! files removed, then forgotten).
//!
//! Its work is proportional to what changed, not to how many shards the
//! node or the cluster holds:
//! - the disk: [`ShardWatch`] names the shard directories that appeared or
//!   went (inotify), and only those are looked at;
//! - the state: each pass diffs the replica table and the transfer records
//!   against the copies the last pass saw (persistent maps: the diff skips
//!   the structure they share), and looks at the rows that changed.
//!
//! A full pass (every shard directory, every row) runs at start, after this
//! node joins or leaves, when the watch cannot tell what changed, and every
//! [`RESCAN_PERIOD`] as a safety net. Staging that belongs to no transfer is
//! swept every [`SWEEP_PERIOD`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use imbl::ordmap::DiffItem;
use tokio_util::sync::CancellationToken;

use crate::consensus::ConsensusError;
use crate::consensus::state::{
    Command, MAX_REGISTER_BATCH, Member, NodeId, ReplicaState, ReplicaTable, ShardKey, TransferTable,
};
use crate::node::Node;
use crate::node::shard_watch::{Changes, ShardWatch};

/// How often a full pass runs when nothing asks for one.
pub const RESCAN_PERIOD: Duration = Duration::from_secs(60);
/// How often a full pass runs when inotify is not available.
const UNWATCHED_RESCAN_PERIOD: Duration = Duration::from_secs(5);
/// How often staging of no live transfer is looked for (it must be a minute
/// old to go).
pub const SWEEP_PERIOD: Duration = Duration::from_secs(10);
/// How soon a pass that failed (no leader yet, say) is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Runs until the node stops.
pub async fn run(node: Arc<Node>, stop: CancellationToken) {
    let mut watch = match ShardWatch::start(&node.data.shards_root()) {
        Ok(watch) => Some(watch),
        Err(e) => {
            tracing::warn!("cannot watch shards/ ({e}): it is scanned every {UNWATCHED_RESCAN_PERIOD:?} instead");
            None
        }
    };
    let period = if watch.is_some() { RESCAN_PERIOD } else { UNWATCHED_RESCAN_PERIOD };
    let mut rescan = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut sweep = tokio::time::interval(SWEEP_PERIOD);
    let mut applied = node.consensus.applied_watch();
    let mut pass = Pass::default();
    let mut full = true;
    loop {
        full |= node.rescan_requested();
        let failed = match pass.run(&node, full).await {
            Ok(()) => false,
            Err(e) => {
                tracing::debug!("registrar: {e}");
                true
            }
        };
        full = false;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = node.registrar.notified() => {}
            _ = applied.changed() => {}
            changes = changed(&mut watch) => match changes {
                Some(Changes { shards, rescan }) => {
                    pass.dirty.extend(shards);
                    full = rescan;
                }
                None => {
                    tracing::warn!("the watch of shards/ ended: it is scanned every {UNWATCHED_RESCAN_PERIOD:?}");
                    watch = None;
                    rescan = tokio::time::interval(UNWATCHED_RESCAN_PERIOD);
                }
            },
            _ = sweep.tick() => sweep_staging(&node),
            _ = rescan.tick() => full = true,
            _ = tokio::time::sleep(RETRY), if failed => {}
        }
    }
}

/// The watch's next changes; never, without a watch. None: the watch ended.
async fn changed(watch: &mut Option<ShardWatch>) -> Option<Changes> {
    match watch {
        Some(watch) => watch.changed().await,
        None => std::future::pending().await,
    }
}

/// Staging that belongs to no running or live transfer (TiKV #10930).
fn sweep_staging(node: &Node) {
    let mut keep = crate::node::live_here(&node.consensus);
    keep.extend(node.transfers.running());
    match crate::node::remove_stale_staging(&node.data, &keep, Duration::from_secs(60)) {
        Ok(0) => {}
        Ok(removed) => tracing::info!(removed, "swept staging directories of no live transfer"),
        Err(e) => tracing::warn!("sweeping staging: {e}"),
    }
}

/// What the registrar carries from one pass to the next.
#[derive(Default)]
struct Pass {
    /// The replica table and transfer records the last pass saw.
    replicas: ReplicaTable,
    transfers: TransferTable,
    /// Shards whose directory here may have appeared or gone.
    dirty: BTreeSet<ShardKey>,
    /// Dead replicas here whose files are still to remove: they wait for a
    /// transfer or a retirement, or their removal failed.
    dead: BTreeSet<ShardKey>,
}

impl Pass {
    async fn run(&mut self, node: &Node, full: bool) -> anyhow::Result<()> {
        if full {
            self.replicas = ReplicaTable::new();
            self.transfers = TransferTable::new();
            let data = node.data.clone();
            self.dirty.extend(tokio::task::spawn_blocking(move || local_shards(&data)).await??);
        }
        self.own_member_record(node).await?;
        let state = node.consensus.state();
        self.diff(node.consensus.id, &state.replicas, &state.transfers);
        self.remove_dead(node).await;
        self.register_new(node).await
    }

    /// This node's name and address, as the state should have them.
    async fn own_member_record(&self, node: &Node) -> Result<(), ConsensusError> {
        let consensus = &node.consensus;
        let member = Member { name: consensus.name.clone(), addr: consensus.addr.clone() };
        if consensus.state().members.get(&consensus.id) != Some(&member) {
            consensus.propose(Command::SetMember { id: consensus.id, member }).await?;
        }
        Ok(())
    }

    /// Notes what changed since the last pass: replicas here that became
    /// Dead, replicas here that left the table, and transfers to this node
    /// that ended (their shard's directory is looked at again).
    fn diff(&mut self, me: NodeId, replicas: &ReplicaTable, transfers: &TransferTable) {
        let mine = |nodes: &BTreeMap<NodeId, ReplicaState>| nodes.get(&me).copied();
        for item in self.replicas.diff(replicas) {
            let (key, before, after) = match item {
                DiffItem::Add(key, new) => (key, None, mine(new)),
                DiffItem::Update { old: (key, old), new: (_, new) } => (key, mine(old), mine(new)),
                DiffItem::Remove(key, old) => (key, mine(old), None),
            };
            match (before, after) {
                (_, Some(ReplicaState::Dead)) => {
                    self.dead.insert(key.clone());
                }
                (Some(_), None) => {
                    self.dirty.insert(key.clone());
                }
                _ => {}
            }
        }
        for item in self.transfers.diff(transfers) {
            let ended = match item {
                DiffItem::Update { old: (_, old), new: (_, new) } if old.stage.is_live() && !new.stage.is_live() => {
                    Some(old)
                }
                DiffItem::Remove(_, old) if old.stage.is_live() => Some(old),
                _ => None,
            };
            if let Some(t) = ended.filter(|t| t.target == me) {
                self.dirty.insert((t.engine.clone(), t.shard.clone()));
            }
        }
        self.replicas = replicas.clone();
        self.transfers = transfers.clone();
    }

    /// Dead replicas here: removes their files, then forgets them. Only a
    /// real directory directly under shards/<engine>/ is ever removed; a name
    /// that makes no such path (a record from before names were checked)
    /// names no files of ours, so it is just forgotten.
    async fn remove_dead(&mut self, node: &Node) {
        let consensus = &node.consensus;
        let me = consensus.id;
        for (engine, shard) in std::mem::take(&mut self.dead) {
            let state = consensus.state();
            if state.replica(&engine, &shard, me) != Some(ReplicaState::Dead) {
                continue; // forgotten, or back in use
            }
            if state.live_transfer(&engine, &shard).is_some_and(|t| t.target == me)
                || crate::node::cutover::retire_pending(node, &engine, &shard)
            {
                self.dead.insert((engine, shard)); // later
                continue;
            }
            if node.data.shard(&engine, &shard).is_ok() {
                let (data, e, s) = (node.data.clone(), engine.clone(), shard.clone());
                let removed = tokio::task::spawn_blocking(move || data.remove_shard(&e, &s)).await;
                match removed.map_err(std::io::Error::other).and_then(|r| r) {
                    Ok(true) => tracing::info!(engine, shard, "removed the files of a dead replica"),
                    Ok(false) => {}
                    Err(e) => {
                        // Kept, and kept in the table: someone must look at it.
                        tracing::warn!(engine, shard, "not removing a dead replica: {e}");
                        self.dead.insert((engine, shard));
                        continue;
                    }
                }
            }
            let forget = Command::ForgetReplica { engine: engine.clone(), shard: shard.clone(), node: me };
            if let Err(e) = consensus.propose(forget).await {
                tracing::warn!(engine, shard, "cannot forget a dead replica: {e}");
                self.dead.insert((engine, shard));
            }
        }
    }

    /// Shard directories here the table does not know: Active, registered
    /// in batches of up to [`MAX_REGISTER_BATCH`].
    async fn register_new(&mut self, node: &Node) -> anyhow::Result<()> {
        if self.dirty.is_empty() {
            return Ok(());
        }
        let consensus = &node.consensus;
        let me = consensus.id;
        // Rows the table has, or shards arriving by transfer, are not looked
        // for on disk (after a full pass, that is nearly all of them).
        let state = consensus.state();
        let arriving: HashSet<(&str, &str)> = state
            .transfers
            .values()
            .filter(|t| t.target == me && t.stage.is_live())
            .map(|t| (t.engine.as_str(), t.shard.as_str()))
            .collect();
        let unknown: Vec<ShardKey> = std::mem::take(&mut self.dirty)
            .into_iter()
            .filter(|(engine, shard)| {
                state.replica(engine, shard, me).is_none() && !arriving.contains(&(engine.as_str(), shard.as_str()))
            })
            .collect();
        let data = node.data.clone();
        let new = tokio::task::spawn_blocking(move || {
            unknown
                .into_iter()
                .filter(|(engine, shard)| {
                    data.shard(engine, shard).is_ok_and(|dir| dir.symlink_metadata().is_ok_and(|m| m.is_dir()))
                })
                .collect::<Vec<ShardKey>>()
        })
        .await?;
        for (i, batch) in new.chunks(MAX_REGISTER_BATCH).enumerate() {
            let command = Command::RegisterReplicas { shards: batch.to_vec(), node: me };
            match consensus.propose(command).await {
                Ok(_) => tracing::debug!(shards = batch.len(), "registered replicas"),
                // One of them may not be (a transfer to here began since):
                // each on its own, so the others still go in.
                Err(ConsensusError::Refused(_)) => {
                    for (engine, shard) in batch {
                        let command =
                            Command::RegisterReplica { engine: engine.clone(), shard: shard.clone(), node: me };
                        if let Err(e) = consensus.propose(command).await {
                            tracing::warn!(engine, shard, "cannot register replica: {e}");
                        }
                    }
                }
                Err(e) => {
                    // Looked at again on the next pass.
                    self.dirty.extend(new[i * MAX_REGISTER_BATCH..].iter().cloned());
                    return Err(e.into());
                }
            }
        }
        Ok(())
    }
}

/// The shards on this node's disk, as (engine, shard): real directories
/// whose names follow the rules (anything else can be neither served nor
/// registered, and is left alone).
pub fn local_shards(data: &crate::install::DataDir) -> std::io::Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for engine in std::fs::read_dir(data.shards_root())? {
        let engine = engine?;
        if !engine.file_type()?.is_dir() {
            continue;
        }
        for shard in std::fs::read_dir(engine.path())? {
            let shard = shard?;
            if shard.file_type()?.is_dir() {
                let (engine, shard) = (engine.file_name(), shard.file_name());
                let (Some(engine), Some(shard)) = (engine.to_str(), shard.to_str()) else { continue };
                if data.shard(engine, shard).is_ok() {
                    out.push((engine.to_owned(), shard.to_owned()));
                }
            }
        }
    }
    out.sort();
    Ok(out)
}
