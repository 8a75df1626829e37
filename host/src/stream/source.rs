//! Source side: turn a plugin's snapshot plan into a tar stream.
//!
//! Memory is bounded: file data is read in [`CHUNK`]-sized pieces into a
//! channel of [`IN_FLIGHT`] chunks that the HTTP body drains, so a slow
//! receiver slows the reads (backpressure) instead of growing buffers.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::manifest::{
    ARCHIVE_FORMAT, Checksum, ERROR_PATH, EntryInfo, FileRecord, IdEntry, MANIFEST_PATH, Manifest, PREAMBLE_PATH,
    Preamble, ResumeRequest, SourceFailure, snapshot_id,
};
use super::ratelimit::RateLimiter;
use super::tar;
use crate::plugin::{PlanEntry, Plugin};
use crate::relpath::RelPath;

/// Size of one read from disk and of one body chunk.
pub const CHUNK: usize = 1 << 20;
/// Chunks buffered between the disk reader and the network.
pub const IN_FLIGHT: usize = 4;

/// One entry, resolved against the shard directory.
enum Planned {
    Inline { path: RelPath, contents: Bytes },
    File { path: RelPath, source: PathBuf, offset: u64, size: u64 },
}

impl Planned {
    fn path(&self) -> &RelPath {
        match self {
            Planned::Inline { path, .. } | Planned::File { path, .. } => path,
        }
    }

    fn size(&self) -> u64 {
        match self {
            Planned::Inline { contents, .. } => contents.len() as u64,
            Planned::File { size, .. } => *size,
        }
    }
}

/// A snapshot ready to stream: the plan resolved, the resume decided.
pub struct PreparedSnapshot {
    pub preamble: Preamble,
    entries: Vec<Planned>,
    skipped: HashMap<RelPath, FileRecord>,
}

fn failure(step: &str, message: impl Into<String>) -> SourceFailure {
    SourceFailure { step: step.into(), message: message.into() }
}

/// Plans a snapshot of the live shard in `dir` and decides which files the
/// receiver need not be sent again: those it holds of the same snapshot
/// whose size and checksum match the source's own bytes.
pub async fn prepare(
    plugin: &Plugin,
    engine: &str,
    shard: &str,
    dir: &Path,
    resume: &ResumeRequest,
) -> Result<PreparedSnapshot, SourceFailure> {
    let plan = plugin.create_snapshot(shard, dir).await.map_err(|e| failure("create-snapshot", e.to_string()))?;
    let dir = dir.to_owned();
    let plan_entries = plan.entries;
    let entries = tokio::task::spawn_blocking(move || resolve(&dir, plan_entries))
        .await
        .map_err(|e| failure("plan", e.to_string()))??;

    let id = snapshot_id(
        engine,
        shard,
        &plan.meta,
        entries.iter().map(|e| match e {
            Planned::Inline { path, contents } => IdEntry::Inline { path, contents },
            Planned::File { path, offset, size, .. } => IdEntry::File { path, offset: *offset, size: *size },
        }),
    );

    let mut skipped = HashMap::new();
    if resume.snapshot_id.as_deref() == Some(id.as_str()) && !resume.have.is_empty() {
        let have: HashMap<&RelPath, &FileRecord> = resume.have.iter().map(|r| (&r.path, r)).collect();
        for entry in &entries {
            let Some(record) = have.get(entry.path()) else { continue };
            if record.size != entry.size() {
                continue;
            }
            if checksum(entry).await? == record.blake3 {
                skipped.insert(entry.path().clone(), (*record).clone());
            }
        }
    }

    let preamble = Preamble {
        format: ARCHIVE_FORMAT,
        snapshot_id: id,
        engine: engine.to_owned(),
        shard: shard.to_owned(),
        snapshot_format: plugin.info().snapshot_format,
        meta: plan.meta,
        entries: entries.iter().map(|e| EntryInfo { path: e.path().clone(), size: e.size() }).collect(),
        skipped: entries.iter().filter(|e| skipped.contains_key(e.path())).map(|e| e.path().clone()).collect(),
    };
    Ok(PreparedSnapshot { preamble, entries, skipped })
}

/// Checks every file entry names a regular file inside `dir` (no symlink on
/// the way out) and fixes its size.
fn resolve(dir: &Path, plan: Vec<PlanEntry>) -> Result<Vec<Planned>, SourceFailure> {
    let root = dir.canonicalize().map_err(|e| failure("plan", format!("{}: {e}", dir.display())))?;
    let mut out = Vec::with_capacity(plan.len());
    for entry in plan {
        out.push(match entry {
            PlanEntry::Inline { path, contents } => Planned::Inline { path, contents: Bytes::from(contents) },
            PlanEntry::File { path, offset, length } => {
                let source = path.join_to(&root);
                let real = source.canonicalize().map_err(|e| failure("plan", format!("{path}: {e}")))?;
                if real != source {
                    return Err(failure("plan", format!("{path} goes through a symlink")));
                }
                let meta = std::fs::symlink_metadata(&source).map_err(|e| failure("plan", format!("{path}: {e}")))?;
                if !meta.is_file() {
                    return Err(failure("plan", format!("{path} is not a regular file")));
                }
                let len = meta.len();
                let size = match length {
                    Some(length) => length,
                    None => len.saturating_sub(offset),
                };
                if offset.checked_add(size).is_none_or(|end| end > len) {
                    return Err(failure(
                        "plan",
                        format!("{path}: range {offset}+{size} is past the file's {len} bytes"),
                    ));
                }
                Planned::File { path, source, offset, size }
            }
        });
    }
    Ok(out)
}

fn open_range(source: &Path, offset: u64) -> io::Result<File> {
    let mut file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(source)?;
    file.seek(SeekFrom::Start(offset))?;
    Ok(file)
}

/// The checksum of an entry's bytes as the source has them now.
async fn checksum(entry: &Planned) -> Result<Checksum, SourceFailure> {
    match entry {
        Planned::Inline { contents, .. } => Ok(Checksum(*blake3::hash(contents).as_bytes())),
        Planned::File { path, source, offset, size } => {
            let (source, offset, size, path) = (source.clone(), *offset, *size, path.clone());
            tokio::task::spawn_blocking(move || {
                let mut file = open_range(&source, offset)?;
                let mut hasher = blake3::Hasher::new();
                let copied = io::copy(&mut (&mut file).take(size), &mut hasher)?;
                if copied != size {
                    return Err(io::Error::other(format!("shrank to {copied} of {size} bytes")));
                }
                Ok(Checksum::of(&hasher))
            })
            .await
            .map_err(|e| failure("resume", e.to_string()))?
            .map_err(|e| failure("resume", format!("{path}: {e}")))
        }
    }
}

/// What the producer needs besides the prepared snapshot.
pub struct StreamContext {
    pub plugin: Arc<Plugin>,
    pub shard: String,
    pub dir: PathBuf,
    pub rate: Arc<RateLimiter>,
    /// Held until the stream ends (an outgoing-transfer slot).
    pub permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

pub type Chunk = Result<Bytes, io::Error>;

/// Starts producing the archive; the receiver yields body chunks. If the
/// receiver is dropped (client gone, transfer cancelled), the producer stops
/// at its next send.
pub fn stream(prepared: PreparedSnapshot, ctx: StreamContext) -> mpsc::Receiver<Chunk> {
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    tokio::spawn(async move {
        let shard = ctx.shard.clone();
        match produce(&tx, prepared, &ctx).await {
            Ok(()) => tracing::info!(shard, "snapshot sent"),
            Err(Produce::Gone) => tracing::info!(shard, "receiver went away; snapshot stopped"),
            Err(Produce::Failed(failure)) => {
                tracing::warn!(shard, "snapshot aborted: {failure}");
                // Say why, then stop: no manifest and no end-of-archive, so
                // the archive can never pass for a complete snapshot. The HTTP
                // body itself ends normally: a body that ends in an error makes
                // hyper drop what it has not flushed, the reason included.
                if let Ok(json) = serde_json::to_vec(&failure) {
                    let _ = send_entry(&tx, ERROR_PATH, Bytes::from(json), None).await;
                }
            }
        }
        drop(ctx.permit);
    });
    rx
}

enum Produce {
    Gone,
    Failed(SourceFailure),
}

impl From<SourceFailure> for Produce {
    fn from(f: SourceFailure) -> Self {
        Produce::Failed(f)
    }
}

async fn send(tx: &mpsc::Sender<Chunk>, bytes: Bytes) -> Result<(), Produce> {
    tx.send(Ok(bytes)).await.map_err(|_| Produce::Gone)
}

async fn send_entry(
    tx: &mpsc::Sender<Chunk>,
    path: &str,
    contents: Bytes,
    rate: Option<&RateLimiter>,
) -> Result<(), Produce> {
    let path = RelPath::new(path).expect("control entry paths are valid");
    let size = contents.len() as u64;
    send(tx, tar::header(&path, size)).await?;
    if let Some(rate) = rate {
        rate.acquire(size).await;
    }
    send(tx, contents).await?;
    if let Some(pad) = tar::padding(size) {
        send(tx, pad).await?;
    }
    Ok(())
}

async fn produce(tx: &mpsc::Sender<Chunk>, prepared: PreparedSnapshot, ctx: &StreamContext) -> Result<(), Produce> {
    let PreparedSnapshot { preamble, entries, skipped } = prepared;
    let json = serde_json::to_vec(&preamble).expect("preamble serializes");
    send_entry(tx, PREAMBLE_PATH, Bytes::from(json), None).await?;

    let mut records = Vec::with_capacity(entries.len());
    for entry in entries {
        if let Some(record) = skipped.get(entry.path()) {
            records.push(record.clone());
            continue;
        }
        let size = entry.size();
        send(tx, tar::header(entry.path(), size)).await?;
        let blake3 = match &entry {
            Planned::Inline { contents, .. } => {
                ctx.rate.acquire(size).await;
                send(tx, contents.clone()).await?;
                Checksum(*blake3::hash(contents).as_bytes())
            }
            Planned::File { path, source, offset, .. } => send_file(tx, path, source, *offset, size, &ctx.rate).await?,
        };
        if let Some(pad) = tar::padding(size) {
            send(tx, pad).await?;
        }
        records.push(FileRecord { path: entry.path().clone(), size, blake3 });
    }

    // The last data entry is out; the archive is not finished. If the term
    // moved, the snapshot is void and the receiver must not get a manifest.
    ctx.plugin
        .term_check(&ctx.shard, &ctx.dir, &preamble.meta)
        .await
        .map_err(|e| failure("term-check", e.to_string()))?;

    let manifest =
        Manifest { format: ARCHIVE_FORMAT, snapshot_id: preamble.snapshot_id, meta: preamble.meta, entries: records };
    let json = serde_json::to_vec(&manifest).expect("manifest serializes");
    send_entry(tx, MANIFEST_PATH, Bytes::from(json), None).await?;
    send(tx, tar::end()).await
}

/// Streams `size` bytes of `source` from `offset`, hashing on the way.
async fn send_file(
    tx: &mpsc::Sender<Chunk>,
    path: &RelPath,
    source: &Path,
    offset: u64,
    size: u64,
    rate: &RateLimiter,
) -> Result<Checksum, Produce> {
    let read_failed = |e: io::Error| Produce::Failed(failure("read", format!("{path}: {e}")));
    let source = source.to_owned();
    let mut file = tokio::task::spawn_blocking(move || open_range(&source, offset))
        .await
        .map_err(|e| read_failed(io::Error::other(e)))?
        .map_err(read_failed)?;
    let mut hasher = blake3::Hasher::new();
    let mut left = size;
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        let (back_file, back_hasher, chunk) = tokio::task::spawn_blocking(move || {
            let mut buf = BytesMut::zeroed(want);
            let mut filled = 0;
            while filled < want {
                match file.read(&mut buf[filled..]) {
                    Ok(0) => {
                        return Err(io::Error::other(format!(
                            "file shrank while being sent ({} bytes short)",
                            want - filled
                        )));
                    }
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            hasher.update(&buf);
            Ok((file, hasher, buf.freeze()))
        })
        .await
        .map_err(|e| read_failed(io::Error::other(e)))?
        .map_err(read_failed)?;
        file = back_file;
        hasher = back_hasher;
        left -= chunk.len() as u64;
        rate.acquire(chunk.len() as u64).await;
        send(tx, chunk).await?;
    }
    Ok(Checksum::of(&hasher))
}
