//! Consensus: Ferry nodes form an openraft cluster that replicates the
//! cluster state ([`state`]): members, the replica table and transfers.
//!
//! - A node that starts with empty Raft storage initializes a one-member
//!   cluster of itself: `ferry serve` alone needs no configuration.
//! - `join` makes a node leave its own one-member cluster (its Raft storage is
//!   wiped; its shards are registered again afterwards) and become a voter of
//!   another; `leave` does the reverse.
//! - Writes go to the leader: any node forwards a proposal to the leader it
//!   knows, retrying through elections.
//! - Raft RPCs from the HTTP API pass [`guard`] before openraft sees them;
//!   proposals are checked ([`Command::check`]) before they reach the log.

pub mod guard;
pub mod network;
pub mod state;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;
use std::sync::{Arc, RwLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use self::network::Network;
use self::state::{Applied, ClusterState, Command, Member, NodeId};
use self::store::{Db, LogStore, StateMachine};
use crate::http::{self, Client};

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
        Responder = openraft::impls::OneshotResponder<TypeConfig>,
);

pub type Raft = openraft::Raft<TypeConfig>;

/// How long a proposal keeps retrying through elections and forwarding.
const PROPOSE_PATIENCE: Duration = Duration::from_secs(30);
/// How long a joining node waits to be replicated to once the leader took it in.
const JOIN_PATIENCE: Duration = Duration::from_secs(20);
/// Largest answer another node's API may give a forwarded request.
const MAX_FORWARD_ANSWER: usize = 16 << 20;

/// How long [`Consensus::ended_at_a_peer`] waits for each peer.
const PEER_OUTCOME_WAIT: Duration = Duration::from_secs(3);

/// The answer to a membership challenge: a keyed hash of the challenger's
/// nonce (32 bytes, hex) with a key derived from the node credential. A node
/// that joins asks for it before it wipes its own Raft storage: a "cluster"
/// that does not hold our node credential cannot answer.
pub fn membership_proof(token: &str, nonce_hex: &str) -> Result<String, String> {
    let nonce = blake3::Hash::from_hex(nonce_hex).map_err(|_| "the nonce must be 64 hex digits".to_owned())?;
    let key = blake3::derive_key("ferry 2026 cluster membership proof v1", token.as_bytes());
    Ok(blake3::keyed_hash(&key, nonce.as_bytes()).to_hex().to_string())
}

/// How long a node may know no leader (or, leading, have no quorum confirm
/// it) before its health says so: several elections' worth.
pub const LEADERLESS_BOUND: Duration = Duration::from_secs(10);

/// How often the leader watch looks, and how long a leader's quorum check
/// may take.
const LEADER_WATCH_PERIOD: Duration = Duration::from_millis(500);
const QUORUM_CHECK: Duration = Duration::from_secs(2);

/// How long a follower asks the leader whether an index exists.
const LEADER_QUERY: Duration = Duration::from_secs(2);

/// The Raft id of a node: derived from its name, so it is stable across
/// restarts and address changes.
pub fn raft_id(name: &str) -> NodeId {
    let hash = blake3::hash(name.as_bytes());
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().unwrap()) | 1
}

#[derive(Debug, thiserror::Error)]
pub enum ConsensusError {
    #[error("no leader reachable: {0}")]
    NoLeader(String),
    #[error("{0}")]
    Refused(String),
    #[error("raft: {0}")]
    Raft(String),
    #[error("storage: {0}")]
    Storage(String),
}

/// A member as `ferry cluster status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    pub id: NodeId,
    pub name: String,
    pub addr: String,
    pub voter: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node: String,
    pub id: NodeId,
    pub state: String,
    pub leader: Option<MemberStatus>,
    pub term: u64,
    pub last_applied: u64,
    pub last_log_index: u64,
    pub members: Vec<MemberStatus>,
    /// Size of this node's stored state-machine snapshot, in bytes.
    #[serde(default)]
    pub snapshot_bytes: u64,
}

/// A node's request to join, sent to any member.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub id: NodeId,
    pub name: String,
    pub addr: String,
}

/// A node's consensus health, as `GET /v1/health` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub state: String,
    /// The leader's name, if one is known.
    pub leader: Option<String>,
    pub term: u64,
    pub last_applied: u64,
    /// Why this node cannot serve writes now, if it cannot.
    pub problem: Option<String>,
}

pub struct Consensus {
    pub id: NodeId,
    pub name: String,
    pub addr: String,
    /// Shared with the leader watch, which ends when this is dropped.
    raft: Arc<RwLock<Raft>>,
    /// When this node last knew a leader (leading: had a quorum confirm it).
    leader_seen: Arc<std::sync::Mutex<Instant>>,
    db: Db,
    sm: StateMachine,
    network: Network,
    config: Arc<openraft::Config>,
    /// Serializes join, leave and reset.
    membership_lock: Mutex<()>,
}

/// The Raft timing and snapshot policy every node runs with (the
/// deterministic simulation starts from it too).
pub fn raft_config() -> Arc<openraft::Config> {
    let config = openraft::Config {
        cluster_name: "ferry".into(),
        heartbeat_interval: 200,
        election_timeout_min: 1000,
        election_timeout_max: 2000,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(1000),
        max_in_snapshot_log_to_keep: 100,
        ..Default::default()
    };
    Arc::new(config.validate().expect("valid raft config"))
}

/// Starts Raft on `db` (the log store and the state machine it holds) with
/// any transport: the node's HTTP [`Network`], or the deterministic
/// simulation's in-memory router. The seam between the consensus logic and
/// the sockets and threads it normally runs on.
pub async fn start_raft<N: openraft::RaftNetworkFactory<TypeConfig>>(
    id: NodeId,
    config: Arc<openraft::Config>,
    network: N,
    db: Db,
) -> Result<(Raft, StateMachine), ConsensusError> {
    let sm = StateMachine::load(db.clone()).await.map_err(|e| ConsensusError::Storage(e.to_string()))?;
    let raft = Raft::new(id, config, network, LogStore::new(db), sm.clone())
        .await
        .map_err(|e| ConsensusError::Raft(e.to_string()))?;
    Ok((raft, sm))
}

impl Consensus {
    /// Opens the Raft storage in `state_dir` and starts Raft; initializes a
    /// one-member cluster if the storage is empty.
    pub async fn open(
        state_dir: &Path,
        name: &str,
        addr: &str,
        client: Client,
        token: Arc<str>,
    ) -> Result<Consensus, ConsensusError> {
        let db = Db::open(&state_dir.join("raft.redb")).map_err(|e| ConsensusError::Storage(e.to_string()))?;
        let network = Network { client, token };
        let config = raft_config();
        let id = raft_id(name);
        let (raft, sm) = start_raft(id, config.clone(), network.clone(), db.clone()).await?;
        let raft = Arc::new(RwLock::new(raft));
        let leader_seen = Arc::new(std::sync::Mutex::new(Instant::now()));
        tokio::spawn(watch_leader(Arc::downgrade(&raft), leader_seen.clone()));
        let consensus = Consensus {
            id,
            name: name.to_owned(),
            addr: addr.to_owned(),
            raft,
            leader_seen,
            db,
            sm,
            network,
            config,
            membership_lock: Mutex::new(()),
        };
        consensus.initialize_if_new().await?;
        Ok(consensus)
    }

    async fn initialize_if_new(&self) -> Result<(), ConsensusError> {
        let raft = self.raft();
        if !raft.is_initialized().await.map_err(|e| ConsensusError::Raft(e.to_string()))? {
            let members = BTreeMap::from([(self.id, BasicNode::new(&self.addr))]);
            raft.initialize(members).await.map_err(|e| ConsensusError::Raft(e.to_string()))?;
        }
        Ok(())
    }

    pub fn raft(&self) -> Raft {
        self.raft.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A copy of the replicated state as this node has applied it.
    pub fn state(&self) -> ClusterState {
        self.sm.data.read().unwrap_or_else(|e| e.into_inner()).state.clone()
    }

    /// Changes whenever this node applies log entries.
    pub fn applied_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.sm.applied.subscribe()
    }

    pub fn applied_index(&self) -> u64 {
        *self.sm.applied.borrow()
    }

    /// Waits until this node has applied `index`.
    pub async fn wait_applied(&self, index: u64, within: Duration) -> Result<(), ConsensusError> {
        let mut rx = self.sm.applied.subscribe();
        tokio::time::timeout(within, rx.wait_for(|applied| *applied >= index))
            .await
            .map_err(|_| ConsensusError::Raft(format!("index {index} not applied here within {within:?}")))?
            .map(|_| ())
            .map_err(|e| ConsensusError::Raft(e.to_string()))
    }

    /// Waits until this node has applied `index`, a log index someone says
    /// exists (a transfer's epoch). An index no leader's log holds is refused
    /// at once, not waited for: a leader holds every committed entry in its
    /// stored log, a follower asks its leader, and one that knows no leader
    /// cannot learn of new entries anyway.
    pub async fn wait_logged(&self, index: u64, within: Duration) -> Result<(), ConsensusError> {
        if self.applied_index() >= index {
            return Ok(());
        }
        let last = self.db.logged_index();
        if index > last {
            let refuse = |why: String| Err(ConsensusError::Refused(format!("index {index} is beyond {why}")));
            let raft = self.raft();
            let (state, vote) = raft
                .with_raft_state(|st| (st.server_state, *st.vote_ref()))
                .await
                .map_err(|e| ConsensusError::Raft(e.to_string()))?;
            if state == ServerState::Leader {
                return refuse(format!("the leader's log (last index {last})"));
            }
            let leader = vote.committed.then_some(vote.leader_id.node_id);
            let leader = leader.and_then(|l| self.state().members.get(&l).map(|m| m.addr.clone()));
            let Some(leader) = leader else {
                return refuse(format!("this node's log (last index {last}) and no leader is known"));
            };
            let asked = self.forward::<(), ClusterStatus>(&leader, "/v1/cluster", hyper::Method::GET, None);
            match tokio::time::timeout(LEADER_QUERY, asked).await {
                Ok(Ok(status)) if index > status.last_log_index => {
                    return refuse(format!("the leader's log (last index {})", status.last_log_index));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return refuse(format!("this node's log (last index {last}): {}", e.describe(&leader))),
                Err(_) => return refuse(format!("this node's log (last index {last}); the leader did not answer")),
            }
        }
        self.wait_applied(index, within).await
    }

    /// The checks a Raft RPC passes before openraft sees it, with this node's
    /// membership and term as its Raft core has them now (its metrics lag,
    /// and read empty for a moment after a start).
    pub async fn guard(&self) -> Result<guard::Guard, ConsensusError> {
        let raft = self.raft();
        let view = raft.with_raft_state(|st| {
            let members = st.membership_state.effective().nodes().map(|(id, _)| *id).collect();
            (members, st.vote_ref().leader_id.term)
        });
        let (members, term) = view.await.map_err(|e| ConsensusError::Raft(e.to_string()))?;
        Ok(guard::Guard::new(members, term))
    }

    /// Commits `command` through the leader, wherever it is. Returns where it
    /// was applied; a refused command is an error with the reason.
    pub async fn propose(&self, command: Command) -> Result<Applied, ConsensusError> {
        let command = command.bounded();
        command.check().map_err(ConsensusError::Refused)?;
        let command = &command;
        let applied = self
            .leader_call(|leader| async move {
                match leader {
                    None => {
                        let response = self.raft().client_write(command.clone()).await;
                        response.map(|r| r.data).map_err(|e| self.classify(e))
                    }
                    Some(addr) => self.forward(&addr, "/v1/raft/propose", hyper::Method::POST, Some(command)).await,
                }
            })
            .await?;
        match applied.error {
            Some(reason) => Err(ConsensusError::Refused(reason)),
            None => Ok(applied),
        }
    }

    /// Runs `op` on the leader: `None` means "this node, try locally",
    /// `Some(addr)` means "forward to that leader". Retries through elections.
    async fn leader_call<T, F, Fut>(&self, op: F) -> Result<T, ConsensusError>
    where
        F: Fn(Option<String>) -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        let deadline = tokio::time::Instant::now() + PROPOSE_PATIENCE;
        let mut target: Option<String> = None;
        let mut last = String::from("no attempt");
        loop {
            match op(target.clone()).await {
                Ok(value) => return Ok(value),
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Forward(addr)) if addr != self.addr => target = Some(addr),
                Err(Attempt::Forward(_)) => target = None,
                Err(Attempt::Retry(why)) => {
                    last = why;
                    target = None;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ConsensusError::NoLeader(last));
            }
            if target.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    fn classify(&self, e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Attempt {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => match f.leader_node {
                Some(node) => Attempt::Forward(node.addr),
                None => Attempt::Retry("no leader known yet".into()),
            },
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                Attempt::Fatal(ConsensusError::Refused(e.to_string()))
            }
            RaftError::Fatal(e) => Attempt::Fatal(ConsensusError::Raft(e.to_string())),
        }
    }

    /// Asks every other member for transfer `id` at `epoch` as it has
    /// applied it, and returns the first record that has ended (`Finished`
    /// or `Aborted`).
    /// An applied entry is committed, so an ended record from any member is
    /// the transfer's final outcome, even when this node cannot hear the
    /// leader (a one-way cut) and its own log lags. Each peer gets
    /// [`PEER_OUTCOME_WAIT`]; all are asked at once.
    ///
    /// # Cancel safety
    /// Read-only: dropping the future drops the requests.
    pub async fn ended_at_a_peer(&self, id: &str, epoch: u64) -> Option<state::TransferRecord> {
        let path = format!("/v1/raft/transfers/{id}");
        let peers: Vec<String> =
            self.state().members.iter().filter(|(m, _)| **m != self.id).map(|(_, m)| m.addr.clone()).collect();
        let mut asks: futures_util::stream::FuturesUnordered<_> = peers
            .iter()
            .map(|addr| async {
                let ask = self.forward::<(), Option<state::TransferRecord>>(addr, &path, hyper::Method::GET, None);
                match tokio::time::timeout(PEER_OUTCOME_WAIT, ask).await {
                    Ok(Ok(Some(r))) if r.id == id && r.epoch == epoch && !r.stage.is_live() => Some(r),
                    _ => None,
                }
            })
            .collect();
        // The first ended answer, not all of them: a peer behind a cut
        // would hold the others back for its whole wait.
        while let Some(answer) = futures_util::StreamExt::next(&mut asks).await {
            if answer.is_some() {
                return answer;
            }
        }
        None
    }

    /// Sends a request to another node's API (one hop: the receiver runs it
    /// locally or answers where the leader is).
    async fn forward<B: Serialize, T: serde::de::DeserializeOwned>(
        &self,
        addr: &str,
        path: &str,
        method: hyper::Method,
        body: Option<&B>,
    ) -> Result<T, Attempt> {
        let url = format!("{}{path}", addr.trim_end_matches('/'));
        let body = body.map(|b| Bytes::from(serde_json::to_vec(b).expect("serializes")));
        let request = http::request(method, &url, &self.network.token, body).map_err(Attempt::Retry)?;
        let response = tokio::time::timeout(Duration::from_secs(60), self.network.client.request(request))
            .await
            .map_err(|_| Attempt::Retry(format!("{url}: timed out")))?
            .map_err(|e| Attempt::Retry(format!("{url}: {}", http::error_chain(&e))))?;
        let status = response.status();
        let bytes = http::read_bounded(response.into_body(), MAX_FORWARD_ANSWER, Duration::from_secs(60))
            .await
            .map_err(|e| Attempt::Retry(format!("{url}: {e}")))?;
        if status == hyper::StatusCode::MISDIRECTED_REQUEST {
            // Not the leader (any more): it says who is, or that it does not know.
            return match serde_json::from_slice::<NotLeader>(&bytes) {
                Ok(NotLeader { leader: Some(addr) }) => Err(Attempt::Forward(addr)),
                _ => Err(Attempt::Retry(format!("{url}: not the leader"))),
            };
        }
        if status.is_server_error() {
            return Err(Attempt::Retry(format!("{url}: {status}: {}", http::ApiError::message_of(&bytes))));
        }
        if !status.is_success() {
            return Err(Attempt::Fatal(ConsensusError::Refused(http::ApiError::message_of(&bytes))));
        }
        serde_json::from_slice(&bytes).map_err(|e| Attempt::Retry(format!("{url}: {e}")))
    }

    /// Commits `command` if this node is the leader; else says who is. A
    /// command that breaks a name or size rule is refused before the log.
    pub async fn propose_here(&self, command: Command) -> Result<Applied, NotLeaderOr> {
        if let Err(why) = command.check() {
            return Err(NotLeaderOr::Error(ConsensusError::Refused(why)));
        }
        match self.raft().client_write(command).await {
            Ok(response) => Ok(response.data),
            Err(e) => Err(self.not_leader_or(e)),
        }
    }

    fn not_leader_or(&self, e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> NotLeaderOr {
        match self.classify(e) {
            Attempt::Forward(addr) => NotLeaderOr::NotLeader(NotLeader { leader: Some(addr) }),
            Attempt::Retry(_) => NotLeaderOr::NotLeader(NotLeader { leader: None }),
            Attempt::Fatal(e) => NotLeaderOr::Error(e),
        }
    }

    /// Leader side of a join: learner first (it catches up), then voter, then
    /// its name and address in the state.
    pub async fn add_member(&self, join: &JoinRequest) -> Result<Applied, NotLeaderOr> {
        // Checked before the membership changes, not only when applied.
        let member = Member { name: join.name.clone(), addr: join.addr.clone() };
        if let Err(why) = (Command::SetMember { id: join.id, member }).check() {
            return Err(NotLeaderOr::Error(ConsensusError::Refused(why)));
        }
        let raft = self.raft();
        let node = BasicNode::new(&join.addr);
        raft.add_learner(join.id, node, true).await.map_err(|e| self.not_leader_or(e))?;
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([join.id])), false)
            .await
            .map_err(|e| self.not_leader_or(e))?;
        let member = Member { name: join.name.clone(), addr: join.addr.clone() };
        self.propose_here(Command::SetMember { id: join.id, member }).await
    }

    /// Leader side of a leave.
    pub async fn remove_member(&self, id: NodeId) -> Result<Applied, NotLeaderOr> {
        let applied = self.propose_here(Command::RemoveMember { id }).await?;
        if let Some(reason) = &applied.error {
            return Err(NotLeaderOr::Error(ConsensusError::Refused(reason.clone())));
        }
        let raft = self.raft();
        let voters = self.voters();
        if voters.contains(&id) {
            raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(|e| self.not_leader_or(e))?;
        }
        raft.change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
            .await
            .map_err(|e| self.not_leader_or(e))?;
        Ok(applied)
    }

    fn voters(&self) -> BTreeSet<NodeId> {
        let metrics = self.raft().metrics().borrow().clone();
        metrics.membership_config.voter_ids().collect()
    }

    /// Makes this node a member of the cluster that `to` belongs to.
    pub async fn join(&self, to: &str) -> Result<(), ConsensusError> {
        let _guard = self.membership_lock.lock().await;
        let others: Vec<NodeId> = self.voters().into_iter().filter(|v| *v != self.id).collect();
        if !others.is_empty() {
            return Err(ConsensusError::Refused(format!(
                "node {} is already in a cluster of {} members; leave it first",
                self.name,
                others.len() + 1
            )));
        }
        // Check the other side is a member of a cluster that holds our node
        // credential before giving up our own cluster.
        let status: ClusterStatus = self
            .forward::<(), _>(to, "/v1/cluster", hyper::Method::GET, None)
            .await
            .map_err(|e| ConsensusError::NoLeader(e.describe(to)))?;
        if status.members.iter().any(|m| m.id == self.id) {
            return Err(ConsensusError::Refused(format!("node {} is already a member of that cluster", self.name)));
        }
        self.verify_peer(to).await?;
        self.reset(false).await?;
        let join = JoinRequest { id: self.id, name: self.name.clone(), addr: self.addr.clone() };
        let result = self
            .leader_call(|leader| {
                let join = join.clone();
                let addr = leader.unwrap_or_else(|| to.to_owned());
                async move {
                    self.forward::<_, Applied>(&addr, "/v1/cluster/members", hyper::Method::POST, Some(&join)).await
                }
            })
            .await;
        let result = match result {
            Ok(_) => self.wait_joined().await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            // Do not stay without a cluster: back to a one-member cluster.
            tracing::warn!("join failed ({e}); re-initializing a one-member cluster");
            self.reset(true).await?;
            return Err(e);
        }
        Ok(())
    }

    /// Asks `to` to prove it holds our node credential.
    async fn verify_peer(&self, to: &str) -> Result<(), ConsensusError> {
        let nonce = blake3::Hash::from_bytes(*uuid::Uuid::new_v4().as_bytes().repeat(2).first_chunk().expect("32"));
        let nonce = nonce.to_hex();
        let path = format!("/v1/cluster/proof?nonce={nonce}");
        #[derive(Deserialize)]
        struct Proof {
            proof: String,
        }
        let answer: Proof = self
            .forward::<(), _>(to, &path, hyper::Method::GET, None)
            .await
            .map_err(|e| ConsensusError::Refused(format!("{to} did not prove it is a member: {}", e.describe(to))))?;
        let expected = membership_proof(&self.network.token, &nonce).expect("our own nonce is valid");
        if !constant_time_eq::constant_time_eq(answer.proof.as_bytes(), expected.as_bytes()) {
            return Err(ConsensusError::Refused(format!(
                "{to} does not hold this node's node credential: it is not a member of a cluster this node may join"
            )));
        }
        Ok(())
    }

    /// Waits until the cluster has replicated to this node: it is a voter of
    /// a membership with a leader, and has applied that leader's entries.
    async fn wait_joined(&self) -> Result<(), ConsensusError> {
        let raft = self.raft();
        let id = self.id;
        let joined = raft
            .wait(Some(JOIN_PATIENCE))
            .metrics(
                |m| {
                    m.current_leader.is_some_and(|l| l != id)
                        && m.membership_config.voter_ids().any(|v| v == id)
                        && m.last_applied.is_some()
                },
                "a voter of the new cluster",
            )
            .await;
        joined.map(|_| ()).map_err(|e| {
            ConsensusError::NoLeader(format!("the cluster took this node in but did not replicate to it: {e}"))
        })
    }

    /// Takes this node out of its cluster; it becomes a one-member cluster.
    pub async fn leave(&self) -> Result<(), ConsensusError> {
        let _guard = self.membership_lock.lock().await;
        if self.voters().iter().all(|v| *v == self.id) {
            return Err(ConsensusError::Refused(format!("node {} is alone in its cluster", self.name)));
        }
        let id = self.id;
        self.leader_call(|leader| async move {
            match leader {
                None => self.remove_member(id).await.map_err(NotLeaderOr::into_attempt),
                Some(addr) => {
                    self.forward::<(), Applied>(
                        &addr,
                        &format!("/v1/cluster/members/{id}"),
                        hyper::Method::DELETE,
                        None,
                    )
                    .await
                }
            }
        })
        .await?;
        self.reset(true).await
    }

    /// Replaces Raft with a fresh one on wiped storage.
    async fn reset(&self, initialize: bool) -> Result<(), ConsensusError> {
        let old = self.raft();
        old.shutdown().await.map_err(|e| ConsensusError::Raft(e.to_string()))?;
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.wipe())
            .await
            .map_err(|e| ConsensusError::Storage(e.to_string()))?
            .map_err(|e| ConsensusError::Storage(e.to_string()))?;
        *self.sm.data.write().unwrap_or_else(|e| e.into_inner()) = Default::default();
        self.sm.applied.send_replace(0);
        let raft = Raft::new(
            self.id,
            self.config.clone(),
            self.network.clone(),
            LogStore::new(self.db.clone()),
            self.sm.clone(),
        )
        .await
        .map_err(|e| ConsensusError::Raft(e.to_string()))?;
        *self.raft.write().unwrap_or_else(|e| e.into_inner()) = raft;
        if initialize {
            self.initialize_if_new().await?;
            self.raft()
                .wait(Some(Duration::from_secs(10)))
                .current_leader(self.id, "leader of its own one-member cluster")
                .await
                .map_err(|e| ConsensusError::Raft(e.to_string()))?;
        }
        Ok(())
    }

    pub fn status(&self) -> ClusterStatus {
        let metrics = self.raft().metrics().borrow().clone();
        let state = self.state();
        let membership = metrics.membership_config.membership().clone();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let members: Vec<MemberStatus> = membership
            .nodes()
            .map(|(id, node)| MemberStatus {
                id: *id,
                name: state.members.get(id).map(|m| m.name.clone()).unwrap_or_default(),
                addr: node.addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        let leader = metrics.current_leader.and_then(|l| members.iter().find(|m| m.id == l).cloned());
        ClusterStatus {
            node: self.name.clone(),
            id: self.id,
            state: match metrics.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            }
            .into(),
            leader,
            term: metrics.current_term,
            last_applied: metrics.last_applied.map(|l| l.index).unwrap_or(0),
            // The stored log is ahead of the metrics for a moment.
            last_log_index: metrics.last_log_index.unwrap_or(0).max(self.db.logged_index()),
            members,
            snapshot_bytes: self.db.snapshot_bytes(),
        }
    }

    /// Time since this node last knew a leader (see [`Consensus::health`]).
    pub fn leader_seen_age(&self) -> Duration {
        self.leader_seen.lock().unwrap_or_else(|e| e.into_inner()).elapsed()
    }

    /// On the leader: the last log index each member's log matches (`None`:
    /// nothing yet); empty elsewhere.
    pub fn replication(&self) -> Vec<(NodeId, Option<u64>)> {
        let metrics = self.raft().metrics().borrow().clone();
        match metrics.replication {
            Some(members) => members.iter().map(|(id, log)| (*id, log.map(|l| l.index))).collect(),
            None => Vec::new(),
        }
    }

    /// Whether this node can serve writes: Raft runs and a leader has been
    /// known (leading: confirmed by a quorum) within [`LEADERLESS_BOUND`].
    pub fn health(&self) -> Health {
        let metrics = self.raft().metrics().borrow().clone();
        let since = self.leader_seen_age();
        let status = self.status();
        Health {
            state: status.state,
            leader: status.leader.map(|l| if l.name.is_empty() { l.id.to_string() } else { l.name }),
            term: status.term,
            last_applied: status.last_applied,
            problem: judge_health(&metrics, since).err(),
        }
    }

    pub async fn shutdown(&self) {
        let _ = self.raft().shutdown().await;
    }
}

/// The health decision: `since` is how long ago a leader was last known.
fn judge_health(metrics: &openraft::RaftMetrics<NodeId, BasicNode>, since: Duration) -> Result<(), String> {
    if let Err(fatal) = &metrics.running_state {
        return Err(format!("raft has stopped: {fatal}"));
    }
    if metrics.state == ServerState::Shutdown {
        return Err("raft has shut down".into());
    }
    if since > LEADERLESS_BOUND {
        let secs = since.as_secs();
        return Err(if metrics.state == ServerState::Leader {
            format!("this node leads term {} but no quorum has confirmed it for {secs} s", metrics.current_term)
        } else {
            format!("no leader known for {secs} s (term {}, {:?})", metrics.current_term, metrics.state)
        });
    }
    Ok(())
}

/// Records when a leader is known, while the [`Consensus`] lives: a
/// follower's view of the leader, or, for a leader with other voters, a
/// quorum confirming it (a leader cut off from its followers stays leader
/// in openraft 0.9).
async fn watch_leader(raft: Weak<RwLock<Raft>>, seen: Arc<std::sync::Mutex<Instant>>) {
    let mut tick = tokio::time::interval(LEADER_WATCH_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(lock) = raft.upgrade() else { return };
        let raft = lock.read().unwrap_or_else(|e| e.into_inner()).clone();
        drop(lock);
        let metrics = raft.metrics().borrow().clone();
        let known = match metrics.state {
            _ if metrics.running_state.is_err() => false,
            ServerState::Leader if metrics.membership_config.voter_ids().any(|v| v != metrics.id) => {
                matches!(tokio::time::timeout(QUORUM_CHECK, raft.get_read_log_id()).await, Ok(Ok(_)))
            }
            _ => metrics.current_leader.is_some(),
        };
        if known {
            *seen.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

/// One attempt of a leader-bound operation.
pub enum Attempt {
    Forward(String),
    Retry(String),
    Fatal(ConsensusError),
}

impl Attempt {
    fn describe(&self, to: &str) -> String {
        match self {
            Attempt::Forward(addr) => format!("{to} points to {addr}"),
            Attempt::Retry(why) => why.clone(),
            Attempt::Fatal(e) => e.to_string(),
        }
    }
}

/// The body of a 421 answer: this node is not the leader.
#[derive(Debug, Serialize, Deserialize)]
pub struct NotLeader {
    pub leader: Option<String>,
}

pub enum NotLeaderOr {
    NotLeader(NotLeader),
    Error(ConsensusError),
}

impl NotLeaderOr {
    fn into_attempt(self) -> Attempt {
        match self {
            NotLeaderOr::NotLeader(NotLeader { leader: Some(addr) }) => Attempt::Forward(addr),
            NotLeaderOr::NotLeader(NotLeader { leader: None }) => Attempt::Retry("no leader known yet".into()),
            NotLeaderOr::Error(e) => Attempt::Fatal(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_needs_a_running_raft_and_a_recent_leader() {
        let mut m = openraft::RaftMetrics::<NodeId, BasicNode>::new_initial(1);
        m.current_leader = Some(1);
        m.state = ServerState::Leader;
        assert_eq!(judge_health(&m, Duration::from_secs(1)), Ok(()));
        // An election in progress is not yet a problem; a long one is.
        m.state = ServerState::Candidate;
        m.current_leader = None;
        assert_eq!(judge_health(&m, LEADERLESS_BOUND / 2), Ok(()));
        let why = judge_health(&m, LEADERLESS_BOUND + Duration::from_secs(1)).unwrap_err();
        assert!(why.contains("no leader known for 11 s"), "{why}");
        // A leader no quorum confirms.
        m.state = ServerState::Leader;
        let why = judge_health(&m, LEADERLESS_BOUND * 2).unwrap_err();
        assert!(why.contains("no quorum"), "{why}");
        // Raft stopped or failed: unhealthy at once.
        m.state = ServerState::Shutdown;
        assert!(judge_health(&m, Duration::ZERO).unwrap_err().contains("shut down"));
        m.running_state = Err(openraft::error::Fatal::Panicked);
        assert!(judge_health(&m, Duration::ZERO).unwrap_err().contains("panicked"));
    }

    async fn open_alone(dir: &Path) -> Consensus {
        let client = crate::http::client();
        // Whatever the previous instance's tasks still hold of the database
        // is released a moment after its shutdown.
        for _ in 0..100 {
            match Consensus::open(dir, "solo", "http://127.0.0.1:1", client.clone(), "t".into()).await {
                Ok(consensus) => return consensus,
                Err(ConsensusError::Storage(e)) if e.contains("lock") || e.contains("already open") => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("open: {e}"),
            }
        }
        panic!("the database stayed locked");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_whose_vote_was_poisoned_starts_and_writes() {
        let dir = tempfile::tempdir().unwrap();
        let member = |addr: &str| Command::SetMember {
            id: raft_id("solo"),
            member: Member { name: "solo".into(), addr: addr.into() },
        };
        let consensus = open_alone(dir.path()).await;
        consensus.propose(member("http://127.0.0.1:1")).await.unwrap();
        consensus.shutdown().await;
        let db = consensus.db.clone();
        drop(consensus);
        // What a forged append at term u64::MAX used to leave behind.
        db.put_meta_for_test("vote", &openraft::Vote::new_committed(u64::MAX, 77)).await;
        drop(db);

        let consensus = open_alone(dir.path()).await;
        let applied = consensus.propose(member("http://127.0.0.1:2")).await.unwrap();
        assert!(applied.index > 0);
        assert_eq!(consensus.state().members[&raft_id("solo")].addr, "http://127.0.0.1:2");
        assert!(consensus.status().term <= guard::MAX_TERM);
        consensus.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn proposals_that_break_a_rule_never_reach_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let consensus = open_alone(dir.path()).await;
        // At once after a start (metrics still read empty), a stranger's
        // Raft message is refused.
        let stranger = openraft::raft::VoteRequest::new(openraft::Vote::new(1, 12345), None);
        let refused = consensus.guard().await.unwrap().vote(&stranger).unwrap_err();
        assert!(refused.to_string().contains("not a member"), "{refused}");
        consensus
            .propose(Command::SetMember {
                id: raft_id("solo"),
                member: Member { name: "solo".into(), addr: "http://127.0.0.1:1".into() },
            })
            .await
            .unwrap();
        let before = consensus.status().last_log_index;
        let bad =
            Command::RegisterReplica { engine: "/some/absolute/dir".into(), shard: "s".into(), node: consensus.id };
        let Err(NotLeaderOr::Error(ConsensusError::Refused(why))) = consensus.propose_here(bad.clone()).await else {
            panic!("accepted");
        };
        assert!(why.contains("engine name"), "{why}");
        assert!(matches!(consensus.propose(bad).await, Err(ConsensusError::Refused(_))));
        assert_eq!(consensus.status().last_log_index, before);
        // Fencing: an index beyond the leader's log is refused without waiting.
        let error = consensus.wait_logged(before + 1000, Duration::from_secs(600)).await.unwrap_err();
        assert!(error.to_string().contains("beyond the leader's log"), "{error}");
        consensus.wait_logged(before, Duration::from_secs(5)).await.unwrap();
        consensus.shutdown().await;
    }

    #[test]
    fn raft_ids_are_stable_and_nonzero() {
        assert_eq!(raft_id("node-1"), raft_id("node-1"));
        assert_ne!(raft_id("node-1"), raft_id("node-2"));
        assert_ne!(raft_id(""), 0);
    }
}
