//! The `{{ENGINE}}` engine's Ferry plugin (contract `ferry:engine@0.2.0`),
//! made by `ferry plugin new`. Start from here: it is a complete engine for
//! a simple format, which yours replaces.
//!
//! The format: a shard is a directory of append-only files (no
//! subdirectories; names starting with `.` are the plugin's own).
//! - Position: the bytes of all files (they only grow).
//! - Snapshot: every file up to its current size; `term-check` fails if a
//!   file shrank or went away during the copy.
//! - `check-files` (while the snapshot streams): each file has the size the
//!   snapshot recorded. `validate` (after the last byte): exactly the
//!   snapshot's files.
//! - Catch-up: the host compares every file block by block.
//! - Fence: the marker `.fence` holds the epoch; the engine's writers must
//!   check it before each write (that is the engine's side of the contract).

use std::fs;
use std::path::Path;

use ferry_plugin_sdk::{
    BlockDiffEntry, DeltaEntry, DeltaMeta, DeltaPlan, EngineError, EngineInfo, Entry, FenceInfo, FileChecks, FileEntry,
    Hooks, Live, SHARD, ShardPosition, SnapshotMeta, SnapshotPlan, info, invalid, io_error,
};

const FENCE: &str = ".fence";

struct Engine;

/// The shard's files and their sizes, sorted by name.
fn files(dir: &Path) -> Result<Vec<(String, u64)>, EngineError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_error("shard", e))? {
        let entry = entry.map_err(|e| io_error("shard", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let meta = entry.metadata().map_err(|e| io_error(&name, e))?;
        if !meta.is_file() {
            return Err(EngineError::Unsupported(format!("{name} is not a regular file")));
        }
        out.push((name, meta.len()));
    }
    if out.is_empty() {
        return Err(EngineError::Invalid("the shard has no file".into()));
    }
    out.sort();
    Ok(out)
}

fn position(files: &[(String, u64)]) -> ShardPosition {
    ShardPosition { term: 0, position: files.iter().map(|(_, size)| size).sum() }
}

/// What a meta records: every file's size.
fn recorded(attributes: &[(String, String)]) -> Result<Vec<(String, u64)>, EngineError> {
    let mut out = Vec::new();
    for (name, size) in attributes {
        let size = size.parse().map_err(|_| invalid(name, "the meta's size is not a number"))?;
        out.push((name.clone(), size));
    }
    out.sort();
    Ok(out)
}

/// The fence marker: `Ok(epoch)` while fenced, `Err(epoch)` once retired.
fn marker(dir: &Path) -> Result<Option<Result<u64, u64>>, EngineError> {
    let text = match fs::read_to_string(dir.join(FENCE)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(FENCE, e)),
    };
    let bad = || invalid(FENCE, format!("holds {text:?}"));
    Ok(Some(match text.trim().strip_prefix("retired ") {
        Some(epoch) => Err(epoch.parse().map_err(|_| bad())?),
        None => Ok(text.trim().parse().map_err(|_| bad())?),
    }))
}

fn fenced(by: u64) -> EngineError {
    EngineError::Fenced(format!("fenced by transfer epoch {by}"))
}

impl Hooks for Engine {
    fn describe() -> EngineInfo {
        EngineInfo { name: "{{ENGINE}}".into(), plugin_version: env!("CARGO_PKG_VERSION").into(), snapshot_format: 1 }
    }

    fn shard_status(_shard: String) -> Result<ShardPosition, EngineError> {
        Ok(position(&files(Path::new(SHARD))?))
    }

    fn create_snapshot(shard: String) -> Result<SnapshotPlan, EngineError> {
        let files = files(Path::new(SHARD))?;
        info(&format!("snapshot of {shard}: {} files", files.len()));
        let entries = files
            .iter()
            .map(|(name, size)| Entry::File(FileEntry { path: name.clone(), offset: 0, length: Some(*size) }))
            .collect();
        let attributes = files.iter().map(|(name, size)| (name.clone(), size.to_string())).collect();
        let at = position(&files);
        Ok(SnapshotPlan { meta: SnapshotMeta { term: at.term, position: at.position, attributes }, entries })
    }

    fn term_check(_shard: String, meta: SnapshotMeta) -> Result<(), EngineError> {
        let now = files(Path::new(SHARD))?;
        for (name, size) in recorded(&meta.attributes)? {
            match now.iter().find(|(n, _)| *n == name) {
                Some((_, now)) if *now >= size => {}
                _ => return Err(EngineError::TermChanged(format!("{name} shrank or went away during the snapshot"))),
            }
        }
        Ok(())
    }

    fn validate(_shard: String, meta: SnapshotMeta) -> Result<ShardPosition, EngineError> {
        let now = files(Path::new(SHARD))?;
        let want = recorded(&meta.attributes)?;
        if now != want {
            return Err(EngineError::Invalid(format!("the copy holds {now:?}, the snapshot {want:?}")));
        }
        Ok(position(&now))
    }

    fn apply(_shard: String, _meta: SnapshotMeta) -> Result<(), EngineError> {
        Ok(())
    }
}

impl Live for Engine {
    fn changes_since(_shard: String, since: ShardPosition) -> Result<DeltaPlan, EngineError> {
        let dir = Path::new(SHARD);
        if let Some(Err(epoch)) = marker(dir)? {
            return Err(EngineError::Fenced(format!("retired by transfer epoch {epoch}")));
        }
        let files = files(dir)?;
        let entries = files
            .iter()
            .map(|(name, size)| {
                DeltaEntry::BlockDiff(BlockDiffEntry { path: name.clone(), block_size: 4096, length: *size })
            })
            .collect();
        let attributes = files.iter().map(|(name, size)| (name.clone(), size.to_string())).collect();
        let meta = DeltaMeta { term: 0, since: since.position, until: position(&files).position, attributes };
        Ok(DeltaPlan { meta, entries })
    }

    fn delta_check(_shard: String, _meta: DeltaMeta) -> Result<(), EngineError> {
        // Block diffs read while writes go on are repaired by the next round;
        // the round under the fence is exact.
        Ok(())
    }

    fn apply_changes(_shard: String, meta: DeltaMeta) -> Result<ShardPosition, EngineError> {
        let now = files(Path::new(SHARD))?;
        for (name, size) in recorded(&meta.attributes)? {
            if !now.iter().any(|(n, s)| *n == name && *s == size) {
                return Err(invalid(&name, format!("is not the source's {size} bytes")));
            }
        }
        Ok(position(&now))
    }

    fn fence(_shard: String, epoch: u64) -> Result<FenceInfo, EngineError> {
        let dir = Path::new(SHARD);
        match marker(dir)? {
            Some(Ok(by)) | Some(Err(by)) if by != epoch => return Err(fenced(by)),
            Some(Err(_)) => return Err(EngineError::Fenced(format!("retired by transfer epoch {epoch}"))),
            _ => {}
        }
        fs::write(dir.join(FENCE), epoch.to_string()).map_err(|e| io_error(FENCE, e))?;
        Ok(FenceInfo { last: position(&files(dir)?), locks: Vec::new() })
    }

    fn unfence(_shard: String, epoch: u64) -> Result<(), EngineError> {
        let dir = Path::new(SHARD);
        match marker(dir)? {
            None => Ok(()),
            Some(Ok(by)) if by == epoch => fs::remove_file(dir.join(FENCE)).map_err(|e| io_error(FENCE, e)),
            Some(Ok(by)) | Some(Err(by)) => Err(fenced(by)),
        }
    }

    fn retire(_shard: String, epoch: u64) -> Result<(), EngineError> {
        let dir = Path::new(SHARD);
        match marker(dir)? {
            Some(Err(by)) if by == epoch => Ok(()),
            Some(Ok(by)) | Some(Err(by)) if by != epoch => Err(fenced(by)),
            _ => fs::write(dir.join(FENCE), format!("retired {epoch}")).map_err(|e| io_error(FENCE, e)),
        }
    }
}

/// Checks of single files, while later files of a snapshot still arrive:
/// each file on its own, against what the meta recorded. Put the checks of
/// your format that read one file here (its checksums, its records), so
/// they run during the transfer rather than after it.
impl FileChecks for Engine {
    fn check_files(_shard: String, meta: SnapshotMeta, paths: Vec<String>) -> Result<(), EngineError> {
        let want = recorded(&meta.attributes)?;
        for path in paths {
            let Some((_, size)) = want.iter().find(|(name, _)| *name == path) else {
                return Err(invalid(&path, "is not in the snapshot"));
            };
            let len = fs::metadata(Path::new(SHARD).join(&path)).map_err(|e| io_error(&path, e))?.len();
            if len != *size {
                return Err(invalid(&path, format!("is {len} bytes, the snapshot's was {size}")));
            }
        }
        Ok(())
    }
}

ferry_plugin_sdk::export_engine!(Engine);
