//! The live workload: shards moved between two cluster members while an
//! application writes to them, back and forth, N moves each:
//! - a segment-log shard (the test kit's appender, `--live-rate` records/s);
//! - a SQLite database in WAL mode (`tests/sqlite_writer.py`, Python's
//!   `sqlite3` module, `--live-rate` inserts/s).
//!
//! Prints per move the write pause (`pause_ms`, fence to commit), the
//! rounds, and the bytes sent beyond the shard's size (snapshot and rounds,
//! less the replica's size after the move); then p50 and max of the pauses.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use ferry::transfer::{State, TransferStatus};
use ferry_tests::appender::Appender;
use ferry_tests::engines::sqlite3;
use ferry_tests::node::TestCluster;
use ferry_tests::segment_log::Generator;
use ferry_tests::sqlite_writer::SqliteWriter;
use hyper::Method;
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(600);

pub struct LiveArgs {
    pub segment_log_size: u64,
    pub sqlite_size: u64,
    pub rate: u32,
    pub moves: usize,
}

/// What one engine's moves measured.
pub struct LiveResult {
    pub engine: &'static str,
    pub pauses: Vec<u64>,
}

impl LiveResult {
    pub fn p50(&self) -> u64 {
        let mut p = self.pauses.clone();
        p.sort();
        p[p.len() / 2]
    }

    pub fn max(&self) -> u64 {
        self.pauses.iter().copied().max().unwrap_or(0)
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |d| d.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
}

/// A writer of either engine, running until stopped.
enum Running {
    SegmentLog { stop: PathBuf, thread: std::thread::JoinHandle<anyhow::Result<ferry_tests::appender::Summary>> },
    Sqlite(SqliteWriter),
}

impl Running {
    fn start(engine: &str, from: &Path, to: &Path, rate: u32, work: &Path) -> Running {
        match engine {
            "segment-log" => {
                let appender = Appender {
                    dir: from.to_owned(),
                    then: Some(to.to_owned()),
                    rate,
                    record_size: 200,
                    acks: work.join("acks"),
                    stop_file: Some(work.join("stop")),
                    duration: Duration::from_secs(3600),
                };
                Running::SegmentLog { stop: work.join("stop"), thread: std::thread::spawn(move || appender.run()) }
            }
            _ => Running::Sqlite(SqliteWriter::start(&from.join("app.db"), Some(&to.join("app.db")), rate, work)),
        }
    }

    /// Stops it; its acknowledged writes and whether it moved.
    fn stop(self) -> anyhow::Result<(u64, bool)> {
        match self {
            Running::SegmentLog { stop, thread } => {
                std::fs::write(&stop, b"")?;
                let summary = thread.join().map_err(|_| anyhow::anyhow!("the appender panicked"))??;
                Ok((summary.acked, summary.switched))
            }
            Running::Sqlite(writer) => {
                let summary = writer.stop();
                Ok((summary.acked, summary.switched))
            }
        }
    }
}

pub async fn run(args: &LiveArgs) -> anyhow::Result<Vec<LiveResult>> {
    let cluster = TestCluster::start(&["live-a", "live-b"]).await;
    let names = ["live-a", "live-b"];
    let mut results = Vec::new();
    for engine in ["segment-log", "sqlite"] {
        let dirs = [cluster.nodes[0].shard_dir(engine, "live"), cluster.nodes[1].shard_dir(engine, "live")];
        if engine == "segment-log" {
            Generator { segment_size: 64 << 20, term: 1, seed: 7 }.create(&dirs[0], args.segment_log_size)?;
        } else {
            std::fs::create_dir_all(&dirs[0])?;
            let rows = args.sqlite_size / 1100;
            sqlite3(
                &dirs[0].join("app.db"),
                &format!(
                    "PRAGMA page_size=4096; PRAGMA journal_mode=WAL;
                     CREATE TABLE acks(seq INTEGER PRIMARY KEY, v BLOB NOT NULL);
                     CREATE TABLE bulk(id INTEGER PRIMARY KEY, v BLOB NOT NULL);
                     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
                     INSERT INTO bulk(v) SELECT randomblob(1000) FROM n;"
                ),
            );
        }
        cluster.wait_replicas(engine, "live", json!({"live-a": "active"}), WITHIN).await;
        println!("live {engine}: {} MiB, {} writes/s, {} moves", dir_size(&dirs[0]) >> 20, args.rate, args.moves);
        let mut pauses = Vec::new();
        for n in 0..args.moves {
            let (from, to) = (n % 2, (n + 1) % 2);
            let work = tempfile::tempdir()?;
            let writer = Running::start(engine, &dirs[from], &dirs[to], args.rate, work.path());
            // Let the application reach its pace before the move starts.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let body =
                json!({"engine": engine, "shard": "live", "source": names[from], "target": names[to], "kind": "move"});
            let api = cluster.nodes[to].api();
            let started: TransferStatus = api.call(Method::POST, "/v1/transfers", Some(&body)).await?;
            let mut done = cluster.nodes[to].wait_transfer(&started.id, WITHIN).await;
            if done.state != State::Succeeded {
                bail!("live {engine} move {n}: {:?}", done.error);
            }
            // The pause is recorded by its own entry, right after the commit
            // that finished the move.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while done.pause_ms.is_none() && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
                done = cluster.nodes[to].transfer(&started.id).await;
            }
            let mut want = serde_json::Map::new();
            want.insert(names[to].into(), json!("active"));
            cluster.wait_replicas(engine, "live", serde_json::Value::Object(want), WITHIN).await;
            // The application goes on on the new owner for a moment.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let (acked, switched) = writer.stop()?;
            if !switched {
                bail!("live {engine} move {n}: the application never reached the new owner");
            }
            let pause = done.pause_ms.context("no pause_ms recorded")?;
            let rounds: u64 = done.rounds.iter().map(|r| r.bytes).sum();
            let size = dir_size(&dirs[to]);
            let extra = (done.bytes_total + rounds).saturating_sub(size);
            println!(
                "  move {}: {:>5} ms pause, {} rounds ({} KiB), snapshot {} MiB, {} KiB beyond the shard's {} MiB; {acked} writes acknowledged",
                n + 1,
                pause,
                done.rounds.len(),
                rounds >> 10,
                done.bytes_total >> 20,
                extra >> 10,
                size >> 20
            );
            pauses.push(pause);
            // The old replica is retired and removed before the next move
            // brings the shard back.
            let deadline = std::time::Instant::now() + WITHIN;
            while dirs[from].exists() {
                if std::time::Instant::now() > deadline {
                    bail!("live {engine}: the retired replica was never removed");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let result = LiveResult { engine, pauses };
        println!("  pause p50 {} ms, max {} ms", result.p50(), result.max());
        results.push(result);
    }
    Ok(results)
}
