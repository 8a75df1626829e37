//! Checks a Raft RPC between the HTTP body and openraft.
//!
//! openraft trusts its peers: a vote at term `u64::MAX` made the next
//! election's `term + 1` overflow (a panic, persisted with the vote, so every
//! restart panicked again), and log ids, entry runs and snapshot sizes are
//! taken as sent. Before a message reaches openraft it must:
//!
//! - come from a node in this node's membership (voters and learners), once
//!   this node has one: a node that wiped its storage to join does not know
//!   the leader that sends it its first append yet, and accepts anyone;
//! - carry terms and log indexes at most [`MAX_TERM`] / [`MAX_INDEX`] (2^48:
//!   a term per millisecond would take 8,900 years to reach it), and a term at
//!   most [`MAX_TERM_LEAP`] above this node's own, so that no single message
//!   can move a cluster's term anywhere near a bound;
//! - be shaped as a real peer's would be: a vote request's vote is not
//!   committed, log ids are not from a later term than the sender's vote,
//!   appended entries are consecutive after `prev_log_id` with non-decreasing
//!   terms, at most [`MAX_APPEND_ENTRIES`] of them, and a snapshot is at most
//!   [`MAX_SNAPSHOT_BYTES`].
//!
//! Refusing a message is the same as losing it, which Raft tolerates: safety
//! never depends on these checks letting a message through.

use std::collections::BTreeSet;

use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use openraft::{BasicNode, LogId, SnapshotMeta, Vote};

use super::TypeConfig;
use super::state::NodeId;

/// Highest term and log index accepted from a peer.
pub const MAX_TERM: u64 = 1 << 48;
/// Highest log index accepted from a peer.
pub const MAX_INDEX: u64 = 1 << 48;
/// How far above this node's own term a peer's term may be: a node cut off
/// for weeks, campaigning every second or two, stays well within it.
pub const MAX_TERM_LEAP: u64 = 1 << 20;
/// Most entries in one append (openraft sends `max_payload_entries`, 300).
pub const MAX_APPEND_ENTRIES: usize = 4096;
/// Largest state-machine snapshot accepted, in bytes (it travels as JSON in a
/// request body of at most 64 MiB).
pub const MAX_SNAPSHOT_BYTES: u64 = 48 << 20;
/// Longest snapshot id accepted, in bytes.
pub const MAX_SNAPSHOT_ID: usize = 256;

/// Why a Raft RPC was refused before it reached openraft.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("raft message refused: {0}")]
pub struct Refused(pub String);

fn refuse<T>(why: String) -> Result<T, Refused> {
    Err(Refused(why))
}

/// What this node knows when it judges a message: its membership and term.
#[derive(Clone, Debug)]
pub struct Guard {
    /// Voters and learners; empty while this node has no cluster (joining).
    members: BTreeSet<NodeId>,
    term: u64,
}

impl Guard {
    pub fn new(members: BTreeSet<NodeId>, term: u64) -> Guard {
        Guard { members, term }
    }

    /// An `AppendEntries` from the leader.
    pub fn append(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> Result<(), Refused> {
        self.sender(&rpc.vote, "append")?;
        if rpc.entries.len() > MAX_APPEND_ENTRIES {
            return refuse(format!("{} entries in one append, at most {MAX_APPEND_ENTRIES}", rpc.entries.len()));
        }
        let term = rpc.vote.leader_id.term;
        log_id(rpc.prev_log_id.as_ref(), term, "prev_log_id")?;
        log_id(rpc.leader_commit.as_ref(), term, "leader_commit")?;
        let mut previous = rpc.prev_log_id;
        for entry in &rpc.entries {
            log_id(Some(&entry.log_id), term, "an entry's log id")?;
            let want = previous.map_or(0, |p| p.index + 1);
            if entry.log_id.index != want {
                return refuse(format!("entry at index {} where {want} comes next", entry.log_id.index));
            }
            if let Some(p) = previous
                && entry.log_id.leader_id.term < p.leader_id.term
            {
                return refuse(format!(
                    "entry {} of term {} follows one of term {}",
                    entry.log_id.index, entry.log_id.leader_id.term, p.leader_id.term
                ));
            }
            previous = Some(entry.log_id);
        }
        Ok(())
    }

    /// A `RequestVote` from a candidate.
    pub fn vote(&self, rpc: &VoteRequest<NodeId>) -> Result<(), Refused> {
        self.sender(&rpc.vote, "vote request")?;
        if rpc.vote.committed {
            return refuse("a vote request carries a committed vote; candidates never send one".into());
        }
        log_id(rpc.last_log_id.as_ref(), rpc.vote.leader_id.term, "last_log_id")
    }

    /// A chunk of a snapshot (`install-snapshot`).
    pub fn install_snapshot(&self, rpc: &InstallSnapshotRequest<TypeConfig>) -> Result<(), Refused> {
        self.sender(&rpc.vote, "snapshot")?;
        let end = rpc.offset.checked_add(rpc.data.len() as u64);
        if end.is_none_or(|end| end > MAX_SNAPSHOT_BYTES) {
            return refuse(format!(
                "snapshot chunk at {} of {} bytes ends past {MAX_SNAPSHOT_BYTES} bytes",
                rpc.offset,
                rpc.data.len()
            ));
        }
        snapshot_meta(&rpc.meta, rpc.vote.leader_id.term)
    }

    /// A whole snapshot (`snapshot`) of `len` bytes.
    pub fn full_snapshot(
        &self,
        vote: &Vote<NodeId>,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        len: usize,
    ) -> Result<(), Refused> {
        self.sender(vote, "snapshot")?;
        if len as u64 > MAX_SNAPSHOT_BYTES {
            return refuse(format!("a snapshot of {len} bytes, at most {MAX_SNAPSHOT_BYTES}"));
        }
        snapshot_meta(meta, vote.leader_id.term)
    }

    /// The sender's vote: its term in bounds, the sender a member.
    fn sender(&self, vote: &Vote<NodeId>, what: &str) -> Result<(), Refused> {
        let (term, from) = (vote.leader_id.term, vote.leader_id.node_id);
        if term > MAX_TERM {
            return refuse(format!("{what} at term {term}, beyond {MAX_TERM}"));
        }
        if self.members.is_empty() {
            return Ok(()); // joining: the first leader is not known yet
        }
        if !self.members.contains(&from) {
            return refuse(format!("{what} from node {from}, which is not a member here"));
        }
        if term > self.term.saturating_add(MAX_TERM_LEAP) {
            return refuse(format!("{what} at term {term}, more than {MAX_TERM_LEAP} above this node's {}", self.term));
        }
        Ok(())
    }
}

/// A log id a peer sent, in a message whose vote is at `term`.
fn log_id(id: Option<&LogId<NodeId>>, term: u64, what: &str) -> Result<(), Refused> {
    let Some(id) = id else { return Ok(()) };
    if id.index > MAX_INDEX {
        return refuse(format!("{what} has index {}, beyond {MAX_INDEX}", id.index));
    }
    if id.leader_id.term > term {
        return refuse(format!("{what} has term {}, later than the sender's term {term}", id.leader_id.term));
    }
    Ok(())
}

fn snapshot_meta(meta: &SnapshotMeta<NodeId, BasicNode>, term: u64) -> Result<(), Refused> {
    if meta.snapshot_id.len() > MAX_SNAPSHOT_ID {
        return refuse(format!("snapshot id of {} bytes, at most {MAX_SNAPSHOT_ID}", meta.snapshot_id.len()));
    }
    log_id(meta.last_log_id.as_ref(), term, "the snapshot's last log id")?;
    let membership = meta.last_membership.log_id().as_ref();
    log_id(membership, term, "the snapshot's membership log id")?;
    if membership.map(|m| m.index) > meta.last_log_id.map(|l| l.index) {
        return refuse("the snapshot's membership is newer than its last log id".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload, StoredMembership};

    use super::*;
    use crate::consensus::state::Command;

    const LEADER: NodeId = 11;
    const OTHER: NodeId = 13;

    fn guard() -> Guard {
        Guard::new(BTreeSet::from([LEADER, OTHER]), 5)
    }

    fn id(term: u64, index: u64) -> LogId<NodeId> {
        LogId::new(CommittedLeaderId::new(term, LEADER), index)
    }

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry { log_id: id(term, index), payload: EntryPayload::Blank }
    }

    fn append(
        vote: Vote<NodeId>,
        prev: Option<LogId<NodeId>>,
        entries: Vec<Entry<TypeConfig>>,
    ) -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest { vote, prev_log_id: prev, entries, leader_commit: prev }
    }

    fn refused(result: Result<(), Refused>, why: &str) {
        let Err(Refused(message)) = result else { panic!("accepted, expected a refusal about {why:?}") };
        assert!(message.contains(why), "{message}");
    }

    #[test]
    fn real_messages_pass() {
        let g = guard();
        let vote = Vote::new_committed(6, LEADER);
        let entries = vec![entry(5, 8), entry(6, 9), entry(6, 10)];
        g.append(&append(vote, Some(id(5, 7)), entries)).unwrap();
        g.append(&append(vote, None, vec![entry(1, 0)])).unwrap();
        g.append(&append(vote, Some(id(6, 10)), vec![])).unwrap();
        g.vote(&VoteRequest::new(Vote::new(7, OTHER), Some(id(6, 10)))).unwrap();
        let meta = SnapshotMeta {
            last_log_id: Some(id(6, 10)),
            last_membership: StoredMembership::new(Some(id(1, 0)), Default::default()),
            snapshot_id: "6-11-10".into(),
        };
        g.full_snapshot(&vote, &meta, 1 << 20).unwrap();
        let chunk = InstallSnapshotRequest { vote, meta, offset: 0, data: vec![0; 100], done: true };
        g.install_snapshot(&chunk).unwrap();
    }

    #[test]
    fn terms_and_indexes_near_overflow_are_refused() {
        // Even while joining, when the sender cannot be checked.
        for g in [guard(), Guard::new(BTreeSet::new(), 0)] {
            refused(g.append(&append(Vote::new_committed(u64::MAX, LEADER), None, vec![])), "beyond");
            refused(g.vote(&VoteRequest::new(Vote::new(u64::MAX, OTHER), None)), "beyond");
            refused(g.vote(&VoteRequest::new(Vote::new(MAX_TERM + 1, OTHER), None)), "beyond");
            let vote = Vote::new_committed(6, LEADER);
            refused(g.append(&append(vote, Some(id(6, u64::MAX)), vec![])), "index");
            refused(g.append(&append(vote, Some(id(6, MAX_INDEX + 1)), vec![])), "index");
            refused(g.append(&append(vote, Some(id(6, 1)), vec![entry(6, 2), entry(6, MAX_INDEX + 1)])), "index");
        }
        // No single message moves a member's term far.
        refused(guard().vote(&VoteRequest::new(Vote::new(5 + MAX_TERM_LEAP + 1, OTHER), None)), "above");
        guard().vote(&VoteRequest::new(Vote::new(5 + MAX_TERM_LEAP, OTHER), None)).unwrap();
    }

    #[test]
    fn senders_must_be_members_once_there_is_a_membership() {
        let stranger = Vote::new_committed(6, 99);
        refused(guard().append(&append(stranger, None, vec![])), "not a member");
        refused(guard().vote(&VoteRequest::new(Vote::new(6, 99), None)), "not a member");
        // A node that wiped its storage to join knows nobody yet.
        Guard::new(BTreeSet::new(), 0).append(&append(Vote::new_committed(40, 99), None, vec![entry(1, 0)])).unwrap();
    }

    #[test]
    fn shapes_no_peer_sends_are_refused() {
        let g = guard();
        let vote = Vote::new_committed(6, LEADER);
        refused(g.vote(&VoteRequest::new(Vote::new_committed(7, OTHER), None)), "committed");
        refused(g.vote(&VoteRequest::new(Vote::new(7, OTHER), Some(id(8, 3)))), "later than");
        refused(g.append(&append(vote, Some(id(7, 3)), vec![])), "later than");
        refused(g.append(&append(vote, Some(id(5, 3)), vec![entry(5, 5)])), "comes next");
        refused(g.append(&append(vote, None, vec![entry(5, 1)])), "comes next");
        refused(g.append(&append(vote, Some(id(5, 3)), vec![entry(5, 4), entry(5, 4)])), "comes next");
        refused(g.append(&append(vote, Some(id(5, 3)), vec![entry(4, 4)])), "follows");
        let many: Vec<_> = (1..=MAX_APPEND_ENTRIES as u64 + 1).map(|i| entry(6, i)).collect();
        refused(g.append(&append(vote, Some(id(6, 0)), many)), "entries in one append");
        let command = Command::RemoveMember { id: 1 };
        let normal = Entry { log_id: id(6, 1), payload: EntryPayload::Normal(command) };
        g.append(&append(vote, Some(id(6, 0)), vec![normal])).unwrap();
    }

    #[test]
    fn snapshots_are_bounded() {
        let g = guard();
        let vote = Vote::new_committed(6, LEADER);
        let meta = SnapshotMeta {
            last_log_id: Some(id(6, 10)),
            last_membership: StoredMembership::new(Some(id(1, 0)), Default::default()),
            snapshot_id: "s".into(),
        };
        refused(g.full_snapshot(&vote, &meta, MAX_SNAPSHOT_BYTES as usize + 1), "at most");
        let chunk = |offset: u64, len: usize| InstallSnapshotRequest {
            vote,
            meta: meta.clone(),
            offset,
            data: vec![0; len],
            done: false,
        };
        refused(g.install_snapshot(&chunk(MAX_SNAPSHOT_BYTES, 1)), "ends past");
        refused(g.install_snapshot(&chunk(u64::MAX, 1)), "ends past");
        let mut long_id = meta.clone();
        long_id.snapshot_id = "x".repeat(MAX_SNAPSHOT_ID + 1);
        refused(g.full_snapshot(&vote, &long_id, 10), "snapshot id");
        let mut future = meta.clone();
        future.last_membership = StoredMembership::new(Some(id(6, 11)), Default::default());
        refused(g.full_snapshot(&vote, &future, 10), "newer");
        let mut huge = meta;
        huge.last_log_id = Some(id(6, u64::MAX));
        refused(g.full_snapshot(&vote, &huge, 10), "index");
    }

    #[test]
    fn openraft_sends_fewer_entries_than_the_bound() {
        assert!(super::super::raft_config().max_payload_entries as usize <= MAX_APPEND_ENTRIES);
    }
}
