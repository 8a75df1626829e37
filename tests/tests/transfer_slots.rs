//! Transfer slots are never held for ever: a source that goes silent does not
//! keep a receiver's incoming slot, and a client that asks for a snapshot and
//! never reads it does not keep a source's outgoing slot.

use std::time::Duration;

use ferry::transfer::{Stage, State};
use ferry_tests::engines::{SegmentLog, TestEngine};
use ferry_tests::fake_source::{self, Reply};
use ferry_tests::node::{NodeOptions, TOKEN, TestNode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ENGINE: &str = "segment-log";
const MIB: u64 = 1 << 20;
const WITHIN: Duration = Duration::from_secs(120);

fn args(args: &[&str]) -> NodeOptions {
    NodeOptions { args: args.iter().map(|a| a.to_string()).collect(), ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_silent_after_a_500_head_does_not_hold_the_incoming_slot() {
    let source = TestNode::start("source", NodeOptions::default());
    SegmentLog.create(&source.shard_dir(ENGINE, "s2"), 2 * MIB);
    // One incoming slot: the second pull waits for the first.
    let target = TestNode::start("target", args(&["--max-incoming", "1", "--stall-timeout", "2"]));
    let head = "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n";
    let (silent, server) = fake_source::serve_reply(Reply::ThenSilence(head.as_bytes().to_vec())).await;

    let stuck = target.start_transfer(ENGINE, "s1", &silent).await.unwrap();
    target.wait_until(&stuck.id, WITHIN, |s| s.stage == Stage::Connecting).await;
    let queued = target.start_transfer(ENGINE, "s2", &source.url).await.unwrap();

    let failed = target.wait_transfer(&stuck.id, Duration::from_secs(60)).await;
    assert_eq!(failed.state, State::Failed, "{failed:?}");
    let error = failed.error.unwrap();
    assert!(
        error.starts_with("connecting: source answered 500 Internal Server Error")
            && error.contains("no complete body within 2s"),
        "{error}"
    );
    let done = target.wait_transfer(&queued.id, WITHIN).await;
    assert_eq!(done.state, State::Succeeded, "{done:?}");
    SegmentLog.assert_same(&source.shard_dir(ENGINE, "s2"), &target.shard_dir(ENGINE, "s2"));
    server.abort();
}

/// Whether the node's end (local port `server`) of the connection to
/// `client` is still ESTABLISHED, from /proc/net/tcp.
fn server_side_established(server: u16, client: u16) -> bool {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next().unwrap_or(""), 16).ok();
        port(fields[1]) == Some(server) && port(fields[2]) == Some(client) && fields[3] == "01"
    })
}

/// Asks `node` for a snapshot of `shard` over a raw connection and reads only
/// the response head; returns the connection (never read again) and the
/// status line.
async fn ask_and_never_read(node: &TestNode, shard: &str) -> (TcpStream, String) {
    let mut conn = TcpStream::connect(("127.0.0.1", node.port)).await.unwrap();
    let request = format!(
        "POST /v1/engines/{ENGINE}/shards/{shard}/snapshot HTTP/1.1\r\nhost: 127.0.0.1\r\n\
         authorization: Bearer {TOKEN}\r\ncontent-length: 0\r\n\r\n"
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(conn.read(&mut byte).await.unwrap(), 1, "connection closed before the head");
        head.push(byte[0]);
    }
    let status = String::from_utf8_lossy(&head).lines().next().unwrap_or_default().to_owned();
    (conn, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_lose_their_outgoing_slots() {
    // Larger than what socket buffers, the HTTP layer and the chunk channel
    // hold together, so the stream blocks on the reader.
    let source = TestNode::start("source", args(&["--stall-timeout", "2"]));
    SegmentLog.create(&source.shard_dir(ENGINE, "s1"), 64 * MIB);
    let target = TestNode::start("target", NodeOptions::default());

    // Both outgoing slots (the default two) taken by clients that stop reading.
    let (first, status) = ask_and_never_read(&source, "s1").await;
    assert!(status.contains(" 200 "), "{status}");
    let (_second, status) = ask_and_never_read(&source, "s1").await;
    assert!(status.contains(" 200 "), "{status}");
    let (_third, status) = ask_and_never_read(&source, "s1").await;
    assert!(status.contains(" 503 "), "both slots should be taken: {status}");

    // Once the stall timeout passes, the slots are free again: the pull,
    // turned away meanwhile, retries and gets the whole shard.
    let started = target.start_transfer(ENGINE, "s1", &source.url).await.unwrap();
    let done = target.wait_transfer(&started.id, WITHIN).await;
    assert_eq!(done.state, State::Succeeded, "{done:?}");
    SegmentLog.assert_same(&source.shard_dir(ENGINE, "s1"), &target.shard_dir(ENGINE, "s1"));

    // The stalled connection itself was given up by the node while its
    // client still does not read: the node's end is no longer established.
    let client_port = first.local_addr().unwrap().port();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while server_side_established(source.port, client_port) {
        assert!(std::time::Instant::now() < deadline, "the node keeps a connection nobody reads");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(first);
}
