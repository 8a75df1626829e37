//! Source side: turn a plugin's snapshot plan into a tar stream.
//!
//! Memory is bounded: file data is read in [`CHUNK`]-sized pieces (from a
//! small pool of reused buffers) into a channel of [`IN_FLIGHT`] chunks that
//! the HTTP body drains, so a slow receiver slows the reads (backpressure)
//! instead of growing buffers. A receiver that takes nothing for the stall
//! timeout ends the stream and frees its outgoing slot, so a client that
//! asks and never reads cannot hold a slot for ever. Small files are read in
//! batches of up to a chunk, each batch one piece of the archive, so 20,000
//! small files are not 20,000 disk round trips and thread hops one after
//! another.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use super::buffer::BufferPool;
use super::manifest::{
    ARCHIVE_FORMAT, Checksum, ERROR_PATH, EntryInfo, FileRecord, FileRecordRef, IdEntry, MANIFEST_PATH, ManifestRef,
    PREAMBLE_PATH, Preamble, ResumeRequest, SourceFailure, snapshot_id,
};
use super::ratelimit::RateLimiter;
use super::tar;
use crate::plugin::{EngineError, PlanEntry, Plugin};
use crate::relpath::RelPath;

/// Size of one read from disk and of one body chunk.
pub const CHUNK: usize = 1 << 20;
/// Chunks buffered between the disk reader and the network.
pub const IN_FLIGHT: usize = 4;

/// One entry, resolved against the shard directory.
pub(super) enum Planned {
    Inline {
        path: RelPath,
        contents: Bytes,
    },
    /// Bytes `[offset, offset + size)` of `root/path`.
    File {
        path: RelPath,
        root: Root,
        offset: u64,
        size: u64,
    },
    /// Byte ranges `(offset, length)` of one file, sent one after the other
    /// as one entry (a block diff's differing blocks); `size` is their sum.
    Ranges {
        path: RelPath,
        root: Root,
        ranges: Vec<(u64, u64)>,
        size: u64,
    },
}

/// The resolved shard directory a plan's files are in: one copy shared by
/// all of them (a plan has up to 100,000), each file's own path joined to
/// it only when the file is opened.
pub(super) type Root = Arc<Path>;

impl Planned {
    pub(super) fn path(&self) -> &RelPath {
        match self {
            Planned::Inline { path, .. } | Planned::File { path, .. } | Planned::Ranges { path, .. } => path,
        }
    }

    pub(super) fn size(&self) -> u64 {
        match self {
            Planned::Inline { contents, .. } => contents.len() as u64,
            Planned::File { size, .. } | Planned::Ranges { size, .. } => *size,
        }
    }
}

/// A snapshot ready to stream: the plan resolved, the resume decided.
pub struct PreparedSnapshot {
    pub preamble: Preamble,
    entries: Vec<Planned>,
    skipped: HashMap<RelPath, FileRecord>,
}

pub(super) fn failure(step: &str, message: impl Into<String>) -> SourceFailure {
    SourceFailure { step: step.into(), message: message.into(), code: None }
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
            Planned::Ranges { .. } => unreachable!("a snapshot plan resolves to whole entries"),
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
/// the way, checked per directory rather than by resolving every path) and
/// fixes its size.
pub(super) fn resolve(dir: &Path, plan: Vec<PlanEntry>) -> Result<Vec<Planned>, SourceFailure> {
    let root: Root = dir.canonicalize().map_err(|e| failure("plan", format!("{}: {e}", dir.display())))?.into();
    let mut out = Vec::with_capacity(plan.len());
    // Directories already found to be real directories (not symlinks), each
    // checked once however many files it holds.
    let mut real_dirs: HashSet<&str> = HashSet::new();
    let not_real = |path: &RelPath, e: io::Error| failure("plan", format!("{path}: {e}"));
    for entry in &plan {
        if let PlanEntry::File { path, .. } = entry {
            for parent in path.parents() {
                if real_dirs.contains(parent) {
                    continue;
                }
                let meta = std::fs::symlink_metadata(root.join(parent)).map_err(|e| not_real(path, e))?;
                if meta.file_type().is_symlink() {
                    return Err(failure("plan", format!("{path} goes through a symlink")));
                }
                if !meta.is_dir() {
                    return Err(failure("plan", format!("{path}: {parent} is not a directory")));
                }
                real_dirs.insert(parent);
            }
        }
    }
    drop(real_dirs);
    for entry in plan {
        out.push(match entry {
            PlanEntry::Inline { path, contents } => Planned::Inline { path, contents: Bytes::from(contents) },
            PlanEntry::File { path, offset, length } => {
                let source = path.join_to(&root);
                let meta = std::fs::symlink_metadata(&source).map_err(|e| not_real(&path, e))?;
                if meta.file_type().is_symlink() {
                    return Err(failure("plan", format!("{path} goes through a symlink")));
                }
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
                Planned::File { path, root: root.clone(), offset, size }
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
        Planned::Ranges { path, .. } => Err(failure("resume", format!("{path}: block ranges are not resumed"))),
        Planned::File { path, root, offset, size } => {
            let (source, offset, size, path) = (path.join_to(root), *offset, *size, path.clone());
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
    /// A chunk the receiver does not take within this long ends the stream.
    pub stall_timeout: Duration,
    /// A snapshot for a live move: one whose term-check fails for writes
    /// during the copy is sent as fuzzy instead of void (see
    /// [`Manifest::fuzzy`]).
    pub fuzzy_ok: bool,
}

pub type Chunk = Result<Bytes, io::Error>;

/// Starts producing the archive; the receiver yields body chunks. If the
/// receiver is dropped (client gone, transfer cancelled), the producer stops
/// at its next send; if it takes no chunk for `ctx.stall_timeout`, the
/// producer stops too and the body ends without a manifest.
pub fn stream(prepared: PreparedSnapshot, mut ctx: StreamContext) -> mpsc::Receiver<Chunk> {
    let permit = ctx.permit.take();
    spawn_producer("snapshot", ctx.shard.clone(), ctx.stall_timeout, permit, |tx| async move {
        produce(&tx, prepared, &ctx).await
    })
}

/// Runs `produce` on its own task, feeding the returned channel, and ends the
/// archive as its outcome says: a failure becomes `.ferry/error.json`.
/// `permit` is held until the producer is done.
pub(super) fn spawn_producer<F, Fut>(
    what: &'static str,
    shard: String,
    stall: Duration,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
    produce: F,
) -> mpsc::Receiver<Chunk>
where
    F: FnOnce(Out) -> Fut,
    Fut: Future<Output = Result<(), Produce>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    let out = Out { tx, stall };
    let tx = out.clone();
    let work = produce(out);
    tokio::spawn(async move {
        match work.await {
            Ok(()) => tracing::info!(shard, "{what} sent"),
            Err(Produce::Gone) => tracing::info!(shard, "receiver went away; {what} stopped"),
            Err(Produce::Stalled) => {
                tracing::warn!(shard, "the receiver took nothing for {stall:?}; {what} stopped");
            }
            Err(Produce::Failed(failure)) => {
                tracing::warn!(shard, "{what} aborted: {failure}");
                // Say why, then stop: no manifest and no end-of-archive, so
                // the archive can never pass for a complete snapshot. The HTTP
                // body itself ends normally: a body that ends in an error makes
                // hyper drop what it has not flushed, the reason included.
                if let Ok(json) = serde_json::to_vec(&failure) {
                    let _ = send_entry(&tx, ERROR_PATH, Bytes::from(json), None).await;
                }
            }
        }
        drop(permit);
    });
    rx
}

/// How a producer stopped early.
pub(super) enum Produce {
    Gone,
    /// The receiver stopped taking data.
    Stalled,
    Failed(SourceFailure),
}

impl From<SourceFailure> for Produce {
    fn from(f: SourceFailure) -> Self {
        Produce::Failed(f)
    }
}

/// The body's channel, and how long a chunk may wait for room in it.
#[derive(Clone)]
pub(super) struct Out {
    tx: mpsc::Sender<Chunk>,
    stall: Duration,
}

pub(super) async fn send(out: &Out, bytes: Bytes) -> Result<(), Produce> {
    out.tx.send_timeout(Ok(bytes), out.stall).await.map_err(|e| match e {
        mpsc::error::SendTimeoutError::Timeout(_) => Produce::Stalled,
        mpsc::error::SendTimeoutError::Closed(_) => Produce::Gone,
    })
}

pub(super) async fn send_entry(
    tx: &Out,
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

async fn produce(tx: &Out, prepared: PreparedSnapshot, ctx: &StreamContext) -> Result<(), Produce> {
    let PreparedSnapshot { preamble, entries, skipped } = prepared;
    let preamble = send_json(tx, PREAMBLE_PATH, preamble, |p, out| serde_json::to_writer(out, p)).await?;
    let checksums = send_entries(tx, entries, &skipped, ctx).await?;

    // The last data entry is out; the archive is not finished. If the term
    // moved, the snapshot is void and the receiver must not get a manifest,
    // unless a live move's rounds will complete it.
    let fuzzy = match ctx.plugin.term_check(&ctx.shard, &ctx.dir, &preamble.meta).await {
        Ok(()) => false,
        Err(e) if ctx.fuzzy_ok && matches!(e.engine_error(), Some(EngineError::TermChanged(_))) => {
            tracing::info!(shard = %ctx.shard, "the shard was written to during the snapshot ({e}): sent as fuzzy");
            true
        }
        Err(e) => return Err(failure("term-check", e.to_string()).into()),
    };

    send_json(tx, MANIFEST_PATH, (preamble, checksums, fuzzy), |(preamble, checksums, fuzzy), out| {
        let records = preamble.entries.iter().zip(checksums).map(|(e, &blake3)| FileRecordRef {
            path: &e.path,
            size: e.size,
            blake3,
        });
        let manifest = ManifestRef {
            format: ARCHIVE_FORMAT,
            snapshot_id: &preamble.snapshot_id,
            meta: &preamble.meta,
            entries: Records(records),
            fuzzy: *fuzzy,
        };
        serde_json::to_writer(out, &manifest)
    })
    .await?;
    send(tx, tar::end()).await
}

/// Serializes an iterator of records as a JSON list (each time from the start).
struct Records<I>(I);

impl<'a, I: Iterator<Item = FileRecordRef<'a>> + Clone> serde::Serialize for Records<I> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.clone())
    }
}

/// Sends the JSON that `write` makes of `state` as the entry `path`, in
/// pieces as it is made: a preamble or a manifest has an item per file and
/// is never whole in memory. `write` runs twice on a blocking thread, first
/// to size the entry's header; `state` goes there and comes back.
async fn send_json<S: Send + 'static>(
    tx: &Out,
    path: &str,
    state: S,
    write: fn(&S, &mut dyn io::Write) -> serde_json::Result<()>,
) -> Result<S, Produce> {
    let (size_tx, size_rx) = tokio::sync::oneshot::channel();
    let (pieces_tx, mut pieces) = mpsc::channel::<Bytes>(2);
    let writer = tokio::task::spawn_blocking(move || {
        let mut count = Count(0);
        write(&state, &mut count).expect("control entries serialize");
        if size_tx.send(count.0).is_ok() {
            let mut out = Pieces { tx: pieces_tx, piece: Vec::with_capacity(JSON_PIECE) };
            // Fails only when the reader below is gone, which says why.
            let _ = write(&state, &mut out).map_err(io::Error::from).and_then(|()| io::Write::flush(&mut out));
        }
        state
    });
    let failed = |why: String| Produce::Failed(failure("send", format!("{path}: {why}")));
    let size = size_rx.await.map_err(|_| failed("serializing failed".into()))? as u64;
    let entry = RelPath::new(path).expect("control entry paths are valid");
    send(tx, tar::header(&entry, size)).await?;
    let mut sent = 0;
    while let Some(piece) = pieces.recv().await {
        sent += piece.len() as u64;
        send(tx, piece).await?;
    }
    let state = writer.await.map_err(|e| failed(e.to_string()))?;
    if sent != size {
        return Err(failed(format!("serialized {sent} bytes of the {size} announced")));
    }
    if let Some(pad) = tar::padding(size) {
        send(tx, pad).await?;
    }
    Ok(state)
}

/// Bytes of JSON per piece of archive.
const JSON_PIECE: usize = 64 << 10;

/// Counts what is written.
struct Count(usize);

impl io::Write for Count {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Hands what is written to a channel, [`JSON_PIECE`] bytes at a time.
struct Pieces {
    tx: mpsc::Sender<Bytes>,
    piece: Vec<u8>,
}

impl io::Write for Pieces {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.piece.extend_from_slice(buf);
        if self.piece.len() >= JSON_PIECE {
            self.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.piece.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.piece, Vec::with_capacity(JSON_PIECE));
        self.tx.blocking_send(Bytes::from(piece)).map_err(|_| io::Error::other("the archive's reader is gone"))
    }
}

/// Sends the data entries in order (those in `skipped` only recorded), each
/// hashed on the way; returns their checksums for the manifest, in order.
/// What was sent is counted in the engine's `ferry_stream_sent_*` metrics.
pub(super) async fn send_entries(
    tx: &Out,
    entries: Vec<Planned>,
    skipped: &HashMap<RelPath, FileRecord>,
    ctx: &StreamContext,
) -> Result<Vec<Checksum>, Produce> {
    let rate = &*ctx.rate;
    let metrics = crate::metrics::global();
    let engine = crate::metrics::Metrics::engine(&ctx.plugin.name());
    let (sent_bytes, sent_files) =
        (metrics.sent_bytes.get_or_create_owned(&engine), metrics.sent_files.get_or_create_owned(&engine));
    // Chunks in the channel, one being read, and a few the HTTP layer holds.
    let buffers = BufferPool::new(CHUNK, IN_FLIGHT + 4);
    let mut checksums = Vec::with_capacity(entries.len());
    let mut entries = entries.into_iter().peekable();
    while let Some(entry) = entries.next() {
        if let Some(record) = skipped.get(entry.path()) {
            checksums.push(record.blake3);
            continue;
        }
        if is_small_file(&entry) {
            // Small files go in batches: one piece of archive per batch.
            let mut batch = vec![entry];
            let mut bytes = batch[0].size();
            while let Some(next) = entries.next_if(|next| {
                is_small_file(next)
                    && !skipped.contains_key(next.path())
                    && bytes + next.size() <= BATCH_BYTES
                    && batch.len() < BATCH_FILES
            }) {
                bytes += next.size();
                batch.push(next);
            }
            let (piece, batch_checksums) = read_batch(batch).await?;
            rate.acquire(bytes).await;
            send(tx, piece).await?;
            sent_bytes.inc_by(bytes);
            sent_files.inc_by(batch_checksums.len() as u64);
            checksums.extend(batch_checksums);
            continue;
        }
        let size = entry.size();
        send(tx, tar::header(entry.path(), size)).await?;
        let blake3 = match &entry {
            Planned::Inline { contents, .. } => {
                rate.acquire(size).await;
                send(tx, contents.clone()).await?;
                sent_bytes.inc_by(size);
                Checksum(*blake3::hash(contents).as_bytes())
            }
            Planned::File { path, root, offset, .. } => {
                send_file(tx, path, path.join_to(root), &[(*offset, size)], rate, &buffers, &sent_bytes).await?
            }
            Planned::Ranges { path, root, ranges, .. } => {
                send_file(tx, path, path.join_to(root), ranges, rate, &buffers, &sent_bytes).await?
            }
        };
        if let Some(pad) = tar::padding(size) {
            send(tx, pad).await?;
        }
        sent_files.inc();
        checksums.push(blake3);
    }
    Ok(checksums)
}

/// Files up to this size are read in batches.
const SMALL_FILE: u64 = 64 << 10;
/// File bytes in one batch.
const BATCH_BYTES: u64 = CHUNK as u64;
/// Files in one batch (each is open until the batch is read).
const BATCH_FILES: usize = 256;

fn is_small_file(entry: &Planned) -> bool {
    matches!(entry, Planned::File { size, .. } if *size <= SMALL_FILE)
}

/// Reads a batch of small files into one contiguous piece of the archive
/// (each file's header, bytes and padding), hashing each, on one blocking
/// thread. Every file is opened and announced to the kernel first
/// (`POSIX_FADV_WILLNEED`), so their reads are in flight together instead
/// of one disk round trip after another.
async fn read_batch(batch: Vec<Planned>) -> Result<(Bytes, Vec<Checksum>), Produce> {
    tokio::task::spawn_blocking(move || {
        let mut opened = Vec::with_capacity(batch.len());
        let mut capacity = 0;
        for entry in &batch {
            let Planned::File { path, root, offset, size } = entry else { unreachable!("batches hold files") };
            let file = open_range(&path.join_to(root), *offset).map_err(|e| failure("read", format!("{path}: {e}")))?;
            // SAFETY: `file` is an open descriptor for the duration of the call.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), *offset as i64, *size as i64, libc::POSIX_FADV_WILLNEED) };
            let header = tar::header(path, *size);
            capacity += header.len() + (*size + tar::padding_len(*size)) as usize;
            opened.push((path, header, file, *size));
        }
        let mut piece = Vec::with_capacity(capacity);
        let mut checksums = Vec::with_capacity(batch.len());
        for (path, header, mut file, size) in opened {
            piece.extend_from_slice(&header);
            let start = piece.len();
            let read = (&mut file).take(size).read_to_end(&mut piece);
            match read {
                Ok(n) if n as u64 == size => {}
                Ok(n) => {
                    let short = size - n as u64;
                    return Err(failure("read", format!("{path}: file shrank while being sent ({short} bytes short)")));
                }
                Err(e) => return Err(failure("read", format!("{path}: {e}"))),
            }
            checksums.push(Checksum(*blake3::hash(&piece[start..]).as_bytes()));
            piece.resize(piece.len() + tar::padding_len(size) as usize, 0);
        }
        Ok((Bytes::from(piece), checksums))
    })
    .await
    .map_err(|e| failure("read", e.to_string()))?
    .map_err(Produce::Failed)
}

/// Streams `size` bytes of `source` from `offset`, hashing on the way.
async fn send_file(
    tx: &Out,
    path: &RelPath,
    source: PathBuf,
    ranges: &[(u64, u64)],
    rate: &RateLimiter,
    buffers: &BufferPool,
    sent_bytes: &prometheus_client::metrics::counter::Counter,
) -> Result<Checksum, Produce> {
    let read_failed = |e: io::Error| Produce::Failed(failure("read", format!("{path}: {e}")));
    let file = tokio::task::spawn_blocking(move || open_range(&source, 0))
        .await
        .map_err(|e| read_failed(io::Error::other(e)))?
        .map_err(read_failed)?;
    let file = Arc::new(file);
    let mut hasher = blake3::Hasher::new();
    // Where the next chunk starts: a range, and how far into it.
    let (mut range, mut into) = (0usize, 0u64);
    let ranges: Arc<[(u64, u64)]> = ranges.into();
    while range < ranges.len() {
        let mut buf = buffers.take();
        let (f, r) = (file.clone(), ranges.clone());
        let (back_hasher, buf, next) = tokio::task::spawn_blocking(move || {
            // Fill one chunk from as many ranges as fit (a block diff sends
            // many small ones).
            let (mut range, mut into) = (range, into);
            while range < r.len() && buf.len() < CHUNK {
                let (offset, length) = r[range];
                if length == 0 {
                    range += 1;
                    continue;
                }
                let want = (length - into).min((CHUNK - buf.len()) as u64) as usize;
                match f.read_at(&mut buf.spare(buf.len() + want)[..want], offset + into) {
                    Ok(0) => {
                        return Err(io::Error::other(format!(
                            "file shrank while being sent ({} bytes short)",
                            length - into
                        )));
                    }
                    Ok(n) => {
                        buf.advance(n);
                        into += n as u64;
                        if into == length {
                            (range, into) = (range + 1, 0);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            hasher.update(&buf);
            Ok((hasher, buf, (range, into)))
        })
        .await
        .map_err(|e| read_failed(io::Error::other(e)))?
        .map_err(read_failed)?;
        hasher = back_hasher;
        (range, into) = next;
        if buf.is_empty() {
            buffers.give_back(buf);
            continue;
        }
        let chunk = buffers.lend(buf);
        let n = chunk.len() as u64;
        rate.acquire(n).await;
        send(tx, chunk).await?;
        sent_bytes.inc_by(n);
    }
    Ok(Checksum::of(&hasher))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> PlanEntry {
        PlanEntry::File { path: RelPath::new(path).unwrap(), offset: 0, length: None }
    }

    fn resolved(dir: &Path, plan: Vec<PlanEntry>) -> Result<Vec<u64>, String> {
        resolve(dir, plan).map(|entries| entries.iter().map(Planned::size).collect()).map_err(|f| f.to_string())
    }

    #[test]
    fn resolve_accepts_regular_files_and_refuses_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let (shard, outside) = (tmp.path().join("shard"), tmp.path().join("outside"));
        std::fs::create_dir_all(shard.join("a/b")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(shard.join("a/b/one"), b"12345").unwrap();
        std::fs::write(shard.join("a/two"), b"12").unwrap();
        std::fs::write(outside.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(&outside, shard.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("secret"), shard.join("a/file-link")).unwrap();

        assert_eq!(resolved(&shard, vec![file("a/b/one"), file("a/two")]).unwrap(), vec![5, 2]);
        let through_dir = resolved(&shard, vec![file("a/two"), file("link/secret")]).unwrap_err();
        assert!(through_dir.contains("link/secret goes through a symlink"), "{through_dir}");
        let file_link = resolved(&shard, vec![file("a/file-link")]).unwrap_err();
        assert!(file_link.contains("a/file-link goes through a symlink"), "{file_link}");
        let not_dir = resolved(&shard, vec![file("a/two/x")]).unwrap_err();
        assert!(not_dir.contains("a/two is not a directory"), "{not_dir}");
        let dir = resolved(&shard, vec![file("a/b")]).unwrap_err();
        assert!(dir.contains("a/b is not a regular file"), "{dir}");
        assert!(resolved(&shard, vec![file("missing")]).is_err());
        let range = PlanEntry::File { path: RelPath::new("a/two").unwrap(), offset: 1, length: Some(5) };
        assert!(resolved(&shard, vec![range]).unwrap_err().contains("past the file"));
    }

    #[tokio::test]
    async fn json_entries_go_in_pieces_exactly_as_announced() {
        use futures_util::StreamExt;
        use tokio::io::AsyncReadExt;

        let (tx, mut rx) = mpsc::channel(IN_FLIGHT);
        let out = Out { tx, stall: Duration::from_secs(10) };
        let reader = tokio::spawn(async move {
            let (mut archive, mut pieces) = (Vec::new(), 0);
            while let Some(chunk) = rx.recv().await {
                archive.extend_from_slice(&chunk.unwrap());
                pieces += 1;
            }
            (archive, pieces)
        });
        // Several pieces' worth of JSON.
        let value: Vec<u64> = (0..60_000).collect();
        let expected = serde_json::to_vec(&value).unwrap();
        let back = send_json(&out, "big.json", value, |v, w| serde_json::to_writer(w, v)).await.ok().unwrap();
        assert_eq!(back.len(), 60_000, "the state comes back");
        drop(out);
        let (mut archive, pieces) = reader.await.unwrap();
        assert!(pieces > expected.len() / JSON_PIECE, "{pieces} pieces");
        archive.extend_from_slice(&tar::end());
        let mut reader = tokio_tar::Archive::new(&archive[..]);
        let mut entries = reader.entries().unwrap();
        let mut entry = entries.next().await.unwrap().unwrap();
        assert_eq!(&*entry.path_bytes().unwrap(), b"big.json");
        let mut got = Vec::new();
        entry.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected);
        drop(entry);
        assert!(entries.next().await.is_none());
    }

    #[tokio::test]
    async fn a_batch_is_a_valid_piece_of_archive() {
        use futures_util::StreamExt;
        use tokio::io::AsyncReadExt;

        let tmp = tempfile::tempdir().unwrap();
        let root: Root = tmp.path().into();
        let contents: [&[u8]; 3] = [b"first", b"", &[9u8; 1000]];
        let mut batch = Vec::new();
        for (i, data) in contents.iter().enumerate() {
            std::fs::create_dir_all(tmp.path().join("dir")).unwrap();
            std::fs::write(tmp.path().join(format!("dir/f{i}")), data).unwrap();
            let path = RelPath::new(&format!("dir/f{i}")).unwrap();
            batch.push(Planned::File { path, root: root.clone(), offset: 0, size: data.len() as u64 });
        }
        // A range of a file, as a plan may ask.
        std::fs::write(tmp.path().join("ranged"), b"0123456789").unwrap();
        let path = RelPath::new("ranged").unwrap();
        batch.push(Planned::File { path, root: root.clone(), offset: 3, size: 4 });

        let paths: Vec<RelPath> = batch.iter().map(|e| e.path().clone()).collect();
        let (piece, checksums) = read_batch(batch).await.ok().unwrap();
        let mut archive = piece.to_vec();
        archive.extend_from_slice(&tar::end());
        let mut reader = tokio_tar::Archive::new(&archive[..]);
        let mut entries = reader.entries().unwrap();
        let expected: Vec<&[u8]> = vec![b"first", b"", &[9u8; 1000], b"3456"];
        assert_eq!(checksums.len(), expected.len());
        for ((want, path), checksum) in expected.iter().zip(&paths).zip(&checksums) {
            let mut entry = entries.next().await.unwrap().unwrap();
            assert_eq!(&*entry.path_bytes().unwrap(), path.as_str().as_bytes());
            let mut got = Vec::new();
            entry.read_to_end(&mut got).await.unwrap();
            assert_eq!(&got, want);
            assert_eq!(*checksum, Checksum(*blake3::hash(want).as_bytes()));
        }
        assert!(entries.next().await.is_none());

        let gone = Planned::File { path: RelPath::new("gone").unwrap(), root, offset: 0, size: 1 };
        match read_batch(vec![gone]).await {
            Err(Produce::Failed(f)) => assert!(f.to_string().contains("gone"), "{f}"),
            _ => panic!("a missing file fails the batch"),
        }
    }
}
