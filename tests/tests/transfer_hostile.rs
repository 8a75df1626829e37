//! A fake source serves hostile archives. Each is refused: the transfer fails
//! naming the problem, nothing is published, nothing is written outside
//! staging, and staging is removed.

use std::time::Duration;

use ferry::transfer::State;
use ferry_tests::fake_source::{self, ArchiveBuilder};
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
