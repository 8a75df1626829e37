//! Ferry plugin for the `segment-log` engine: a write-ahead log of fixed-size
//! segments and a control file (see the `segment-log-format` crate).
//!
//! - `create-snapshot`: the control file, re-serialized inline in `snapshot`
//!   state, and the segments from `start` up to the flush position (the last
//!   one cut at the flush position, as a byte range the host streams).
//! - `term-check`: re-reads the control file; the term must not have moved and
//!   the log must not have been cut below the snapshot.
//! - `validate`: contiguity, sizes, every record's CRC, control consistency.
//! - `apply`: extends the last segment to full size and rewrites the control
//!   file as `active` for its new home.

wit_bindgen::generate!({
    world: "engine",
    path: "../../wit/v0.1.0",
});

use std::fs;
use std::path::Path;

use exports::ferry::engine::hooks::Guest;
use ferry::engine::log::{Level, log};
use ferry::engine::types::{
    EngineError, EngineInfo, Entry, FileEntry, InlineEntry, ShardPosition, SnapshotMeta, SnapshotPlan,
};
use segment_log_format::{CONTROL_FILE, Control, FormatError, ShardState, check_shard, segment_name};

const SHARD: &str = "/shard";

struct SegmentLog;

fn to_engine_error(err: FormatError) -> EngineError {
    match err {
        FormatError::Io { .. } => EngineError::Io(err.to_string()),
        FormatError::Invalid(msg) => EngineError::Invalid(msg),
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

impl Guest for SegmentLog {
    fn describe() -> EngineInfo {
        EngineInfo {
            name: "segment-log".into(),
            plugin_version: env!("CARGO_PKG_VERSION").into(),
            snapshot_format: segment_log_format::FORMAT_VERSION,
        }
    }

    fn shard_status(_shard: String) -> Result<ShardPosition, EngineError> {
        let control = read_control()?;
        Ok(ShardPosition { term: control.term, position: control.flush })
    }

    fn create_snapshot(shard: String) -> Result<SnapshotPlan, EngineError> {
        let control = read_control()?;
        if control.state != ShardState::Active {
            return Err(EngineError::Invalid(format!("shard {shard} is a received snapshot that was never applied")));
        }
        let snapshot_control = Control { state: ShardState::Snapshot, ..control };
        let mut entries = vec![Entry::Inline(InlineEntry {
            path: CONTROL_FILE.into(),
            contents: snapshot_control.encode().to_vec(),
        })];
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
        if control.term != meta.term {
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
        let summary = check_shard(Path::new(SHARD)).map_err(to_engine_error)?;
        let control = summary.control;
        if control.state != ShardState::Snapshot {
            return Err(EngineError::Invalid("control file is not in snapshot state".into()));
        }
        check_meta(&control, &meta)?;
        log(Level::Info, &format!("validated {} segments, {} records", summary.segments, summary.records));
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

fn meta_start(meta: &SnapshotMeta) -> Result<u64, EngineError> {
    meta.attributes
        .iter()
        .find(|(k, _)| k == "start")
        .and_then(|(_, v)| v.parse().ok())
        .ok_or_else(|| EngineError::Invalid("snapshot meta has no start attribute".into()))
}

export!(SegmentLog);
