//! The replicated state: members, the replica table, transfers. Pure logic:
//! `apply` is deterministic, so every member computes the same state from the
//! same log. Commands that break a rule are applied as no-ops and answer an
//! error to the proposer.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

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

impl fmt::Display for ReplicaState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReplicaState::Active => "active",
            ReplicaState::Dead => "dead",
            ReplicaState::PartialSnapshot => "partial-snapshot",
            ReplicaState::Partial => "partial",
        })
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
    /// A Dead replica's files are gone from its node.
    ForgetReplica {
        engine: String,
        shard: String,
        node: NodeId,
    },
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

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub members: BTreeMap<NodeId, Member>,
    /// (engine, shard) → node → state.
    #[serde(with = "shard_map")]
    pub replicas: BTreeMap<ShardKey, BTreeMap<NodeId, ReplicaState>>,
    pub transfers: BTreeMap<String, TransferRecord>,
}

impl ClusterState {
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
                for nodes in self.replicas.values_mut() {
                    nodes.remove(id);
                }
                self.replicas.retain(|_, nodes| !nodes.is_empty());
            }
            Command::RegisterReplica { engine, shard, node } => {
                self.member(*node)?;
                if self.live_transfer(engine, shard).is_some_and(|t| t.target == *node) {
                    return Err(format!("{engine}/{shard} is being transferred to node {node}"));
                }
                match self.replica(engine, shard, *node) {
                    None | Some(ReplicaState::Dead) => {
                        self.set_replica(engine, shard, *node, Some(ReplicaState::Active))
                    }
                    Some(ReplicaState::Active) => {}
                    Some(state) => return Err(format!("replica {engine}/{shard} on node {node} is {state}")),
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
                t.failure = Some(reason.clone());
                t.updated_at = *now;
                // Never leave anything partial: back to what it was, and a
                // replica that was not there becomes Dead (its files, if any,
                // are removed by its node).
                self.set_replica(&engine, &shard, target, Some(was.unwrap_or(ReplicaState::Dead)));
            }
            Command::ForgetReplica { engine, shard, node } => match self.replica(engine, shard, *node) {
                Some(ReplicaState::Dead) => self.set_replica(engine, shard, *node, None),
                Some(state) => return Err(format!("replica {engine}/{shard} on node {node} is {state}, not dead")),
                None => {}
            },
        }
        Ok(())
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

    use super::{NodeId, ReplicaState, ShardKey};

    #[derive(Serialize, Deserialize)]
    struct Row {
        engine: String,
        shard: String,
        replicas: BTreeMap<NodeId, ReplicaState>,
    }

    pub fn serialize<S: Serializer>(
        map: &BTreeMap<ShardKey, BTreeMap<NodeId, ReplicaState>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
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

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<ShardKey, BTreeMap<NodeId, ReplicaState>>, D::Error> {
        let rows = Vec::<Row>::deserialize(d)?;
        Ok(rows.into_iter().map(|r| ((r.engine, r.shard), r.replicas)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> ClusterState {
        let mut s = ClusterState::default();
        for (id, name) in [(1, "a"), (2, "b"), (3, "c")] {
            let member = Member { name: name.into(), addr: format!("http://{name}") };
            assert_eq!(s.apply(id, &Command::SetMember { id, member }).error, None);
        }
        let reg = Command::RegisterReplica { engine: "e".into(), shard: "s".into(), node: 1 };
        assert_eq!(s.apply(4, &reg).error, None);
        s
    }

    fn start(id: &str, source: NodeId, target: NodeId, kind: TransferKind) -> Command {
        Command::StartTransfer { id: id.into(), engine: "e".into(), shard: "s".into(), source, target, kind, now: 0 }
    }

    #[test]
    fn a_move_goes_through_every_phase() {
        let mut s = cluster();
        assert_eq!(s.apply(10, &start("t1", 1, 2, TransferKind::Move)).error, None);
        assert_eq!(s.replica("e", "s", 2), Some(ReplicaState::PartialSnapshot));
        assert_eq!(s.transfers["t1"].epoch, 10);
        // Out of order or stale epoch: refused.
        let finish = Command::FinishTransfer { transfer: "t1".into(), epoch: 10, now: 1 };
        assert!(s.apply(11, &finish).error.unwrap().contains("not Partial"));
        let stale = Command::MarkPartial { transfer: "t1".into(), epoch: 9, now: 1 };
        assert!(s.apply(11, &stale).error.unwrap().contains("epoch 10, not 9"));
        assert_eq!(s.apply(12, &Command::MarkPartial { transfer: "t1".into(), epoch: 10, now: 1 }).error, None);
        assert_eq!(s.replica("e", "s", 2), Some(ReplicaState::Partial));
        assert_eq!(s.apply(13, &finish).error, None);
        assert_eq!(s.replica("e", "s", 2), Some(ReplicaState::Active));
        assert_eq!(s.replica("e", "s", 1), Some(ReplicaState::Dead));
        let forget = Command::ForgetReplica { engine: "e".into(), shard: "s".into(), node: 1 };
        assert_eq!(s.apply(14, &forget).error, None);
        assert_eq!(s.replica("e", "s", 1), None);
    }

    #[test]
    fn one_transfer_per_shard_and_never_to_an_active_replica() {
        let mut s = cluster();
        assert_eq!(s.apply(10, &start("t1", 1, 2, TransferKind::Replicate)).error, None);
        assert!(s.apply(11, &start("t2", 1, 3, TransferKind::Replicate)).error.unwrap().contains("in progress"));
        assert!(s.apply(11, &start("t3", 1, 1, TransferKind::Replicate)).error.unwrap().contains("same node"));
        let abort = Command::AbortTransfer { transfer: "t1".into(), epoch: 10, reason: "x".into(), now: 2 };
        assert_eq!(s.apply(12, &abort).error, None);
        assert_eq!(s.replica("e", "s", 2), Some(ReplicaState::Dead), "nothing partial stays");
        assert!(s.apply(13, &abort).error.unwrap().contains("already ended"));
        // Node 1 is Active: a transfer to it is refused (Qdrant #2805).
        assert!(s.apply(14, &start("t4", 2, 1, TransferKind::Replicate)).error.is_some());
        assert!(s.apply(15, &start("t5", 3, 2, TransferKind::Replicate)).error.unwrap().contains("no active replica"));
    }

    #[test]
    fn registering_does_not_override_a_transfer() {
        let mut s = cluster();
        assert_eq!(s.apply(10, &start("t1", 1, 2, TransferKind::Replicate)).error, None);
        let reg = Command::RegisterReplica { engine: "e".into(), shard: "s".into(), node: 2 };
        assert!(s.apply(11, &reg).error.is_some());
        assert_eq!(s.replica("e", "s", 2), Some(ReplicaState::PartialSnapshot));
        let remove = Command::RemoveMember { id: 2 };
        assert!(s.apply(12, &remove).error.unwrap().contains("live transfer"));
    }

    #[test]
    fn state_roundtrips_through_json() {
        let mut s = cluster();
        s.apply(10, &start("t1", 1, 2, TransferKind::Move));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ClusterState>(&json).unwrap(), s);
    }
}
