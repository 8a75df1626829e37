//! One catch-up round's data path: the source's `/changes` endpoint and
//! delta archive, the receiver's `pull_round`, against a real `ferry serve`
//! and the real segment-log plugin.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ferry::plugin::{Plugin, PluginRuntime, RuntimeConfig, ShardPosition};
use ferry::relpath::RelPath;
use ferry::stream::RateLimiter;
use ferry::stream::delta::{Prepared, prepare_delta, stream_delta};
use ferry::stream::source::StreamContext;
use ferry::transfer::State;
use ferry::transfer::catchup::{DigestCache, Round, RoundError, RoundRequest, pull_round, receive_round};
use ferry_tests::engines::{SegmentLog, TestEngine};
use ferry_tests::node::{NodeOptions, TOKEN, TestNode};
use ferry_tests::plugins;
use ferry_tests::segment_log::{Control, Generator, Writer, check_shard};
use tokio_util::sync::CancellationToken;

const WITHIN: Duration = Duration::from_secs(120);
const SEGMENT: u64 = 64 * 1024;

async fn plugin() -> (PluginRuntime, Plugin) {
    let runtime = PluginRuntime::new(RuntimeConfig::default()).unwrap();
    let plugin = runtime.load(Path::new(plugins::SEGMENT_LOG)).await.unwrap();
    (runtime, plugin)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Appends `n` records of varied sizes (crossing segments); returns the flush.
fn append(dir: &Path, n: usize) -> u64 {
    let mut writer = Writer::open(dir).unwrap();
    let mut flush = 0;
    for i in 0..n {
        let payload = vec![(i % 251) as u8; 100 + (i * 37) % 3000];
        flush = writer.append(&[&payload]).unwrap();
    }
    flush
}

async fn round(
    source: &TestNode,
    plugin: &Plugin,
    since: ShardPosition,
    scratch: &Path,
    replica: &Path,
) -> Result<Round, RoundError> {
    let client = ferry::http::client();
    let rate = RateLimiter::new(None);
    let request = RoundRequest {
        client: &client,
        source: &source.url,
        token: TOKEN,
        engine: "segment-log",
        shard: "s1",
        transfer: None,
        since,
        scratch,
        replica,
        plugin,
        rate: &rate,
        stall_timeout: Duration::from_secs(30),
        digests: &DigestCache::default(),
    };
    pull_round(&request, &CancellationToken::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rounds_catch_a_snapshot_up_with_the_source() {
    let source = TestNode::start("source", NodeOptions::default());
    let target = TestNode::start("target", NodeOptions::default());
    let src = source.shard_dir("segment-log", "s1");
    SegmentLog.create(&src, 3 << 20);
    let started = target.start_transfer("segment-log", "s1", &source.url).await.unwrap();
    assert_eq!(target.wait_transfer(&started.id, WITHIN).await.state, State::Succeeded);

    let (_rt, plugin) = plugin().await;
    let tmp = tempfile::tempdir().unwrap();
    let (replica, scratch) = (tmp.path().join("replica"), tmp.path().join("scratch"));
    copy_dir(&target.shard_dir("segment-log", "s1"), &replica);
    let since = plugin.shard_status("s1", &replica).await.unwrap();

    // Records appended after the snapshot arrive in one round.
    let flush = append(&src, 600);
    let done = round(&source, &plugin, since, &scratch, &replica).await.unwrap();
    let term = Control::read(&src).unwrap().term;
    assert_eq!(done.position, ShardPosition { term, position: flush });
    assert_eq!((done.meta.since, done.meta.until), (since.position, flush));
    assert!(done.bytes >= flush - since.position, "{} bytes for {} of records", done.bytes, flush - since.position);
    assert!(done.entries >= 1, "segment ranges: {done:?}");
    SegmentLog.assert_same(&src, &replica);
    assert_eq!(check_shard(&replica).unwrap().control.flush, flush);
    assert!(!scratch.exists(), "the scratch is removed once applied");

    // Nothing new: the round still succeeds and stays where it is.
    let empty = round(&source, &plugin, done.position, &scratch, &replica).await.unwrap();
    assert_eq!(empty.position, done.position);
    assert_eq!((empty.meta.since, empty.meta.until), (flush, flush));
    SegmentLog.assert_same(&src, &replica);

    // A round after the empty one still catches later writes (Qdrant #5271).
    let later = append(&src, 50);
    let next = round(&source, &plugin, empty.position, &scratch, &replica).await.unwrap();
    assert_eq!(next.position.position, later);
    SegmentLog.assert_same(&src, &replica);

    // A new leader's term on the source: our history may differ.
    SegmentLog.write(&src);
    let err = round(&source, &plugin, next.position, &scratch, &replica).await.unwrap_err();
    assert!(matches!(err, RoundError::TermChanged(_)), "{err}");
    assert_eq!(plugin.shard_status("s1", &replica).await.unwrap(), next.position, "a refused round moves nothing");

    // The log cut above the position asked for: history gone.
    let control = Control::read(&src).unwrap();
    Control { start: control.segment_size, ..control }.write(&src).unwrap();
    let since = ShardPosition { term: control.term, position: 1000 };
    let err = round(&source, &plugin, since, &scratch, &replica).await.unwrap_err();
    assert!(matches!(err, RoundError::HistoryGone(_)), "{err}");
    assert_eq!(plugin.shard_status("s1", &replica).await.unwrap(), next.position);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_endpoint_needs_a_position_and_a_known_shard() {
    let source = TestNode::start("source", NodeOptions::default());
    SegmentLog.create(&source.shard_dir("segment-log", "s1"), 1 << 20);
    let api = source.api();
    let missing = api
        .call::<serde_json::Value>(hyper::Method::POST, "/v1/engines/segment-log/shards/s1/changes", None)
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("since"), "{missing}");
    let body = serde_json::json!({"since": {"term": 1, "position": 0}});
    let unknown = api
        .call::<serde_json::Value>(hyper::Method::POST, "/v1/engines/segment-log/shards/nope/changes", Some(&body))
        .await
        .unwrap_err();
    assert!(unknown.to_string().contains("no shard"), "{unknown}");
}

/// The archive `prepare_delta` and `stream_delta` make for the changes after
/// `since` of the shard in `dir`.
async fn archive(plugin: Arc<Plugin>, dir: &Path, since: ShardPosition) -> Vec<u8> {
    let Prepared::Round(prepared) = prepare_delta(&plugin, "segment-log", "s1", dir, since, &[]).await.unwrap() else {
        panic!("segment-log rounds compare no blocks")
    };
    let ctx = StreamContext {
        plugin,
        shard: "s1".into(),
        dir: dir.to_owned(),
        rate: Arc::new(RateLimiter::new(None)),
        permit: None,
        stall_timeout: Duration::from_secs(30),
        fuzzy_ok: false,
    };
    let mut chunks = stream_delta(prepared, ctx);
    let mut out = Vec::new();
    while let Some(chunk) = chunks.recv().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    out
}

/// Byte offset of the first data entry's data, and its size.
fn first_data(archive: &[u8]) -> (usize, u64) {
    let header = |at: usize| tokio_tar::Header::from_byte_slice(&archive[at..at + 512]).raw_entry_size().unwrap();
    let preamble = header(0);
    let second = 512 + preamble.next_multiple_of(512) as usize;
    (second + 512, header(second))
}

async fn receive(archive: &[u8], since: ShardPosition, scratch: &Path) -> Result<u64, RoundError> {
    let rate = RateLimiter::new(None);
    let cancel = CancellationToken::new();
    receive_round(archive, "segment-log", "s1", since, scratch, &rate, &cancel).await.map(|r| r.bytes)
}

#[tokio::test]
async fn delta_archives_are_checked_entry_by_entry() {
    let (_rt, plugin) = plugin().await;
    let plugin = Arc::new(plugin);
    let tmp = tempfile::tempdir().unwrap();
    let (dir, scratch) = (tmp.path().join("shard"), tmp.path().join("scratch"));
    Generator { segment_size: SEGMENT, term: 3, seed: 7 }.create(&dir, 200_000).unwrap();
    let since = plugin.shard_status("s1", &dir).await.unwrap();
    let flush = append(&dir, 40);
    let good = archive(plugin.clone(), &dir, since).await;

    // What the source makes, the receiver takes.
    let bytes = receive(&good, since, &scratch).await.unwrap();
    assert!(bytes >= flush - since.position);
    // Another position than the one asked for.
    let other = ShardPosition { position: since.position + 1, ..since };
    let err = receive(&good, other, &scratch).await.unwrap_err();
    assert!(matches!(&err, RoundError::Refused(m) if m.contains("we asked for the changes after")), "{err}");

    // One flipped byte of data: the checksum catches it.
    let (at, size) = first_data(&good);
    assert!(size > 0);
    let mut tampered = good.clone();
    tampered[at + size as usize / 2] ^= 1;
    let err = receive(&tampered, since, &scratch).await.unwrap_err();
    assert!(matches!(&err, RoundError::Refused(m) if m.contains("checksum mismatch")), "{err}");

    // An entry the preamble did not announce.
    let mut extra = good[..at - 512].to_vec();
    extra.extend_from_slice(&ferry::stream::tar::header(&RelPath::new("stray").unwrap(), 3));
    extra.extend_from_slice(b"abc");
    extra.extend_from_slice(&ferry::stream::tar::padding(3).unwrap());
    extra.extend_from_slice(&good[at - 512..]);
    let err = receive(&extra, since, &scratch).await.unwrap_err();
    assert!(matches!(&err, RoundError::Refused(m) if m.contains("stray was not announced")), "{err}");

    // Cut before the manifest: interrupted, never complete.
    let err = receive(&good[..at + 100], since, &scratch).await.unwrap_err();
    assert!(matches!(err, RoundError::Interrupted(_)), "{err}");

    // A source that fails under way says why, with its code.
    Control { term: 4, ..Control::read(&dir).unwrap() }.write(&dir).unwrap();
    let Err(err) = prepare_delta(&plugin, "segment-log", "s1", &dir, since, &[]).await else {
        panic!("a moved term fails the plan")
    };
    assert_eq!(err.code, Some(ferry::stream::FailureCode::TermChanged), "{err}");
}

/// The host's block diff, with the SQLite plugin (whose rounds compare every
/// database and WAL block by block): a round sends the pages that changed,
/// not the files; the replica ends byte for byte equal to the source; the
/// receiver's digests, kept from round to round, stay true.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_diff_rounds_send_only_the_pages_that_changed() {
    use ferry_tests::engines::{Sqlite, sqlite3};
    let source = TestNode::start("source", NodeOptions::default());
    let src = source.shard_dir("sqlite", "db");
    Sqlite.create(&src, 4 << 20);
    let runtime = PluginRuntime::new(RuntimeConfig::default()).unwrap();
    let plugin = runtime.load(Path::new(plugins::SQLITE)).await.unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (replica, scratch) = (tmp.path().join("replica"), tmp.path().join("scratch"));
    copy_dir(&src, &replica);
    let digests = DigestCache::default();
    let client = ferry::http::client();
    let rate = RateLimiter::new(None);
    let round = |since: ShardPosition| {
        let request = RoundRequest {
            client: &client,
            source: &source.url,
            token: TOKEN,
            engine: "sqlite",
            shard: "db",
            transfer: None,
            since,
            scratch: &scratch,
            replica: &replica,
            plugin: &plugin,
            rate: &rate,
            stall_timeout: Duration::from_secs(30),
            digests: &digests,
        };
        async move { pull_round(&request, &CancellationToken::new()).await }
    };
    let same = |name: &str| std::fs::read(src.join(name)).ok() == std::fs::read(replica.join(name)).ok();
    let db_size = std::fs::metadata(src.join("main.db")).unwrap().len();

    // A few rows changed in a 4 MiB database: a few pages travel.
    sqlite3(
        &src.join("main.db"),
        "UPDATE t SET v = randomblob(1000) WHERE id IN (3, 1000); INSERT INTO t(k, v) VALUES (1, x'00')",
    );
    let since = plugin.shard_status("db", &replica).await.unwrap();
    let first = round(since).await.unwrap();
    assert!(same("main.db") && same("users.db"), "the replica differs from the source");
    assert!(first.bytes > 0 && first.bytes < db_size / 20, "{} bytes for a {db_size}-byte database", first.bytes);
    assert_eq!(first.position, plugin.shard_status("db", &src).await.unwrap());

    // Nothing changed: nothing travels.
    let idle = round(first.position).await.unwrap();
    assert_eq!(idle.bytes, 0);

    // More changes, with the receiver's digests from the cache: still exact.
    sqlite3(&src.join("users.db"), "INSERT INTO users VALUES ('barbara2', 31)");
    sqlite3(&src.join("main.db"), "DELETE FROM t WHERE id > 3500");
    let third = round(idle.position).await.unwrap();
    assert!(same("main.db") && same("users.db"), "a round from cached digests left the replica different");
    assert!(third.bytes < db_size, "{}", third.bytes);

    // WAL mode, with a connection that never closed (its WAL and index
    // stay): the WAL travels too, and the replica reads the same rows.
    let script = format!(
        "import sqlite3, os\nc = sqlite3.connect({:?}, isolation_level=None)\nc.execute('PRAGMA journal_mode=WAL')\n\
         c.execute('PRAGMA wal_autocheckpoint=0')\nfor i in range(50): c.execute('INSERT INTO t(k, v) VALUES (?, randomblob(500))', (i,))\nos._exit(0)",
        src.join("main.db").display().to_string()
    );
    assert!(std::process::Command::new("python3").args(["-c", &script]).status().unwrap().success());
    assert!(src.join("main.db-wal").exists());
    let wal = round(third.position).await.unwrap();
    assert!(same("main.db") && same("main.db-wal"), "the WAL did not travel");
    assert!(!replica.join("main.db-shm").exists(), "the index is never copied");
    assert_eq!(wal.position, plugin.shard_status("db", &src).await.unwrap());
    Sqlite.assert_same(&src, &replica);
}
