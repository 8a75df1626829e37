//! Source side of a catch-up round: a plugin's delta plan as a tar stream.
//!
//! Archive layout (same framing, bounds and checks as a snapshot):
//! 1. `.ferry/delta.json` — the [`DeltaPreamble`]: engine, shard, the round's
//!    [`DeltaMeta`] and every entry (a range of a file, the differing blocks
//!    of a file, an inline file, a removal), in plan order.
//! 2. One data entry per range, blocks or inline entry, named by its path, in
//!    plan order: a range entry holds just the range's bytes, a blocks entry
//!    the bytes of its ranges one after the other.
//! 3. (the source runs the plugin's `delta-check` here)
//! 4. `.ferry/manifest.json` — the [`DeltaManifest`]: size and BLAKE3 of every
//!    data entry, and the meta. Last entry.
//! 5. The end-of-archive blocks.
//!
//! A failure mid-way writes `.ferry/error.json` and stops, as for snapshots,
//! so a cut or aborted round can never pass for a complete one.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::blockdiff::{self, BlockFile, FileDigests};
use super::manifest::{ARCHIVE_FORMAT, FailureCode, FileRecord, MANIFEST_PATH, SourceFailure};
use super::source::{Chunk, Planned, StreamContext, failure, resolve, send, send_entries, send_entry, spawn_producer};
use super::tar;
use crate::plugin::{DeltaEntry, DeltaMeta, EngineError, HookError, PlanEntry, Plugin, ShardPosition};
use crate::relpath::RelPath;

/// Where a delta archive announces itself.
pub const DELTA_PATH: &str = ".ferry/delta.json";

/// One entry of a round as the archive announces it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DeltaEntryInfo {
    /// The data entry `path` holds bytes `[offset, offset + length)` of the
    /// file, to be written at `offset`.
    Range { path: RelPath, offset: u64, length: u64 },
    /// The file becomes `length` bytes long, and the data entry `path` holds
    /// the bytes of `ranges` (`[offset, length]` pairs, ascending, apart),
    /// one after the other, each written at its offset: the blocks that
    /// differ from the receiver's digests (`block_size` apart).
    Blocks { path: RelPath, length: u64, block_size: u32, ranges: Vec<[u64; 2]> },
    /// The data entry `path` (`size` bytes) replaces the whole file.
    Inline { path: RelPath, size: u64 },
    /// The file is removed; no data entry.
    Remove { path: RelPath },
}

impl DeltaEntryInfo {
    /// The file the entry is about.
    pub fn path(&self) -> &RelPath {
        match self {
            DeltaEntryInfo::Range { path, .. }
            | DeltaEntryInfo::Blocks { path, .. }
            | DeltaEntryInfo::Inline { path, .. }
            | DeltaEntryInfo::Remove { path } => path,
        }
    }

    /// Bytes of its data entry; `None` for a removal, which has none.
    pub fn data_size(&self) -> Option<u64> {
        match self {
            DeltaEntryInfo::Range { length, .. } => Some(*length),
            DeltaEntryInfo::Blocks { ranges, .. } => Some(ranges.iter().map(|[_, n]| n).sum()),
            DeltaEntryInfo::Inline { size, .. } => Some(*size),
            DeltaEntryInfo::Remove { .. } => None,
        }
    }
}

/// First entry of a delta archive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaPreamble {
    pub format: u32,
    pub engine: String,
    pub shard: String,
    pub meta: DeltaMeta,
    pub entries: Vec<DeltaEntryInfo>,
}

impl DeltaPreamble {
    /// Bytes of all data entries.
    pub fn data_bytes(&self) -> u64 {
        self.entries.iter().filter_map(DeltaEntryInfo::data_size).sum()
    }
}

/// Last entry of a delta archive: every data entry's record, in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaManifest {
    pub format: u32,
    pub meta: DeltaMeta,
    pub entries: Vec<FileRecord>,
}

/// A round ready to stream: the plan resolved against the shard directory.
pub struct PreparedDelta {
    pub preamble: DeltaPreamble,
    /// The data entries, in preamble order.
    data: Vec<Planned>,
}

/// A hook failure as a source failure, with the code a receiver acts on.
fn hook_failure(step: &str, e: &HookError) -> SourceFailure {
    let code = match e.engine_error() {
        Some(EngineError::HistoryGone(_)) => Some(FailureCode::HistoryGone),
        Some(EngineError::TermChanged(_)) => Some(FailureCode::TermChanged),
        Some(EngineError::Unsupported(_)) => Some(FailureCode::Unsupported),
        _ if matches!(e.kind, crate::plugin::HookErrorKind::Unsupported { .. }) => Some(FailureCode::Unsupported),
        _ => None,
    };
    SourceFailure { code, ..failure(step, e.to_string()) }
}

/// What a round's request gets: the round, or the list of files compared
/// block by block whose digests the receiver must send first.
pub enum Prepared {
    Round(PreparedDelta),
    NeedDigests(Vec<BlockFile>),
}

/// Plans the changes of the live shard in `dir` after `since` and resolves
/// them like a snapshot's files: a range must lie in a regular file (no
/// symlink on the way) within its current size. A block-diff entry is
/// compared with the receiver's `digests` of that file, and becomes the
/// ranges that differ; without them, the answer asks for them.
pub async fn prepare_delta(
    plugin: &Plugin,
    engine: &str,
    shard: &str,
    dir: &Path,
    since: ShardPosition,
    digests: &[FileDigests],
) -> Result<Prepared, SourceFailure> {
    let plan = plugin.changes_since(shard, dir, since).await.map_err(|e| hook_failure("changes-since", &e))?;
    let needed: Vec<BlockFile> = plan
        .entries
        .iter()
        .filter_map(|entry| match entry {
            DeltaEntry::BlockDiff { path, block_size, .. } => {
                let file = BlockFile { path: path.clone(), block_size: *block_size };
                (!digests.iter().any(|d| d.file() == file)).then_some(file)
            }
            _ => None,
        })
        .collect();
    if !needed.is_empty() {
        return Ok(Prepared::NeedDigests(needed));
    }
    let mut infos = Vec::with_capacity(plan.entries.len());
    let mut to_resolve = Vec::new();
    let mut compare = Vec::new();
    for entry in plan.entries {
        match entry {
            DeltaEntry::Range { path, offset, length } => {
                infos.push(DeltaEntryInfo::Range { path: path.clone(), offset, length });
                to_resolve.push(PlanEntry::File { path, offset, length: Some(length) });
            }
            DeltaEntry::Inline { path, contents } => {
                infos.push(DeltaEntryInfo::Inline { path: path.clone(), size: contents.len() as u64 });
                to_resolve.push(PlanEntry::Inline { path, contents });
            }
            DeltaEntry::Remove { path } => infos.push(DeltaEntryInfo::Remove { path }),
            DeltaEntry::BlockDiff { path, block_size, length } => {
                let theirs = digests.iter().find(|d| d.path == path && d.block_size == block_size);
                let theirs = theirs.expect("digests of every block-diff file were checked above");
                let theirs = theirs.decode().map_err(|e| failure("digests", e))?;
                // Placeholder, filled in once the file is compared.
                infos.push(DeltaEntryInfo::Blocks { path: path.clone(), length, block_size, ranges: Vec::new() });
                compare.push((infos.len() - 1, theirs));
                to_resolve.push(PlanEntry::File { path, offset: 0, length: Some(length) });
            }
        }
    }
    let owned = dir.to_owned();
    let data = tokio::task::spawn_blocking(move || {
        let mut data = resolve(&owned, to_resolve)?;
        compare_blocks(&mut infos, &mut data, compare)?;
        Ok::<_, SourceFailure>((infos, data))
    })
    .await
    .map_err(|e| failure("plan", e.to_string()))?;
    let (infos, data) = data?;
    let preamble = DeltaPreamble {
        format: ARCHIVE_FORMAT,
        engine: engine.to_owned(),
        shard: shard.to_owned(),
        meta: plan.meta,
        entries: infos,
    };
    Ok(Prepared::Round(PreparedDelta { preamble, data }))
}

/// Compares each block-diff file with the receiver's digests: its preamble
/// entry gets the differing ranges, its data entry sends just those.
fn compare_blocks(
    infos: &mut [DeltaEntryInfo],
    data: &mut [Planned],
    compare: Vec<(usize, Vec<u128>)>,
) -> Result<(), SourceFailure> {
    // Data entries are in the order of the infos that have data.
    let data_index: Vec<usize> =
        infos.iter().enumerate().filter(|(_, i)| !matches!(i, DeltaEntryInfo::Remove { .. })).map(|(n, _)| n).collect();
    for (info_at, theirs) in compare {
        let DeltaEntryInfo::Blocks { path, length, block_size, ranges } = &mut infos[info_at] else {
            unreachable!("compare lists blocks entries")
        };
        let at = data_index.iter().position(|&n| n == info_at).expect("a blocks entry has data");
        let Planned::File { root, .. } = &data[at] else { unreachable!("a blocks entry is a file") };
        let file = std::fs::File::open(path.join_to(root)).map_err(|e| failure("compare", format!("{path}: {e}")))?;
        let (found, total) = blockdiff::differing_ranges(&file, *length, *block_size, &theirs)
            .map_err(|e| failure("compare", format!("{path}: {e}")))?;
        *ranges = found.iter().map(|&(offset, n)| [offset, n]).collect();
        data[at] = Planned::Ranges { path: path.clone(), root: root.clone(), ranges: found, size: total };
    }
    Ok(())
}

/// Starts producing the round's archive; the receiver yields body chunks.
/// Same flow control as [`super::source::stream`]: a dropped receiver stops
/// the producer at its next send, one that takes nothing for
/// `ctx.stall_timeout` ends the body without a manifest.
pub fn stream_delta(prepared: PreparedDelta, mut ctx: StreamContext) -> mpsc::Receiver<Chunk> {
    let permit = ctx.permit.take();
    spawn_producer("delta", ctx.shard.clone(), ctx.stall_timeout, permit, |tx| async move {
        let PreparedDelta { preamble, data } = prepared;
        let json = serde_json::to_vec(&preamble).expect("delta preamble serializes");
        send_entry(&tx, DELTA_PATH, Bytes::from(json), None).await?;
        let checksums = send_entries(&tx, data, &HashMap::new(), &ctx).await?;
        // The last data entry is out; if the delta no longer describes the
        // shard, the receiver must not get a manifest.
        ctx.plugin
            .delta_check(&ctx.shard, &ctx.dir, &preamble.meta)
            .await
            .map_err(|e| hook_failure("delta-check", &e))?;
        // Data entries are in the order of the infos that have data.
        let data_infos = preamble.entries.iter().filter_map(|e| Some((e.path(), e.data_size()?)));
        let records = data_infos
            .zip(checksums)
            .map(|((path, size), blake3)| FileRecord { path: path.clone(), size, blake3 })
            .collect();
        let manifest = DeltaManifest { format: ARCHIVE_FORMAT, meta: preamble.meta, entries: records };
        let json = serde_json::to_vec(&manifest).expect("delta manifest serializes");
        send_entry(&tx, MANIFEST_PATH, Bytes::from(json), None).await?;
        send(&tx, tar::end()).await
    })
}
