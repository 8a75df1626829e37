//! A live move's catch-up and cut-over, from the target (contract 0.2.0
//! engines). Runs after the snapshot is published and every member applied
//! `Partial`, before `FinishTransfer`:
//!
//! 1. Rounds while the source takes writes: each pulls the changes after the
//!    position the replica holds and applies them (`transfer::catchup`), and
//!    is recorded in the replicated state (bytes, time, position).
//! 2. After each round, the lag (the source's position less ours) and the
//!    last round's speed predict the final round; the pause is that round
//!    plus the fence's call and two commits (the fence's record and the
//!    cut-over), each as long as this round's record took. When it fits the
//!    pause budget, the source is fenced. A lag that does not shrink, or too
//!    many rounds, fails the transfer: "not converging", the source
//!    untouched and unfenced.
//! 3. Under the fence, at least one round, and more until the replica holds
//!    exactly the fence's last position: only a round under the fence is
//!    exact (a block diff read while writes went on may mix two states).
//!    Then the conductor commits, and the pause runs from the fence to that
//!    commit.
//!
//! A restarted target resumes from the replicated record: already fenced, it
//! goes straight to the final round.
//!
//! The fenced phase is bounded ([`fenced_limit`]): a final round that cannot
//! finish (the source cut off from the target, a stalled disk) fails the
//! move, whose abort unfences the source, instead of holding its writers for
//! as long as the fault lasts. The fault tests found this: a one-way cut
//! during the commit paused an application's writes for the whole cut.

use std::time::Duration;

use crate::consensus::state::{Command, FenceRecord, RoundRecord, TransferRecord};
use crate::http::{TRANSFER_EPOCH_HEADER, TRANSFER_ID_HEADER};
use crate::node::Node;
use crate::plugin::{FenceInfo, Hook, ShardPosition};
use crate::transfer::catchup::{DigestCache, Round, RoundError, RoundRequest, pull_round};

/// Most unfenced rounds before a move that does not converge fails.
pub const MAX_ROUNDS: usize = 12;
/// Most rounds under the fence (one is the rule; more only if a plan stopped short).
const MAX_FENCED_ROUNDS: usize = 4;
/// Interrupted rounds retried in a row before the transfer fails.
const ROUND_RETRIES: u32 = 3;

/// Whether the transfer moves live here: its plugin build speaks contract 0.2.0.
pub fn is_live(node: &Node, t: &TransferRecord) -> bool {
    node.plugins.resolve(&t.engine, t.plugin.as_deref()).is_some_and(|p| p.contract().has(Hook::ApplyChanges))
}

/// Catches the published replica up with the source and fences it; returns
/// the fence's time (Unix ms), from which the pause is measured.
pub async fn catch_up(node: &Node, t: &TransferRecord) -> Result<u64, String> {
    let result = rounds_and_fence(node, t).await;
    // The rounds' scratch lives in the transfer's staging directory: leave
    // nothing behind, whatever the outcome.
    let (data, id) = (node.data.clone(), t.id.clone());
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || data.remove_staging(&id)).await {
        tracing::warn!(transfer = %t.id, "cannot remove the rounds' staging: {e}");
    }
    result
}

async fn rounds_and_fence(node: &Node, t: &TransferRecord) -> Result<u64, String> {
    let mover = Mover::new(node, t)?;
    let mut at = mover.replica_position().await?;
    let limit = fenced_limit(node.config.pause_budget_ms);
    if let Some(fence) = t.live.as_ref().and_then(|l| l.fenced) {
        // Resumed after a restart: the source is fenced already, since
        // `at_ms`; the bound counts from then.
        let last = ShardPosition { term: fence.term, position: fence.position };
        bounded(limit, fenced_for(&fence), mover.final_rounds(at, last)).await?;
        return Ok(fence.at_ms);
    }
    let budget = node.config.pause_budget_ms;
    let mut lags: Vec<u64> = Vec::new();
    loop {
        let (round, commit_ms) = mover.round(at, false).await?;
        at = round.position;
        let lag = mover.lag(at).await?;
        let predicted = predict_ms(&round, lag) + FENCE_CALL_MS + 2 * commit_ms;
        tracing::info!(transfer = %t.id, round = lags.len() + 1, bytes = round.bytes, lag, predicted_ms = predicted, "caught up");
        if predicted <= budget {
            break;
        }
        lags.push(lag);
        let stalled = lags.len() >= 3 && lag >= lags[lags.len() - 3];
        if lags.len() >= MAX_ROUNDS || stalled {
            return Err(format!("not converging: lag {lag} after {} rounds", lags.len()));
        }
    }
    let at_ms = super::conductor::unix_now_ms();
    let fence = mover.fence().await?;
    let record = FenceRecord { term: fence.last.term, position: fence.last.position, at_ms };
    let mark = Command::MarkFenced { transfer: t.id.clone(), epoch: t.epoch, fence: record };
    let fenced = std::time::Instant::now();
    node.consensus.propose(mark).await.map_err(|e| format!("recording the fence: {e}"))?;
    bounded(limit, fenced.elapsed(), mover.final_rounds(at, fence.last)).await?;
    Ok(at_ms)
}

/// How long the source may stay fenced before the move gives up: ten pause
/// budgets, at least 5 s. A move that fits its budget needs one; past this,
/// the writers have waited long enough that failing the move (and
/// unfencing) is better than waiting for the fault to end.
pub fn fenced_limit(pause_budget_ms: u64) -> Duration {
    Duration::from_millis(pause_budget_ms.saturating_mul(10).max(5_000))
}

/// How long the source has been fenced, by the wall clock of the fence's
/// record.
pub fn fenced_for(fence: &FenceRecord) -> Duration {
    Duration::from_millis(super::conductor::unix_now_ms().saturating_sub(fence.at_ms))
}

/// Runs the fenced rounds for what is left of `limit`, the source having been
/// fenced for `since` already.
async fn bounded(
    limit: Duration,
    since: Duration,
    rounds: impl std::future::Future<Output = Result<(), String>>,
) -> Result<(), String> {
    match tokio::time::timeout(limit.saturating_sub(since), rounds).await {
        Ok(done) => done,
        Err(_) => Err(format!("the source was fenced for {limit:?} and the final round had not finished")),
    }
}

/// What a fence's call costs (a plugin call and the locks) on top of the
/// final round, in the prediction.
const FENCE_CALL_MS: u64 = 10;

/// The final round's predicted time: the lag at the last round's speed
/// (positions per ms), plus that round's fixed cost. A round that moved no
/// positions (an engine whose rounds rewrite blocks) costs what it took.
fn predict_ms(round: &Round, lag: u64) -> u64 {
    let span = round.meta.until.saturating_sub(round.meta.since);
    let ms = round.elapsed.as_millis() as u64;
    if span == 0 {
        return ms;
    }
    // A round that moved little costs about its fixed overhead; per position
    // it is `ms / span`.
    (lag.saturating_mul(ms) / span).saturating_add(ms.min(50))
}

/// One transfer's rounds.
struct Mover<'a> {
    node: &'a Node,
    t: &'a TransferRecord,
    source: String,
    replica: std::path::PathBuf,
    scratch: std::path::PathBuf,
    plugin: std::sync::Arc<crate::plugin::Plugin>,
    digests: DigestCache,
}

impl<'a> Mover<'a> {
    fn new(node: &'a Node, t: &'a TransferRecord) -> Result<Mover<'a>, String> {
        let state = node.consensus.state();
        let source = state.members.get(&t.source).ok_or("the source is not a member")?.addr.clone();
        let plugin =
            node.plugins.resolve(&t.engine, t.plugin.as_deref()).ok_or("the pinned plugin build is not loaded")?;
        let replica = node.data.shard(&t.engine, &t.shard).map_err(|e| e.to_string())?;
        let scratch = node.data.staging(&t.id).map_err(|e| e.to_string())?.join("round");
        Ok(Mover { node, t, source, replica, scratch, plugin, digests: DigestCache::default() })
    }

    fn headers(&self) -> Vec<(&'static str, String)> {
        vec![(TRANSFER_ID_HEADER, self.t.id.clone()), (TRANSFER_EPOCH_HEADER, self.t.epoch.to_string())]
    }

    async fn replica_position(&self) -> Result<ShardPosition, String> {
        self.plugin.shard_status(&self.t.shard, &self.replica).await.map_err(|e| format!("the replica: {e}"))
    }

    /// The source's position less ours, in the engine's positions; a source
    /// in another term counts as far ahead.
    async fn lag(&self, at: ShardPosition) -> Result<u64, String> {
        let path = format!("/v1/engines/{}/shards/{}/status", self.t.engine, self.t.shard);
        let api = self.node.peer(&self.source).timeout(Duration::from_secs(10));
        let source: ShardPosition = api.call(hyper::Method::GET, &path, None).await.map_err(|e| e.to_string())?;
        Ok(if source.term == at.term { source.position.saturating_sub(at.position) } else { u64::MAX / 4 })
    }

    /// Asks the source to fence for this transfer's epoch (idempotent, so
    /// retried: a fence can lose a race with an append in flight).
    async fn fence(&self) -> Result<FenceInfo, String> {
        let path = format!("/v1/engines/{}/shards/{}/fence", self.t.engine, self.t.shard);
        let api = self.node.peer(&self.source);
        let mut attempt = 0;
        loop {
            match api.call_with(hyper::Method::POST, &path, None, &self.headers()).await {
                Ok(info) => return Ok(info),
                Err(e) if attempt < 2 => {
                    attempt += 1;
                    tracing::info!(transfer = %self.t.id, "fencing: {e}; again");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(format!("fencing: {e}")),
            }
        }
    }

    /// Rounds under the fence until the replica holds exactly `last`: at
    /// least one, since only a round under the fence is exact.
    async fn final_rounds(&self, mut at: ShardPosition, last: ShardPosition) -> Result<(), String> {
        for n in 0..MAX_FENCED_ROUNDS {
            if n > 0 && at == last {
                return Ok(());
            }
            at = self.round(at, true).await?.0.position;
        }
        if at == last { Ok(()) } else { Err(format!("the fenced round ended at {at:?}, not at the fence's {last:?}")) }
    }

    /// One round from `since`, recorded; interrupted rounds are retried.
    /// Also says how long recording it took (what a commit costs now).
    async fn round(&self, since: ShardPosition, fenced: bool) -> Result<(Round, u64), String> {
        let (id, epoch) = (self.t.id.as_str(), self.t.epoch);
        let mut failures = 0;
        let round = loop {
            let request = RoundRequest {
                client: &self.node.client,
                source: &self.source,
                token: &self.node.token,
                engine: &self.t.engine,
                shard: &self.t.shard,
                transfer: Some((id, epoch)),
                since,
                scratch: &self.scratch,
                replica: &self.replica,
                plugin: &self.plugin,
                rate: &self.node.rate,
                stall_timeout: Duration::from_secs(self.node.config.stall_timeout),
                digests: &self.digests,
            };
            let cancel = tokio_util::sync::CancellationToken::new();
            match pull_round(&request, &cancel).await {
                Ok(round) => break round,
                Err(RoundError::Interrupted(why)) if failures < ROUND_RETRIES => {
                    failures += 1;
                    tracing::info!(transfer = %id, "round interrupted ({why}); again");
                    tokio::time::sleep(Duration::from_millis(100 << failures)).await;
                }
                Err(e) => return Err(format!("catching up: {e}")),
            }
        };
        let labels = crate::metrics::RoundLabels {
            engine: self.t.engine.clone(),
            fenced: if fenced { "true" } else { "false" },
        };
        let metrics = crate::metrics::global();
        metrics.catchup_rounds.get_or_create(&labels).inc();
        metrics.catchup_round_duration.get_or_create(&labels).observe(round.elapsed.as_secs_f64());
        let record = RoundRecord {
            bytes: round.bytes,
            ms: round.elapsed.as_millis() as u64,
            until: round.position.position,
            fenced,
        };
        let command = Command::RecordRound {
            transfer: id.to_owned(),
            epoch,
            round: record,
            pause_budget_ms: self.node.config.pause_budget_ms,
        };
        let proposed = std::time::Instant::now();
        self.node.consensus.propose(command).await.map_err(|e| format!("recording a round: {e}"))?;
        Ok((round, proposed.elapsed().as_millis() as u64))
    }
}
