//! The source's part of a live move's cut-over (contract 0.2.0 engines).
//!
//! - [`fence`]: on the target's request, the plugin fences the shard for the
//!   transfer's epoch, the host takes the locks the plugin names, and the
//!   plugin fences once more under them: an append that raced the first
//!   fence cannot have undone the second. Its answer is the last position
//!   any write can have.
//! - [`reconcile`]: from the replicated state, on every change and after a
//!   restart: a live transfer that was fenced gets its fence and locks back
//!   (a crash released the locks); an aborted one, or a committed replicate,
//!   is unfenced; a committed move is retired, before the registrar removes
//!   its files, so a writer still holding the old replica gets an error;
//!   a move fenced for longer than its limit without committing is aborted
//!   by the source itself, or settled from a peer's committed record when
//!   this node cannot hear the leader ([`abort_if_fenced_too_long`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::consensus::state::{Command, TransferKind, TransferRecord, TransferStage};
use crate::node::Node;
use crate::plugin::{EngineError, FenceInfo, Hook};

/// How long the host waits for writers to let go of the fence's locks.
pub const LOCK_WAIT: Duration = Duration::from_secs(2);

/// Transfer ids this node has done something for once since it started:
/// settled their end (unfenced or retired), or asked for their abort.
#[derive(Default)]
pub struct Once(Mutex<HashSet<String>>);

impl Once {
    fn contains(&self, id: &str) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).contains(id)
    }

    /// Whether `id` is new.
    fn insert(&self, id: &str) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_owned())
    }

    fn remove(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

/// Fences `engine`/`shard` for `epoch` and holds its locks.
pub async fn fence(node: &Node, engine: &str, shard: &str, epoch: u64) -> Result<FenceInfo, String> {
    let plugin = super::rollout::for_shard(node, engine, shard).await?;
    if !plugin.contract().has(Hook::Fence) {
        return Err(format!("the {engine} plugin ({}) cannot fence", plugin.contract().package()));
    }
    let dir = node.data.shard(engine, shard).map_err(|e| e.to_string())?;
    let first = plugin.fence(shard, &dir, epoch).await.map_err(|e| e.to_string())?;
    node.fences.hold(engine, shard, &dir, epoch, &first.locks, LOCK_WAIT).await?;
    match plugin.fence(shard, &dir, epoch).await {
        Ok(info) => Ok(info),
        Err(e) => {
            node.fences.release(engine, shard, epoch);
            Err(e.to_string())
        }
    }
}

/// Whether a committed move of this shard away from this node still waits
/// for its retirement (the registrar keeps the files until then).
pub fn retire_pending(node: &Node, engine: &str, shard: &str) -> bool {
    let state = node.consensus.state();
    state.transfers.values().any(|t| {
        t.source == node.consensus.id
            && t.engine == engine
            && t.shard == shard
            && t.stage == TransferStage::Finished
            && t.kind == TransferKind::Move
            && is_live_move(node, t)
            && !node.settled.contains(&t.id)
    })
}

/// A transfer of an engine whose plugin here speaks contract 0.2.0.
fn is_live_move(node: &Node, t: &TransferRecord) -> bool {
    node.plugins.resolve(&t.engine, t.plugin.as_deref()).is_some_and(|p| p.contract().has(Hook::Fence))
}

/// Brings this node's fences in line with the replicated state.
pub async fn reconcile(node: &Arc<Node>) {
    let state = node.consensus.state();
    let me = node.consensus.id;
    for t in state.transfers.values().filter(|t| t.source == me && is_live_move(node, t)) {
        if node.settled.contains(&t.id) {
            continue;
        }
        let fenced = t.live.as_ref().is_some_and(|l| l.fenced.is_some());
        match t.stage {
            TransferStage::Snapshot => {}
            // A restarted source fences again and takes its locks back; not
            // while this process asks for the move's abort, or has settled
            // it from a peer ahead of its own log.
            TransferStage::Partial
                if fenced
                    && !node.aborts_asked.contains(&t.id)
                    && node.fences.holder(&t.engine, &t.shard) != Some(t.epoch) =>
            {
                match fence(node, &t.engine, &t.shard, t.epoch).await {
                    Ok(_) => tracing::info!(transfer = %t.id, "fence taken again"),
                    Err(e) => tracing::warn!(transfer = %t.id, "cannot fence again: {e}"),
                }
            }
            TransferStage::Partial if fenced => abort_if_fenced_too_long(node, t),
            TransferStage::Partial => {}
            TransferStage::Finished | TransferStage::Aborted => settle_end(node, t).await,
        }
    }
}

/// How much longer than the target's own bound ([`super::live::fenced_limit`])
/// the source waits before it gives up on a move that holds its fence: the
/// target, when it can reach the leader, fails the move first.
const SOURCE_SLACK: Duration = Duration::from_secs(2);

/// A fenced move that has not committed past the fenced limit is aborted by
/// its source. The target cannot always do it: cut off from the leader (a
/// partition, a one-way link) it can neither commit nor abort, and the
/// source's writers would wait for as long as the fault lasts. The source
/// can, when it reaches a quorum. Consensus decides between the two: an
/// abort after the commit is refused (the source is then retired), a commit
/// after the abort too (the source is then unfenced).
fn abort_if_fenced_too_long(node: &Arc<Node>, t: &TransferRecord) {
    let Some(fence) = t.live.as_ref().and_then(|l| l.fenced) else { return };
    let limit = super::live::fenced_limit(node.config.pause_budget_ms) + SOURCE_SLACK;
    let fenced_for = super::live::fenced_for(&fence);
    if fenced_for < limit || !node.aborts_asked.insert(&t.id) {
        return;
    }
    let reason = format!("the source was fenced for {fenced_for:?} (limit {limit:?}) and the move had not committed");
    tracing::warn!(transfer = %t.id, "aborting as its source: {reason}");
    let abort =
        Command::AbortTransfer { transfer: t.id.clone(), epoch: t.epoch, reason, now: super::conductor::unix_now() };
    let (node, id, epoch) = (node.clone(), t.id.clone(), t.epoch);
    tokio::spawn(async move {
        // The move may have ended where this node cannot hear it: a one-way
        // cut from the leader leaves its log behind, and a proposal waits
        // for a leader it cannot reach. Any peer that applied the end knows
        // it is final; whichever answer comes first settles the source.
        // Both stop once this node's own log has ended it and settled it.
        let learned = async {
            while !node.settled.contains(&id) {
                if let Some(ended) = node.consensus.ended_at_a_peer(&id, epoch).await {
                    return Some(ended);
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            None
        };
        tokio::select! {
            proposed = node.consensus.propose(abort) => if let Err(e) = proposed {
                tracing::warn!(transfer = %id, "the source's abort not recorded: {e}");
                // Asked again on a later pass.
                node.aborts_asked.remove(&id);
            },
            ended = learned => if let Some(ended) = ended {
                tracing::info!(transfer = %id, stage = ?ended.stage, "learned the move's end from a peer");
                settle_end(&node, &ended).await;
            },
        }
    });
}

/// Settles the source of an ended transfer (from this node's log, or from
/// a peer's that is ahead of it). Marked settled only once done: the
/// registrar keeps a retired replica's files until then.
async fn settle_end(node: &Node, t: &TransferRecord) {
    if node.settled.contains(&t.id) {
        return; // both ways reached it: settled once
    }
    match settle(node, t, end_hook(t)).await {
        Ok(()) => {
            node.settled.insert(&t.id);
            // A retired replica's files are the registrar's to remove now.
            node.registrar.notify_one();
        }
        Err(e) => {
            tracing::warn!(transfer = %t.id, "cut-over not settled: {e}");
            // Asked again, or learned again, on a later pass.
            node.aborts_asked.remove(&t.id);
        }
    }
}

/// What ends the source's part of an ended transfer: a committed move
/// retires it, anything else unfences it.
fn end_hook(t: &TransferRecord) -> Hook {
    match (t.stage, t.kind) {
        (TransferStage::Finished, TransferKind::Move) => Hook::Retire,
        _ => Hook::Unfence,
    }
}

/// Unfences or retires the source replica of `t`, then drops its locks.
async fn settle(node: &Node, t: &TransferRecord, hook: Hook) -> Result<(), String> {
    let plugin = super::rollout::pinned(node, &t.engine, t.plugin.as_deref()).await?;
    let dir = node.data.shard(&t.engine, &t.shard).map_err(|e| e.to_string())?;
    if !dir.is_dir() {
        node.fences.release(&t.engine, &t.shard, t.epoch);
        return Ok(()); // nothing left to settle
    }
    let result = match hook {
        Hook::Retire => plugin.retire(&t.shard, &dir, t.epoch).await,
        _ => plugin.unfence(&t.shard, &dir, t.epoch).await,
    };
    node.fences.release(&t.engine, &t.shard, t.epoch);
    match result {
        Ok(()) => {
            tracing::info!(transfer = %t.id, engine = %t.engine, shard = %t.shard, "{}", match hook {
                Hook::Retire => "source replica retired",
                _ => "source replica unfenced",
            });
            Ok(())
        }
        // Another transfer's fence: not ours to lift.
        Err(e) if matches!(e.engine_error(), Some(EngineError::Fenced(_))) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
