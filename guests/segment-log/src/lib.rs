//! Ferry plugin for the `segment-log` engine: a write-ahead log of fixed-size
//! segments and a control file (see the `segment-log-format` crate).
//!
//! - `create-snapshot`: the control file, re-serialized inline in `snapshot`
//!   state, and the segments from `start` up to the flush position (the last
//!   one cut at the flush position, as a byte range the host streams).
//! - `term-check`: re-reads the control file; the term must not have moved and
//!   the log must not have been cut below the snapshot.
//! - `check-files` (while the snapshot streams): each segment's length and
//!   every record's CRC, against the layout the snapshot's meta gives.
//! - `validate` (after the last byte): the control file against the meta,
//!   every segment present at its length, no other file.
//! - `apply`: extends the last segment to full size and rewrites the control
//!   file as `active` for its new home.
//!
//! Live moves (contract 0.2.0; the rules on terms and fences are the format
//! crate's): a position is a byte offset of the log.
//! - `changes-since`: one range per segment overlapping `[since, flush)`, at
//!   most [`MAX_DELTA_SEGMENTS`] (the host asks again from `until`);
//!   `term-changed` if `since` is not on the shard's history, `history-gone`
//!   if it lies before `start`.
//! - `delta-check`: the history up to `until` is still the shard's.
//! - `apply-changes`: the replica must stand at `since` (or already at
//!   `until`: idempotent); checks the records' CRCs in `[since, until)`, then
//!   rewrites the control file at `until`.
//! - `fence` / `unfence` / `retire`: rewrite the control file; the fence's
//!   lock is the writers' lock on `control.lock`.

use std::fs;
use std::path::Path;

use ferry_plugin_sdk::{
    DeltaEntry, DeltaMeta, DeltaPlan, EngineError, EngineInfo, Entry, FenceInfo, FileChecks, FileEntry, FileLock,
    Hooks, InlineEntry, Level, Live, RangeEntry, SHARD, ShardPosition, SnapshotMeta, SnapshotPlan, io_error, log,
};
use segment_log_format::{
    CONTROL_FILE, Control, FormatError, LOCK_FILE, LiveState, ShardState, WRITER_LOCK, check_layout, check_range,
    check_snapshot_file, segment_index, segment_name, written_end,
};

/// Most segments one delta plan covers; a longer lag takes several rounds.
const MAX_DELTA_SEGMENTS: u64 = 1024;

struct SegmentLog;

fn to_engine_error(err: FormatError) -> EngineError {
    match err {
        FormatError::Io { .. } => EngineError::Io(err.to_string()),
        FormatError::Invalid(msg) => EngineError::Invalid(msg),
        FormatError::Fenced(msg) => EngineError::Fenced(msg),
    }
}

fn read_control() -> Result<Control, EngineError> {
    Control::read(Path::new(SHARD)).map_err(to_engine_error)
}

fn attributes(control: &Control) -> Vec<(String, String)> {
    vec![
        ("segment-size".into(), control.segment_size.to_string()),
        ("start".into(), control.start.to_string()),
        ("commit".into(), control.commit.to_string()),
    ]
}

/// The snapshot meta must describe the control file that came with it.
fn check_meta(control: &Control, meta: &SnapshotMeta) -> Result<(), EngineError> {
    if control.term != meta.term || control.flush != meta.position {
        return Err(EngineError::Invalid(format!(
            "control file says term {} flush {}, snapshot meta says term {} position {}",
            control.term, control.flush, meta.term, meta.position
        )));
    }
    if meta.attributes != attributes(control) {
        return Err(EngineError::Invalid("snapshot attributes disagree with the control file".into()));
    }
    Ok(())
}

impl Hooks for SegmentLog {
    fn describe() -> EngineInfo {
        EngineInfo {
            name: "segment-log".into(),
            plugin_version: env!("CARGO_PKG_VERSION").into(),
            snapshot_format: segment_log_format::FORMAT_VERSION,
        }
    }

    fn shard_status(_shard: String) -> Result<ShardPosition, EngineError> {
        #[cfg(feature = "mutant-read-only-hook-writes")]
        fs::write(Path::new(SHARD).join("touched"), b"mutant").map_err(io("touched"))?;
        let control = read_control()?;
        Ok(ShardPosition { term: control.term, position: control.flush })
    }

    fn create_snapshot(shard: String) -> Result<SnapshotPlan, EngineError> {
        let control = read_control()?;
        if control.state != ShardState::Active {
            return Err(EngineError::Invalid(format!("shard {shard} is a received snapshot that was never applied")));
        }
        if control.live.retired_epoch != 0 {
            return Err(EngineError::Fenced(format!("shard {shard} is retired")));
        }
        // The copy starts a new life: no fence, no fence history.
        let snapshot_control = Control { state: ShardState::Snapshot, live: LiveState::default(), ..control };
        let mut entries =
            vec![Entry::Inline(InlineEntry { path: CONTROL_FILE.into(), contents: snapshot_control.encode() })];
        let segments = control.segments();
        for index in segments.clone() {
            let name = segment_name(index);
            let len =
                fs::metadata(Path::new(SHARD).join(&name)).map_err(|e| EngineError::Io(format!("{name}: {e}")))?.len();
            let used = control.used_bytes(index);
            if len < used {
                return Err(EngineError::Invalid(format!("{name} is {len} bytes, shorter than its {used} used bytes")));
            }
            entries.push(Entry::File(FileEntry { path: name, offset: 0, length: Some(used) }));
        }
        #[cfg(feature = "mutant-plan-drops-a-file")]
        if entries.len() > 2 {
            entries.remove(1);
        }
        log(
            Level::Info,
            &format!(
                "snapshot of {shard}: term {} flush {} in {} segments",
                control.term,
                control.flush,
                segments.end - segments.start
            ),
        );
        Ok(SnapshotPlan {
            meta: SnapshotMeta { term: control.term, position: control.flush, attributes: attributes(&control) },
            entries,
        })
    }

    fn term_check(_shard: String, meta: SnapshotMeta) -> Result<(), EngineError> {
        let control = read_control()?;
        // A fence's term bump leaves the snapshot on the shard's history.
        if !control.same_history(meta.term, meta.position) {
            return Err(EngineError::TermChanged(format!(
                "term moved from {} to {} during the snapshot",
                meta.term, control.term
            )));
        }
        if control.flush < meta.position || control.start > meta_start(&meta)? {
            return Err(EngineError::TermChanged(format!(
                "log was cut during the snapshot: now [{}, {}), snapshot up to {}",
                control.start, control.flush, meta.position
            )));
        }
        Ok(())
    }

    fn validate(_shard: String, meta: SnapshotMeta) -> Result<ShardPosition, EngineError> {
        #[cfg(feature = "mutant-validate-accepts-anything")]
        return Ok(ShardPosition { term: meta.term, position: meta.position });
        // `check-files` passed every segment's records against the meta's
        // layout; what is left is that the control file is that layout.
        #[allow(unreachable_code)]
        let control = check_layout(Path::new(SHARD)).map_err(to_engine_error)?;
        if control.state != ShardState::Snapshot {
            return Err(EngineError::Invalid("control file is not in snapshot state".into()));
        }
        check_meta(&control, &meta)?;
        let segments = control.segments();
        log(Level::Info, &format!("validated {} segments", segments.end - segments.start));
        Ok(ShardPosition { term: control.term, position: control.flush })
    }

    fn apply(_shard: String, meta: SnapshotMeta) -> Result<(), EngineError> {
        let dir = Path::new(SHARD);
        let control = Control::read(dir).map_err(to_engine_error)?;
        if control.state != ShardState::Snapshot {
            return Err(EngineError::Invalid("control file is not in snapshot state".into()));
        }
        check_meta(&control, &meta)?;
        // Segments are preallocated at full size on a live shard.
        if let Some(last) = control.segments().last() {
            let name = segment_name(last);
            let file = fs::OpenOptions::new()
                .write(true)
                .open(dir.join(&name))
                .map_err(|e| EngineError::Io(format!("{name}: {e}")))?;
            file.set_len(control.segment_size).map_err(|e| EngineError::Io(format!("{name}: {e}")))?;
            file.sync_all().map_err(|e| EngineError::Io(format!("{name}: {e}")))?;
        }
        Control { state: ShardState::Active, ..control }.write(dir).map_err(to_engine_error)
    }
}

fn delta_attribute(meta: &DeltaMeta, key: &str) -> Result<u64, EngineError> {
    meta.attributes
        .iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| EngineError::Invalid(format!("delta meta has no {key} attribute")))
}

fn write_control(control: &Control) -> Result<(), EngineError> {
    // Not the writers' temporary name: a fence runs beside an append.
    control.write_through(Path::new(SHARD), "control.plugin.tmp").map_err(to_engine_error)
}

fn io(name: &str) -> impl FnOnce(std::io::Error) -> EngineError + '_ {
    move |e| io_error(name, e)
}

impl Live for SegmentLog {
    fn changes_since(shard: String, since: ShardPosition) -> Result<DeltaPlan, EngineError> {
        let control = read_control()?;
        if control.state != ShardState::Active {
            return Err(EngineError::Invalid(format!("shard {shard} is a received snapshot that was never applied")));
        }
        if control.live.retired_epoch != 0 {
            return Err(EngineError::Fenced(format!("shard {shard} is retired")));
        }
        if !control.same_history(since.term, since.position) {
            return Err(EngineError::TermChanged(format!(
                "position {}:{} is not on the shard's history (term {}, last fence from term {} at {})",
                since.term, since.position, control.term, control.live.fence_term, control.live.fence_flush
            )));
        }
        if since.position < control.start {
            return Err(EngineError::HistoryGone(format!(
                "the log starts at {}, after {}",
                control.start, since.position
            )));
        }
        if since.position > control.flush {
            return Err(EngineError::TermChanged(format!(
                "position {} is past the flush position {}",
                since.position, control.flush
            )));
        }
        let first = since.position / control.segment_size;
        let limit = (first + MAX_DELTA_SEGMENTS).saturating_mul(control.segment_size);
        let until = control.flush.min(limit);
        let entries = control
            .ranges(since.position, until)
            .into_iter()
            .map(|(index, offset, length)| DeltaEntry::Range(RangeEntry { path: segment_name(index), offset, length }))
            .collect::<Vec<_>>();
        log(Level::Info, &format!("delta of {shard}: [{}, {until}) in {} ranges", since.position, entries.len()));
        Ok(DeltaPlan {
            meta: DeltaMeta {
                term: control.term,
                since: since.position,
                until,
                attributes: vec![
                    ("segment-size".into(), control.segment_size.to_string()),
                    ("commit".into(), control.commit.min(until).to_string()),
                ],
            },
            entries,
        })
    }

    fn delta_check(_shard: String, meta: DeltaMeta) -> Result<(), EngineError> {
        let control = read_control()?;
        if !control.same_history(meta.term, meta.until) {
            return Err(EngineError::TermChanged(format!(
                "term moved from {} to {} during the round",
                meta.term, control.term
            )));
        }
        if control.start > meta.since {
            return Err(EngineError::HistoryGone(format!(
                "the log was cut to {} during the round from {}",
                control.start, meta.since
            )));
        }
        if control.flush < meta.until {
            return Err(EngineError::TermChanged(format!(
                "the log was cut to {} during the round up to {}",
                control.flush, meta.until
            )));
        }
        Ok(())
    }

    fn apply_changes(_shard: String, meta: DeltaMeta) -> Result<ShardPosition, EngineError> {
        let dir = Path::new(SHARD);
        let control = read_control()?;
        let done = ShardPosition { term: meta.term, position: meta.until };
        if control.state != ShardState::Active {
            return Err(EngineError::Invalid("the replica is a snapshot that was never applied".into()));
        }
        if control.term == meta.term && control.flush == meta.until {
            return Ok(done);
        }
        if control.flush != meta.since {
            return Err(EngineError::Invalid(format!(
                "the replica stands at {}, the delta starts at {}",
                control.flush, meta.since
            )));
        }
        let segment_size = delta_attribute(&meta, "segment-size")?;
        if segment_size != control.segment_size {
            return Err(EngineError::Invalid(format!(
                "the delta's segment size {segment_size} is not the replica's {}",
                control.segment_size
            )));
        }
        let commit = delta_attribute(&meta, "commit")?;
        if meta.until < meta.since || commit > meta.until {
            return Err(EngineError::Invalid(format!(
                "delta [{}, {}) with commit {commit} is not a range",
                meta.since, meta.until
            )));
        }
        let records = check_range(dir, &control, meta.since, meta.until).map_err(to_engine_error)?;
        // Segments as a live shard has them: full size; and nothing after
        // `until` (a stale tail would pass for padding to the next writer).
        let size = control.segment_size;
        let tail = meta.until / size;
        let touched = control.ranges(meta.since, meta.until).into_iter().map(|(index, _, _)| index);
        for index in touched.chain(std::iter::once(tail)) {
            let name = segment_name(index);
            let file = match fs::OpenOptions::new().write(true).open(dir.join(&name)) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && index == tail => continue,
                Err(e) => return Err(io(&name)(e)),
            };
            if index == tail {
                file.set_len(meta.until - index * size).map_err(io(&name))?;
            }
            file.set_len(size).map_err(io(&name))?;
            file.sync_all().map_err(io(&name))?;
        }
        for entry in fs::read_dir(dir).map_err(io("/shard"))? {
            let name = entry.map_err(io("/shard"))?.file_name().to_string_lossy().into_owned();
            if segment_index(&name).is_some_and(|index| index > tail) {
                fs::remove_file(dir.join(&name)).map_err(io(&name))?;
            }
        }
        write_control(&Control { term: meta.term, flush: meta.until, commit, ..control })?;
        log(Level::Info, &format!("applied [{}, {}): {records} records", meta.since, meta.until));
        Ok(done)
    }

    fn fence(_shard: String, epoch: u64) -> Result<FenceInfo, EngineError> {
        let read = read_control()?;
        // An append whose control update an earlier, unlocked fence
        // overwrote was acknowledged: its records count. (The host fences a
        // second time under the writers' lock, when no append is in flight.)
        let end = written_end(Path::new(SHARD), &read).map_err(to_engine_error)?;
        let control = read.with_written_end(end);
        let fenced = control.fence(epoch).map_err(to_engine_error)?;
        // The host locks this file; make sure it is there.
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(SHARD).join(LOCK_FILE))
            .map_err(io(LOCK_FILE))?;
        if fenced != read {
            write_control(&fenced)?;
            log(
                Level::Info,
                &format!("fenced by epoch {epoch}: term {} -> {} at {}", read.term, fenced.term, fenced.flush),
            );
        }
        Ok(FenceInfo {
            last: ShardPosition { term: fenced.term, position: fenced.flush },
            locks: vec![FileLock {
                path: LOCK_FILE.into(),
                offset: WRITER_LOCK.0,
                length: WRITER_LOCK.1,
                exclusive: true,
            }],
        })
    }

    fn unfence(_shard: String, epoch: u64) -> Result<(), EngineError> {
        let control = read_control()?;
        let unfenced = control.unfence(epoch).map_err(to_engine_error)?;
        if unfenced != control {
            write_control(&unfenced)?;
        }
        Ok(())
    }

    fn retire(_shard: String, epoch: u64) -> Result<(), EngineError> {
        let control = read_control()?;
        let retired = control.retire(epoch).map_err(to_engine_error)?;
        if retired != control {
            write_control(&retired)?;
        }
        Ok(())
    }
}

/// The layout a snapshot's meta describes: the control file the snapshot
/// must hold (`validate` checks that it does).
fn meta_layout(meta: &SnapshotMeta) -> Result<Control, EngineError> {
    let number = |key: &str| {
        ferry_plugin_sdk::attribute(&meta.attributes, key)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| EngineError::Invalid(format!("snapshot meta has no {key} attribute")))
    };
    let control = Control {
        state: ShardState::Snapshot,
        term: meta.term,
        flush: meta.position,
        commit: number("commit")?,
        segment_size: number("segment-size")?,
        start: number("start")?,
        live: LiveState::default(),
    };
    control.check().map_err(to_engine_error)?;
    Ok(control)
}

impl FileChecks for SegmentLog {
    fn check_files(_shard: String, meta: SnapshotMeta, paths: Vec<String>) -> Result<(), EngineError> {
        #[cfg(feature = "mutant-validate-accepts-anything")]
        {
            let _ = (meta, paths);
            return Ok(());
        }
        #[allow(unreachable_code)]
        let control = meta_layout(&meta)?;
        let mut records = 0;
        for path in &paths {
            records += check_snapshot_file(Path::new(SHARD), &control, path).map_err(to_engine_error)?;
        }
        log(Level::Debug, &format!("checked {} files, {records} records", paths.len()));
        Ok(())
    }
}

fn meta_start(meta: &SnapshotMeta) -> Result<u64, EngineError> {
    meta.attributes
        .iter()
        .find(|(k, _)| k == "start")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| EngineError::Invalid("snapshot meta has no start attribute".into()))
}

ferry_plugin_sdk::export_engine!(SegmentLog);
