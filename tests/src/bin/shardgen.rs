//! Makes sample shards for tests, demos and benchmarks.
//!
//! `shardgen segment-log DIR --size 64M [--segment-size 1M] [--term N]`
//! `shardgen sqlite DIR --size 8M` (needs Debian's `sqlite3`)
//! `shardgen same ENGINE ORIGINAL COPY` (the engine's own oracle; exit 1 if not)
//! `shardgen materialize --plan PLAN.json --from SHARD --to DIR`
//! `shardgen append DIR [--then NEW_OWNER] --rate N --acks FILE [--duration S] [--stop-file F]`
//!   (a segment-log application writing while its shard moves)

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry::api::cli::parse_size;
use ferry::plugin::SnapshotPlan;
use ferry_tests::engines::TestEngine;
use ferry_tests::segment_log::Generator;

#[derive(Parser)]
#[command(about = "Makes sample shards for Ferry's tests and demos")]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A valid segment-log shard with at least SIZE bytes of log.
    SegmentLog {
        dir: PathBuf,
        #[arg(long, value_parser = parse_size, default_value = "8M")]
        size: u64,
        #[arg(long, value_parser = parse_size, default_value = "1M")]
        segment_size: u64,
        #[arg(long, default_value_t = 1)]
        term: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// SQLite databases (main.db with SIZE bytes of rows, users.db), made by `sqlite3`.
    Sqlite {
        dir: PathBuf,
        #[arg(long, value_parser = parse_size, default_value = "8M")]
        size: u64,
    },
    /// Check that COPY holds what ORIGINAL holds, by the engine's own oracle.
    Same { engine: String, original: PathBuf, copy: PathBuf },
    /// Append records to a segment-log shard at a steady rate, honouring the
    /// writers' lock, the term and the fence; log each acknowledged record;
    /// once the shard is retired, go on writing to --then.
    Append {
        dir: PathBuf,
        #[arg(long)]
        then: Option<PathBuf>,
        #[arg(long, default_value_t = 100)]
        rate: u32,
        #[arg(long, default_value_t = 128)]
        record_size: usize,
        #[arg(long)]
        acks: PathBuf,
        /// Seconds to run at most.
        #[arg(long, default_value_t = 600)]
        duration: u64,
        #[arg(long)]
        stop_file: Option<PathBuf>,
    },
    /// A new leader's term on a segment-log shard (the write the conformance
    /// kit's `--mutate` needs: it voids snapshots taken before).
    Term { dir: PathBuf },
    /// Copy what a plan (from `ferry plugin run-hook … create-snapshot --json`) names.
    Materialize {
        #[arg(long)]
        plan: PathBuf,
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        to: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Cmd::SegmentLog { dir, size, segment_size, term, seed } => {
            let control = Generator { segment_size, term, seed }.create(&dir, size)?;
            println!(
                "segment-log shard {}: term {} flush {} in {} segments",
                dir.display(),
                control.term,
                control.flush,
                control.segments().count()
            );
        }
        Cmd::Term { dir } => {
            use ferry_tests::engines::TestEngine;
            ferry_tests::engines::SegmentLog.write(&dir);
            println!(
                "segment-log shard {}: term {}",
                dir.display(),
                ferry_tests::segment_log::Control::read(&dir)?.term
            );
        }
        Cmd::Sqlite { dir, size } => {
            ferry_tests::engines::Sqlite.create(&dir, size);
            println!("sqlite shard {}: main.db, users.db", dir.display());
        }
        Cmd::Same { engine, original, copy } => {
            let adapter = ferry_tests::engines::all()
                .into_iter()
                .find(|e| e.name() == engine)
                .ok_or_else(|| anyhow::anyhow!("unknown engine {engine:?}"))?;
            adapter.assert_same(&original, &copy);
            println!("{engine}: {} holds what {} holds", copy.display(), original.display());
        }
        Cmd::Append { dir, then, rate, record_size, acks, duration, stop_file } => {
            let appender = ferry_tests::appender::Appender {
                dir,
                then,
                rate,
                record_size,
                acks,
                stop_file,
                duration: std::time::Duration::from_secs(duration),
            };
            let summary = appender.run()?;
            println!(
                "acked {} records; longest gap between acknowledgements {} ms; {} refusals; {}",
                summary.acked,
                summary.longest_gap.as_millis(),
                summary.refused,
                if summary.switched { "moved to the new owner" } else { "stayed on its replica" }
            );
        }
        Cmd::Materialize { plan, from, to } => {
            let text = std::fs::read_to_string(&plan).with_context(|| plan.display().to_string())?;
            let value: serde_json::Value = serde_json::from_str(&text)?;
            // Accept the plan itself or `run-hook --json` output around it.
            let plan: SnapshotPlan = serde_json::from_value(value.get("ok").cloned().unwrap_or(value))?;
            ferry_tests::materialize(&plan, &from, &to)?;
            println!("materialized {} entries into {}", plan.entries.len(), to.display());
        }
    }
    Ok(())
}
