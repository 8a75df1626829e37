//! Live moves (contract 0.2.0): a segment-log shard moved between real nodes
//! while an application appends to it. Every acknowledged record ends up on
//! the new owner, the write pause is measured and recorded, the old replica
//! refuses its writers for ever; a move that cannot converge gives up and
//! leaves the source writable.

use std::path::PathBuf;
use std::time::Duration;

use ferry::transfer::{State, TransferStatus};
use ferry_tests::appender::{self, Appender, Summary};
use ferry_tests::node::{NodeOptions, TestCluster};
use ferry_tests::segment_log::{Generator, Writer, check_shard};
use hyper::Method;
use serde_json::json;

const ENGINE: &str = "segment-log";
const WITHIN: Duration = Duration::from_secs(120);

/// An appender on its own thread until `stop` exists.
fn start_appender(
    dir: PathBuf,
    then: Option<PathBuf>,
    rate: u32,
    work: &std::path::Path,
) -> std::thread::JoinHandle<Summary> {
    let appender = Appender {
        dir,
        then,
        rate,
        record_size: 200,
        acks: work.join("acks"),
        stop_file: Some(work.join("stop")),
        duration: Duration::from_secs(300),
    };
    std::thread::spawn(move || appender.run().expect("the appender failed"))
}

async fn acks_at_least(work: &std::path::Path, n: usize) {
    let deadline = std::time::Instant::now() + WITHIN;
    while appender::acked(&work.join("acks")).map(|a| a.len()).unwrap_or(0) < n {
        assert!(std::time::Instant::now() < deadline, "the appender stopped acknowledging");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_moves_while_it_is_written_and_no_acknowledged_write_is_lost() {
    let cluster = TestCluster::start_with(&["w1", "w2", "w3"], NodeOptions::live_moves()).await;
    let [w1, w2, w3] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let (source, target) = (w1.shard_dir(ENGINE, "live"), w3.shard_dir(ENGINE, "live"));
    Generator { segment_size: 1 << 20, term: 3, seed: 9 }.create(&source, 16 << 20).unwrap();
    cluster.wait_replicas(ENGINE, "live", json!({"w1": "active"}), WITHIN).await;

    let work = tempfile::tempdir().unwrap();
    // A writer that opened the old replica before the move and keeps it.
    let mut stale = Writer::open(&source).unwrap();
    let app = start_appender(source.clone(), Some(target.clone()), 200, work.path());
    acks_at_least(work.path(), 50).await;

    let body = json!({"engine": ENGINE, "shard": "live", "source": "w1", "target": "w3", "kind": "move"});
    let started: TransferStatus = w2.api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();
    let done = w2.wait_transfer(&started.id, WITHIN).await;
    assert_eq!(done.state, State::Succeeded, "{done:?}");
    cluster.wait_replicas(ENGINE, "live", json!({"w3": "active"}), WITHIN).await;

    // The application goes on, on the new owner.
    let before = appender::acked(&work.path().join("acks")).unwrap().len();
    acks_at_least(work.path(), before + 50).await;
    std::fs::write(work.path().join("stop"), b"").unwrap();
    let summary = app.join().unwrap();
    assert!(summary.switched, "the appender never moved to the new owner: {summary:?}");

    // Every acknowledged record is on the new owner, once, in order.
    check_shard(&target).unwrap();
    let on_target: Vec<u64> = appender::records(&target).unwrap().iter().filter_map(|p| appender::seq_of(p)).collect();
    let acked = appender::acked(&work.path().join("acks")).unwrap();
    let missing: Vec<&u64> = acked.iter().filter(|s| on_target.binary_search(s).is_err()).collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged records are not on the new owner: {:?}…",
        missing.len(),
        &missing[..missing.len().min(5)]
    );

    // The pause and the rounds are recorded; the last round was fenced.
    let status: TransferStatus =
        w1.api().call(Method::GET, &format!("/v1/transfers/{}", started.id), None).await.unwrap();
    let pause = status.pause_ms.expect("pause_ms recorded");
    assert!(!status.rounds.is_empty() && status.rounds.last().unwrap().fenced, "{:?}", status.rounds);
    assert!(status.rounds.iter().take(status.rounds.len() - 1).all(|r| !r.fenced));
    eprintln!(
        "live move: pause {pause} ms, {} rounds, appender's longest gap {:?}",
        status.rounds.len(),
        summary.longest_gap
    );

    // The writer that kept the old replica gets an error, never a success.
    assert!(stale.append(&[b"late write"]).is_err(), "a write to the retired replica succeeded");
}

/// Also Qdrant #7787: an aborted transfer must not make a later one skip
/// changes. The move is retried after the operator raised the budget, with
/// the same application writing throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_that_cannot_converge_gives_up_and_a_later_move_loses_nothing() {
    let options = ferry_tests::node::NodeOptions {
        // A budget no round can fit: the move must give up, not fence.
        args: vec!["--pause-budget-ms".into(), "10".into()],
        ..Default::default()
    };
    let mut cluster = TestCluster::start_with(&["c1", "c2", "c3"], options).await;
    let (source, target) = (cluster.nodes[0].shard_dir(ENGINE, "busy"), cluster.nodes[1].shard_dir(ENGINE, "busy"));
    Generator { segment_size: 1 << 20, term: 1, seed: 2 }.create(&source, 4 << 20).unwrap();
    cluster.wait_replicas(ENGINE, "busy", json!({"c1": "active"}), WITHIN).await;
    let work = tempfile::tempdir().unwrap();
    let app = start_appender(source.clone(), Some(target.clone()), 300, work.path());
    acks_at_least(work.path(), 20).await;

    let body = json!({"engine": ENGINE, "shard": "busy", "source": "c1", "target": "c2", "kind": "move"});
    let c1 = &cluster.nodes[0];
    let started: TransferStatus = c1.api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();
    let done = c1.wait_transfer(&started.id, WITHIN).await;
    assert_eq!(done.state, State::Failed, "{done:?}");
    assert!(done.error.as_deref().unwrap_or("").contains("not converging"), "{done:?}");
    assert!(done.pause_ms.is_none());

    // The source stays the only owner and keeps taking writes.
    cluster.wait_replicas(ENGINE, "busy", json!({"c1": "active"}), WITHIN).await;
    let before = appender::acked(&work.path().join("acks")).unwrap().len();
    acks_at_least(work.path(), before + 30).await;

    // The operator raises the budget (a restart of both ends, the source
    // killed while it is being written) and moves again.
    for node in &mut cluster.nodes[..2] {
        node.restart(NodeOptions::live_moves());
    }
    cluster.wait_agreement(WITHIN).await;
    let c3 = &cluster.nodes[2];
    let again: TransferStatus = c3.api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();
    let done = c3.wait_transfer(&again.id, WITHIN).await;
    assert_eq!(done.state, State::Succeeded, "{done:?}");
    let before = appender::acked(&work.path().join("acks")).unwrap().len();
    acks_at_least(work.path(), before + 30).await;
    std::fs::write(work.path().join("stop"), b"").unwrap();
    let summary = app.join().unwrap();
    assert!(summary.switched, "{summary:?}");
    let on_target: Vec<u64> = appender::records(&target).unwrap().iter().filter_map(|p| appender::seq_of(p)).collect();
    let acked = appender::acked(&work.path().join("acks")).unwrap();
    let missing: Vec<u64> = acked.iter().copied().filter(|s| on_target.binary_search(s).is_err()).collect();
    if !missing.is_empty() {
        let lines = std::fs::read_to_string(work.path().join("acks")).unwrap();
        let around: Vec<&str> = lines
            .lines()
            .filter(|l| {
                let seq: u64 = l.split_whitespace().next().unwrap().parse().unwrap();
                missing.iter().any(|m| seq + 3 >= *m && seq <= m + 3)
            })
            .collect();
        let status: TransferStatus =
            c3.api().call(Method::GET, &format!("/v1/transfers/{}", again.id), None).await.unwrap();
        panic!(
            "acknowledged records missing on the new owner after an aborted move: {missing:?}; acks around: {around:?}; \
             target holds {} records, last {:?}; fence {:?}; rounds {:?}",
            on_target.len(),
            on_target.last(),
            status.consensus.and_then(|c| c.live).map(|l| l.fenced),
            status.rounds
        );
    }
}

/// Kills the target or the source with SIGKILL as soon as the fence is
/// recorded (during the fenced round or the commit, wherever it lands), then
/// restarts it. Whichever way the transfer ends, there is one active
/// replica, and every acknowledged record is on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_during_the_cut_over_loses_no_acknowledged_write() {
    for victim in [2usize, 0] {
        let mut cluster = TestCluster::start_with(&["k1", "k2", "k3"], NodeOptions::live_moves()).await;
        let (source, target) = (cluster.nodes[0].shard_dir(ENGINE, "k"), cluster.nodes[2].shard_dir(ENGINE, "k"));
        Generator { segment_size: 1 << 20, term: 1, seed: 5 }.create(&source, 8 << 20).unwrap();
        cluster.wait_replicas(ENGINE, "k", json!({"k1": "active"}), WITHIN).await;
        let work = tempfile::tempdir().unwrap();
        let app = start_appender(source.clone(), Some(target.clone()), 200, work.path());
        acks_at_least(work.path(), 30).await;

        let body = json!({"engine": ENGINE, "shard": "k", "source": "k1", "target": "k3", "kind": "move"});
        let k2 = &cluster.nodes[1];
        let started: TransferStatus = k2.api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();
        let path = format!("/v1/transfers/{}", started.id);
        let deadline = std::time::Instant::now() + WITHIN;
        loop {
            let status: TransferStatus = k2.api().call(Method::GET, &path, None).await.unwrap();
            let fenced = status.consensus.as_ref().and_then(|c| c.live.as_ref()).is_some_and(|l| l.fenced.is_some());
            if fenced || status.state.is_final() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never fenced: {status:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        cluster.nodes[victim].kill();
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.nodes[victim].restart(NodeOptions::live_moves());
        let done = cluster.nodes[1].wait_transfer(&started.id, WITHIN).await;

        // The application goes on wherever the shard is now.
        let before = appender::acked(&work.path().join("acks")).unwrap().len();
        acks_at_least(work.path(), before + 20).await;
        std::fs::write(work.path().join("stop"), b"").unwrap();
        let summary = app.join().unwrap();
        let (owner, owner_name) = match done.state {
            State::Succeeded => (&target, "k3"),
            _ => (&source, "k1"),
        };
        let mut want = serde_json::Map::new();
        want.insert(owner_name.into(), json!("active"));
        cluster.wait_replicas(ENGINE, "k", serde_json::Value::Object(want), WITHIN).await;
        assert_eq!(summary.switched, done.state == State::Succeeded, "{done:?} {summary:?}");
        let held: Vec<u64> = appender::records(owner).unwrap().iter().filter_map(|p| appender::seq_of(p)).collect();
        let acked = appender::acked(&work.path().join("acks")).unwrap();
        let missing: Vec<u64> = acked.iter().copied().filter(|s| held.binary_search(s).is_err()).collect();
        assert!(missing.is_empty(), "victim {victim}: {:?}: acknowledged records lost: {missing:?}", done.state);
        eprintln!("victim {victim}: transfer {:?}, {} acknowledged, none lost", done.state, acked.len());
    }
}
