//! Runs this node's part of every transfer that targets it, as the
//! replicated state says (Qdrant's phases):
//!
//! 1. `Snapshot` stage: pull and install the snapshot (the transfer pipeline),
//!    sending the transfer's epoch with every request, and refusing to
//!    publish if the epoch is no longer current.
//! 2. Propose `MarkPartial`, and wait until this node has applied it.
//! 3. Wait until every reachable member, and a majority, has applied that
//!    index (bounded; the error names the laggards). A member that is down
//!    replays the log when it returns.
//! 4. Propose `FinishTransfer`: the replica is Active (a move makes the
//!    source Dead; the source's registrar then removes its files).
//!
//! Any failure proposes `AbortTransfer`. A restarted node picks its live
//! transfers up again from the replicated state.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::consensus::state::{Command, TransferRecord, TransferStage};
use crate::consensus::{ClusterStatus, ConsensusError};
use crate::node::Node;
use crate::transfer::{Fencing, State, TransferRequest};

/// How long step 3 waits for every member.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// Transfers this node is conducting now.
#[derive(Default)]
pub struct Conducting(Mutex<HashSet<String>>);

impl Conducting {
    fn claim(&self, id: &str) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(id.to_owned())
    }

    fn release(&self, id: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
    }
}

pub async fn run(node: Arc<Node>, stop: CancellationToken) {
    let mut applied = node.consensus.applied_watch();
    loop {
        reconcile(&node);
        crate::node::cutover::reconcile(&node).await;
        crate::node::rollout::reconcile(&node).await;
        tokio::select! {
            _ = applied.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

fn reconcile(node: &Arc<Node>) {
    let me = node.consensus.id;
    let state = node.consensus.state();
    for transfer in state.transfers.values() {
        if transfer.target != me {
            continue;
        }
        if transfer.stage.is_live() {
            if node.conducting.claim(&transfer.id) {
                let (node, transfer) = (node.clone(), transfer.clone());
                tokio::spawn(async move {
                    let id = transfer.id.clone();
                    conduct(&node, transfer).await;
                    node.conducting.release(&id);
                });
            }
        } else if node.transfers.is_running(&transfer.id) {
            // Aborted elsewhere (cancelled, failed over): stop our side.
            node.transfers.cancel(&transfer.id);
        }
    }
}

async fn conduct(node: &Node, transfer: TransferRecord) {
    let outcome = steps(node, &transfer).await;
    if node.transfers.stopping() {
        // Shutting down: the transfer stays live; the restarted node resumes it.
        return;
    }
    if let Err(reason) = outcome {
        tracing::warn!(transfer = %transfer.id, "aborting: {reason}");
        let abort =
            Command::AbortTransfer { transfer: transfer.id.clone(), epoch: transfer.epoch, reason, now: unix_now() };
        if let Err(e) = node.consensus.propose(abort).await {
            tracing::warn!(transfer = %transfer.id, "abort not recorded: {e}");
        }
    }
}

async fn steps(node: &Node, t: &TransferRecord) -> Result<(), String> {
    let consensus = &node.consensus;
    let mut partial_index = None;
    if t.stage == TransferStage::Snapshot {
        let state = consensus.state();
        let source = state.members.get(&t.source).ok_or_else(|| format!("source node {} is not a member", t.source))?;
        let request = TransferRequest { engine: t.engine.clone(), shard: t.shard.clone(), source: source.addr.clone() };
        let fencing = Fencing {
            epoch: t.epoch,
            still_current: {
                let consensus = consensus.clone();
                let (id, epoch) = (t.id.clone(), t.epoch);
                Arc::new(move || {
                    consensus.state().transfers.get(&id).is_some_and(|r| r.epoch == epoch && r.stage.is_live())
                })
            },
            plugin: t.plugin.clone(),
        };
        if !node.transfers.is_running(&t.id) {
            // The pinned build, loaded from this node's store (or a peer's).
            super::rollout::pinned(node, &t.engine, t.plugin.as_deref()).await?;
            node.transfers
                .start_with(request, Some(t.id.clone()), Some(fencing))
                .map_err(|e| format!("target: {e}"))?;
        }
        let done = node.transfers.wait(&t.id).await.ok_or("target: the transfer vanished")?;
        match done.state {
            State::Succeeded => {}
            State::Cancelled => return Err("cancelled".into()),
            _ => return Err(format!("target: {}", done.error.unwrap_or_else(|| "failed".into()))),
        }
        let mark = Command::MarkPartial { transfer: t.id.clone(), epoch: t.epoch, now: unix_now() };
        match consensus.propose(mark).await {
            Ok(applied) => partial_index = Some(applied.index),
            // Aborted meanwhile: the replica is Dead; the registrar removes it.
            Err(ConsensusError::Refused(why)) => {
                tracing::info!(transfer = %t.id, "not marked partial: {why}");
                return Ok(());
            }
            Err(e) => return Err(format!("marking partial: {e}")),
        }
    } else if !node.data.shard(&t.engine, &t.shard).is_ok_and(|dir| dir.is_dir()) {
        return Err("the installed replica is missing".into());
    }

    // This node applied Partial; now every member must have.
    let index = partial_index.unwrap_or_else(|| consensus.applied_index());
    consensus.wait_applied(index, SYNC_TIMEOUT).await.map_err(|e| format!("sync: {e}"))?;
    sync_all(node, index).await?;

    // A live move catches up and fences the source; the write pause runs from
    // that fence to the commit below.
    // It holds an incoming slot meanwhile: 100 moves started at once catch
    // up `max_incoming` at a time, not all together (then every round's
    // commit is slow, and none fits its pause budget).
    let (fenced_at, _slot) = if crate::node::live::is_live(node, t) {
        let record = consensus.state().transfers.get(&t.id).cloned().unwrap_or_else(|| t.clone());
        // A move resumed with its source fenced already does not queue: the
        // source's writers wait for it.
        let fenced = record.live.as_ref().is_some_and(|l| l.fenced.is_some());
        let slot = if fenced { None } else { Some(node.transfers.incoming_slot().await) };
        (Some(crate::node::live::catch_up(node, &record).await?), slot)
    } else {
        (None, None)
    };
    let finish = Command::FinishTransfer { transfer: t.id.clone(), epoch: t.epoch, now: unix_now() };
    match consensus.propose(finish).await {
        Ok(_) => {}
        Err(ConsensusError::Refused(why)) => {
            tracing::info!(transfer = %t.id, "not finished: {why}");
            return Ok(());
        }
        Err(e) => return Err(format!("finishing: {e}")),
    }
    if let Some(at) = fenced_at {
        let pause_ms = unix_now_ms().saturating_sub(at);
        let over = pause_ms > node.config.pause_budget_ms;
        let metrics = crate::metrics::global();
        let engine = crate::metrics::Metrics::engine(&t.engine);
        metrics.write_pause.get_or_create(&engine).observe(pause_ms as f64 / 1000.0);
        if over {
            metrics.write_pause_over_budget.get_or_create(&engine).inc();
            tracing::warn!(transfer = %t.id, pause_ms, budget_ms = node.config.pause_budget_ms, "write pause over budget");
        } else {
            tracing::info!(transfer = %t.id, pause_ms, "cut over");
        }
        let record = Command::RecordPause { transfer: t.id.clone(), epoch: t.epoch, pause_ms };
        if let Err(e) = consensus.propose(record).await {
            tracing::warn!(transfer = %t.id, "pause not recorded: {e}");
        }
    }
    Ok(())
}

/// Waits until every reachable member has applied `index`, and a majority
/// of all members has. A member that is down is skipped: it replays the log
/// when it comes back, and while down it routes nothing.
async fn sync_all(node: &Node, index: u64) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + SYNC_TIMEOUT;
    loop {
        let state = node.consensus.state();
        let (mut laggards, mut down, mut caught_up) = (Vec::new(), Vec::new(), 0usize);
        for (id, member) in &state.members {
            let applied = if *id == node.consensus.id {
                Some(node.consensus.applied_index())
            } else {
                let api = node.peer(&member.addr).timeout(Duration::from_secs(2));
                api.call::<ClusterStatus>(hyper::Method::GET, "/v1/cluster", None).await.ok().map(|s| s.last_applied)
            };
            match applied {
                Some(applied) if applied >= index => caught_up += 1,
                Some(_) => laggards.push(member.name.clone()),
                None => down.push(member.name.clone()),
            }
        }
        if laggards.is_empty() && caught_up * 2 > state.members.len() {
            if !down.is_empty() {
                tracing::info!(index, "synced; unreachable members skipped: {}", down.join(", "));
            }
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            let mut why = Vec::new();
            if !laggards.is_empty() {
                why.push(format!("{} did not apply index {index}", laggards.join(", ")));
            }
            if !down.is_empty() {
                why.push(format!("{} unreachable", down.join(", ")));
            }
            return Err(format!("sync: {} within {SYNC_TIMEOUT:?}", why.join("; ")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Unix time in milliseconds (a pause spans nodes' records, so wall time).
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
