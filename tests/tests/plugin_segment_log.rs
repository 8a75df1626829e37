//! Every hook of the segment-log guest, through the production plugin host.

use std::fs;
use std::path::Path;

use ferry::plugin::{EngineError, HookErrorKind, PlanEntry, PluginRuntime, RuntimeConfig, ShardPosition};
use ferry_tests::segment_log::{Control, Generator, ShardState, check_shard, segment_name};
use ferry_tests::{materialize, plugins};

const SEGMENT: u64 = 64 * 1024;

async fn plugin() -> (PluginRuntime, ferry::plugin::Plugin) {
    let runtime = PluginRuntime::new(RuntimeConfig::default()).unwrap();
    let plugin = runtime.load(Path::new(plugins::SEGMENT_LOG)).await.unwrap();
    (runtime, plugin)
}

fn shard(dir: &Path, bytes: u64) -> Control {
    Generator { segment_size: SEGMENT, term: 3, seed: 7 }.create(dir, bytes).unwrap()
}

#[tokio::test]
async fn describe_names_the_engine() {
    let (_rt, plugin) = plugin().await;
    let info = plugin.describe().await.unwrap();
    assert_eq!(info.name, "segment-log");
    assert_eq!(info.snapshot_format, 1);
    assert_eq!(plugin.info(), &info);
}

#[tokio::test]
async fn shard_status_reports_term_and_flush() {
    let (_rt, plugin) = plugin().await;
    let tmp = tempfile::tempdir().unwrap();
    let control = shard(tmp.path(), 300_000);
    let pos = plugin.shard_status("s1", tmp.path()).await.unwrap();
    assert_eq!(pos, ShardPosition { term: 3, position: control.flush });
}

#[tokio::test]
async fn shard_status_of_a_non_shard_is_an_io_error() {
    let (_rt, plugin) = plugin().await;
    let tmp = tempfile::tempdir().unwrap();
    let err = plugin.shard_status("s1", tmp.path()).await.unwrap_err();
    assert!(matches!(err.kind, HookErrorKind::Engine(EngineError::Io(_))), "{err}");
    assert!(err.to_string().contains("segment-log") && err.to_string().contains("shard-status"), "{err}");
}

#[tokio::test]
async fn plan_lists_control_and_segments_up_to_flush() {
    let (_rt, plugin) = plugin().await;
    let tmp = tempfile::tempdir().unwrap();
    let control = shard(tmp.path(), 300_000);
    let plan = plugin.create_snapshot("s1", tmp.path()).await.unwrap();
    assert_eq!((plan.meta.term, plan.meta.position), (3, control.flush));

    let PlanEntry::Inline { path, contents } = &plan.entries[0] else { panic!("control is inline") };
    assert_eq!(path.as_str(), "control");
    let sent = Control::decode(contents).unwrap();
    assert_eq!(sent, Control { state: ShardState::Snapshot, ..control });

    let segments: Vec<_> = plan.entries[1..].iter().collect();
    assert_eq!(segments.len() as u64, control.flush.div_ceil(SEGMENT));
    for (i, entry) in segments.iter().enumerate() {
        let PlanEntry::File { path, offset, length } = entry else { panic!("segments are files") };
        assert_eq!(path.as_str(), segment_name(i as u64));
        assert_eq!(*offset, 0);
        assert_eq!(*length, Some(control.used_bytes(i as u64)));
    }
    // The last segment is cut at the flush position.
    let last = control.flush.div_ceil(SEGMENT) - 1;
    assert!(control.used_bytes(last) < SEGMENT);
}

#[tokio::test]
async fn term_check_passes_until_the_term_moves() {
    let (_rt, plugin) = plugin().await;
    let tmp = tempfile::tempdir().unwrap();
    let control = shard(tmp.path(), 100_000);
    let plan = plugin.create_snapshot("s1", tmp.path()).await.unwrap();
    plugin.term_check("s1", tmp.path(), &plan.meta).await.unwrap();

    // Appending in the same term keeps the snapshot valid.
    let grown = Generator { segment_size: SEGMENT, term: 3, seed: 8 }.append(tmp.path(), control, 50_000).unwrap();
    plugin.term_check("s1", tmp.path(), &plan.meta).await.unwrap();

    Control { term: 4, ..grown }.write(tmp.path()).unwrap();
    let err = plugin.term_check("s1", tmp.path(), &plan.meta).await.unwrap_err();
    match err.kind {
        HookErrorKind::Engine(EngineError::TermChanged(msg)) => assert!(msg.contains("from 3 to 4"), "{msg}"),
        other => panic!("expected term-changed, got {other}"),
    }
}

#[tokio::test]
async fn snapshot_validates_applies_and_becomes_a_live_shard() {
    let (_rt, plugin) = plugin().await;
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    let control = shard(src.path(), 500_000);
    let plan = plugin.create_snapshot("s1", src.path()).await.unwrap();
    materialize(&plan, src.path(), dst.path()).unwrap();

    let pos = plugin.validate("s1", dst.path(), &plan.meta).await.unwrap();
    assert_eq!(pos, ShardPosition { term: 3, position: control.flush });
    plugin.apply("s1", dst.path(), &plan.meta).await.unwrap();

    let summary = check_shard(dst.path()).unwrap();
    assert_eq!(summary.control, control, "applied control equals the source's");
    assert_eq!(summary.control.state, ShardState::Active);
    for index in control.segments() {
        let name = segment_name(index);
        assert_eq!(fs::metadata(dst.path().join(&name)).unwrap().len(), SEGMENT, "{name} full size");
        assert_eq!(fs::read(dst.path().join(&name)).unwrap(), fs::read(src.path().join(&name)).unwrap());
    }
    // A live shard can be snapshotted again from its new home.
    let again = plugin.create_snapshot("s1", dst.path()).await.unwrap();
    assert_eq!(again.meta, plan.meta);
}

#[tokio::test]
async fn validate_finds_a_flipped_byte() {
    let (_rt, plugin) = plugin().await;
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    shard(src.path(), 200_000);
    let plan = plugin.create_snapshot("s1", src.path()).await.unwrap();
    materialize(&plan, src.path(), dst.path()).unwrap();
    let victim = dst.path().join(segment_name(1));
    let mut bytes = fs::read(&victim).unwrap();
    bytes[1000] ^= 0x01;
    fs::write(&victim, bytes).unwrap();
    let err = plugin.validate("s1", dst.path(), &plan.meta).await.unwrap_err();
    match err.kind {
        HookErrorKind::Engine(EngineError::Invalid(msg)) => assert!(msg.contains("CRC"), "{msg}"),
        other => panic!("expected invalid, got {other}"),
    }
}

#[tokio::test]
async fn validate_refuses_missing_segment_and_wrong_meta() {
    let (_rt, plugin) = plugin().await;
    let src = tempfile::tempdir().unwrap();
    shard(src.path(), 200_000);
    let plan = plugin.create_snapshot("s1", src.path()).await.unwrap();

    let dst = tempfile::tempdir().unwrap();
    materialize(&plan, src.path(), dst.path()).unwrap();
    let mut meta = plan.meta.clone();
    meta.term += 1;
    let err = plugin.validate("s1", dst.path(), &meta).await.unwrap_err();
    assert!(err.to_string().contains("snapshot meta says term 4"), "{err}");

    fs::remove_file(dst.path().join(segment_name(1))).unwrap();
    let err = plugin.validate("s1", dst.path(), &plan.meta).await.unwrap_err();
    assert!(matches!(err.kind, HookErrorKind::Engine(EngineError::Io(_))), "{err}");

    // A live shard is not a received snapshot.
    let err = plugin.apply("s1", src.path(), &plan.meta).await.unwrap_err();
    assert!(err.to_string().contains("not in snapshot state"), "{err}");
}
