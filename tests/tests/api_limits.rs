//! The API under attack from its own port: idle connection floods, huge and
//! slow request bodies, pulls aimed at arbitrary hosts, and listings while a
//! member is frozen. Each is bounded in memory and time.

use std::time::{Duration, Instant};

use ferry::transfer::{State, TransferStatus};
use ferry_tests::engines;
use ferry_tests::node::{NodeOptions, TOKEN, TestCluster, TestNode};
use hyper::Method;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Raises this test process's own open-file limit (it holds the flood).
fn raise_own_fd_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid pointer to a local struct.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max.min(1 << 16);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
    limit.rlim_cur
}

/// The soft and hard "Max open files" of a process.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let numbers: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    (numbers[0], numbers[1])
}

async fn health_within(node: &TestNode, within: Duration) {
    let started = Instant::now();
    let api = node.api().timeout(within);
    let answer: Value = api.call(Method::GET, "/v1/health", None).await.expect("health under load");
    assert_eq!(answer["node_id"], node.name.as_str());
    assert!(started.elapsed() < within);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connection_floods_do_not_lock_out_clients() {
    let flood = 1_100.min(raise_own_fd_limit() as usize - 100);
    let node = TestNode::start(
        "flooded",
        NodeOptions {
            fd_soft_limit: Some(256),
            args: vec!["--max-connections".into(), "512".into()],
            ..Default::default()
        },
    );
    // Started with 256 open files allowed, the node raised it to its hard limit.
    let (soft, hard) = open_files_limit(node.pid());
    assert_eq!(soft, hard.min(1 << 20), "the node did not raise its fd limit");

    // Connections that never send a byte, then ones that send only a partial head.
    let addr = node.url.trim_start_matches("http://").to_owned();
    let mut idle = Vec::new();
    for i in 0..flood {
        match TcpStream::connect(&addr).await {
            Ok(mut conn) => {
                if i % 2 == 0 {
                    let _ = conn.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n").await;
                }
                idle.push(conn);
            }
            Err(e) => panic!("connect {i}: {e}"),
        }
    }
    // An authenticated client still gets in, again and again.
    for _ in 0..5 {
        health_within(&node, Duration::from_secs(5)).await;
    }
    // The unauthenticated flood was shed, not kept: most idle connections are closed.
    let mut closed = 0;
    for conn in &mut idle {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(Duration::from_millis(5), conn.read(&mut byte)).await {
            closed += 1;
        }
    }
    assert!(closed > flood / 2, "only {closed} of {flood} idle connections were closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_and_slow_request_bodies_are_bounded() {
    let node = TestNode::start(
        "bodies",
        NodeOptions { args: vec!["--request-timeout".into(), "2".into()], ..Default::default() },
    );
    let addr = node.url.trim_start_matches("http://").to_owned();
    let head = |length: usize| {
        format!(
            "POST /v1/transfers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
    };
    async fn answer(conn: &mut TcpStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(20), conn.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    // Declared larger than any request: refused before a byte of it is read.
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    conn.write_all(head(1 << 30).as_bytes()).await.unwrap();
    let text = answer(&mut conn).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");

    // A body that stops arriving: 408 after the request timeout.
    let started = Instant::now();
    let mut conn = TcpStream::connect(&addr).await.unwrap();
    conn.write_all(head(1000).as_bytes()).await.unwrap();
    conn.write_all(b"{\"engine\":").await.unwrap();
    let text = answer(&mut conn).await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10), "slow body held for {:?}", started.elapsed());

    // 16 bodies of 63 MiB at once: the node holds a bounded budget of them,
    // not all 1 GiB.
    let base = node.peak_rss();
    let size = 63 << 20;
    let mut senders = Vec::new();
    for _ in 0..16 {
        let (addr, head) = (addr.clone(), head(size));
        senders.push(tokio::spawn(async move {
            let mut conn = TcpStream::connect(&addr).await.unwrap();
            conn.write_all(head.as_bytes()).await.unwrap();
            let chunk = vec![b' '; 1 << 20];
            for _ in 0..63 {
                if conn.write_all(&chunk).await.is_err() {
                    break;
                }
            }
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(60), conn.read_to_end(&mut out)).await;
            String::from_utf8_lossy(&out).lines().next().unwrap_or("").to_owned()
        }));
    }
    for sender in senders {
        let status = sender.await.unwrap();
        // Refused as empty JSON, told to retry, or timed out: never accepted.
        assert!(["400", "503", "408"].iter().any(|c| status.contains(c)), "{status}");
    }
    let grown = node.peak_rss().saturating_sub(base);
    assert!(grown < 400 << 20, "request bodies grew the node by {} MiB", grown >> 20);
    health_within(&node, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_pulls_only_from_members_or_allowed_sources() {
    let source = TestNode::start("source", NodeOptions::default());
    let engine = &engines::all()[0];
    engine.create(&source.shard_dir(engine.name(), "s1"), 1 << 20);
    let strict = TestNode::start("strict", NodeOptions { strict_sources: true, ..Default::default() });
    let err = strict.start_transfer(engine.name(), "s1", &source.url).await.unwrap_err().to_string();
    assert!(err.starts_with("403") && err.contains("allowed_sources"), "{err}");
    let with_credentials = source.url.replace("http://", "http://user:secret@");
    let err = strict.start_transfer(engine.name(), "s1", &with_credentials).await.unwrap_err().to_string();
    assert!(err.starts_with("400") && err.contains("credentials"), "{err}");
    assert!(!err.contains("secret"), "the credential was echoed back: {err}");

    let allowed = TestNode::start(
        "allowed",
        NodeOptions {
            strict_sources: true,
            args: vec!["--allow-source".into(), source.url.clone()],
            ..Default::default()
        },
    );
    let started = allowed.start_transfer(engine.name(), "s1", &source.url).await.unwrap();
    let done = allowed.wait_transfer(&started.id, Duration::from_secs(60)).await;
    assert_eq!(done.state, State::Succeeded, "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_answer_in_time_while_a_member_is_frozen() {
    let cluster = TestCluster::start(&["l1", "l2", "l3"]).await;
    let [l1, _, l3] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    let engine = &engines::all()[0];
    engine.create(&l1.shard_dir(engine.name(), "s"), 1 << 20);
    cluster.wait_replicas(engine.name(), "s", json!({"l1": "active"}), Duration::from_secs(60)).await;
    let body = json!({"engine": engine.name(), "shard": "s", "target": "l3"});
    let started: TransferStatus = l1.api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();
    assert_eq!(l1.wait_transfer(&started.id, Duration::from_secs(60)).await.state, State::Succeeded);

    // Freeze the target: its socket accepts, nothing answers.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(l3.pid() as i32, libc::SIGSTOP) };
    let api = l1.api().timeout(Duration::from_secs(10));
    let began = Instant::now();
    let list: Vec<TransferStatus> = api.call(Method::GET, "/v1/transfers", None).await.unwrap();
    let one: TransferStatus = api.call(Method::GET, &format!("/v1/transfers/{}", started.id), None).await.unwrap();
    let took = began.elapsed();
    unsafe { libc::kill(l3.pid() as i32, libc::SIGCONT) };
    assert!(took < Duration::from_secs(8), "listing took {took:?}");
    let listed = list.iter().find(|t| t.id == started.id).expect("listed");
    for status in [listed, &one] {
        assert_eq!(status.state, State::Succeeded, "the consensus record still decides: {status:?}");
        let why = status.unreachable.as_deref().unwrap_or_default();
        assert!(why.contains("l3"), "the frozen member is not named: {status:?}");
    }
}
