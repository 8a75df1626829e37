//! Watching a cluster while faults run, and judging what was seen.
//!
//! An [`Observer`] polls every member's `GET /v1/cluster`, `GET /v1/shards`
//! and `GET /v1/transfers` over the test's own link (never cut by a
//! nemesis) and keeps every answer with the time it came. [`History::check`]
//! then asserts the invariants that must hold at every observed moment;
//! [`settle`] waits for the healed cluster to agree and end its transfers.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry::consensus::ClusterStatus;
use ferry::http::ApiClient;
use ferry::transfer::TransferStatus;
use hyper::Method;
use serde::Deserialize;

use crate::node::TestCluster;

/// A row of `GET /v1/shards`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Row {
    pub engine: String,
    pub shard: String,
    pub replicas: BTreeMap<String, String>,
}

/// One member's answers at one moment.
#[derive(Clone, Debug)]
pub struct Observation {
    pub at: Duration,
    pub node: String,
    pub cluster: ClusterStatus,
    pub shards: Vec<Row>,
    pub transfers: Vec<TransferStatus>,
}

/// A move the checker holds the cluster to: `engine/shard` from `from` to `to`.
#[derive(Clone, Debug)]
pub struct Move {
    pub engine: String,
    pub shard: String,
    pub from: String,
    pub to: String,
}

pub struct Observer {
    log: Arc<Mutex<Vec<Observation>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Every answer is bounded in time: a paused member does not stall the
/// others' observations.
const ASK_WITHIN: Duration = Duration::from_millis(1500);

async fn observe(name: String, api: ApiClient, started: Instant) -> Option<Observation> {
    let cluster: ClusterStatus = api.call(Method::GET, "/v1/cluster", None).await.ok()?;
    let shards: Vec<Row> = api.call(Method::GET, "/v1/shards", None).await.ok()?;
    let transfers: Vec<TransferStatus> = api.call(Method::GET, "/v1/transfers", None).await.ok()?;
    Some(Observation { at: started.elapsed(), node: name, cluster, shards, transfers })
}

impl Observer {
    /// Polls every member of `cluster` every `every`, until [`Observer::stop`].
    pub fn start(cluster: &TestCluster, every: Duration) -> Observer {
        let members: Vec<(String, ApiClient)> =
            cluster.nodes.iter().map(|n| (n.name.clone(), n.api().timeout(ASK_WITHIN))).collect();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let sink = log.clone();
        let started = Instant::now();
        let task = tokio::spawn(async move {
            loop {
                let polls = members.iter().map(|(name, api)| observe(name.clone(), api.clone(), started));
                for seen in futures_util::future::join_all(polls).await.into_iter().flatten() {
                    sink.lock().unwrap().push(seen);
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stopped.changed() => return,
                }
            }
        });
        Observer { log, stop, task }
    }

    /// Stops polling; what was seen.
    pub async fn stop(self) -> History {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let observations = std::mem::take(&mut *self.log.lock().unwrap());
        History { observations }
    }
}

pub struct History {
    pub observations: Vec<Observation>,
}

impl History {
    /// Every invariant that must hold at each observed moment, with each
    /// violation described (empty: none).
    ///
    /// - election safety: at most one leader per term;
    /// - each member's term and applied index never go back;
    /// - a moved shard never has two `active` replicas in one member's view,
    ///   and once a member saw the target own it, it never sees the source
    ///   own it again;
    /// - a transfer that a member saw end never changes its outcome there.
    pub fn check(&self, moves: &[Move]) -> Vec<String> {
        let mut violations = Vec::new();
        let mut leaders: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
        let mut last: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        let mut moved_to: BTreeSet<(&str, usize)> = BTreeSet::new();
        let mut ended: BTreeMap<(&str, &str), String> = BTreeMap::new();
        for o in &self.observations {
            let c = &o.cluster;
            if c.state == "leader" {
                leaders.entry(c.term).or_default().insert(o.node.clone());
            }
            let (term, applied) = last.get(o.node.as_str()).copied().unwrap_or((0, 0));
            if c.term < term || c.last_applied < applied {
                violations.push(format!(
                    "{} at {:?}: term {} applied {} after term {term} applied {applied}",
                    o.node, o.at, c.term, c.last_applied
                ));
            }
            last.insert(&o.node, (c.term, c.last_applied));
            for (i, m) in moves.iter().enumerate() {
                let Some(row) = o.shards.iter().find(|r| r.engine == m.engine && r.shard == m.shard) else { continue };
                let active: Vec<&String> =
                    row.replicas.iter().filter(|(_, s)| *s == "active").map(|(n, _)| n).collect();
                if active.len() > 1 {
                    violations.push(format!(
                        "{} at {:?}: two active owners of {}/{}: {active:?}",
                        o.node, o.at, m.engine, m.shard
                    ));
                }
                if active.iter().any(|n| **n == m.to) {
                    moved_to.insert((&o.node, i));
                } else if active.iter().any(|n| **n == m.from) && moved_to.contains(&(o.node.as_str(), i)) {
                    violations.push(format!(
                        "{} at {:?}: {}/{} owned by {} again after {} took it",
                        o.node, o.at, m.engine, m.shard, m.from, m.to
                    ));
                }
            }
            for t in &o.transfers {
                let outcome = format!("{:?}", t.state);
                match ended.get(&(o.node.as_str(), t.id.as_str())) {
                    Some(before) if *before != outcome => violations
                        .push(format!("{} at {:?}: transfer {} ended {before}, now {outcome}", o.node, o.at, t.id)),
                    Some(_) => {}
                    None if t.state.is_final() => {
                        ended.insert((&o.node, &t.id), outcome);
                    }
                    None => {}
                }
            }
        }
        for (term, nodes) in leaders {
            if nodes.len() > 1 {
                violations.push(format!("term {term} had {} leaders: {nodes:?}", nodes.len()));
            }
        }
        violations
    }

    /// How many observations there were, per member.
    pub fn counts(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for o in &self.observations {
            *counts.entry(o.node.clone()).or_default() += 1;
        }
        counts
    }
}

/// What a settled cluster looks like: every member's view, the same.
#[derive(Debug)]
pub struct Settled {
    pub status: ClusterStatus,
    pub shards: Vec<Row>,
    pub transfers: Vec<TransferStatus>,
    /// How long it took after the call.
    pub took: Duration,
}

/// Waits, at most `within`, until every running member answers, one leader
/// is known to all, all have applied the same index, show the same replica
/// table, and every transfer they know has ended. Describes what was still
/// wrong if the bound passes.
pub async fn settle(cluster: &TestCluster, within: Duration) -> Result<Settled, String> {
    let started = Instant::now();
    let mut why;
    loop {
        why = String::new();
        let mut seen = Vec::new();
        for node in cluster.nodes.iter().filter(|n| n.is_running()) {
            match observe(node.name.clone(), node.api().timeout(ASK_WITHIN), started).await {
                Some(o) => seen.push(o),
                None => why = format!("{} does not answer", node.name),
            }
        }
        if why.is_empty() && !seen.is_empty() {
            let first = &seen[0];
            let open: Vec<&str> =
                seen.iter().flat_map(|o| &o.transfers).filter(|t| !t.state.is_final()).map(|t| t.id.as_str()).collect();
            if first.cluster.leader.is_none() {
                why = "no leader".into();
            } else if let Some(o) = seen.iter().find(|o| o.cluster.leader != first.cluster.leader) {
                why = format!("{} follows {:?}, {} {:?}", o.node, o.cluster.leader, first.node, first.cluster.leader);
            } else if let Some(o) = seen.iter().find(|o| o.cluster.last_applied != first.cluster.last_applied) {
                why = format!(
                    "{} applied {}, {} {}",
                    o.node, o.cluster.last_applied, first.node, first.cluster.last_applied
                );
            } else if let Some(o) = seen.iter().find(|o| o.shards != first.shards) {
                why = format!("{} shows {:?}, {} {:?}", o.node, o.shards, first.node, first.shards);
            } else if !open.is_empty() {
                why = format!("transfers not ended: {open:?}");
            } else {
                let first = seen.swap_remove(0);
                return Ok(Settled {
                    status: first.cluster,
                    shards: first.shards,
                    transfers: first.transfers,
                    took: started.elapsed(),
                });
            }
        }
        if started.elapsed() > within {
            return Err(format!("not settled {within:?} after the heal: {why}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(node: &str, at_ms: u64, state: &str, term: u64, applied: u64, replicas: &[(&str, &str)]) -> Observation {
        let cluster = ClusterStatus {
            node: node.into(),
            id: 0,
            state: state.into(),
            leader: None,
            term,
            last_applied: applied,
            last_log_index: applied,
            members: Vec::new(),
            snapshot_bytes: 0,
        };
        let replicas = replicas.iter().map(|(n, s)| (n.to_string(), s.to_string())).collect();
        let shards = vec![Row { engine: "e".into(), shard: "s".into(), replicas }];
        Observation { at: Duration::from_millis(at_ms), node: node.into(), cluster, shards, transfers: Vec::new() }
    }

    fn moves() -> Vec<Move> {
        vec![Move { engine: "e".into(), shard: "s".into(), from: "a".into(), to: "c".into() }]
    }

    #[test]
    fn a_clean_move_passes() {
        let observations = vec![
            seen("a", 0, "leader", 1, 5, &[("a", "active")]),
            seen("b", 1, "follower", 1, 5, &[("a", "active"), ("c", "partial-snapshot")]),
            seen("a", 2, "leader", 1, 7, &[("a", "active"), ("c", "partial")]),
            seen("b", 3, "follower", 1, 8, &[("c", "active")]),
            seen("c", 4, "leader", 2, 9, &[("c", "active")]),
        ];
        assert_eq!(History { observations }.check(&moves()), Vec::<String>::new());
    }

    #[test]
    fn two_leaders_in_a_term_two_owners_and_a_return_are_each_found() {
        let observations = vec![
            seen("a", 0, "leader", 3, 5, &[("a", "active")]),
            seen("b", 1, "leader", 3, 5, &[("a", "active"), ("c", "active")]),
            seen("b", 2, "follower", 3, 6, &[("c", "active")]),
            seen("b", 3, "follower", 3, 7, &[("a", "active")]),
        ];
        let found = History { observations }.check(&moves());
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(found.iter().any(|v| v.contains("term 3 had 2 leaders")), "{found:#?}");
        assert!(found.iter().any(|v| v.contains("two active owners")), "{found:#?}");
        assert!(found.iter().any(|v| v.contains("owned by a again after c took it")), "{found:#?}");
    }

    #[test]
    fn a_term_or_applied_index_going_back_is_found() {
        let observations = vec![
            seen("a", 0, "follower", 4, 9, &[]),
            seen("a", 1, "follower", 3, 9, &[]),
            seen("a", 2, "follower", 4, 8, &[]),
        ];
        assert_eq!(History { observations }.check(&moves()).len(), 2);
    }
}
