//! Live moves of SQLite databases (contract 0.2.0) in both journal modes,
//! with a real application writing: Python's `sqlite3` module, one
//! long-lived connection with a busy timeout. The fence is SQLite's own lock
//! bytes held by the source's host: the application's writes wait through
//! the pause, its connection to the old replica fails after the cut-over,
//! and every acknowledged write is on the new owner.

use std::path::Path;
use std::time::Duration;

use ferry::transfer::{State, TransferStatus};
use ferry_tests::engines::sqlite3;
use ferry_tests::node::TestCluster;
use ferry_tests::sqlite_writer::{SqliteWriter, rows};
use hyper::Method;
use serde_json::json;

const ENGINE: &str = "sqlite";
const WITHIN: Duration = Duration::from_secs(120);

/// A database of about `mib` MiB in `mode` (`WAL` or `DELETE`).
fn create(dir: &Path, mode: &str, mib: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let rows = mib * 1000;
    sqlite3(
        &dir.join("app.db"),
        &format!(
            "PRAGMA page_size=4096; PRAGMA journal_mode={mode};
             CREATE TABLE acks(seq INTEGER PRIMARY KEY, v BLOB NOT NULL);
             CREATE TABLE bulk(id INTEGER PRIMARY KEY, v BLOB NOT NULL);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
             INSERT INTO bulk(v) SELECT randomblob(1000) FROM n;"
        ),
    );
}

async fn moves_while_written(mode: &str) {
    let cluster = TestCluster::start(&["q1", "q2", "q3"]).await;
    let [q1, q2, _] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let (source, target) = (q1.shard_dir(ENGINE, "app"), cluster.nodes[2].shard_dir(ENGINE, "app"));
    create(&source, mode, 16);
    cluster.wait_replicas(ENGINE, "app", json!({"q1": "active"}), WITHIN).await;

    let work = tempfile::tempdir().unwrap();
    let writer = SqliteWriter::start(&source.join("app.db"), Some(&target.join("app.db")), 200, work.path());
    writer.wait_acked(50, WITHIN).await;

    let body = json!({"engine": ENGINE, "shard": "app", "source": "q1", "target": "q3", "kind": "move"});
    let started: TransferStatus = q2.api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();
    let done = q2.wait_transfer(&started.id, WITHIN).await;
    assert_eq!(done.state, State::Succeeded, "{mode}: {done:?}");
    cluster.wait_replicas(ENGINE, "app", json!({"q3": "active"}), WITHIN).await;

    // The application goes on, on the new owner.
    let before = writer.acked().len();
    writer.wait_acked(before + 50, WITHIN).await;
    let acked = writer.acked();
    let summary = writer.stop();
    assert!(summary.switched, "{mode}: the writer never moved to the new owner: {summary:?}");
    // Its long-lived connection to the old replica failed; it never wrote
    // there silently (those writes would be missing below).
    assert!(
        summary.errors.first().is_some_and(|e| e.contains("not a database") || e.contains("malformed")),
        "{mode}: {summary:?}"
    );

    let db = target.join("app.db");
    assert_eq!(sqlite3(&db, "PRAGMA integrity_check").trim(), "ok", "{mode}");
    assert_eq!(sqlite3(&db, "PRAGMA journal_mode").trim(), mode.to_lowercase(), "{mode}");
    let held = rows(&db);
    let missing: Vec<&u64> = acked.iter().filter(|s| held.binary_search(s).is_err()).collect();
    assert!(missing.is_empty(), "{mode}: {} acknowledged writes are not on the new owner: {missing:?}", missing.len());

    let status: TransferStatus =
        q1.api().call(Method::GET, &format!("/v1/transfers/{}", started.id), None).await.unwrap();
    let pause = status.pause_ms.expect("pause_ms recorded");
    assert!(status.rounds.last().is_some_and(|r| r.fenced), "{:?}", status.rounds);
    let bytes: u64 = status.rounds.iter().map(|r| r.bytes).sum();
    eprintln!(
        "{mode}: pause {pause} ms, {} rounds, {bytes} bytes in rounds, writer's longest gap {} ms",
        status.rounds.len(),
        summary.longest_gap_ms
    );

    // The old replica's files go once it is retired.
    let deadline = std::time::Instant::now() + WITHIN;
    while source.exists() {
        assert!(std::time::Instant::now() < deadline, "{mode}: the retired replica was never removed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_database_moves_while_it_is_written_and_no_acknowledged_write_is_lost() {
    moves_while_written("WAL").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_journal_database_moves_while_it_is_written_and_no_acknowledged_write_is_lost() {
    moves_while_written("DELETE").await;
}
