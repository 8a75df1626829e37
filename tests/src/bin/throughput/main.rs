//! Throughput harness: Ferry between two local nodes against `cp -r` and
//! `tar | tar` on the same data, in one run on this machine.
//!
//! Workloads (segment-log shards):
//! - large: ~2 GiB in 64 MiB segment files;
//! - small: 20,000 segment files of 4 KiB;
//! - live: a 1 GiB segment-log shard and a 256 MiB SQLite database (WAL
//!   mode) moved back and forth between two cluster members, 5 times each,
//!   while an application writes 500 times a second (see `live.rs`);
//! - control: a 3-node cluster at 10 and at 10,000 registered shards, the
//!   same control-plane figures at both, and 100 transfers at once (see
//!   `control.rs`).
//!
//! Every measurement starts with the page cache dropped when the machine
//! allows it (else everything runs warm alike) and ends durable: the
//! baselines include a `sync`, Ferry its own fsync/syncfs. Prints one final
//! line of figures: `large_ratio=<ferry/cp> small_ratio=<ferry/tar>
//! peak_rss_mib=<max of both nodes> live_segment_log_pause_p50_ms=…
//! shards_10k_entry_cost_ratio=<at 10,000 / at 10> …` (the README's
//! benchmark section lists them all).
//!
//! Run: `tests/bench.sh` (builds release binaries, then runs this).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use ferry::api::cli::parse_size;
use ferry::transfer::State;
use ferry_tests::node::{NodeOptions, TestNode, proc_status_kib};
use ferry_tests::segment_log::Generator;

#[derive(Parser)]
struct Args {
    /// Scratch directory (default: a temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, value_parser = parse_size, default_value = "2G")]
    large_size: u64,
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    large_file: u64,
    #[arg(long, default_value_t = 20_000)]
    small_count: u64,
    #[arg(long, value_parser = parse_size, default_value = "4K")]
    small_file: u64,
    /// Runs of each contender, interleaved; the median counts.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Measure one workload only (for quick iterations; the final line then
    /// has only its figures).
    #[arg(long, value_parser = ["large", "small", "live", "control", "concurrent"])]
    only: Option<String>,
    /// Shards the control-plane workload grows the cluster to.
    #[arg(long, default_value_t = 10_000)]
    control_shards: usize,
    /// Shards the concurrency workload moves at once, and their size.
    #[arg(long, default_value_t = 16)]
    concurrent_shards: usize,
    #[arg(long, value_parser = parse_size, default_value = "128M")]
    concurrent_size: u64,
    /// Transfers the control-plane workload starts at once.
    #[arg(long, default_value_t = 100)]
    control_transfers: usize,
    #[arg(long, value_parser = parse_size, default_value = "1G")]
    live_segment_log_size: u64,
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    live_sqlite_size: u64,
    /// Writes per second during the live moves.
    #[arg(long, default_value_t = 500)]
    live_rate: u32,
    #[arg(long, default_value_t = 5)]
    live_moves: usize,
}

mod control;
mod live;

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn sh(script: &str) -> anyhow::Result<()> {
    let status = Command::new("bash").args(["-c", script]).status()?;
    if !status.success() {
        bail!("`{script}` failed: {status}");
    }
    Ok(())
}

/// Drops the page cache if allowed; says whether it did. Then waits for the
/// kernel to settle: a VM with free page reporting hands the freed memory back
/// to its host a couple of seconds later (`PAGE_REPORTING_DELAY`), and until
/// then a writer that starts early gets faster, still-backed pages.
fn drop_caches() -> bool {
    sh("sync").ok();
    let dropped = std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    std::thread::sleep(Duration::from_secs(5));
    dropped
}

/// Times `script` after `setup` (which removes the previous copy) and a drop
/// of the page cache, so every contender starts alike: no copy in the cache,
/// and no pages of one just freed for it to reuse. (On a VM that hands freed
/// memory back to its host, writing into recycled pages is faster than into
/// cold ones, which would favour whoever deletes inside its timing.)
fn timed(label: &str, setup: &str, script: &str) -> anyhow::Result<Duration> {
    sh(setup)?;
    drop_caches();
    let start = Instant::now();
    sh(script)?;
    let took = start.elapsed();
    println!("  {label:<28} {:>8.2} s", took.as_secs_f64());
    Ok(took)
}

async fn ferry_run(source: &TestNode, target: &TestNode, shard: &str) -> anyhow::Result<Duration> {
    let _ = std::fs::remove_dir_all(target.shard_dir("segment-log", shard));
    drop_caches();
    let cpu_before = (cpu_secs(source.pid())?, cpu_secs(target.pid())?);
    let start = Instant::now();
    let started = target.start_transfer("segment-log", shard, &source.url).await?;
    let done = target.wait_transfer(&started.id, Duration::from_secs(3600)).await;
    let took = start.elapsed();
    if done.state != State::Succeeded {
        bail!("transfer failed: {:?}", done.error);
    }
    let cpu = (cpu_secs(source.pid())? - cpu_before.0, cpu_secs(target.pid())? - cpu_before.1);
    let stages: Vec<String> = done.stage_ms.iter().map(|(stage, ms)| format!("{stage} {ms} ms")).collect();
    println!(
        "  {:<28} {:>8.2} s  ({:.0} MiB/s; {}; cpu: source {:.2} s, target {:.2} s)",
        "ferry",
        took.as_secs_f64(),
        done.bytes_total as f64 / (1 << 20) as f64 / took.as_secs_f64(),
        stages.join(", "),
        cpu.0,
        cpu.1
    );
    Ok(took)
}

/// Moves `count` shards of `size` from `source` into `target` at once; the
/// aggregate rate (MiB/s) and the target's resident memory per transfer
/// (its peak during the run less before it, over `count`, in MiB).
async fn concurrent(source: &TestNode, target: &TestNode, count: usize, size: u64) -> anyhow::Result<(f64, f64)> {
    let shards: Vec<String> = (0..count).map(|i| format!("concurrent-{i}")).collect();
    for (i, shard) in shards.iter().enumerate() {
        let dir = source.shard_dir("segment-log", shard);
        if !dir.exists() {
            Generator { segment_size: 16 << 20, term: 1, seed: 100 + i as u64 }.create(&dir, size)?;
        }
        let _ = std::fs::remove_dir_all(target.shard_dir("segment-log", shard));
    }
    println!("concurrent: {count} shards of {} MiB at once", size >> 20);
    drop_caches();
    let before = proc_status_kib(target.pid(), "VmRSS")?;
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (pid, sampling) = (target.pid(), sampling.clone());
        std::thread::spawn(move || {
            let mut peak = 0;
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(proc_status_kib(pid, "VmRSS").unwrap_or(0));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let start = Instant::now();
    let mut ids = Vec::new();
    for shard in &shards {
        ids.push(target.start_transfer("segment-log", shard, &source.url).await?.id);
    }
    let mut bytes = 0;
    for id in &ids {
        let done = target.wait_transfer(id, Duration::from_secs(3600)).await;
        if done.state != State::Succeeded {
            bail!("transfer {id} failed: {:?}", done.error);
        }
        bytes += done.bytes_total;
    }
    let took = start.elapsed();
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().map_err(|_| anyhow::anyhow!("the RSS sampler panicked"))?;
    println!(
        "  {:<28} {:>8.2} s  ({} transfers, {} MiB; target RSS {} MiB before, {} MiB at most)",
        "ferry",
        took.as_secs_f64(),
        ids.len(),
        bytes >> 20,
        before >> 10,
        peak >> 10
    );
    let aggregate = bytes as f64 / (1 << 20) as f64 / took.as_secs_f64();
    Ok((aggregate, peak.saturating_sub(before) as f64 / 1024.0 / count as f64))
}

/// User plus system CPU time of a process so far.
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat format")?.1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok(ticks as f64 / hz)
}

fn size_of(dir: &Path) -> u64 {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scratch = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            tempfile::tempdir_in(dir)?
        }
        None => tempfile::tempdir()?,
    };
    let base = scratch.path();
    // Limits of 16 each way, for the concurrency workload (a single transfer
    // uses one slot whatever the limit).
    let limits: Vec<String> = ["--max-incoming", "16", "--max-outgoing", "16"].map(String::from).to_vec();
    let node = |name: &str, dir: &str| {
        TestNode::start(
            name,
            NodeOptions { data_dir: Some(base.join(dir)), args: limits.clone(), ..Default::default() },
        )
    };
    let (source, target) = (node("bench-source", "a"), node("bench-target", "b"));
    println!("page cache dropped before each run: {}", drop_caches());

    let mut figures = Vec::new();
    if args.only.as_deref().is_none_or(|only| only == "control") {
        let control = control::ControlArgs {
            shards: args.control_shards.max(20),
            samples: 20,
            transfers: args.control_transfers,
        };
        let r = control::run(&control).await?;
        let (small, large) = (&r.small, &r.large);
        figures.push(format!(
            "shards_10k_entry_cost_ratio={:.2} shards_10k_start_latency_ratio={:.2} shards_10k_visible_p50_ms={:.0} \
             shards_10k_registration_s={:.1} shards_10k_cli_ms={:.0} shards_10k_raft_store_kib={} \
             shards_10k_snapshot_kib={} hundred_transfers_s={:.1} hundred_transfers_max_running={}",
            large.entry_cpu_ms / small.entry_cpu_ms,
            control::p50(&large.start_ms) / control::p50(&small.start_ms),
            control::p50(&large.visible_ms),
            r.registration_s,
            large.shards_cli_ms,
            r.raft_log_bytes >> 10,
            r.snapshot_bytes >> 10,
            r.concurrent_s,
            r.concurrent_max_running,
        ));
        if args.only.is_some() {
            println!("{}", figures.join(" "));
            return Ok(());
        }
    }
    if args.only.as_deref().is_none_or(|only| only == "live") {
        let live = live::LiveArgs {
            segment_log_size: args.live_segment_log_size,
            sqlite_size: args.live_sqlite_size,
            rate: args.live_rate,
            moves: args.live_moves.max(1),
        };
        for result in live::run(&live).await? {
            let name = result.engine.replace('-', "_");
            figures.push(format!(
                "live_{name}_pause_p50_ms={} live_{name}_pause_max_ms={}",
                result.p50(),
                result.max()
            ));
        }
        if args.only.is_some() {
            println!("{}", figures.join(" "));
            return Ok(());
        }
    }

    let large = source.shard_dir("segment-log", "large");
    Generator { segment_size: args.large_file, term: 1, seed: 1 }.create(&large, args.large_size)?;
    let small = source.shard_dir("segment-log", "small");
    Generator { segment_size: args.small_file, term: 1, seed: 2 }
        .create(&small, args.small_count * args.small_file - 64)?;
    sh("sync")?;
    println!(
        "large: {} files, {} MiB; small: {} files, {} MiB",
        std::fs::read_dir(&large)?.count(),
        size_of(&large) >> 20,
        std::fs::read_dir(&small)?.count(),
        size_of(&small) >> 20
    );

    let mut ratios = Vec::new();
    let mut single_mib_s = None;
    for (shard, dir, baseline) in [("large", &large, "cp"), ("small", &small, "tar")] {
        if args.only.as_deref().is_some_and(|only| only != shard) {
            continue;
        }
        println!("{shard}:");
        let dst = base.join(format!("copy-{shard}"));
        let (src, dst) = (dir.display(), dst.display());
        let (mut cp, mut tar, mut ferry) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.runs.max(1) {
            let fresh = format!("rm -rf {dst}");
            cp.push(timed("cp -r + sync", &fresh, &format!("cp -r {src} {dst} && sync"))?);
            tar.push(timed(
                "tar -c | tar -x + sync",
                &fresh,
                &format!("mkdir {dst} && tar -C {src} -cf - . | tar -C {dst} -xf - && sync"),
            )?);
            sh(&format!("rm -rf {dst}"))?;
            ferry.push(ferry_run(&source, &target, shard).await?);
        }
        let (cp, tar, ferry) = (median(cp), median(tar), median(ferry));
        println!(
            "  medians: cp {:.2} s, tar {:.2} s, ferry {:.2} s",
            cp.as_secs_f64(),
            tar.as_secs_f64(),
            ferry.as_secs_f64()
        );
        let reference = if baseline == "cp" { cp } else { tar };
        ratios.push(format!("{shard}_ratio={:.2}", ferry.as_secs_f64() / reference.as_secs_f64()));
        if shard == "large" {
            single_mib_s = Some(size_of(&large) as f64 / (1 << 20) as f64 / ferry.as_secs_f64());
        }
    }
    // One transfer at a time so far: the figure the ≤ 64 MiB goal is about.
    let (source_rss, target_rss) = (source.peak_rss() >> 10, target.peak_rss() >> 10);
    if args.only.as_deref().is_none_or(|only| only == "concurrent") {
        let single = match single_mib_s {
            Some(rate) => rate,
            None => {
                // Alone: the single transfer's rate from one run of large.
                let took = ferry_run(&source, &target, "large").await?;
                size_of(&large) as f64 / (1 << 20) as f64 / took.as_secs_f64()
            }
        };
        let (aggregate, per_transfer_mib) =
            concurrent(&source, &target, args.concurrent_shards, args.concurrent_size).await?;
        println!(
            "  aggregate {aggregate:.0} MiB/s against {single:.0} MiB/s for one transfer; {per_transfer_mib:.1} MiB of \
             target RSS per transfer"
        );
        ratios.push(format!("concurrent_ratio={:.2} rss_per_transfer_mib={per_transfer_mib:.1}", aggregate / single));
    }

    println!("peak RSS, one transfer at a time: source {} MiB, target {} MiB", source_rss / 1024, target_rss / 1024);
    let rss = source_rss.max(target_rss);
    println!("{} peak_rss_mib={} {}", ratios.join(" "), rss / 1024, figures.join(" "));
    Ok(())
}
