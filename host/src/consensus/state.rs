//! The replicated state: members, the replica table, transfers. Pure logic:
//! `apply` is deterministic, so every member computes the same state from the
//! same log. Commands that break a rule are applied as no-ops and answer an
//! error to the proposer.
//!
//! Every name is checked where it is applied, not only at the public API: a
//! command can reach the log through `POST /v1/raft/propose` or a Raft
//! message, and names in the state become directory names on every node.
//! A command that adds a name to the state checks its rule (engines as plugin
//! engine names, shards as shard ids, transfer ids, member names and
//! addresses); a command that only refers to an existing record accepts any
//! reference up to [`MAX_REFERENCE`] bytes, so records made before these
//! rules can still be aborted or forgotten. Failure reasons are clipped, and
//! only the last [`MAX_ENDED_TRANSFERS`] ended transfers are kept.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::install::layout::{check_shard_id, check_transfer_id};
use crate::plugin::types::check_engine_name;

/// Ended (finished or aborted) transfers kept in the state; older ones are
/// dropped, oldest epoch first. Live transfers are never dropped.
pub const MAX_ENDED_TRANSFERS: usize = 1000;

/// Most shards one `RegisterReplicas` names (a node that finds 10,000
/// shards on its disk registers them in a few entries, not 10,000).
pub const MAX_REGISTER_BATCH: usize = 512;

/// Longest failure reason kept in a transfer record, in bytes.
pub const MAX_REASON: usize = 1024;

/// Longest failure reason a command may carry (it is clipped to
/// [`MAX_REASON`] when applied), in bytes.
pub const MAX_PROPOSED_REASON: usize = 64 << 10;

/// Longest reference to an existing record (a transfer id, an engine or shard
/// to forget) a command may carry, in bytes.
pub const MAX_REFERENCE: usize = 256;

/// Longest member address, in bytes.
pub const MAX_ADDR: usize = 256;

/// A Raft node id.
pub type NodeId = u64;

/// A member of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's configured name (`--node-id`).
    pub name: String,
    /// Base URL of its API.
    pub addr: String,
}

/// Member names are node ids (`--node-id`): 1-64 of `A-Z a-z 0-9 . _ -`,
/// not starting with `.` or `-`.
pub fn check_member_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "node name {:?} is not 1-64 of A-Z, a-z, 0-9, '.', '_', '-' (not starting with '.' or '-')",
            clip(name, 80)
        ))
    }
}

/// Member addresses are base URLs: `http://` or `https://`, a host, an
/// optional port, no user, path or query; at most [`MAX_ADDR`] bytes.
pub fn check_member_addr(addr: &str) -> Result<(), String> {
    let bad = || format!("address {:?} is not a base URL like http://host:port", clip(addr, 80));
    if addr.is_empty() || addr.len() > MAX_ADDR || !addr.is_ascii() {
        return Err(bad());
    }
    let uri: hyper::Uri = addr.parse().map_err(|_| bad())?;
    let authority = uri.authority().ok_or_else(bad)?;
    let base = matches!(uri.scheme_str(), Some("http" | "https"))
        && !authority.as_str().contains('@')
        && !authority.host().is_empty()
        && matches!(uri.path(), "" | "/")
        && uri.query().is_none();
    if base { Ok(()) } else { Err(bad()) }
}

/// `s` cut to at most `max` bytes (at a character boundary), marked with `…`
/// when cut. Deterministic: every member clips alike.
pub fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn check_reference(what: &str, value: &str) -> Result<(), String> {
    if value.len() > MAX_REFERENCE {
        return Err(format!("{what} {:?} is longer than {MAX_REFERENCE} bytes", clip(value, 80)));
    }
    Ok(())
}

/// A replica's state on one node (Qdrant's states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicaState {
    /// Serves reads and is a transfer source.
    Active,
    /// Holds no usable data (failed, aborted, or moved away).
    Dead,
    /// Receiving a snapshot; not usable.
    PartialSnapshot,
    /// Snapshot installed; catching up, not yet Active.
    Partial,
}

impl ReplicaState {
    /// The name the API and the metrics use.
    pub fn name(self) -> &'static str {
        match self {
            ReplicaState::Active => "active",
            ReplicaState::Dead => "dead",
            ReplicaState::PartialSnapshot => "partial-snapshot",
            ReplicaState::Partial => "partial",
        }
    }
}

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransferKind {
    /// The target gets a replica; the source keeps its own.
    Replicate,
    /// The target gets a replica; the source's becomes Dead and its files go.
    Move,
}

/// Where a transfer is in its consensus lifecycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransferStage {
    /// Started: the target pulls and installs the snapshot.
    Snapshot,
    /// The target installed it; its replica is Partial; nodes are syncing.
    Partial,
    /// The target's replica is Active.
    Finished,
    /// Failed or cancelled; the target's replica went back to its previous state.
    Aborted,
}

impl TransferStage {
    pub fn is_live(self) -> bool {
        matches!(self, TransferStage::Snapshot | TransferStage::Partial)
    }

    /// The name the API and the metrics use.
    pub fn name(self) -> &'static str {
        match self {
            TransferStage::Snapshot => "snapshot",
            TransferStage::Partial => "partial",
            TransferStage::Finished => "finished",
            TransferStage::Aborted => "aborted",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRecord {
    pub id: String,
    pub engine: String,
    pub shard: String,
    pub source: NodeId,
    pub target: NodeId,
    pub kind: TransferKind,
    pub stage: TransferStage,
    /// The log index of the proposal that started it: every request of the
    /// transfer carries it, and anything with an older epoch is refused.
    pub epoch: u64,
    /// The target's replica state before the transfer, restored on abort.
    pub target_was: Option<ReplicaState>,
    pub started_at: u64,
    pub updated_at: u64,
    pub failure: Option<String>,
    /// A live move's catch-up rounds, fence and write pause (contract 0.2.0
    /// engines); absent for a snapshot-only transfer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LiveProgress>,
    /// The plugin build (BLAKE3) the transfer runs with on both ends: the
    /// engine's active build when it started. None: no build was installed
    /// through the cluster, and each end uses its own plugins directory's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin: Option<String>,
}

/// Most catch-up rounds a record keeps (the conductor stops long before).
pub const MAX_RECORDED_ROUNDS: usize = 64;

/// What a live move did after its snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveProgress {
    /// Every catch-up round, in order; the fenced ones last.
    pub rounds: Vec<RoundRecord>,
    /// Set once the source is fenced: the last position any write can have.
    pub fenced: Option<FenceRecord>,
    /// Fence to the commit of the new owner, in milliseconds (set after it).
    pub pause_ms: Option<u64>,
    /// The budget the pause was held to.
    pub pause_budget_ms: u64,
}

/// One catch-up round, as the target applied it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Data bytes the round carried.
    pub bytes: u64,
    pub ms: u64,
    /// The position the target holds after it.
    pub until: u64,
    /// Taken under the fence.
    pub fenced: bool,
}

/// Where the source's fence stopped its writers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    pub term: u64,
    pub position: u64,
    /// When, in Unix milliseconds (the conductor's clock).
    pub at_ms: u64,
}

/// A change to the replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Command {
    /// Records a member's name and address (Raft membership is separate).
    SetMember {
        id: NodeId,
        member: Member,
    },
    RemoveMember {
        id: NodeId,
    },
    /// A replica found on a node's disk (or published outside a transfer).
    RegisterReplica {
        engine: String,
        shard: String,
        node: NodeId,
    },
    /// Replicas found on a node's disk, at most [`MAX_REGISTER_BATCH`]: all
    /// registered, or none if any is refused (as `RegisterReplica` each).
    RegisterReplicas {
        shards: Vec<ShardKey>,
        node: NodeId,
    },
    StartTransfer {
        id: String,
        engine: String,
        shard: String,
        source: NodeId,
        target: NodeId,
        kind: TransferKind,
        now: u64,
    },
    /// The target installed the snapshot: its replica becomes Partial.
    MarkPartial {
        transfer: String,
        epoch: u64,
        now: u64,
    },
    /// Every member applied Partial: the target becomes Active (a move makes
    /// the source Dead).
    FinishTransfer {
        transfer: String,
        epoch: u64,
        now: u64,
    },
    AbortTransfer {
        transfer: String,
        epoch: u64,
        reason: String,
        now: u64,
    },
    /// A catch-up round the target applied (stage Partial).
    RecordRound {
        transfer: String,
        epoch: u64,
        round: RoundRecord,
        pause_budget_ms: u64,
    },
    /// The source is fenced for the transfer's final round (stage Partial).
    MarkFenced {
        transfer: String,
        epoch: u64,
        fence: FenceRecord,
    },
    /// The write pause, measured once the new owner was committed Active.
    RecordPause {
        transfer: String,
        epoch: u64,
        pause_ms: u64,
    },
    /// A Dead replica's files are gone from its node.
    ForgetReplica {
        engine: String,
        shard: String,
        node: NodeId,
    },
    /// A plugin build installed through `node`, which holds its bytes: it
    /// becomes the engine's rollout (replacing an unfinished one).
    InstallPlugin {
        engine: String,
        /// BLAKE3 (hex) of the component.
        hash: String,
        version: String,
        node: NodeId,
        now: u64,
    },
    /// `node` holds an installed build, verified and compiled.
    PluginReady {
        engine: String,
        hash: String,
        node: NodeId,
    },
    /// Rolls an installed build out again (a roll back to an earlier one):
    /// active once every member holds it.
    ActivatePlugin {
        engine: String,
        hash: String,
    },
    /// Forgets an installed build that is neither active nor pinned by a live
    /// transfer; members delete its bytes.
    RemovePlugin {
        engine: String,
        hash: String,
    },
}

impl Command {
    /// The command with its free text clipped as `apply` would keep it (a
    /// proposer's long failure reason is not refused, only shortened).
    pub fn bounded(mut self) -> Command {
        if let Command::AbortTransfer { reason, .. } = &mut self
            && reason.len() > MAX_REASON
        {
            *reason = clip(reason, MAX_REASON);
        }
        self
    }

    /// Checks the command's names and sizes alone, without the state: what
    /// `apply` refuses first anyway. A proposal that fails it is refused
    /// before it reaches the log.
    pub fn check(&self) -> Result<(), String> {
        match self {
            Command::SetMember { id, member } => {
                check_member_name(&member.name)?;
                check_member_addr(&member.addr)?;
                if *id != super::raft_id(&member.name) {
                    return Err(format!("node id {id} is not the id of node name {:?}", member.name));
                }
            }
            Command::RemoveMember { .. } => {}
            Command::RegisterReplica { engine, shard, .. } => {
                check_engine_name(engine)?;
                check_shard_id(shard)?;
            }
            Command::RegisterReplicas { shards, .. } => {
                if shards.is_empty() || shards.len() > MAX_REGISTER_BATCH {
                    return Err(format!("{} shards in one registration (1 to {MAX_REGISTER_BATCH})", shards.len()));
                }
                for (engine, shard) in shards {
                    check_engine_name(engine)?;
                    check_shard_id(shard)?;
                }
            }
            Command::StartTransfer { id, engine, shard, .. } => {
                check_transfer_id(id)?;
                check_engine_name(engine)?;
                check_shard_id(shard)?;
            }
            Command::MarkPartial { transfer, .. }
            | Command::FinishTransfer { transfer, .. }
            | Command::RecordRound { transfer, .. }
            | Command::MarkFenced { transfer, .. }
            | Command::RecordPause { transfer, .. } => {
                check_reference("transfer", transfer)?;
            }
            Command::AbortTransfer { transfer, reason, .. } => {
                check_reference("transfer", transfer)?;
                if reason.len() > MAX_PROPOSED_REASON {
                    return Err(format!("a failure reason of {} bytes, at most {MAX_PROPOSED_REASON}", reason.len()));
                }
            }
            Command::ForgetReplica { engine, shard, .. } => {
                check_reference("engine", engine)?;
                check_reference("shard", shard)?;
            }
            Command::InstallPlugin { engine, hash, version, .. } => {
                check_engine_name(engine)?;
                check_plugin_hash(hash)?;
                if version.is_empty() || version.len() > 128 {
                    return Err(format!("plugin version of {} bytes (1 to 128)", version.len()));
                }
            }
            Command::PluginReady { engine, hash, .. }
            | Command::ActivatePlugin { engine, hash }
            | Command::RemovePlugin { engine, hash } => {
                check_reference("engine", engine)?;
                check_plugin_hash(hash)?;
            }
        }
        Ok(())
    }
}

/// A plugin build's name: the BLAKE3 of its component, in lowercase hex.
pub fn check_plugin_hash(hash: &str) -> Result<(), String> {
    if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        Ok(())
    } else {
        Err(format!("plugin hash {:?} is not 64 lowercase hex digits", clip(hash, 80)))
    }
}

/// An engine's plugin builds installed through the cluster. New transfers
/// use `active`; a transfer keeps the build it started with (its record's
/// `plugin`) to its end, so a build stays until no live transfer holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EnginePlugins {
    /// Every build installed and not removed, by BLAKE3.
    pub builds: BTreeMap<String, PluginBuild>,
    /// The build new transfers of the engine use (none yet: each member's
    /// own, from its plugins directory).
    pub active: Option<String>,
    /// The build being rolled out: active once every member holds it ready
    /// (an install, or an `activate` of an older build: a roll back).
    pub rolling: Option<String>,
}

/// One installed build of an engine's plugin.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PluginBuild {
    pub version: String,
    /// Members that hold it verified and compiled.
    pub ready: BTreeSet<NodeId>,
    pub installed_at: u64,
}

impl EnginePlugins {
    /// The build an operator asked for last: the one being rolled out, else
    /// the active one.
    pub fn wanted(&self) -> Option<&String> {
        self.rolling.as_ref().or(self.active.as_ref())
    }
}

/// States written before builds were kept per engine held one rollout
/// (`hash`, `version`, `ready`, `active: bool`); they still load.
impl<'de> Deserialize<'de> for EnginePlugins {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Current {
            builds: BTreeMap<String, PluginBuild>,
            active: Option<String>,
            rolling: Option<String>,
        }
        #[derive(Deserialize)]
        struct OneRollout {
            hash: String,
            version: String,
            ready: BTreeSet<NodeId>,
            active: bool,
            installed_at: u64,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Current(Current),
            OneRollout(OneRollout),
        }
        Ok(match Form::deserialize(d)? {
            Form::Current(c) => EnginePlugins { builds: c.builds, active: c.active, rolling: c.rolling },
            Form::OneRollout(r) => {
                let build = PluginBuild { version: r.version, ready: r.ready, installed_at: r.installed_at };
                let (active, rolling) =
                    if r.active { (Some(r.hash.clone()), None) } else { (None, Some(r.hash.clone())) };
                EnginePlugins { builds: BTreeMap::from([(r.hash, build)]), active, rolling }
            }
        })
    }
}

/// What applying a command answers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// The log index the command was applied at.
    pub index: u64,
    /// Why the command was refused (then it changed nothing).
    pub error: Option<String>,
}

/// Key of the replica table.
pub type ShardKey = (String, String);

/// (engine, shard) → node → state. A persistent map: copies share their
/// structure, so a copy costs O(1) and `diff` of two copies visits only
/// what changed between them.
pub type ReplicaTable = imbl::OrdMap<ShardKey, BTreeMap<NodeId, ReplicaState>>;

/// Transfer records by id (a persistent map, like the replica table).
pub type TransferTable = imbl::OrdMap<String, TransferRecord>;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub members: BTreeMap<NodeId, Member>,
    /// (engine, shard) → node → state.
    #[serde(with = "shard_map")]
    pub replicas: ReplicaTable,
    pub transfers: TransferTable,
    /// Plugin builds installed through the cluster, by engine.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub plugins: BTreeMap<String, EnginePlugins>,
}

impl ClusterState {
    /// Makes each build being rolled out that every member holds ready the
    /// engine's active build.
    fn activate_ready_plugins(&mut self) {
        for engine in self.plugins.values_mut() {
            let Some(hash) = engine.rolling.clone() else { continue };
            let ready = engine.builds.get(&hash).is_some_and(|b| self.members.keys().all(|m| b.ready.contains(m)));
            if ready {
                engine.active = Some(hash);
                engine.rolling = None;
            }
        }
    }

    /// The build a transfer of `engine` starting now is pinned to.
    pub fn active_plugin(&self, engine: &str) -> Option<&String> {
        self.plugins.get(engine).and_then(|p| p.active.as_ref())
    }

    pub fn replica(&self, engine: &str, shard: &str, node: NodeId) -> Option<ReplicaState> {
        self.replicas.get(&(engine.to_owned(), shard.to_owned())).and_then(|r| r.get(&node)).copied()
    }

    /// The live transfer of a shard, if any.
    pub fn live_transfer(&self, engine: &str, shard: &str) -> Option<&TransferRecord> {
        self.transfers.values().find(|t| t.engine == engine && t.shard == shard && t.stage.is_live())
    }

    fn set_replica(&mut self, engine: &str, shard: &str, node: NodeId, state: Option<ReplicaState>) {
        let key = (engine.to_owned(), shard.to_owned());
        let nodes = self.replicas.entry(key.clone()).or_default();
        match state {
            Some(state) => {
                nodes.insert(node, state);
            }
            None => {
                nodes.remove(&node);
                if nodes.is_empty() {
                    self.replicas.remove(&key);
                }
            }
        }
    }

    /// Applies `command` at log `index`.
    pub fn apply(&mut self, index: u64, command: &Command) -> Applied {
        let error = self.try_apply(index, command).err();
        Applied { index, error }
    }

    fn try_apply(&mut self, index: u64, command: &Command) -> Result<(), String> {
        command.check()?;
        match command {
            Command::SetMember { id, member } => {
                self.members.insert(*id, member.clone());
            }
            Command::RemoveMember { id } => {
                if let Some(t) =
                    self.transfers.values().find(|t| t.stage.is_live() && (t.source == *id || t.target == *id))
                {
                    return Err(format!("node {id} takes part in live transfer {}", t.id));
                }
                self.members.remove(id);
                let held: Vec<ShardKey> =
                    self.replicas.iter().filter(|(_, nodes)| nodes.contains_key(id)).map(|(k, _)| k.clone()).collect();
                for (engine, shard) in held {
                    self.set_replica(&engine, &shard, *id, None);
                }
                // A member that left no longer holds a rollout back.
                self.activate_ready_plugins();
            }
            Command::RegisterReplica { engine, shard, node } => {
                self.member(*node)?;
                if self.may_register(engine, shard, *node)? {
                    self.set_replica(engine, shard, *node, Some(ReplicaState::Active));
                }
            }
            Command::RegisterReplicas { shards, node } => {
                self.member(*node)?;
                let mut new = Vec::with_capacity(shards.len());
                for (engine, shard) in shards {
                    if self.may_register(engine, shard, *node)? {
                        new.push((engine, shard));
                    }
                }
                for (engine, shard) in new {
                    self.set_replica(engine, shard, *node, Some(ReplicaState::Active));
                }
            }
            Command::StartTransfer { id, engine, shard, source, target, kind, now } => {
                if self.transfers.contains_key(id) {
                    return Err(format!("transfer {id} exists"));
                }
                self.member(*source)?;
                self.member(*target)?;
                if source == target {
                    return Err("source and target are the same node".into());
                }
                if let Some(live) = self.live_transfer(engine, shard) {
                    return Err(format!("transfer {} of {engine}/{shard} is in progress", live.id));
                }
                if self.replica(engine, shard, *source) != Some(ReplicaState::Active) {
                    return Err(format!("node {source} has no active replica of {engine}/{shard}"));
                }
                let target_was = self.replica(engine, shard, *target);
                if target_was == Some(ReplicaState::Active) {
                    return Err(format!("node {target} already has an active replica of {engine}/{shard}"));
                }
                self.set_replica(engine, shard, *target, Some(ReplicaState::PartialSnapshot));
                self.transfers.insert(
                    id.clone(),
                    TransferRecord {
                        id: id.clone(),
                        engine: engine.clone(),
                        shard: shard.clone(),
                        source: *source,
                        target: *target,
                        kind: *kind,
                        stage: TransferStage::Snapshot,
                        epoch: index,
                        target_was,
                        started_at: *now,
                        updated_at: *now,
                        failure: None,
                        live: None,
                        plugin: self.plugins.get(engine).and_then(|p| p.active.clone()),
                    },
                );
            }
            Command::MarkPartial { transfer, epoch, now } => {
                let t = self.current(transfer, *epoch, TransferStage::Snapshot)?;
                let (engine, shard, target) = (t.engine.clone(), t.shard.clone(), t.target);
                t.stage = TransferStage::Partial;
                t.updated_at = *now;
                self.set_replica(&engine, &shard, target, Some(ReplicaState::Partial));
            }
            Command::FinishTransfer { transfer, epoch, now } => {
                let t = self.current(transfer, *epoch, TransferStage::Partial)?;
                let (engine, shard, source, target, kind) =
                    (t.engine.clone(), t.shard.clone(), t.source, t.target, t.kind);
                t.stage = TransferStage::Finished;
                t.updated_at = *now;
                self.set_replica(&engine, &shard, target, Some(ReplicaState::Active));
                if kind == TransferKind::Move {
                    self.set_replica(&engine, &shard, source, Some(ReplicaState::Dead));
                }
                self.prune_history();
            }
            Command::RecordRound { transfer, epoch, round, pause_budget_ms } => {
                let t = self.current(transfer, *epoch, TransferStage::Partial)?;
                let live = t.live.get_or_insert_with(LiveProgress::default);
                if live.fenced.is_some() && !round.fenced {
                    return Err(format!("transfer {transfer} is fenced: its rounds are fenced ones"));
                }
                if live.rounds.len() >= MAX_RECORDED_ROUNDS {
                    return Err(format!("transfer {transfer} has recorded {MAX_RECORDED_ROUNDS} rounds"));
                }
                live.rounds.push(*round);
                live.pause_budget_ms = *pause_budget_ms;
            }
            Command::MarkFenced { transfer, epoch, fence } => {
                let t = self.current(transfer, *epoch, TransferStage::Partial)?;
                let live = t.live.get_or_insert_with(LiveProgress::default);
                match live.fenced {
                    None => live.fenced = Some(*fence),
                    Some(held) if held.term == fence.term && held.position == fence.position => {}
                    Some(held) => {
                        return Err(format!(
                            "transfer {transfer} was fenced at ({}, {}), not ({}, {})",
                            held.term, held.position, fence.term, fence.position
                        ));
                    }
                }
            }
            Command::RecordPause { transfer, epoch, pause_ms } => {
                let t = self.transfers.get_mut(transfer).ok_or_else(|| format!("no transfer {transfer}"))?;
                if t.epoch != *epoch || t.stage != TransferStage::Finished {
                    return Err(format!("transfer {transfer} epoch {epoch} has not finished"));
                }
                let Some(live) = t.live.as_mut().filter(|l| l.fenced.is_some()) else {
                    return Err(format!("transfer {transfer} was never fenced"));
                };
                live.pause_ms = Some(*pause_ms);
            }
            Command::AbortTransfer { transfer, epoch, reason, now } => {
                let t = self.transfers.get_mut(transfer).ok_or_else(|| format!("no transfer {transfer}"))?;
                if t.epoch != *epoch {
                    return Err(format!("transfer {transfer} has epoch {}, not {epoch}", t.epoch));
                }
                if !t.stage.is_live() {
                    return Err(format!("transfer {transfer} already ended {:?}", t.stage));
                }
                let (engine, shard, target, was) = (t.engine.clone(), t.shard.clone(), t.target, t.target_was);
                t.stage = TransferStage::Aborted;
                t.failure = Some(clip(reason, MAX_REASON));
                t.updated_at = *now;
                // Never leave anything partial: back to what it was, and a
                // replica that was not there becomes Dead (its files, if any,
                // are removed by its node).
                self.set_replica(&engine, &shard, target, Some(was.unwrap_or(ReplicaState::Dead)));
                self.prune_history();
            }
            Command::ForgetReplica { engine, shard, node } => match self.replica(engine, shard, *node) {
                Some(ReplicaState::Dead) => self.set_replica(engine, shard, *node, None),
                Some(state) => return Err(format!("replica {engine}/{shard} on node {node} is {state}, not dead")),
                None => {}
            },
            Command::InstallPlugin { engine, hash, version, node, now } => {
                self.member(*node)?;
                let plugins = self.plugins.entry(engine.clone()).or_default();
                let build = plugins.builds.entry(hash.clone()).or_insert_with(|| PluginBuild {
                    version: version.clone(),
                    ready: BTreeSet::new(),
                    installed_at: *now,
                });
                build.ready.insert(*node);
                // A newer install replaces an unfinished rollout.
                plugins.rolling = (plugins.active.as_ref() != Some(hash)).then(|| hash.clone());
                self.activate_ready_plugins();
            }
            Command::PluginReady { engine, hash, node } => {
                self.member(*node)?;
                match self.plugins.get_mut(engine).and_then(|p| p.builds.get_mut(hash)) {
                    Some(build) => {
                        build.ready.insert(*node);
                    }
                    None => return Err(format!("{engine} has no installed build {hash}")),
                }
                self.activate_ready_plugins();
            }
            Command::ActivatePlugin { engine, hash } => {
                let plugins = self.plugins.get_mut(engine).ok_or_else(|| format!("no installed builds of {engine}"))?;
                if !plugins.builds.contains_key(hash) {
                    return Err(format!("{engine} has no installed build {hash}"));
                }
                plugins.rolling = (plugins.active.as_ref() != Some(hash)).then(|| hash.clone());
                self.activate_ready_plugins();
            }
            Command::RemovePlugin { engine, hash } => {
                let plugins = self.plugins.get(engine).ok_or_else(|| format!("no installed builds of {engine}"))?;
                if !plugins.builds.contains_key(hash) {
                    return Err(format!("{engine} has no installed build {hash}"));
                }
                if plugins.active.as_ref() == Some(hash) {
                    return Err(format!("{engine} build {hash} is active: activate another build first"));
                }
                if let Some(t) = self.transfers.values().find(|t| t.stage.is_live() && t.plugin.as_ref() == Some(hash))
                {
                    return Err(format!("{engine} build {hash} is in use by live transfer {}", t.id));
                }
                let plugins = self.plugins.get_mut(engine).expect("looked up above");
                plugins.builds.remove(hash);
                if plugins.rolling.as_ref() == Some(hash) {
                    plugins.rolling = None;
                }
                if plugins.builds.is_empty() {
                    self.plugins.remove(engine);
                }
            }
        }
        Ok(())
    }

    /// Drops the oldest ended transfers (by epoch, then id) beyond
    /// [`MAX_ENDED_TRANSFERS`]; live ones stay.
    fn prune_history(&mut self) {
        let mut ended: Vec<(u64, &String)> =
            self.transfers.values().filter(|t| !t.stage.is_live()).map(|t| (t.epoch, &t.id)).collect();
        let Some(excess) = ended.len().checked_sub(MAX_ENDED_TRANSFERS).filter(|n| *n > 0) else { return };
        ended.sort_unstable();
        let doomed: Vec<String> = ended[..excess].iter().map(|(_, id)| (*id).clone()).collect();
        for id in doomed {
            self.transfers.remove(&id);
        }
    }

    /// Whether registering `engine`/`shard` on `node` changes the table
    /// (false: it is Active there already); an error if it may not be.
    fn may_register(&self, engine: &str, shard: &str, node: NodeId) -> Result<bool, String> {
        if self.live_transfer(engine, shard).is_some_and(|t| t.target == node) {
            return Err(format!("{engine}/{shard} is being transferred to node {node}"));
        }
        match self.replica(engine, shard, node) {
            None | Some(ReplicaState::Dead) => Ok(true),
            Some(ReplicaState::Active) => Ok(false),
            Some(state) => Err(format!("replica {engine}/{shard} on node {node} is {state}")),
        }
    }

    fn member(&self, id: NodeId) -> Result<&Member, String> {
        self.members.get(&id).ok_or_else(|| format!("node {id} is not a member"))
    }

    /// The live transfer `id` at `epoch`, in `stage`.
    fn current(&mut self, id: &str, epoch: u64, stage: TransferStage) -> Result<&mut TransferRecord, String> {
        let t = self.transfers.get_mut(id).ok_or_else(|| format!("no transfer {id}"))?;
        if t.epoch != epoch {
            return Err(format!("transfer {id} has epoch {}, not {epoch}", t.epoch));
        }
        if t.stage != stage {
            return Err(format!("transfer {id} is at {:?}, not {:?}", t.stage, stage));
        }
        Ok(t)
    }
}

/// JSON maps need string keys: the replica table is a list of entries.
mod shard_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{NodeId, ReplicaState, ReplicaTable};

    #[derive(Serialize, Deserialize)]
    struct Row {
        engine: String,
        shard: String,
        replicas: BTreeMap<NodeId, ReplicaState>,
    }

    pub fn serialize<S: Serializer>(map: &ReplicaTable, s: S) -> Result<S::Ok, S::Error> {
        let rows: Vec<Row> = map
            .iter()
            .map(|((engine, shard), replicas)| Row {
                engine: engine.clone(),
                shard: shard.clone(),
                replicas: replicas.clone(),
            })
            .collect();
        rows.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ReplicaTable, D::Error> {
        let rows = Vec::<Row>::deserialize(d)?;
        Ok(rows.into_iter().map(|r| ((r.engine, r.shard), r.replicas)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::raft_id;

    /// Node ids of members "a", "b", "c".
    fn n(i: usize) -> NodeId {
        raft_id(["a", "b", "c"][i - 1])
    }

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        for (i, name) in [(1, "a"), (2, "b"), (3, "c")] {
            let member = Member { name: name.into(), addr: format!("http://{name}:7070") };
            assert_eq!(s.apply(i, &Command::SetMember { id: n(i as usize), member }).error, None);
        }
        let reg = Command::RegisterReplica { engine: "e".into(), shard: "s".into(), node: n(1) };
        assert_eq!(s.apply(4, &reg).error, None);
        s
    }

    fn start(id: &str, source: usize, target: usize, kind: TransferKind) -> Command {
        Command::StartTransfer {
            id: id.into(),
            engine: "e".into(),
            shard: "s".into(),
            source: n(source),
            target: n(target),
            kind,
            now: 0,
        }
    }

    #[test]
    fn a_move_goes_through_every_phase() {
        let mut s = cluster();
        assert_eq!(s.apply(10, &start("t1", 1, 2, TransferKind::Move)).error, None);
        assert_eq!(s.replica("e", "s", n(2)), Some(ReplicaState::PartialSnapshot));
        assert_eq!(s.transfers["t1"].epoch, 10);
        // Out of order or stale epoch: refused.
        let finish = Command::FinishTransfer { transfer: "t1".into(), epoch: 10, now: 1 };
        assert!(s.apply(11, &finish).error.unwrap().contains("not Partial"));
        let stale = Command::MarkPartial { transfer: "t1".into(), epoch: 9, now: 1 };
        assert!(s.apply(11, &stale).error.unwrap().contains("epoch 10, not 9"));
        assert_eq!(s.apply(12, &Command::MarkPartial { transfer: "t1".into(), epoch: 10, now: 1 }).error, None);
        assert_eq!(s.replica("e", "s", n(2)), Some(ReplicaState::Partial));
        assert_eq!(s.apply(13, &finish).error, None);
        assert_eq!(s.replica("e", "s", n(2)), Some(ReplicaState::Active));
        assert_eq!(s.replica("e", "s", n(1)), Some(ReplicaState::Dead));
        let forget = Command::ForgetReplica { engine: "e".into(), shard: "s".into(), node: n(1) };
        assert_eq!(s.apply(14, &forget).error, None);
        assert_eq!(s.replica("e", "s", n(1)), None);
    }

    #[test]
    fn one_transfer_per_shard_and_never_to_an_active_replica() {
        let mut s = cluster();
        assert_eq!(s.apply(10, &start("t1", 1, 2, TransferKind::Replicate)).error, None);
        assert!(s.apply(11, &start("t2", 1, 3, TransferKind::Replicate)).error.unwrap().contains("in progress"));
        assert!(s.apply(11, &start("t3", 1, 1, TransferKind::Replicate)).error.unwrap().contains("same node"));
        let abort = Command::AbortTransfer { transfer: "t1".into(), epoch: 10, reason: "x".into(), now: 2 };
        assert_eq!(s.apply(12, &abort).error, None);
        assert_eq!(s.replica("e", "s", n(2)), Some(ReplicaState::Dead), "nothing partial stays");
        assert!(s.apply(13, &abort).error.unwrap().contains("already ended"));
        // Node 1 is Active: a transfer to it is refused (Qdrant #2805).
        assert!(s.apply(14, &start("t4", 2, 1, TransferKind::Replicate)).error.is_some());
        assert!(s.apply(15, &start("t5", 3, 2, TransferKind::Replicate)).error.unwrap().contains("no active replica"));
    }

    #[test]
    fn registering_does_not_override_a_transfer() {
        let mut s = cluster();
        assert_eq!(s.apply(10, &start("t1", 1, 2, TransferKind::Replicate)).error, None);
        let reg = Command::RegisterReplica { engine: "e".into(), shard: "s".into(), node: n(2) };
        assert!(s.apply(11, &reg).error.is_some());
        assert_eq!(s.replica("e", "s", n(2)), Some(ReplicaState::PartialSnapshot));
        let remove = Command::RemoveMember { id: n(2) };
        assert!(s.apply(12, &remove).error.unwrap().contains("live transfer"));
    }

    #[test]
    fn a_live_move_records_rounds_its_fence_and_its_pause() {
        let mut s = cluster();
        assert_eq!(s.apply(10, &start("t1", 1, 2, TransferKind::Move)).error, None);
        let round = |until, fenced| RoundRecord { bytes: 100, ms: 5, until, fenced };
        let record = |round| Command::RecordRound { transfer: "t1".into(), epoch: 10, round, pause_budget_ms: 250 };
        assert!(s.apply(11, &record(round(1, false))).error.unwrap().contains("not Partial"), "before Partial");
        assert_eq!(s.apply(12, &Command::MarkPartial { transfer: "t1".into(), epoch: 10, now: 1 }).error, None);
        assert_eq!(s.apply(13, &record(round(10, false))).error, None);
        let fence = FenceRecord { term: 2, position: 20, at_ms: 7 };
        let fenced = Command::MarkFenced { transfer: "t1".into(), epoch: 10, fence };
        assert_eq!(s.apply(14, &fenced).error, None);
        assert_eq!(s.apply(15, &fenced).error, None, "idempotent");
        let other =
            Command::MarkFenced { transfer: "t1".into(), epoch: 10, fence: FenceRecord { position: 21, ..fence } };
        assert!(s.apply(16, &other).error.is_some());
        assert!(s.apply(17, &record(round(11, false))).error.unwrap().contains("fenced"));
        assert_eq!(s.apply(18, &record(round(20, true))).error, None);
        let pause = Command::RecordPause { transfer: "t1".into(), epoch: 10, pause_ms: 40 };
        assert!(s.apply(19, &pause).error.unwrap().contains("not finished"));
        assert_eq!(s.apply(20, &Command::FinishTransfer { transfer: "t1".into(), epoch: 10, now: 2 }).error, None);
        assert_eq!(s.apply(21, &pause).error, None);
        let live = s.transfers["t1"].live.clone().unwrap();
        assert_eq!(
            (live.rounds.len(), live.fenced, live.pause_ms, live.pause_budget_ms),
            (2, Some(fence), Some(40), 250)
        );
    }

    #[test]
    fn a_plugin_rollout_is_active_once_every_member_holds_it() {
        let mut s = cluster();
        let (h1, h2) = ("a".repeat(64), "b".repeat(64));
        let install = |hash: &str, node| Command::InstallPlugin {
            engine: "e".into(),
            hash: hash.into(),
            version: "2".into(),
            node: n(node),
            now: 1,
        };
        let ready = |hash: &str, node| Command::PluginReady { engine: "e".into(), hash: hash.into(), node: n(node) };
        assert!(s.apply(10, &install("NOT-HEX", 1)).error.unwrap().contains("64 lowercase hex"));
        assert_eq!(s.apply(11, &install(&h1, 1)).error, None);
        assert_eq!(s.apply(12, &ready(&h1, 2)).error, None);
        assert_eq!(s.plugins["e"].active, None);
        // A newer install replaces an unfinished rollout.
        assert_eq!(s.apply(13, &install(&h2, 2)).error, None);
        assert_eq!(s.plugins["e"].rolling.as_ref(), Some(&h2));
        assert!(s.apply(14, &ready(&"c".repeat(64), 3)).error.unwrap().contains("no installed build"));
        assert_eq!(s.apply(15, &ready(&h2, 1)).error, None);
        assert_eq!(s.plugins["e"].active, None);
        // A member that leaves no longer holds it back.
        assert_eq!(s.apply(16, &Command::RemoveMember { id: n(3) }).error, None);
        assert_eq!(s.plugins["e"].active.as_ref(), Some(&h2), "{:?}", s.plugins["e"]);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ClusterState>(&json).unwrap(), s);
    }

    #[test]
    fn transfers_are_pinned_to_the_active_build_which_stays_while_they_run() {
        let mut s = cluster();
        let (h1, h2) = ("a".repeat(64), "b".repeat(64));
        for (i, hash) in [&h1, &h2].into_iter().enumerate() {
            let install = Command::InstallPlugin {
                engine: "e".into(),
                hash: hash.clone(),
                version: "v".into(),
                node: n(1),
                now: 1,
            };
            let base = 10 + i as u64 * 10;
            assert_eq!(s.apply(base, &install).error, None);
            for node in [2u64, 3] {
                let ready = Command::PluginReady { engine: "e".into(), hash: hash.clone(), node: n(node as usize) };
                assert_eq!(s.apply(base + node, &ready).error, None);
            }
            assert_eq!(s.plugins["e"].active.as_ref(), Some(hash));
            if i == 0 {
                let reg = Command::RegisterReplica { engine: "e".into(), shard: "s".into(), node: n(1) };
                assert_eq!(s.apply(15, &reg).error, None);
                let start = Command::StartTransfer {
                    id: "t1".into(),
                    engine: "e".into(),
                    shard: "s".into(),
                    source: n(1),
                    target: n(2),
                    kind: TransferKind::Replicate,
                    now: 1,
                };
                assert_eq!(s.apply(16, &start).error, None);
            }
        }
        // Started under h1, it keeps h1 after h2 went active.
        assert_eq!(s.transfers["t1"].plugin.as_ref(), Some(&h1));
        let remove = |hash: &str| Command::RemovePlugin { engine: "e".into(), hash: hash.into() };
        refused(&mut s, remove(&h1), "in use by live transfer t1");
        refused(&mut s, remove(&h2), "is active");
        // Roll back: every member holds h1 already, so it is active at once.
        assert_eq!(s.apply(40, &Command::ActivatePlugin { engine: "e".into(), hash: h1.clone() }).error, None);
        assert_eq!(s.plugins["e"].active.as_ref(), Some(&h1));
        refused(&mut s, Command::ActivatePlugin { engine: "e".into(), hash: "c".repeat(64) }, "no installed build");
        let abort = Command::AbortTransfer { transfer: "t1".into(), epoch: 16, reason: "x".into(), now: 2 };
        assert_eq!(s.apply(41, &abort).error, None);
        assert_eq!(s.apply(42, &remove(&h2)).error, None);
        assert_eq!(s.plugins["e"].builds.keys().collect::<Vec<_>>(), [&h1]);
    }

    #[test]
    fn a_state_with_the_old_single_rollout_still_loads() {
        let old = format!(
            r#"{{"members":{{}},"replicas":[],"transfers":{{}},"plugins":{{"e":{{"hash":"{}","version":"1","ready":[1],"active":true,"installed_at":5}}}}}}"#,
            "a".repeat(64)
        );
        let s: ClusterState = serde_json::from_str(&old).unwrap();
        assert_eq!(s.plugins["e"].active, Some("a".repeat(64)));
        assert_eq!(s.plugins["e"].builds["a".repeat(64).as_str()].installed_at, 5);
    }

    #[test]
    fn state_roundtrips_through_json() {
        let mut s = cluster();
        s.apply(10, &start("t1", 1, 2, TransferKind::Move));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ClusterState>(&json).unwrap(), s);
    }

    /// Applies `command` and asserts it is refused, mentioning `why`, and
    /// changed nothing.
    fn refused(s: &mut ClusterState, command: Command, why: &str) {
        let before = s.clone();
        let error = s.apply(100, &command).error.unwrap_or_else(|| panic!("accepted: {command:?}"));
        assert!(error.contains(why), "{error}");
        assert!(error.len() < 400, "the error is not clipped: {} bytes", error.len());
        assert_eq!(*s, before, "a refused command changed the state");
    }

    #[test]
    fn engine_names_are_plugin_engine_names() {
        let mut s = cluster();
        for engine in ["/some/absolute/dir", "../../x", "..", "Sqlite", "a/b", "", "-x", &"e".repeat(65)] {
            let reg = Command::RegisterReplica { engine: engine.into(), shard: "s".into(), node: n(1) };
            refused(&mut s, reg, "engine name");
            let start = Command::StartTransfer {
                id: "t9".into(),
                engine: engine.into(),
                shard: "s".into(),
                source: n(1),
                target: n(2),
                kind: TransferKind::Move,
                now: 0,
            };
            refused(&mut s, start, "engine name");
        }
        let reg = Command::RegisterReplica { engine: "segment-log".into(), shard: "s".into(), node: n(1) };
        assert_eq!(s.apply(100, &reg).error, None);
    }

    #[test]
    fn shard_ids_are_checked_and_bounded() {
        let mut s = cluster();
        let huge = "x".repeat(20 << 20);
        for shard in ["..", ".", "../../x", "/abs", "a/b", "", ".hidden", huge.as_str()] {
            let reg = Command::RegisterReplica { engine: "e".into(), shard: shard.into(), node: n(1) };
            refused(&mut s, reg, "shard id");
        }
    }

    #[test]
    fn transfer_ids_are_checked_and_references_bounded() {
        let mut s = cluster();
        for id in ["../../x", "/abs", "a.b", "", &"t".repeat(65)] {
            refused(&mut s, start(id, 1, 2, TransferKind::Move), "transfer id");
        }
        let long = "t".repeat(MAX_REFERENCE + 1);
        refused(&mut s, Command::MarkPartial { transfer: long.clone(), epoch: 1, now: 0 }, "longer than");
        refused(&mut s, Command::FinishTransfer { transfer: long.clone(), epoch: 1, now: 0 }, "longer than");
        let abort = Command::AbortTransfer { transfer: long.clone(), epoch: 1, reason: "x".into(), now: 0 };
        refused(&mut s, abort, "longer than");
        let forget = Command::ForgetReplica { engine: long, shard: "s".into(), node: n(1) };
        refused(&mut s, forget, "longer than");
        // An existing record is still found by a reference outside today's
        // rules (records made before them can be aborted).
        s.transfers.insert("old.id".into(), TransferRecord { id: "old.id".into(), ..record(10) });
        let abort = Command::AbortTransfer { transfer: "old.id".into(), epoch: 10, reason: "x".into(), now: 0 };
        assert_eq!(s.apply(101, &abort).error, None);
    }

    #[test]
    fn member_names_and_addresses_are_checked() {
        let mut s = cluster();
        for name in ["", "-x", ".x", "a/b", "../x", "a b", "ü", &"n".repeat(65)] {
            let member = Member { name: name.into(), addr: "http://x:1".into() };
            refused(&mut s, Command::SetMember { id: raft_id(name), member }, "node name");
        }
        for addr in [
            "",
            "ftp://x:1",
            "x:1",
            "/path",
            "http://x:1/path",
            "http://x:1?q",
            "http://user@x:1",
            "http://x:1\n",
            &format!("http://{}:1", "h".repeat(MAX_ADDR)),
        ] {
            let member = Member { name: "d".into(), addr: addr.into() };
            refused(&mut s, Command::SetMember { id: raft_id("d"), member }, "address");
        }
        // The id is the name's: no record of one node under another's id.
        let member = Member { name: "d".into(), addr: "http://d:7070".into() };
        refused(&mut s, Command::SetMember { id: n(1), member: member.clone() }, "not the id");
        for addr in ["http://d:7070", "https://d.example.com", "http://[::1]:7070/", "http://127.0.0.1:1"] {
            let member = Member { name: "d".into(), addr: addr.into() };
            assert_eq!(s.apply(102, &Command::SetMember { id: raft_id("d"), member }).error, None, "{addr}");
        }
        for name in ["node-1", "alpha", "db1.example.com", "N_2"] {
            assert!(check_member_name(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn failure_reasons_are_clipped_deterministically() {
        let mut s = cluster();
        assert_eq!(s.apply(10, &start("t1", 1, 2, TransferKind::Move)).error, None);
        let reason = "é".repeat(MAX_REASON); // 2 bytes each: the cut falls mid-character
        let abort = Command::AbortTransfer { transfer: "t1".into(), epoch: 10, reason: reason.clone(), now: 0 };
        let mut other = s.clone();
        assert_eq!(s.apply(11, &abort).error, None);
        assert_eq!(other.apply(11, &abort).error, None);
        assert_eq!(s, other);
        let kept = s.transfers["t1"].failure.clone().unwrap();
        assert!(kept.len() <= MAX_REASON + '…'.len_utf8() && kept.ends_with('…'), "{} bytes", kept.len());
        assert!(reason.starts_with(kept.trim_end_matches('…')));
        // A proposer's long reason is shortened, a hand-made huge one refused.
        let Command::AbortTransfer { reason: shortened, .. } = abort.bounded() else { unreachable!() };
        assert_eq!(shortened, clip(&reason, MAX_REASON));
        let huge = Command::AbortTransfer { transfer: "t1".into(), epoch: 10, reason: "x".repeat(1 << 20), now: 0 };
        assert!(huge.check().unwrap_err().contains("failure reason"));
    }

    fn record(epoch: u64) -> TransferRecord {
        TransferRecord {
            id: format!("t{epoch}"),
            engine: "e".into(),
            shard: format!("s{epoch}"),
            source: n(1),
            target: n(2),
            kind: TransferKind::Replicate,
            stage: TransferStage::Snapshot,
            epoch,
            target_was: None,
            started_at: 0,
            updated_at: 0,
            failure: None,
            live: None,
            plugin: None,
        }
    }

    #[test]
    fn ended_transfers_are_pruned_oldest_first_and_live_ones_kept() {
        let mut s = cluster();
        // Live transfers older than all the ended ones.
        for epoch in 1..=3 {
            s.transfers.insert(format!("t{epoch}"), record(epoch));
        }
        let mut index = 10;
        for i in 0..MAX_ENDED_TRANSFERS + 50 {
            let shard = format!("h{i}");
            let reg = Command::RegisterReplica { engine: "e".into(), shard: shard.clone(), node: n(1) };
            assert_eq!(s.apply(index, &reg).error, None);
            let start = Command::StartTransfer {
                id: format!("x{i}"),
                engine: "e".into(),
                shard,
                source: n(1),
                target: n(2),
                kind: TransferKind::Replicate,
                now: 0,
            };
            assert_eq!(s.apply(index + 1, &start).error, None);
            let abort =
                Command::AbortTransfer { transfer: format!("x{i}"), epoch: index + 1, reason: "r".into(), now: 0 };
            assert_eq!(s.apply(index + 2, &abort).error, None);
            index += 3;
        }
        let ended: Vec<&TransferRecord> = s.transfers.values().filter(|t| !t.stage.is_live()).collect();
        assert_eq!(ended.len(), MAX_ENDED_TRANSFERS);
        assert!(!s.transfers.contains_key("x49") && s.transfers.contains_key("x50"), "the oldest go first");
        for epoch in 1..=3 {
            assert!(s.transfers[&format!("t{epoch}")].stage.is_live(), "a live transfer was pruned");
        }
    }
}
