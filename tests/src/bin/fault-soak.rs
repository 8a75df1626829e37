//! `fault-soak N [SEED]`: plays N random fault schedules (seeds SEED,
//! SEED+1, …; SEED defaults to the time) on real nodes in network
//! namespaces, one after the other; prints a line per schedule and every
//! failing seed at the end. Exit status 1 if any failed. Needs root.

use std::time::Instant;

use anyhow::Context;
use ferry_tests::faults::{self, Schedule};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: u64 = args.next().unwrap_or_else(|| "10".into()).parse().context("N: a number of schedules")?;
    let first: u64 = match args.next() {
        Some(seed) => seed.parse().context("SEED: a number")?,
        None => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
    };
    if let Some(why) = faults::net::unsupported() {
        anyhow::bail!("fault schedules cannot run here: {why}");
    }
    let started = Instant::now();
    let mut failed = Vec::new();
    for seed in first..first + n {
        let schedule = Schedule::random(seed);
        match faults::run(&schedule).await {
            Ok(r) => println!(
                "ok   {} | phase hit {} | move {:?}{} | settled {:.1?} after the heal | {} acked, longest gap {:.1?}, pause {:?} ms | {} observations | {:.1?}",
                r.schedule,
                r.phase_hit,
                r.outcome,
                r.error.map(|e| format!(" ({})", e.chars().take(80).collect::<String>())).unwrap_or_default(),
                r.settle,
                r.acked,
                r.longest_gap,
                r.pause_ms,
                r.observations,
                r.took
            ),
            Err(why) => {
                println!("FAIL {why}");
                failed.push(seed);
            }
        }
    }
    let per = started.elapsed() / n.max(1) as u32;
    println!("{n} schedules from seed {first}: {} failed {failed:?}; {:.1?} per schedule", failed.len(), per);
    if failed.is_empty() { Ok(()) } else { std::process::exit(1) }
}
