//! A fake source serves hostile archives and answers. Each is refused: the
//! transfer fails naming the problem, nothing is published, nothing is
//! written outside staging, staging is removed, and the receiver's memory
//! stays bounded.

use std::time::{Duration, Instant};

use ferry::transfer::State;
use ferry_tests::fake_source::{self, ArchiveBuilder, Reply};
use ferry_tests::node::{NodeOptions, TestNode};
use ferry_tests::tree;
use tokio_tar::EntryType;

const ENGINE: &str = "segment-log";
const SHARD: &str = "s1";

fn honest(data: &[u8]) -> ArchiveBuilder {
    ArchiveBuilder::new().preamble(ENGINE, SHARD, &[("control", data.len() as u64)])
}

fn cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let data = b"0123456789";
    let evil = [("control", &data[..])];
    vec![
        ("no preamble", ArchiveBuilder::new().file("control", data).end(), "not the preamble"),
        ("absolute path", honest(data).raw(EntryType::Regular, b"/tmp/ferry-evil", b"", 10, data).end(), "is absolute"),
        ("dot-dot", honest(data).raw(EntryType::Regular, b"../../ferry-evil", b"", 10, data).end(), "'..'"),
        ("symlink", honest(data).raw(EntryType::Symlink, b"control", b"/etc/passwd", 0, b"").end(), "symlink"),
        ("hard link", honest(data).raw(EntryType::Link, b"control", b"/etc/passwd", 0, b"").end(), "hard link"),
        ("device", honest(data).raw(EntryType::Char, b"control", b"", 0, b"").end(), "device"),
        ("directory", honest(data).raw(EntryType::Directory, b"control", b"", 0, b"").end(), "directory"),
        ("not announced", honest(data).file("other", data).end(), "was not announced"),
        ("duplicate", honest(data).file("control", data).file("control", data).end(), "appears twice"),
        (
            "size disagrees",
            honest(data).raw(EntryType::Regular, b"control", b"", 11, b"0123456789X").end(),
            "preamble said 10",
        ),
        (
            "manifest disagrees",
            honest(data).file("control", data).manifest(&[("control", b"01234567890")]).end(),
            "other entries than the preamble",
        ),
        (
            "entry after manifest",
            honest(data).file("control", data).manifest(&evil).file("late", data).end(),
            "follows the manifest",
        ),
        ("wrong checksum", honest(data).file("control", b"9876543210").manifest(&evil).end(), "checksum mismatch"),
        (
            "other shard",
            ArchiveBuilder::new().preamble(ENGINE, "s2", &[("control", 10)]).file("control", data).end(),
            "not segment-log/s1",
        ),
        (
            "ferry namespace",
            ArchiveBuilder::new().preamble(ENGINE, SHARD, &[(".ferry/x", 10)]).end(),
            "Ferry's own namespace",
        ),
        ("garbage", vec![0x42; 4096], "bad archive"),
        ("missing manifest", honest(data).file("control", data).end(), "gave up"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_archives_are_refused() {
    let target = TestNode::start(
        "target",
        NodeOptions { args: vec!["--max-attempts".into(), "2".into()], ..Default::default() },
    );
    let outside = target.data_dir.parent().unwrap().to_owned();
    let before_outside = tree(&outside);
    for (name, archive, want) in cases() {
        let (url, server) = fake_source::serve(archive).await;
        let started = target.start_transfer(ENGINE, SHARD, &url).await.unwrap();
        let done = target.wait_transfer(&started.id, Duration::from_secs(60)).await;
        server.abort();
        assert_eq!(done.state, State::Failed, "{name}: {done:?}");
        let error = done.error.unwrap_or_default();
        assert!(error.contains(want), "{name}: want {want:?} in {error:?}");
        assert!(!target.shard_dir(ENGINE, SHARD).exists(), "{name}: published");
        assert!(tree(&target.staging()).is_empty(), "{name}: staging left");
        assert!(!std::path::Path::new("/tmp/ferry-evil").exists(), "{name}: wrote outside");
    }
    // Nothing appeared anywhere around the node but its own state.
    let after: Vec<String> = tree(&outside).into_iter().filter(|p| !before_outside.contains(p)).collect();
    assert!(after.iter().all(|p| p.starts_with("data/state/") || p == "data/state/"), "new files: {after:?}");
}

/// A snapshot of a layout the local plugin does not read (another plugin
/// version on the source) is refused at its preamble: not a byte written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_of_another_format_is_refused_before_a_byte_is_written() {
    let target = TestNode::start("target", NodeOptions::default());
    let data = vec![7u8; 1 << 20];
    let archive = ArchiveBuilder::new()
        .preamble_of_format(ENGINE, SHARD, &[("control", data.len() as u64)], 99)
        .file("control", &data)
        .manifest(&[("control", &data)])
        .end();
    let (url, server) = fake_source::serve(archive).await;
    let started = target.start_transfer(ENGINE, SHARD, &url).await.unwrap();
    let done = target.wait_transfer(&started.id, Duration::from_secs(60)).await;
    server.abort();
    assert_eq!(done.state, State::Failed, "{done:?}");
    let error = done.error.unwrap_or_default();
    assert!(error.contains("snapshot format 99") && error.contains("plugin version"), "{error}");
    assert_eq!((done.bytes_done, done.files_done), (0, 0), "bytes were written");
    assert_eq!(done.attempts, 1, "a format mismatch is not retried");
    assert!(!target.shard_dir(ENGINE, SHARD).exists());
}

const GIB8: u64 = 8 << 30;

/// The node's peak resident memory since the last [`reset_peak`], in MiB.
fn peak_rss_mib(node: &TestNode) -> u64 {
    node.peak_rss() >> 20
}

/// Resets the node's peak to its current resident memory (Linux ≥ 4.0).
fn reset_peak(node: &TestNode) {
    std::fs::write(format!("/proc/{}/clear_refs", node.pid()), "5").unwrap();
}

/// A header of `kind` claiming `size` bytes of payload.
fn bomb(mut header: tokio_tar::Header, kind: EntryType, name: &[u8], size: u64) -> tokio_tar::Header {
    header.set_entry_type(kind);
    header.set_size(size);
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_cksum();
    header
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_bodies_and_header_bombs_fail_fast_in_bounded_memory() {
    let target = TestNode::start(
        "target",
        NodeOptions { args: vec!["--max-attempts".into(), "2".into()], ..Default::default() },
    );
    let preamble = || honest(b"0123456789");
    let fill = vec![b'a'; 64 << 10];
    let cases = vec![
        (
            "endless 500 body",
            Reply::Endless {
                head: b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n"
                    .to_vec(),
                fill: fill.clone(),
            },
            "source answered 500 Internal Server Error: aaaa",
            "body longer than 64 KiB, not read further",
        ),
        (
            "GNU long-name bomb",
            Reply::endless_archive(
                preamble()
                    .header(&bomb(tokio_tar::Header::new_gnu(), EntryType::GNULongName, b"././@LongLink", GIB8))
                    .bytes,
                &fill,
            ),
            "bad archive: entry \"././@LongLink\" (after \".ferry/snapshot.json\")",
            "is a GNU long name of 8589934592 bytes, at most 4097",
        ),
        (
            "PAX header bomb",
            Reply::endless_archive(
                preamble()
                    .header(&bomb(tokio_tar::Header::new_ustar(), EntryType::XHeader, b"PaxHeaders/control", GIB8))
                    .bytes,
                &fill,
            ),
            "bad archive: entry \"PaxHeaders/control\" (after \".ferry/snapshot.json\")",
            "is a PAX extended header (type 'x')",
        ),
    ];
    for (name, reply, want, why) in cases {
        let (url, server) = fake_source::serve_reply(reply).await;
        reset_peak(&target);
        let before = peak_rss_mib(&target);
        let started = target.start_transfer(ENGINE, SHARD, &url).await.unwrap();
        // Memory is watched while the transfer runs: without the bounds it
        // grows by gigabytes (and an endless body would never stop growing);
        // with them, by a few chunk buffers.
        let deadline = Instant::now() + Duration::from_secs(30);
        let done = loop {
            let status = target.transfer(&started.id).await;
            let peak = peak_rss_mib(&target);
            assert!(peak < before + 64, "{name}: peak RSS {peak} MiB, {before} MiB before: {status:?}");
            if status.state.is_final() {
                break status;
            }
            assert!(Instant::now() < deadline, "{name}: still running after 30 s: {status:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        server.abort();
        assert_eq!(done.state, State::Failed, "{name}: {done:?}");
        let error = done.error.unwrap_or_default();
        assert!(error.contains(want) && error.contains(why), "{name}: want {want:?} and {why:?} in {error:?}");
        assert!(tree(&target.staging()).is_empty(), "{name}: staging left");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preamble_larger_than_the_free_space_fails_at_once() {
    let target = TestNode::start("target", NodeOptions::default());
    // 1 TiB, or more where the disk has that much free.
    let free = ferry::stream::receive::free_space(&target.data_dir).unwrap();
    let size = (1u64 << 40).max(free.saturating_mul(2));
    let archive = ArchiveBuilder::new().preamble(ENGINE, SHARD, &[("control", size)]).end();
    let (url, server) = fake_source::serve(archive).await;
    let started = target.start_transfer(ENGINE, SHARD, &url).await.unwrap();
    let done = target.wait_transfer(&started.id, Duration::from_secs(30)).await;
    server.abort();
    assert_eq!(done.state, State::Failed, "{done:?}");
    assert_eq!(done.attempts, 1, "not worth retrying: {done:?}");
    let error = done.error.unwrap_or_default();
    assert!(
        error.starts_with("streaming: not enough space: ")
            && error.contains(&format!("{size} bytes"))
            && error.contains("still to receive, the staging file system has ")
            && error.contains(" free"),
        "{error}"
    );
    assert!(!target.shard_dir(ENGINE, SHARD).exists());
    assert!(tree(&target.staging()).is_empty(), "staging left");
}
