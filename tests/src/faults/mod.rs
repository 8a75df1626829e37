//! Faults between nodes, on real processes: each node in its own network
//! namespace ([`net`]), optionally on its own disk ([`disk`]), a live move of
//! a segment-log shard that an application writes to throughout, a nemesis
//! at a chosen phase of the move, and a [`checker`] that judges what every
//! member showed while it ran and after the heal.
//!
//! A [`Schedule`] is made from a seed ([`Schedule::random`]) or by hand (the
//! suite's fixed ones); [`run`] plays it and returns what it saw, or every
//! invariant that failed. `tests/fault-soak.sh` runs many seeds.

pub mod checker;
pub mod disk;
pub mod net;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry::transfer::{Stage, State, TransferStatus};
use hyper::Method;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::appender::{self, Appender, Summary};
use crate::node::{NodeNet, NodeOptions, TestCluster, TestNode};
use crate::segment_log::Generator;
use checker::{Move, Observer};

/// The three members; the shard moves from the first to the third, asked
/// of the second. A fourth joins in [`Phase::Membership`].
pub const NAMES: [&str; 4] = ["f0", "f1", "f2", "f3"];
const SOURCE: usize = 0;
const TARGET: usize = 2;
const ENGINE: &str = "segment-log";
const SHARD: &str = "moved";

/// When, in the move, the nemesis starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// While the snapshot streams.
    Stream,
    /// Once catch-up rounds have begun (the fenced round and the commit
    /// follow within the nemesis).
    CatchUp,
    /// Once the source is fenced (its fenced round is committed): the last
    /// round and the commit of the move run under the nemesis.
    Commit,
    /// While the snapshot streams, a fourth node joins the cluster.
    Membership,
    /// While the snapshot streams, a new plugin build rolls out.
    Rollout,
}

/// What goes wrong. Node numbers are indices into [`NAMES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nemesis {
    /// One node cut from the others, both ways.
    Isolate(usize),
    /// Whoever leads when the nemesis starts, cut from the others.
    IsolateLeader,
    /// Packets from one node to another lost; the other way works.
    OneWay { from: usize, to: usize },
    /// Every packet a node sends to its peers delayed by `ms` ± `jitter`.
    Latency { node: usize, ms: u64, jitter: u64 },
    /// A share of the packets a node sends to its peers lost.
    Loss { node: usize, percent: u32 },
    /// What a node sends capped.
    Bandwidth { node: usize, kbit: u32 },
    /// A node stopped (SIGSTOP) and resumed at the heal.
    Pause(usize),
    /// The target's disk at this many bytes per second.
    SlowDisk { bytes_per_sec: u64 },
}

#[derive(Clone, Debug)]
pub struct Schedule {
    pub seed: u64,
    pub phase: Phase,
    pub nemesis: Nemesis,
    /// How long the nemesis lasts.
    pub hold: Duration,
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed {}: {:?} during {:?} for {:?}", self.seed, self.nemesis, self.phase, self.hold)
    }
}

impl Schedule {
    /// The schedule of `seed`: the same seed, the same schedule.
    pub fn random(seed: u64) -> Schedule {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let phases = [Phase::Stream, Phase::CatchUp, Phase::Commit, Phase::Membership, Phase::Rollout];
        let phase = phases[rng.random_range(0..phases.len())];
        let node = rng.random_range(0..3);
        let nemesis = match rng.random_range(0..8) {
            0 => Nemesis::Isolate(node),
            1 => Nemesis::IsolateLeader,
            2 => {
                let to = (node + rng.random_range(1..3)) % 3;
                Nemesis::OneWay { from: node, to }
            }
            3 => Nemesis::Latency { node, ms: rng.random_range(50..=250), jitter: rng.random_range(0..=50) },
            4 => Nemesis::Loss { node, percent: rng.random_range(5..=20) },
            5 => Nemesis::Bandwidth { node, kbit: rng.random_range(2_000..=20_000) },
            6 => Nemesis::Pause(node),
            _ => Nemesis::SlowDisk { bytes_per_sec: rng.random_range(256..=2048) << 10 },
        };
        // Up to past the move's pause budget and its peers' timeouts.
        let hold = Duration::from_millis(rng.random_range(2_000..=15_000));
        Schedule { seed, phase, nemesis, hold }
    }
}

/// What a schedule did, when every invariant held.
#[derive(Debug)]
pub struct Report {
    pub schedule: String,
    /// Whether the nemesis started in the phase asked for (a move may end
    /// before its catch-up could be caught).
    pub phase_hit: bool,
    pub outcome: State,
    pub error: Option<String>,
    /// From the heal until every member agreed and every transfer ended.
    pub settle: Duration,
    pub acked: u64,
    /// The application's longest wait between two acknowledged writes.
    pub longest_gap: Duration,
    /// The move's write pause as the cluster recorded it.
    pub pause_ms: Option<u64>,
    pub observations: usize,
    pub took: Duration,
}

/// The bound on "every transfer ends" after the heal (a debug-build node
/// on a loaded 2-core machine; the move's own deadlines are shorter).
pub const SETTLE_WITHIN: Duration = Duration::from_secs(120);

/// Plays `schedule`; `Err` lists every violated invariant (and where the
/// nodes' logs are).
pub async fn run(schedule: &Schedule) -> Result<Report, String> {
    let started = Instant::now();
    let work = tempfile::Builder::new().prefix("ferry-faults-").tempdir().unwrap();
    let logs = work.path().join("nodes.log");
    let lab = net::Lab::new(NAMES.len());
    let disk = matches!(schedule.nemesis, Nemesis::SlowDisk { .. }).then(|| disk::Disk::new(256));
    let options = |i: usize| {
        let args = ["--rate-limit", "4M", "--pause-budget-ms", "1000"].map(String::from).to_vec();
        let netns = Some(NodeNet { path: lab.netns_path(i), ip: lab.hosts[i].ip });
        let data_dir = (i == TARGET).then(|| disk.as_ref().map(|d| d.mount.join("data"))).flatten();
        NodeOptions { args, netns, data_dir, port: Some(7400), log_file: Some(logs.clone()), ..NodeOptions::default() }
    };
    let nodes: Vec<TestNode> = (0..3).map(|i| TestNode::start(NAMES[i], options(i))).collect();
    if let Some(disk) = &disk {
        disk.adopt(nodes[TARGET].pid());
    }
    let mut cluster = TestCluster::join(nodes).await;

    let source = cluster.nodes[SOURCE].shard_dir(ENGINE, SHARD);
    let target = cluster.nodes[TARGET].shard_dir(ENGINE, SHARD);
    Generator { segment_size: 1 << 20, term: 3, seed: schedule.seed }.create(&source, 16 << 20).unwrap();
    let one = json!({ NAMES[SOURCE]: "active" });
    cluster.wait_replicas(ENGINE, SHARD, one, Duration::from_secs(60)).await;
    let writer = start_appender(source.clone(), target.clone(), work.path());
    wait_acks(work.path(), 20).await;

    let observer = Observer::start(&cluster, Duration::from_millis(100));
    let body =
        json!({"engine": ENGINE, "shard": SHARD, "source": NAMES[SOURCE], "target": NAMES[TARGET], "kind": "move"});
    let moved: TransferStatus = cluster.nodes[1].api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();
    let phase_hit = reach(&cluster.nodes[TARGET], &moved.id, schedule.phase).await;

    // The nemesis, and the work the phase adds while it holds.
    let paused = apply(&lab, &cluster, disk.as_ref(), schedule.nemesis).await;
    let side = match schedule.phase {
        Phase::Membership => {
            let node = TestNode::start(NAMES[3], options(3));
            let body = json!({ "to": cluster.nodes[1].url });
            let api = node.api().timeout(Duration::from_secs(30));
            let join = tokio::spawn(async move {
                api.call::<serde_json::Value>(Method::POST, "/v1/cluster/join", Some(&body))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
            Some((Some(node), join))
        }
        Phase::Rollout => {
            let (url, token) = (cluster.nodes[1].url.clone(), cluster.nodes[1].token_file.clone());
            let build = Path::new(crate::plugins::SEGMENT_LOG)
                .parent()
                .unwrap()
                .join("mutants/segment-log-validate-accepts-anything.wasm");
            let rollout = tokio::task::spawn_blocking(move || {
                let out = std::process::Command::new(crate::ferry_bin())
                    .args(["plugin", "install", "--upgrade"])
                    .arg(&build)
                    .args(["--wait", "110", "--node", &url, "--token-file"])
                    .arg(&token)
                    .output()
                    .unwrap();
                if out.status.success() { Ok(()) } else { Err(String::from_utf8_lossy(&out.stderr).into_owned()) }
            });
            Some((None, tokio::spawn(async move { rollout.await.unwrap() })))
        }
        _ => None,
    };
    tokio::time::sleep(schedule.hold).await;
    lab.heal();
    if let Some(i) = paused {
        cluster.nodes[i].resume();
    }
    if let Some(disk) = &disk {
        disk.throttle(0);
    }
    let healed = Instant::now();

    let mut violations = Vec::new();
    if let Some((node, work)) = side {
        let done = work.await.unwrap();
        if let Some(node) = node {
            // A join cut short by the nemesis is asked again once healed.
            if done.is_err() {
                let body = json!({ "to": cluster.nodes[1].url });
                let api = node.api().timeout(Duration::from_secs(60));
                if let Err(e) = api.call::<serde_json::Value>(Method::POST, "/v1/cluster/join", Some(&body)).await {
                    violations.push(format!("{} could not join after the heal: {e}", node.name));
                }
            }
            cluster.nodes.push(node);
        } else if let Err(e) = done {
            violations.push(format!("the plugin rollout failed: {e}"));
        }
    }
    let settled = checker::settle(&cluster, SETTLE_WITHIN).await;
    let settle_took = healed.elapsed();
    std::fs::write(work.path().join("stop"), b"").unwrap();
    let summary = writer.join().unwrap();
    let history = observer.stop().await;
    let observations = history.observations.len();
    let mv = Move { engine: ENGINE.into(), shard: SHARD.into(), from: NAMES[SOURCE].into(), to: NAMES[TARGET].into() };
    violations.extend(history.check(&[mv]));

    let mut outcome = State::Failed;
    let mut error = None;
    let mut pause_ms = None;
    match &settled {
        Err(why) => violations.push(why.clone()),
        Ok(settled) => {
            let record = settled.transfers.iter().find(|t| t.id == moved.id);
            outcome = record.map(|t| t.state).unwrap_or(State::Failed);
            error = record.and_then(|t| t.error.clone());
            pause_ms = record.and_then(|t| t.pause_ms);
            let row = settled.shards.iter().find(|r| r.engine == ENGINE && r.shard == SHARD);
            let owners: Vec<&String> = row
                .map(|r| r.replicas.iter().filter(|(_, s)| *s == "active").map(|(n, _)| n).collect())
                .unwrap_or_default();
            let want = if outcome == State::Succeeded { NAMES[TARGET] } else { NAMES[SOURCE] };
            if owners != [want] {
                violations
                    .push(format!("after the move ({outcome:?}) {ENGINE}/{SHARD} is owned by {owners:?}, not {want}"));
            }
            let owner_dir = if outcome == State::Succeeded { &target } else { &source };
            violations.extend(lost_writes(work.path(), owner_dir, &summary));
        }
    }
    for node in &cluster.nodes {
        let left: Vec<PathBuf> =
            std::fs::read_dir(node.staging()).map(|d| d.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        if !left.is_empty() {
            violations.push(format!("{} left staging: {left:?}", node.name));
        }
    }
    if !violations.is_empty() {
        let kept = work.keep();
        return Err(format!(
            "{schedule}: {} violation(s):\n  {}\n(nodes' logs: {}; replay: tests/fault-soak.sh 1 {})",
            violations.len(),
            violations.join("\n  "),
            kept.join("nodes.log").display(),
            schedule.seed
        ));
    }
    drop(cluster);
    if std::env::var_os("FERRY_FAULTS_KEEP").is_some() {
        eprintln!("{schedule}: nodes' logs kept in {}", work.keep().join("nodes.log").display());
    }
    Ok(Report {
        schedule: schedule.to_string(),
        phase_hit,
        outcome,
        error,
        settle: settle_took,
        acked: summary.acked,
        longest_gap: summary.longest_gap,
        pause_ms,
        observations,
        took: started.elapsed(),
    })
}

/// Every acknowledged record is on the shard's owner.
fn lost_writes(work: &Path, owner: &Path, summary: &Summary) -> Vec<String> {
    let acked = match appender::acked(&work.join("acks")) {
        Ok(acked) => acked,
        Err(e) => return vec![format!("reading the acknowledgements: {e}")],
    };
    let mut on_owner: Vec<u64> = match appender::records(owner) {
        Ok(records) => records.iter().filter_map(|p| appender::seq_of(p)).collect(),
        Err(e) => return vec![format!("reading {}: {e}", owner.display())],
    };
    on_owner.sort_unstable();
    let missing: Vec<&u64> = acked.iter().filter(|s| on_owner.binary_search(s).is_err()).collect();
    if missing.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "{} of {} acknowledged writes are not on the owner {} ({summary:?}): {:?}…",
        missing.len(),
        acked.len(),
        owner.display(),
        &missing[..missing.len().min(5)]
    )]
}

fn start_appender(dir: PathBuf, then: PathBuf, work: &Path) -> std::thread::JoinHandle<Summary> {
    let appender = Appender {
        dir,
        then: Some(then),
        rate: 100,
        record_size: 200,
        acks: work.join("acks"),
        stop_file: Some(work.join("stop")),
        duration: Duration::from_secs(600),
    };
    std::thread::spawn(move || appender.run().expect("the appender failed"))
}

async fn wait_acks(work: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while appender::acked(&work.join("acks")).map(|a| a.len()).unwrap_or(0) < n {
        assert!(Instant::now() < deadline, "the appender does not write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the move on `target` is in `phase`; false if it ended (or
/// 60 s passed) first.
async fn reach(target: &TestNode, id: &str, phase: Phase) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    let api = target.api().timeout(Duration::from_secs(5));
    while Instant::now() < deadline {
        if let Ok(s) = api.call::<TransferStatus>(Method::GET, &format!("/v1/transfers/{id}"), None).await {
            let there = match phase {
                Phase::CatchUp => !s.rounds.is_empty(),
                Phase::Commit => s.consensus.as_ref().and_then(|c| c.live.as_ref()).is_some_and(|l| l.fenced.is_some()),
                _ => s.stage == Stage::Streaming && s.bytes_done > 0,
            };
            if there {
                return true;
            }
            if s.state.is_final() {
                return false;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Starts `nemesis`; the node it paused, if any.
async fn apply(lab: &net::Lab, cluster: &TestCluster, disk: Option<&disk::Disk>, nemesis: Nemesis) -> Option<usize> {
    match nemesis {
        Nemesis::Isolate(i) => lab.isolate(i),
        Nemesis::IsolateLeader => {
            let status: serde_json::Value =
                cluster.nodes[1].api().call(Method::GET, "/v1/cluster", None).await.unwrap();
            let leader = status["leader"]["name"].as_str().and_then(|n| NAMES.iter().position(|m| *m == n));
            lab.isolate(leader.unwrap_or(0));
        }
        Nemesis::OneWay { from, to } => lab.cut(from, to),
        Nemesis::Latency { node, ms, jitter } => lab.delay(node, ms, jitter, u64::from(lab.hosts[node].ip.octets()[3])),
        Nemesis::Loss { node, percent } => lab.loss(node, percent),
        Nemesis::Bandwidth { node, kbit } => lab.bandwidth(node, kbit),
        Nemesis::Pause(i) => {
            cluster.nodes[i].pause();
            return Some(i);
        }
        Nemesis::SlowDisk { bytes_per_sec } => disk.expect("a slow-disk schedule has a disk").throttle(bytes_per_sec),
    }
    None
}
