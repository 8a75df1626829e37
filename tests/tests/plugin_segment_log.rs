//! Every hook of the segment-log guest, through the production plugin host.

use std::fs;
use std::path::Path;

use ferry::plugin::{
    DeltaEntry, DeltaPlan, EngineError, HookErrorKind, PlanEntry, Plugin, PluginRuntime, RuntimeConfig, ShardPosition,
};
use ferry_tests::segment_log::{
    Control, FormatError, Generator, LOCK_FILE, LiveState, ShardState, Writer, check_shard, segment_name,
};
use ferry_tests::{materialize, materialize_delta, plugins};

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

    let pos = plugin.check_and_validate("s1", dst.path(), &plan.meta, &paths(&plan)).await.unwrap();
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

/// Every path of a plan, as a transfer hands them to `check-files`.
fn paths(plan: &ferry::plugin::SnapshotPlan) -> Vec<String> {
    plan.entries.iter().map(|e| e.path().as_str().to_owned()).collect()
}

#[tokio::test]
async fn check_files_finds_a_flipped_byte() {
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
    let err = plugin.check_files("s1", dst.path(), &plan.meta, &[segment_name(1)]).await.unwrap_err();
    match err.kind {
        HookErrorKind::Engine(EngineError::Invalid(msg)) => assert!(msg.contains("CRC"), "{msg}"),
        other => panic!("expected invalid, got {other}"),
    }
    let err = plugin.check_and_validate("s1", dst.path(), &plan.meta, &paths(&plan)).await.unwrap_err();
    assert!(err.to_string().contains("CRC"), "{err}");
    // The other files pass: the check is per file.
    let others: Vec<String> = paths(&plan).into_iter().filter(|p| *p != segment_name(1)).collect();
    plugin.check_files("s1", dst.path(), &plan.meta, &others).await.unwrap();
    // `validate` reads no records: it relies on `check-files` for them, and
    // checks what spans files.
    plugin.validate("s1", dst.path(), &plan.meta).await.unwrap();
}

#[tokio::test]
async fn check_files_checks_a_segment_before_the_control_file_arrives() {
    let (_rt, plugin) = plugin().await;
    let src = tempfile::tempdir().unwrap();
    let whole = tempfile::tempdir().unwrap();
    shard(src.path(), 200_000);
    let plan = plugin.create_snapshot("s1", src.path()).await.unwrap();
    materialize(&plan, src.path(), whole.path()).unwrap();
    // The last segment alone: the layout comes from the meta.
    let last = segment_name(plan.entries.len() as u64 - 2);
    let alone = tempfile::tempdir().unwrap();
    fs::copy(whole.path().join(&last), alone.path().join(&last)).unwrap();
    plugin.check_files("s1", alone.path(), &plan.meta, std::slice::from_ref(&last)).await.unwrap();
    // Cut short, it is refused; so is a file no snapshot of this layout has.
    let file = fs::OpenOptions::new().write(true).open(alone.path().join(&last)).unwrap();
    file.set_len(100).unwrap();
    let err = plugin.check_files("s1", alone.path(), &plan.meta, &[last]).await.unwrap_err();
    assert!(err.to_string().contains("is 100 bytes"), "{err}");
    fs::write(alone.path().join("junk"), b"x").unwrap();
    let err = plugin.check_files("s1", alone.path(), &plan.meta, &["junk".to_owned()]).await.unwrap_err();
    assert!(err.to_string().contains("unexpected file"), "{err}");
    // A meta whose layout is impossible is refused before any file is read.
    let mut meta = plan.meta.clone();
    meta.attributes.retain(|(k, _)| k != "segment-size");
    let err = plugin.check_files("s1", alone.path(), &meta, &["junk".to_owned()]).await.unwrap_err();
    assert!(err.to_string().contains("no segment-size attribute"), "{err}");
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

/// Appends `n` records of 1000 bytes through the real writer.
fn append(dir: &Path, n: usize) -> u64 {
    let payloads: Vec<Vec<u8>> = (0..n).map(|i| vec![(i % 251) as u8; 1000]).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    Writer::open(dir).unwrap().append(&refs).unwrap()
}

fn engine_error(err: ferry::plugin::HookError) -> EngineError {
    match err.kind {
        HookErrorKind::Engine(e) => e,
        other => panic!("expected an engine error, got {other}"),
    }
}

/// The ranges a delta of `[since, until)` must hold.
fn expected_ranges(control: &Control, since: u64, until: u64) -> Vec<DeltaEntry> {
    control
        .ranges(since, until)
        .into_iter()
        .map(|(index, offset, length)| DeltaEntry::Range {
            path: ferry::relpath::RelPath::new(&segment_name(index)).unwrap(),
            offset,
            length,
        })
        .collect()
}

/// A replica of `src` in `dst`, through a snapshot, as a receiver holds it.
async fn replica(plugin: &Plugin, src: &Path, dst: &Path) -> ShardPosition {
    let plan = plugin.create_snapshot("s1", src).await.unwrap();
    materialize(&plan, src, dst).unwrap();
    let pos = plugin.check_and_validate("s1", dst, &plan.meta, &paths(&plan)).await.unwrap();
    plugin.apply("s1", dst, &plan.meta).await.unwrap();
    pos
}

/// One catch-up round from `src` to `dst`, as the hosts run it.
async fn round(plugin: &Plugin, src: &Path, dst: &Path, since: ShardPosition) -> (DeltaPlan, ShardPosition) {
    let plan = plugin.changes_since("s1", src, since).await.unwrap();
    materialize_delta(&plan, src, dst).unwrap();
    plugin.delta_check("s1", src, &plan.meta).await.unwrap();
    let pos = plugin.apply_changes("s1", dst, &plan.meta).await.unwrap();
    assert_eq!(pos, plan.meta.end());
    (plan, pos)
}

fn assert_same_log(src: &Path, dst: &Path) {
    let (a, b) = (check_shard(src).unwrap().control, check_shard(dst).unwrap().control);
    assert_eq!(
        (a.term, a.flush, a.commit, a.segment_size, a.start),
        (b.term, b.flush, b.commit, b.segment_size, b.start)
    );
    for index in a.segments() {
        let name = segment_name(index);
        assert!(fs::read(src.join(&name)).unwrap() == fs::read(dst.join(&name)).unwrap(), "{name} differs");
    }
}

#[tokio::test]
async fn changes_since_covers_the_new_bytes_round_after_round() {
    let (_rt, plugin) = plugin().await;
    let tmp = tempfile::tempdir().unwrap();
    let first = shard(tmp.path(), 150_000);
    let mid = first.flush;
    let second = append(tmp.path(), 200);
    let plan = plugin.changes_since("s1", tmp.path(), ShardPosition { term: 3, position: mid }).await.unwrap();
    assert_eq!((plan.meta.term, plan.meta.since, plan.meta.until), (3, mid, second));
    let control = Control::read(tmp.path()).unwrap();
    assert_eq!(plan.entries, expected_ranges(&control, mid, second));
    assert!(plan.entries.len() >= 3, "the delta spans segments: {:?}", plan.entries);

    // After more writes, the next round covers exactly the new bytes.
    let third = append(tmp.path(), 30);
    let next = plugin.changes_since("s1", tmp.path(), ShardPosition { term: 3, position: second }).await.unwrap();
    assert_eq!((next.meta.since, next.meta.until), (second, third));
    let covered: u64 =
        next.entries.iter().map(|e| if let DeltaEntry::Range { length, .. } = e { *length } else { 0 }).sum();
    assert_eq!(covered, third - second);

    // Nothing new: an empty round.
    let empty = plugin.changes_since("s1", tmp.path(), ShardPosition { term: 3, position: third }).await.unwrap();
    assert!(empty.entries.is_empty() && empty.meta.since == empty.meta.until);
}

#[tokio::test]
async fn snapshot_then_deltas_then_fenced_round_make_an_equal_replica() {
    let (_rt, plugin) = plugin().await;
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    shard(src.path(), 150_000);
    let mut pos = replica(&plugin, src.path(), dst.path()).await;

    for n in [100, 1, 250] {
        append(src.path(), n);
        pos = round(&plugin, src.path(), dst.path(), pos).await.1;
        assert_eq!(pos, plugin.shard_status("s1", src.path()).await.unwrap());
        assert_same_log(src.path(), dst.path());
    }
    // apply-changes is idempotent: the host repeats it after a lost answer.
    let (plan, _) = round(&plugin, src.path(), dst.path(), ShardPosition { term: 3, position: pos.position }).await;
    assert_eq!(plugin.apply_changes("s1", dst.path(), &plan.meta).await.unwrap(), pos);

    // Writes in flight, then the fence: the final round, planned from the
    // old term's position, takes the replica to exactly the fence's position.
    append(src.path(), 40);
    let (_, mid) = round(&plugin, src.path(), dst.path(), pos).await;
    append(src.path(), 40);
    let fence = plugin.fence("s1", src.path(), 11).await.unwrap();
    assert_eq!(fence.last.term, 4, "the fence bumped the term");
    let (last_plan, last) = round(&plugin, src.path(), dst.path(), mid).await;
    assert_eq!(last, fence.last);
    assert!(!last_plan.entries.is_empty());
    assert_same_log(src.path(), dst.path());
    assert_eq!(check_shard(dst.path()).unwrap().control.live, LiveState::default());
    // The new owner's writers continue at the fence's term.
    let mut writer = Writer::open(dst.path()).unwrap();
    assert_eq!(writer.term(), 4);
    writer.append(&[b"on the new owner"]).unwrap();
    check_shard(dst.path()).unwrap();
}

#[tokio::test]
async fn apply_changes_refuses_a_gap_and_a_flipped_byte() {
    let (_rt, plugin) = plugin().await;
    let src = tempfile::tempdir().unwrap();
    let dst = tempfile::tempdir().unwrap();
    shard(src.path(), 100_000);
    let pos = replica(&plugin, src.path(), dst.path()).await;
    let after = append(src.path(), 50);
    append(src.path(), 50);

    // A delta that starts past where the replica stands.
    let plan = plugin.changes_since("s1", src.path(), ShardPosition { term: 3, position: after }).await.unwrap();
    materialize_delta(&plan, src.path(), dst.path()).unwrap();
    let err = engine_error(plugin.apply_changes("s1", dst.path(), &plan.meta).await.unwrap_err());
    assert!(matches!(&err, EngineError::Invalid(m) if m.contains("stands at")), "{err}");

    let plan = plugin.changes_since("s1", src.path(), pos).await.unwrap();
    materialize_delta(&plan, src.path(), dst.path()).unwrap();
    let DeltaEntry::Range { path, offset, .. } = &plan.entries[0] else { panic!("ranges") };
    let victim = dst.path().join(path.as_str());
    let mut bytes = fs::read(&victim).unwrap();
    bytes[*offset as usize + 20] ^= 0x08;
    fs::write(&victim, bytes).unwrap();
    let err = engine_error(plugin.apply_changes("s1", dst.path(), &plan.meta).await.unwrap_err());
    assert!(matches!(&err, EngineError::Invalid(m) if m.contains("CRC")), "{err}");
    assert_eq!(Control::read(dst.path()).unwrap().flush, pos.position, "the replica did not move");
}

#[tokio::test]
async fn history_gone_and_term_changed() {
    let (_rt, plugin) = plugin().await;
    let tmp = tempfile::tempdir().unwrap();
    let control = shard(tmp.path(), 300_000);
    let since = ShardPosition { term: 3, position: 1000 };

    let plan = plugin.changes_since("s1", tmp.path(), since).await.unwrap();
    // The log is cut below the receiver's position: history gone.
    let cut = Control { start: 2 * SEGMENT, ..control };
    cut.write(tmp.path()).unwrap();
    let err = engine_error(plugin.changes_since("s1", tmp.path(), since).await.unwrap_err());
    assert!(matches!(&err, EngineError::HistoryGone(m) if m.contains("starts at 131072")), "{err}");
    let err = engine_error(plugin.delta_check("s1", tmp.path(), &plan.meta).await.unwrap_err());
    assert!(matches!(err, EngineError::HistoryGone(_)), "{err}");

    // A new leader's term (not a fence): the receiver's history may differ.
    Control { term: 4, ..control }.write(tmp.path()).unwrap();
    let err = engine_error(plugin.changes_since("s1", tmp.path(), since).await.unwrap_err());
    assert!(matches!(err, EngineError::TermChanged(_)), "{err}");
    let err = engine_error(plugin.delta_check("s1", tmp.path(), &plan.meta).await.unwrap_err());
    assert!(matches!(&err, EngineError::TermChanged(m) if m.contains("from 3 to 4")), "{err}");
    // A receiver ahead of the source is not on its history either.
    let ahead = ShardPosition { term: 4, position: control.flush + 1 };
    let err = engine_error(plugin.changes_since("s1", tmp.path(), ahead).await.unwrap_err());
    assert!(matches!(err, EngineError::TermChanged(_)), "{err}");
}

#[tokio::test]
async fn fence_unfence_and_retire_follow_the_epoch() {
    let (_rt, plugin) = plugin().await;
    let tmp = tempfile::tempdir().unwrap();
    let control = shard(tmp.path(), 100_000);
    let flush = append(tmp.path(), 10);

    let fence = plugin.fence("s1", tmp.path(), 7).await.unwrap();
    assert_eq!(fence.last, ShardPosition { term: 4, position: flush });
    assert_eq!(fence.locks.len(), 1);
    let lock = &fence.locks[0];
    assert_eq!((lock.path.as_str(), lock.offset, lock.length, lock.exclusive), (LOCK_FILE, 0, 1, true));
    let fenced = Control::read(tmp.path()).unwrap();
    assert_eq!((fenced.term, fenced.live.fenced_epoch, fenced.live.fence_term), (4, 7, control.term));
    assert_eq!(plugin.shard_status("s1", tmp.path()).await.unwrap(), fence.last);
    // Idempotent for its epoch; another epoch is told who holds it.
    assert_eq!(plugin.fence("s1", tmp.path(), 7).await.unwrap(), fence);
    let err = engine_error(plugin.fence("s1", tmp.path(), 8).await.unwrap_err());
    assert!(matches!(&err, EngineError::Fenced(m) if m.contains("epoch 7")), "{err}");
    let err = engine_error(plugin.unfence("s1", tmp.path(), 8).await.unwrap_err());
    assert!(matches!(err, EngineError::Fenced(_)), "{err}");
    assert!(matches!(Writer::open(tmp.path()), Err(FormatError::Fenced(_))));

    // Unfenced: writers re-open and continue at the new term.
    plugin.unfence("s1", tmp.path(), 7).await.unwrap();
    plugin.unfence("s1", tmp.path(), 7).await.unwrap();
    let flush = append(tmp.path(), 5);
    assert_eq!(plugin.shard_status("s1", tmp.path()).await.unwrap(), ShardPosition { term: 4, position: flush });

    // Retired by a move's epoch: no writer, snapshot or unfence ever again.
    let mut writer = Writer::open(tmp.path()).unwrap();
    plugin.fence("s1", tmp.path(), 9).await.unwrap();
    plugin.retire("s1", tmp.path(), 9).await.unwrap();
    plugin.retire("s1", tmp.path(), 9).await.unwrap();
    let err = writer.append(&[b"late write"]).unwrap_err();
    assert!(matches!(&err, FormatError::Fenced(m) if m.contains("retired")), "{err}");
    assert!(matches!(Writer::open(tmp.path()), Err(FormatError::Fenced(_))));
    let err = engine_error(plugin.unfence("s1", tmp.path(), 9).await.unwrap_err());
    assert!(matches!(err, EngineError::Fenced(_)), "{err}");
    let err = engine_error(plugin.create_snapshot("s1", tmp.path()).await.unwrap_err());
    assert!(matches!(err, EngineError::Fenced(_)), "{err}");
    assert_eq!(Control::read(tmp.path()).unwrap().flush, flush, "nothing was written after the fence");
}
