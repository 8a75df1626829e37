//! The control-plane workload: a 3-node cluster whose first node holds 10
//! shards, then `--shards` (10,000), small real shards of both engines; the
//! same figures measured at both sizes:
//! - CPU per applied log entry (all three nodes), while single shards are
//!   registered one at a time;
//! - how soon a new shard is visible in the replica table;
//! - transfer start latency (the request, until the target's pipeline runs)
//!   and the whole transfer of a small shard;
//! - `ferry shards` and `GET /v1/cluster` latency;
//!
//! and once, at the large size: the time to register all the shards, the
//! Raft log and state-machine snapshot sizes, and 100 transfers started at
//! once (queued within the targets' limits, all finished).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ferry::transfer::{State, TransferStatus};
use ferry_tests::engines::sqlite3;
use ferry_tests::node::{NodeOptions, TestCluster, TestNode};
use ferry_tests::segment_log::Generator;
use hyper::Method;
use serde_json::{Value, json};

use super::cpu_secs;

pub struct ControlArgs {
    pub shards: usize,
    /// Shards registered one at a time for the per-entry figures.
    pub samples: usize,
    /// Transfers started at once at the large size.
    pub transfers: usize,
}

/// The figures measured at one size.
#[derive(Debug)]
pub struct Figures {
    pub entry_cpu_ms: f64,
    pub visible_ms: Vec<f64>,
    pub start_ms: Vec<f64>,
    pub transfer_ms: Vec<f64>,
    pub shards_cli_ms: f64,
    pub cluster_ms: f64,
}

pub struct ControlResult {
    pub small: Figures,
    pub large: Figures,
    pub registration_s: f64,
    pub raft_log_bytes: u64,
    pub snapshot_bytes: u64,
    pub concurrent_s: f64,
    pub concurrent_max_running: usize,
}

pub fn p50(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

const ENGINES: [&str; 2] = ["segment-log", "sqlite"];
const WITHIN: Duration = Duration::from_secs(600);
/// The targets' limit of incoming transfers for the concurrent figure (the
/// nodes' `--max-incoming`).
const MAX_INCOMING: usize = 16;

/// Small real shards of both engines, copied into place by rename (as an
/// engine or a publish makes a shard appear: whole).
struct Shards {
    templates: [PathBuf; 2],
    incoming: PathBuf,
    made: usize,
}

impl Shards {
    fn new(work: &Path) -> anyhow::Result<Shards> {
        let templates = [work.join("template-segment-log"), work.join("template-sqlite")];
        Generator { segment_size: 4096, term: 1, seed: 3 }.create(&templates[0], 8192)?;
        std::fs::create_dir_all(&templates[1])?;
        sqlite3(
            &templates[1].join("app.db"),
            "CREATE TABLE kv(k INTEGER PRIMARY KEY, v TEXT); INSERT INTO kv(v) VALUES ('x');",
        );
        Ok(Shards { templates, incoming: work.join("incoming"), made: 0 })
    }

    /// Makes the next shard on `node`; its (engine, shard).
    fn make(&mut self, node: &TestNode) -> anyhow::Result<(&'static str, String)> {
        let (engine, template) = (ENGINES[self.made % 2], &self.templates[self.made % 2]);
        let shard = format!("s{:06}", self.made);
        self.made += 1;
        let tmp = self.incoming.join(&shard);
        std::fs::create_dir_all(&tmp)?;
        for entry in std::fs::read_dir(template)? {
            let entry = entry?;
            std::fs::copy(entry.path(), tmp.join(entry.file_name()))?;
        }
        let dst = node.shard_dir(engine, &shard);
        std::fs::create_dir_all(dst.parent().context("engine dir")?)?;
        std::fs::rename(&tmp, &dst)?;
        Ok((engine, shard))
    }
}

async fn row(node: &TestNode, engine: &str, shard: &str) -> anyhow::Result<Value> {
    let rows: Value = node.api().call(Method::GET, &format!("/v1/shards?engine={engine}&shard={shard}"), None).await?;
    Ok(rows.get(0).map(|r| r["replicas"].clone()).unwrap_or(Value::Null))
}

async fn wait_active(node: &TestNode, engine: &str, shard: &str, poll: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + WITHIN;
    while row(node, engine, shard).await?[&node.name] != "active" {
        if Instant::now() > deadline {
            bail!("{engine}/{shard} never became active on {}", node.name);
        }
        tokio::time::sleep(poll).await;
    }
    Ok(())
}

async fn last_applied(node: &TestNode) -> anyhow::Result<u64> {
    let status: Value = node.api().call(Method::GET, "/v1/cluster", None).await?;
    status["last_applied"].as_u64().context("last_applied")
}

fn cluster_cpu(cluster: &TestCluster) -> anyhow::Result<f64> {
    cluster.nodes.iter().map(|n| cpu_secs(n.pid())).sum()
}

async fn figures(cluster: &TestCluster, shards: &mut Shards, samples: usize) -> anyhow::Result<Figures> {
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let count = shards.made;

    // CPU per applied entry: single registrations, each its own entry, no
    // polling while they run; less what the idle cluster spends in as long
    // (heartbeats, timers), measured just before.
    cluster.wait_agreement(WITHIN).await;
    let idle_start = (Instant::now(), cluster_cpu(cluster)?);
    tokio::time::sleep(Duration::from_millis(200) * samples as u32).await;
    let idle_rate = (cluster_cpu(cluster)? - idle_start.1) / idle_start.0.elapsed().as_secs_f64();
    let window = Instant::now();
    let (cpu0, applied0) = (cluster_cpu(cluster)?, last_applied(a).await?);
    let mut made = Vec::new();
    for _ in 0..samples {
        made.push(shards.make(a)?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for (engine, shard) in &made {
        wait_active(a, engine, shard, Duration::from_millis(50)).await?;
    }
    cluster.wait_agreement(WITHIN).await;
    let (cpu1, applied1) = (cluster_cpu(cluster)?, last_applied(a).await?);
    let entries = applied1.saturating_sub(applied0).max(1);
    let busy = (cpu1 - cpu0) - idle_rate * window.elapsed().as_secs_f64();
    let entry_cpu_ms = busy.max(0.0) * 1000.0 / entries as f64;

    // A new shard's way into the table.
    let mut visible_ms = Vec::new();
    for _ in 0..samples.min(10) {
        let start = Instant::now();
        let (engine, shard) = shards.make(a)?;
        wait_active(a, engine, &shard, Duration::from_millis(5)).await?;
        visible_ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }

    // Transfers of small shards to b: start latency, and the whole transfer.
    let (mut start_ms, mut transfer_ms) = (Vec::new(), Vec::new());
    for (engine, shard) in made.iter().take(5) {
        let body = json!({"engine": engine, "shard": shard, "source": a.name, "target": b.name});
        let start = Instant::now();
        let started: TransferStatus = b.api().call(Method::POST, "/v1/transfers", Some(&body)).await?;
        let local = format!("/v1/transfers/{}/local", started.id);
        while b.api().call::<Value>(Method::GET, &local, None).await.is_err() {
            if start.elapsed() > WITHIN {
                bail!("transfer {} never started on {}", started.id, b.name);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        start_ms.push(start.elapsed().as_secs_f64() * 1000.0);
        let done = b.wait_transfer(&started.id, WITHIN).await;
        if done.state != State::Succeeded {
            bail!("transfer of {engine}/{shard}: {:?}", done.error);
        }
        wait_active(b, engine, shard, Duration::from_millis(5)).await?;
        transfer_ms.push(start.elapsed().as_secs_f64() * 1000.0);
    }

    // What an operator waits for.
    let mut cli = Vec::new();
    for _ in 0..3 {
        let start = Instant::now();
        let out = std::process::Command::new(ferry_tests::ferry_bin())
            .args(["shards", "--node", &a.url, "--token-file"])
            .arg(&a.token_file)
            .output()?;
        if !out.status.success() {
            bail!("ferry shards: {}", String::from_utf8_lossy(&out.stderr));
        }
        cli.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let mut status = Vec::new();
    for _ in 0..10 {
        let start = Instant::now();
        let _: Value = a.api().call(Method::GET, "/v1/cluster", None).await?;
        status.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let figures =
        Figures { entry_cpu_ms, visible_ms, start_ms, transfer_ms, shards_cli_ms: p50(&cli), cluster_ms: p50(&status) };
    println!(
        "  at {count} shards: {:.2} ms CPU per entry ({entries} entries); new shard visible p50 {:.0} ms, max {:.0} ms; \
         transfer start p50 {:.0} ms, whole transfer p50 {:.0} ms; `ferry shards` {:.0} ms, GET /v1/cluster {:.1} ms",
        figures.entry_cpu_ms,
        p50(&figures.visible_ms),
        figures.visible_ms.iter().copied().fold(0.0, f64::max),
        p50(&figures.start_ms),
        p50(&figures.transfer_ms),
        figures.shards_cli_ms,
        figures.cluster_ms
    );
    Ok(figures)
}

/// Starts `n` transfers at once from a to b and c, and waits for them all,
/// counting how many run at once on each target.
async fn concurrent(cluster: &TestCluster, n: usize) -> anyhow::Result<(f64, usize)> {
    let a = &cluster.nodes[0];
    let rows: Vec<Value> = a.api().call(Method::GET, "/v1/shards?engine=segment-log", None).await?;
    let picked: Vec<String> = rows
        .iter()
        .filter(|r| r["replicas"].as_object().is_some_and(|m| m.len() == 1))
        .filter_map(|r| r["shard"].as_str().map(str::to_owned))
        .take(n)
        .collect();
    if picked.len() < n {
        bail!("only {} shards held by one node", picked.len());
    }
    let start = Instant::now();
    let asks = picked.iter().enumerate().map(|(i, shard)| {
        let target = &cluster.nodes[1 + i % 2];
        let body = json!({"engine": "segment-log", "shard": shard, "source": a.name, "target": target.name});
        async move {
            let started: TransferStatus = target.api().call(Method::POST, "/v1/transfers", Some(&body)).await?;
            anyhow::Ok((1 + i % 2, started.id))
        }
    });
    let ids: Vec<(usize, String)> =
        futures_util::future::join_all(asks).await.into_iter().collect::<anyhow::Result<_>>()?;
    let mut max_running = 0;
    loop {
        let mut running = 0;
        let mut open = 0;
        for node in &cluster.nodes[1..] {
            let list: Vec<TransferStatus> = node.api().call(Method::GET, "/v1/transfers/local", None).await?;
            let here = list.iter().filter(|t| t.state == State::Running).count();
            max_running = max_running.max(here);
            running += here;
            open += list.iter().filter(|t| matches!(t.state, State::Running | State::Queued)).count();
        }
        let mut ended = 0;
        for (target, id) in &ids {
            let t = cluster.nodes[*target].transfer(id).await;
            match t.state {
                State::Succeeded => ended += 1,
                State::Failed | State::Cancelled => bail!("transfer {id}: {:?}", t.error),
                _ => {}
            }
        }
        if ended == ids.len() {
            break;
        }
        if start.elapsed() > WITHIN {
            bail!("{ended} of {} transfers ended in {WITHIN:?} ({running} running, {open} open)", ids.len());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((start.elapsed().as_secs_f64(), max_running))
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

pub async fn run(args: &ControlArgs) -> anyhow::Result<ControlResult> {
    // Both engines move live (contract 0.2.0): with 100 moves at once on
    // two cores, a cut-over's fixed cost alone (a fence call, two commits)
    // is far above the 250 ms default. The pause is the live workload's
    // figure; this one is about the control plane.
    let options = NodeOptions {
        args: ["--max-incoming", "16", "--max-outgoing", "16", "--pause-budget-ms", "5000"].map(String::from).to_vec(),
        ..NodeOptions::default()
    };
    let cluster = TestCluster::start_with(&["ctl-a", "ctl-b", "ctl-c"], options).await;
    let work = tempfile::tempdir_in(cluster.nodes[0].data_dir.parent().context("node dir")?)?;
    let mut shards = Shards::new(work.path())?;
    let a = &cluster.nodes[0];

    println!("control plane: 3 nodes, 10 then {} shards on one", args.shards);
    let mut last = None;
    for _ in 0..10 {
        last = Some(shards.make(a)?);
    }
    let (engine, shard) = last.context("no shard")?;
    wait_active(a, engine, &shard, Duration::from_millis(20)).await?;
    let small = figures(&cluster, &mut shards, args.samples).await?;

    let start = Instant::now();
    let mut last = None;
    while shards.made < args.shards {
        last = Some(shards.make(a)?);
    }
    let (engine, shard) = last.context("no shard")?;
    wait_active(a, engine, &shard, Duration::from_millis(100)).await?;
    let mut registered = 0;
    for engine in ENGINES {
        let rows: Vec<Value> = a.api().call(Method::GET, &format!("/v1/shards?engine={engine}"), None).await?;
        registered += rows.len();
    }
    let registration_s = start.elapsed().as_secs_f64();
    println!("  registered {registered} shards in {registration_s:.1} s (made and registered while it ran)");
    if registered < args.shards {
        bail!("only {registered} of {} shards registered", args.shards);
    }
    let large = figures(&cluster, &mut shards, args.samples).await?;

    let (concurrent_s, concurrent_max_running) = concurrent(&cluster, args.transfers).await?;
    println!(
        "  {} transfers started at once: all finished in {concurrent_s:.1} s, at most {concurrent_max_running} \
         running on a target (limit {MAX_INCOMING})",
        args.transfers
    );
    if concurrent_max_running > MAX_INCOMING {
        bail!("{concurrent_max_running} transfers ran at once on a target, over its limit of {MAX_INCOMING}");
    }

    let raft_log_bytes = file_size(&a.data_dir.join("state").join("raft.redb"));
    let mut snapshot_bytes = 0;
    for node in &cluster.nodes {
        let status: Value = node.api().call(Method::GET, "/v1/cluster", None).await?;
        snapshot_bytes = snapshot_bytes.max(status["snapshot_bytes"].as_u64().unwrap_or(0));
    }
    println!(
        "  Raft store (log, state machine, snapshot) {} KiB; state-machine snapshot {} KiB (0: none built yet, \
         one is built every 1,000 entries)",
        raft_log_bytes >> 10,
        snapshot_bytes >> 10
    );
    Ok(ControlResult {
        small,
        large,
        registration_s,
        raft_log_bytes,
        snapshot_bytes,
        concurrent_s,
        concurrent_max_running,
    })
}
