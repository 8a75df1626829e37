//! Receiver side: unpack a snapshot archive into a staging directory.
//!
//! Every entry is untrusted. Accepted: regular files whose relative,
//! normalised path the preamble announced, once each, with the announced
//! size. Refused (the transfer fails): absolute paths, `..`, symlinks, hard
//! links, devices, directories, duplicates, unannounced entries, sizes that
//! disagree, anything after the manifest. Nothing is written outside the
//! staging directory: paths are [`RelPath`]s and staging never holds a symlink.
//!
//! Memory and disk are bounded before anything is taken on trust: headers
//! pass a [`TarGuard`] (no PAX headers, long links or sparse files; long
//! names of a path's length at most), control entries are read up to
//! [`MAX_CONTROL_ENTRY`] bytes, and the preamble's total must fit in the
//! staging file system's free space. What is kept per file is small (a
//! snapshot may have [`MAX_PLAN_ENTRIES`]): each path is held once, in the
//! preamble, with a sorted index of positions to find it; the files held are
//! a size and a checksum per path; and the manifest is checked record by
//! record as it is parsed, never held whole.
//!
//! Writes run on a writer thread fed by a bounded channel, so the network and
//! the disk work in parallel with bounded memory; chunk buffers go back and
//! forth through a small pool rather than being allocated per chunk. Durability is the caller's:
//! one `syncfs` of the staging file system once the archive is complete and
//! verified flushes every file and directory in one call (measured faster
//! than an fsync per file for both many small files and a few large ones,
//! whose early fsyncs compete with the source's reads) and reports writeback
//! errors (Linux ≥ 5.8).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_tar::EntryType;
use tokio_util::sync::CancellationToken;

use super::buffer::{BufferPool, ChunkBuf};
use super::guard::TarGuard;
use super::manifest::{
    self, ARCHIVE_FORMAT, Checked, Checksum, ERROR_PATH, EntryInfo, FileRecord, MANIFEST_PATH, MAX_CONTROL_ENTRY,
    PREAMBLE_PATH, Preamble, SourceFailure,
};
use super::ratelimit::RateLimiter;
use crate::plugin::types::MAX_PLAN_ENTRIES;
use crate::relpath::{PathIndex, RelPath};

pub(crate) const CHUNK: usize = 1 << 20;
const WRITE_QUEUE: usize = 8;
/// Free space a snapshot must leave on the staging file system, for the
/// node's own state and the staging bookkeeping.
pub const FREE_SPACE_RESERVE: u64 = 64 << 20;

/// Counters a transfer's status is read from.
#[derive(Default, Debug)]
pub struct Progress {
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    /// Bytes actually received over the network, over all attempts.
    pub received: AtomicU64,
}

impl Progress {
    fn reset(&self, preamble: &Preamble, held: u64, held_files: usize) {
        self.bytes_total.store(preamble.total_bytes(), Ordering::Relaxed);
        self.files_total.store(preamble.entries.len() as u64, Ordering::Relaxed);
        self.bytes_done.store(held, Ordering::Relaxed);
        self.files_done.store(held_files as u64, Ordering::Relaxed);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The stream broke off; worth another attempt.
    #[error("stream interrupted: {0}")]
    Interrupted(String),
    /// The source gave up and said why.
    #[error("{0}")]
    Source(SourceFailure),
    /// The archive breaks the rules.
    #[error("bad archive: {0}")]
    Refused(String),
    /// A received file does not match the source's checksum.
    #[error("checksum mismatch: {0}")]
    Mismatch(String),
    /// Our own disk failed.
    #[error("writing: {0}")]
    Local(String),
    /// The snapshot cannot fit: found before any data is written.
    #[error(
        "not enough space: {needed} bytes ({}) still to receive, the staging file system has {free} bytes ({}) \
         free and keeps {} in reserve",
        human(*needed),
        human(*free),
        human(FREE_SPACE_RESERVE)
    )]
    NoSpace { needed: u64, free: u64 },
    #[error("cancelled")]
    Cancelled,
}

/// What a complete archive delivered: its preamble, every entry of which
/// the manifest verified, and whether the manifest says it is fuzzy
/// ([`manifest::Manifest::fuzzy`]).
pub struct Complete {
    pub preamble: Preamble,
    pub fuzzy: bool,
}

/// What one receiver remembers between attempts of one transfer, kept in
/// `held.json` beside the data so a restarted node resumes too.
#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Held {
    /// Snapshot the held files belong to.
    pub snapshot_id: Option<String>,
    /// Files complete in the data directory, with the size and checksum of
    /// what we wrote (one copy of each path: a snapshot may have 100,000).
    pub files: HashMap<RelPath, HeldFile>,
}

/// A held file's size and the checksum of the bytes we wrote. (Read from an
/// older `held.json` too, whose values were whole [`FileRecord`]s.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeldFile {
    pub size: u64,
    pub blake3: Checksum,
}

impl Held {
    pub const FILE: &'static str = "held.json";
    /// Records of files completed during an attempt, one JSON line each.
    pub const JOURNAL: &'static str = "records.jsonl";

    /// Writes `held.json` in `staging` (temporary file, fsync, rename).
    pub fn save(&self, staging: &Path) -> io::Result<()> {
        let tmp = staging.join("held.json.tmp");
        // Written through a buffer, never whole in memory.
        let mut file = io::BufWriter::new(File::create(&tmp)?);
        serde_json::to_writer(&mut file, self).map_err(io::Error::other)?;
        let file = file.into_inner().map_err(io::IntoInnerError::into_error)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, staging.join(Self::FILE))
    }

    /// Loads `held.json` from `staging` and keeps only the files whose bytes
    /// on disk still match (a crash may have torn files that were never
    /// synced). Missing or unreadable: nothing held.
    pub fn load(staging: &Path, data_dir: &Path) -> Held {
        let Ok(bytes) = fs::read(staging.join(Self::FILE)) else { return Held::default() };
        let Ok(mut held) = serde_json::from_slice::<Held>(&bytes) else { return Held::default() };
        if let Ok(journal) = fs::read_to_string(staging.join(Self::JOURNAL)) {
            for line in journal.lines() {
                if let Ok(record) = serde_json::from_str::<FileRecord>(line) {
                    held.add(record);
                }
            }
        }
        held.files.retain(|path, record| {
            let Ok(mut file) = File::open(path.join_to(data_dir)) else { return false };
            let mut hasher = blake3::Hasher::new();
            match io::copy(&mut file, &mut hasher) {
                Ok(size) => size == record.size && Checksum::of(&hasher) == record.blake3,
                Err(_) => false,
            }
        });
        held
    }

    /// Takes in a file the writer completed.
    fn add(&mut self, record: FileRecord) {
        self.files.insert(record.path, HeldFile { size: record.size, blake3: record.blake3 });
    }

    /// Takes in the files a writer completed.
    pub(crate) fn absorb(&mut self, records: Vec<FileRecord>) {
        self.files.reserve(records.len());
        for record in records {
            self.add(record);
        }
    }

    /// What we hold, as a resume request lists it.
    pub fn records(&self) -> Vec<FileRecord> {
        self.files.iter().map(|(path, f)| FileRecord { path: path.clone(), size: f.size, blake3: f.blake3 }).collect()
    }
}

/// What a receiver is told as an archive arrives, so that work on single
/// files (an engine's `check-files`) runs while later files stream: first
/// which snapshot it is and how many entries it has, then each file once
/// all its bytes are written, with its position among the preamble's
/// entries. Those bytes are verified against the manifest only at the
/// archive's end.
#[derive(Debug)]
pub enum Arrived {
    Snapshot { id: String, meta: crate::plugin::SnapshotMeta, entries: usize },
    File { at: usize, path: RelPath },
}

/// Where [`Arrived`] news goes (unbounded: one message per entry, and a
/// snapshot has at most [`MAX_PLAN_ENTRIES`]).
pub type Arrivals = mpsc::UnboundedSender<Arrived>;

/// Where and for what an archive is unpacked.
pub struct Destination<'a> {
    pub engine: &'a str,
    pub shard: &'a str,
    /// The snapshot format the local plugin reads: an archive of another
    /// is refused at its preamble, before a byte is written.
    pub snapshot_format: u32,
    /// The staging directory's `data/`.
    pub data_dir: &'a Path,
    pub rate: &'a RateLimiter,
    pub progress: &'a Arc<Progress>,
    /// Told of the snapshot and of each file as it completes, if given.
    pub arrivals: Option<&'a Arrivals>,
}

/// Unpacks one attempt's archive from `reader` into `data_dir`.
///
/// On success every file matches the manifest; making them durable is the
/// caller's (one [`syncfs`](crate::install::sync::syncfs)). On failure
/// complete files stay (listed in `held`) so a retry can resume; partial files
/// are removed.
///
/// # Cancel safety
/// Pass a token instead of dropping the future: on cancel, the writer thread
/// is stopped and joined before this returns, so the caller may remove the
/// directory without racing a write.
pub async fn receive(
    reader: impl AsyncRead + Unpin,
    to: &Destination<'_>,
    held: &mut Held,
    cancel: &CancellationToken,
) -> Result<Complete, ReceiveError> {
    let mut writer = FileWriter::start(to.data_dir.to_owned(), to.progress.clone(), to.engine, to.arrivals.cloned());
    let result = tokio::select! {
        r = unpack(reader, to, held, &mut writer) => r,
        _ = cancel.cancelled() => Err(ReceiveError::Cancelled),
    };
    // Already finished if the archive got as far as its manifest.
    let outcome = writer.finish().await;
    held.absorb(outcome.records);
    match (result, outcome.error) {
        (Err(ReceiveError::Cancelled), _) => Err(ReceiveError::Cancelled),
        (_, Some(e)) => Err(ReceiveError::Local(e)),
        (result, None) => result,
    }
}

fn refused<T>(msg: impl Into<String>) -> Result<T, ReceiveError> {
    Err(ReceiveError::Refused(msg.into()))
}

fn interrupted(e: io::Error) -> ReceiveError {
    ReceiveError::Interrupted(crate::http::error_chain(&e))
}

async fn unpack(
    reader: impl AsyncRead + Unpin,
    to: &Destination<'_>,
    held: &mut Held,
    writer: &mut FileWriter,
) -> Result<Complete, ReceiveError> {
    let Destination { engine, shard, snapshot_format, data_dir, rate, progress, arrivals } = *to;
    let transport = TransportWatch::new(reader);
    let broke = transport.failed.clone();
    // An error while reading entries is the network's if the transport
    // failed, else the archive's own (a malformed or refused header).
    let read_err = |e: io::Error| {
        if broke.load(Ordering::Relaxed) { interrupted(e) } else { ReceiveError::Refused(e.to_string()) }
    };
    let mut archive = tokio_tar::Archive::new(TarGuard::new(transport));
    let mut entries = archive.entries().map_err(&read_err)?;

    // 1. The preamble.
    let Some(first) = entries.next().await else {
        return Err(ReceiveError::Interrupted("the archive ended before its preamble".into()));
    };
    let mut first = first.map_err(&read_err)?;
    let path = entry_path(&first)?;
    if path == ERROR_PATH {
        return Err(ReceiveError::Source(read_json(&mut first, ERROR_PATH).await?));
    }
    if path != PREAMBLE_PATH {
        return refused(format!("first entry is {path:?}, not the preamble"));
    }
    let preamble: Preamble = read_json(&mut first, PREAMBLE_PATH).await?;
    drop(first);
    let mut announced = check_preamble(&preamble, engine, shard)?;
    if preamble.snapshot_format != snapshot_format {
        return refused(format!(
            "snapshot format {} is not the one the local {engine} plugin reads ({snapshot_format}): \
             install the same plugin version on both nodes",
            preamble.snapshot_format
        ));
    }
    let held_bytes = resume(&preamble, &mut announced, held, data_dir)?;

    // What is still to come must fit, with a reserve, before a byte of it is
    // written (files sent again were removed by `resume`, so their space counts).
    let needed = preamble.total_bytes().saturating_sub(held_bytes);
    let fs_dir = data_dir.ancestors().find(|d| d.exists()).unwrap_or(data_dir);
    let free = free_space(fs_dir).map_err(|e| ReceiveError::Local(format!("free space of staging: {e}")))?;
    if needed.saturating_add(FREE_SPACE_RESERVE) > free {
        return Err(ReceiveError::NoSpace { needed, free });
    }
    progress.reset(&preamble, held_bytes, announced.count(Slot::Skipped));
    if let Some(arrivals) = arrivals {
        // Closed only when its reader is gone, which is the caller's business.
        let _ = arrivals.send(Arrived::Snapshot {
            id: preamble.snapshot_id.clone(),
            meta: preamble.meta.clone(),
            entries: preamble.entries.len(),
        });
    }

    // 2. Data entries, then the manifest, checked against what was written.
    let (preamble, fuzzy) = loop {
        let Some(entry) = entries.next().await else {
            return Err(ReceiveError::Interrupted("the archive ended before its manifest".into()));
        };
        let mut entry = entry.map_err(&read_err)?;
        let path = entry_path(&entry)?;
        match path.as_str() {
            MANIFEST_PATH => {
                // Every data entry is with the writer: wait for the disk.
                let outcome = writer.finish().await;
                held.absorb(outcome.records);
                if let Some(e) = outcome.error {
                    return Err(ReceiveError::Local(e));
                }
                break check_manifest(&mut entry, preamble, held).await?;
            }
            ERROR_PATH => return Err(ReceiveError::Source(read_json(&mut entry, ERROR_PATH).await?)),
            _ => {}
        }
        let kind = entry.header().entry_type();
        if kind != EntryType::Regular {
            return refused(format!("entry {path:?} is a {}, not a regular file", kind_name(kind)));
        }
        let path = RelPath::new(&path).map_err(|e| ReceiveError::Refused(format!("entry {e}")))?;
        let Some(at) = announced.find(&preamble.entries, path.as_str()) else {
            return refused(format!("entry {path} was not announced in the preamble"));
        };
        match announced.slots[at] {
            Slot::Skipped => return refused(format!("entry {path} was announced as skipped")),
            Slot::Received => return refused(format!("entry {path} appears twice")),
            Slot::Expected => announced.slots[at] = Slot::Received,
        }
        let size = preamble.entries[at].size;
        // The size the reader will deliver (PAX `size` overrides included).
        let header_size = entry.effective_size();
        if header_size != size {
            return refused(format!("entry {path} is {header_size} bytes, the preamble said {size}"));
        }
        copy_entry(&mut entry, &path, at, size, writer, rate, &read_err).await?;
    };

    // 3. Nothing may follow the manifest.
    if let Some(next) = entries.next().await {
        return match next {
            Ok(entry) => refused(format!("entry {:?} follows the manifest", entry_path(&entry)?)),
            Err(e) => Err(read_err(e)),
        };
    }
    let missing = announced.count(Slot::Expected);
    if missing > 0 {
        let total = preamble.entries.len();
        return refused(format!("the archive holds {} of {total} announced entries", total - missing));
    }
    Ok(Complete { preamble, fuzzy })
}

/// Where one announced entry stands in an attempt.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    Expected,
    /// Held from an earlier attempt, not sent again.
    Skipped,
    Received,
}

/// The preamble's entries, found by path through a [`PathIndex`], and
/// where each stands.
struct Announced {
    index: PathIndex,
    slots: Vec<Slot>,
}

impl Announced {
    fn find(&self, entries: &[EntryInfo], path: &str) -> Option<usize> {
        self.index.find(|at| &entries[at].path, path)
    }

    fn count(&self, slot: Slot) -> usize {
        self.slots.iter().filter(|s| **s == slot).count()
    }
}

/// Squares what we hold with the snapshot announced: held files of another
/// snapshot are all dropped; of the same one, those the source skips stay
/// (each must be held, at its announced size) and the rest are removed, to
/// be received again. Returns the bytes held.
fn resume(
    preamble: &Preamble,
    announced: &mut Announced,
    held: &mut Held,
    data_dir: &Path,
) -> Result<u64, ReceiveError> {
    if held.snapshot_id.as_deref() != Some(preamble.snapshot_id.as_str()) {
        if !preamble.skipped.is_empty() {
            return refused("the source skips files of a snapshot we do not hold");
        }
        if !held.files.is_empty() {
            tracing::info!(shard = preamble.shard, "snapshot changed since the last attempt; starting over");
        }
        clear_dir(data_dir).map_err(|e| ReceiveError::Local(format!("clearing staging: {e}")))?;
        held.files.clear();
        held.snapshot_id = Some(preamble.snapshot_id.clone());
    }
    for path in &preamble.skipped {
        let at = announced.find(&preamble.entries, path.as_str()).expect("check_preamble found every skipped entry");
        match held.files.get(path) {
            Some(file) if file.size == preamble.entries[at].size => announced.slots[at] = Slot::Skipped,
            _ => return refused(format!("the source skips {path}, which we do not hold")),
        }
    }
    // Held files the source sends again are replaced.
    let resent: Vec<RelPath> = held
        .files
        .keys()
        .filter(|p| announced.find(&preamble.entries, p.as_str()).is_none_or(|at| announced.slots[at] != Slot::Skipped))
        .cloned()
        .collect();
    for path in resent {
        held.files.remove(&path);
        remove_file_if_exists(&path.join_to(data_dir)).map_err(|e| ReceiveError::Local(e.to_string()))?;
    }
    if let Some(staging) = data_dir.parent() {
        // Which snapshot the files about to arrive belong to, for a restart;
        // what the journal held is in held.json now. Truncated in place, not
        // removed: the writer thread has it open for appending.
        held.save(staging).map_err(|e| ReceiveError::Local(format!("saving {}: {e}", Held::FILE)))?;
        File::create(staging.join(Held::JOURNAL))
            .map_err(|e| ReceiveError::Local(format!("{}: {e}", Held::JOURNAL)))?;
    }
    let skipped = preamble.entries.iter().zip(&announced.slots).filter(|(_, s)| **s == Slot::Skipped);
    Ok(skipped.map(|(e, _)| e.size).sum())
}

/// Reads the manifest and checks it as it is parsed, record by record
/// ([`manifest::read_checked`]), against the preamble and the files we hold:
/// every entry held, at the size and BLAKE3 the source sent. The manifest
/// is never held whole (it has a record per file). The parse runs on a
/// blocking thread, which `preamble` and `held` go to and come back from;
/// `held` is left empty only if that thread panics or this future is
/// dropped (the transfer is then over anyway).
async fn check_manifest<R: AsyncRead + Unpin>(
    entry: &mut tokio_tar::Entry<R>,
    preamble: Preamble,
    held: &mut Held,
) -> Result<(Preamble, bool), ReceiveError> {
    let mut body = control_entry(entry, MANIFEST_PATH)?;
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let ours = std::mem::take(held);
    let parse = tokio::task::spawn_blocking(move || {
        let checked = manifest::read_checked(ChannelRead { rx, chunk: Bytes::new() }, &preamble, |r| verify(r, &ours));
        (preamble, ours, checked)
    });
    // Fed in pieces; if the parse stops early, its answer says why.
    let mut fed = 0u64;
    let read = loop {
        let mut piece = bytes::BytesMut::with_capacity(64 << 10);
        match body.read_buf(&mut piece).await {
            Ok(0) => break Ok(()),
            Ok(n) => {
                fed += n as u64;
                if fed > MAX_CONTROL_ENTRY {
                    break Err(too_large(MANIFEST_PATH));
                }
                if tx.send(piece.freeze()).await.is_err() {
                    break Ok(());
                }
            }
            Err(e) => break Err(interrupted(e)),
        }
    };
    drop(tx);
    let (preamble, ours, checked) =
        parse.await.map_err(|e| ReceiveError::Local(format!("checking the manifest: {e}")))?;
    *held = ours;
    read?;
    match checked {
        Ok(fuzzy) => Ok((preamble, fuzzy)),
        Err(Checked::Bad(why)) => Err(ReceiveError::Refused(why)),
        Err(Checked::Failed(e)) => Err(e),
    }
}

/// A blocking reader of the pieces a channel brings.
struct ChannelRead {
    rx: mpsc::Receiver<Bytes>,
    chunk: Bytes,
}

impl io::Read for ChannelRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.chunk = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk.advance(n);
        Ok(n)
    }
}

/// Copies one data entry of `size` bytes from the archive to `writer`, at
/// the node's rate. `read_err` says what a failed read is (the network's, or
/// the archive's own); an entry that ends short is an interruption.
pub(crate) async fn copy_entry<E: From<ReceiveError>>(
    entry: &mut (impl AsyncRead + Unpin),
    path: &RelPath,
    at: usize,
    size: u64,
    writer: &mut FileWriter,
    rate: &RateLimiter,
    read_err: &impl Fn(io::Error) -> E,
) -> Result<(), E> {
    let whole = size <= CHUNK as u64;
    if !whole {
        writer.begin(path.clone(), at, size).await?;
    }
    let mut left = size;
    loop {
        let want = CHUNK.min(left as usize);
        // Whole chunks come from the pool; a small file or a file's tail
        // gets a buffer of its own size, so a queue of small files does
        // not hold a megabyte each.
        let mut buf = if want == CHUNK { writer.buffers.take() } else { ChunkBuf::new(want) };
        while buf.len() < want {
            let n = entry.read(buf.spare(want)).await.map_err(read_err)?;
            if n == 0 {
                return Err(ReceiveError::Interrupted(format!("{path} ended {left} bytes short")).into());
            }
            buf.advance(n);
        }
        left -= buf.len() as u64;
        rate.acquire(buf.len() as u64).await;
        if whole {
            writer.whole(path.clone(), at, buf).await?;
            return Ok(());
        }
        writer.data(buf).await?;
        if left == 0 {
            writer.end().await?;
            return Ok(());
        }
    }
}

/// A file the manifest lists must be held, as the source sent it.
fn verify(record: &FileRecord, held: &Held) -> Result<(), ReceiveError> {
    match held.files.get(&record.path) {
        Some(ours) if ours.size == record.size && ours.blake3 == record.blake3 => Ok(()),
        Some(ours) => Err(ReceiveError::Mismatch(format!(
            "{}: received {} bytes with BLAKE3 {}, the source sent {} bytes with {}",
            record.path, ours.size, ours.blake3, record.size, record.blake3
        ))),
        None => Err(ReceiveError::Mismatch(format!("{} was never received", record.path))),
    }
}

fn check_preamble(p: &Preamble, engine: &str, shard: &str) -> Result<Announced, ReceiveError> {
    if p.format != ARCHIVE_FORMAT {
        return refused(format!("archive format {} is not supported (want {ARCHIVE_FORMAT})", p.format));
    }
    if p.engine != engine || p.shard != shard {
        return refused(format!("the archive is of {}/{}, not {engine}/{shard}", p.engine, p.shard));
    }
    if p.entries.len() > MAX_PLAN_ENTRIES {
        return refused(format!("{} entries, at most {MAX_PLAN_ENTRIES}", p.entries.len()));
    }
    if let Some(entry) =
        p.entries.iter().find(|e| e.path.as_str().starts_with(".ferry/") || e.path.as_str() == ".ferry")
    {
        return refused(format!("entry {} is in Ferry's own namespace", entry.path));
    }
    let path = |at: usize| &p.entries[at].path;
    let index = PathIndex::new(p.entries.len(), path);
    if let Some(twice) = index.duplicate(path) {
        return refused(format!("entry {twice} is announced twice"));
    }
    if let Some((inner, file)) = index.nested(path) {
        return refused(format!("entry {inner} is inside file {file}"));
    }
    let announced = Announced { index, slots: vec![Slot::Expected; p.entries.len()] };
    if let Some(unknown) = p.skipped.iter().find(|s| announced.find(&p.entries, s.as_str()).is_none()) {
        return refused(format!("skipped entry {unknown} was not announced"));
    }
    Ok(announced)
}

pub(crate) fn entry_path<R: AsyncRead + Unpin>(entry: &tokio_tar::Entry<R>) -> Result<String, ReceiveError> {
    let bytes = entry.path_bytes().map_err(|e| ReceiveError::Refused(format!("entry path: {e}")))?;
    String::from_utf8(bytes.into_owned()).map_err(|_| ReceiveError::Refused("entry path is not UTF-8".into()))
}

pub(crate) async fn read_json<T: serde::de::DeserializeOwned, R: AsyncRead + Unpin>(
    entry: &mut tokio_tar::Entry<R>,
    name: &str,
) -> Result<T, ReceiveError> {
    let mut buf = Vec::new();
    let n = control_entry(entry, name)?.read_to_end(&mut buf).await.map_err(interrupted)?;
    if n as u64 > MAX_CONTROL_ENTRY {
        return Err(too_large(name));
    }
    serde_json::from_slice(&buf).map_err(|e| ReceiveError::Refused(format!("{name}: {e}")))
}

/// The bytes of the control entry `name`: refused by its header before a
/// byte is read if it declares more than [`MAX_CONTROL_ENTRY`], and read at
/// most one byte past that bound, so that the bound holds even if the header
/// lied (a reader that gets past it refuses the entry with [`too_large`]).
fn control_entry<'e, R: AsyncRead + Unpin>(
    entry: &'e mut tokio_tar::Entry<R>,
    name: &str,
) -> Result<tokio::io::Take<&'e mut tokio_tar::Entry<R>>, ReceiveError> {
    let declared = entry.effective_size();
    if declared > MAX_CONTROL_ENTRY {
        return refused(format!("{name} is {declared} bytes, at most {MAX_CONTROL_ENTRY}"));
    }
    Ok(entry.take(MAX_CONTROL_ENTRY + 1))
}

fn too_large(name: &str) -> ReceiveError {
    ReceiveError::Refused(format!("{name} is larger than {MAX_CONTROL_ENTRY} bytes"))
}

pub(crate) fn kind_name(kind: EntryType) -> &'static str {
    match kind {
        EntryType::Symlink => "symlink",
        EntryType::Link => "hard link",
        EntryType::Char | EntryType::Block => "device",
        EntryType::Directory => "directory",
        EntryType::Fifo => "fifo",
        EntryType::GNUSparse => "sparse file",
        _ => "special entry",
    }
}

/// Bytes of the file system holding `dir` that an unprivileged user may
/// still fill (`statvfs`).
pub fn free_space(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and room for one `statvfs`, which the
    // call fills when it returns 0.
    if unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: filled by the successful call above.
    let stat = unsafe { stat.assume_init() };
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// `bytes` for people: "1.5 GiB".
fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} bytes") } else { format!("{value:.1} {}", UNITS[unit]) }
}

fn remove_file_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Empties `dir` (creating it if missing).
fn clear_dir(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs::create_dir_all(dir)
}

/// Passes reads through and remembers whether the transport itself failed.
pub(crate) struct TransportWatch<R> {
    inner: R,
    pub(crate) failed: Arc<std::sync::atomic::AtomicBool>,
    /// The transport ended (a read with room got nothing): an archive cut
    /// there was cut by the network or the source, not malformed.
    pub(crate) ended: Arc<std::sync::atomic::AtomicBool>,
}

impl<R> TransportWatch<R> {
    pub(crate) fn new(inner: R) -> Self {
        TransportWatch { inner, failed: Arc::default(), ended: Arc::default() }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for TransportWatch<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = (buf.filled().len(), buf.remaining());
        let poll = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        match &poll {
            std::task::Poll::Ready(Err(_)) => self.failed.store(true, Ordering::Relaxed),
            std::task::Poll::Ready(Ok(())) if before.1 > 0 && buf.filled().len() == before.0 => {
                self.ended.store(true, Ordering::Relaxed);
            }
            _ => {}
        }
        poll
    }
}

enum WriteMsg {
    /// A file's path, its position among the announced entries, its size.
    Begin(RelPath, usize, u64),
    Data(ChunkBuf),
    End,
    /// A whole file in one chunk: begin, data and end.
    Whole(RelPath, usize, ChunkBuf),
}

pub(crate) struct WriterOutcome {
    pub(crate) records: Vec<FileRecord>,
    pub(crate) error: Option<String>,
}

/// Owns the writer thread of one attempt.
pub(crate) struct FileWriter {
    tx: Option<mpsc::Sender<WriteMsg>>,
    thread: Option<thread::JoinHandle<WriterOutcome>>,
    /// Chunk buffers, filled from the network and given back by the writer.
    pub(crate) buffers: BufferPool,
}

impl FileWriter {
    /// Starts the writer thread for `dir`; what it writes is also counted
    /// in `engine`'s `ferry_stream_received_*` metrics, and each file it
    /// completes is told to `arrivals`.
    pub(crate) fn start(dir: PathBuf, progress: Arc<Progress>, engine: &str, arrivals: Option<Arrivals>) -> FileWriter {
        let metrics = crate::metrics::global();
        let engine = crate::metrics::Metrics::engine(engine);
        let counted = Counted {
            bytes: metrics.received_bytes.get_or_create_owned(&engine),
            files: metrics.received_files.get_or_create_owned(&engine),
        };
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        // The queue, one chunk being written and one being filled.
        let buffers = BufferPool::new(CHUNK, WRITE_QUEUE + 2);
        let pool = buffers.clone();
        let thread = thread::Builder::new()
            .name("ferry-writer".into())
            .spawn(move || write_files(&dir, rx, &progress, &pool, counted, arrivals))
            .expect("spawning the writer thread");
        FileWriter { tx: Some(tx), thread: Some(thread), buffers }
    }

    async fn send(&self, msg: WriteMsg) -> Result<(), ReceiveError> {
        let tx = self.tx.as_ref().expect("writer is running");
        // A closed channel means the thread stopped on an error; `finish`
        // reports it.
        tx.send(msg).await.map_err(|_| ReceiveError::Local("the writer stopped".into()))
    }

    pub(crate) async fn begin(&self, path: RelPath, at: usize, size: u64) -> Result<(), ReceiveError> {
        self.send(WriteMsg::Begin(path, at, size)).await
    }

    pub(crate) async fn data(&self, bytes: ChunkBuf) -> Result<(), ReceiveError> {
        self.send(WriteMsg::Data(bytes)).await
    }

    pub(crate) async fn whole(&self, path: RelPath, at: usize, bytes: ChunkBuf) -> Result<(), ReceiveError> {
        self.send(WriteMsg::Whole(path, at, bytes)).await
    }

    pub(crate) async fn end(&self) -> Result<(), ReceiveError> {
        self.send(WriteMsg::End).await
    }

    /// Stops the thread (a file not yet ended is removed) and collects what
    /// it completed; nothing more once it has stopped.
    pub(crate) async fn finish(&mut self) -> WriterOutcome {
        self.tx.take();
        let Some(thread) = self.thread.take() else { return WriterOutcome { records: Vec::new(), error: None } };
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_else(|| WriterOutcome { records: Vec::new(), error: Some("the writer thread panicked".into()) })
    }
}

/// The node-wide counters a writer adds to.
struct Counted {
    bytes: prometheus_client::metrics::counter::Counter,
    files: prometheus_client::metrics::counter::Counter,
}

fn write_files(
    dir: &Path,
    mut rx: mpsc::Receiver<WriteMsg>,
    progress: &Progress,
    pool: &BufferPool,
    counted: Counted,
    arrivals: Option<Arrivals>,
) -> WriterOutcome {
    let mut writer = Writer {
        dir,
        progress,
        counted,
        pool,
        arrivals,
        journal: None,
        records: Vec::new(),
        current: None,
        made: None,
    };
    let mut error = None;
    loop {
        let msg = match rx.try_recv() {
            Ok(msg) => msg,
            Err(mpsc::error::TryRecvError::Empty) => {
                // Caught up with the network: journal what completed so far.
                writer.flush_journal();
                match rx.blocking_recv() {
                    Some(msg) => msg,
                    None => break,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        let step = match msg {
            WriteMsg::Begin(path, at, size) => writer.begin(path, at, size),
            WriteMsg::Data(bytes) => writer.data(bytes),
            WriteMsg::End => writer.end(),
            WriteMsg::Whole(path, at, bytes) => {
                writer.begin(path, at, bytes.len() as u64).and_then(|()| writer.data(bytes)).and_then(|()| writer.end())
            }
        };
        if let Err(e) = step {
            error = Some(e);
            break;
        }
    }
    writer.flush_journal();
    // A file begun but not ended is incomplete: it must not stay.
    if let Some(open) = writer.current.take() {
        let _ = fs::remove_file(open.path.join_to(dir));
    }
    WriterOutcome { records: writer.records, error }
}

/// The writer thread's state.
struct Writer<'a> {
    dir: &'a Path,
    progress: &'a Progress,
    counted: Counted,
    pool: &'a BufferPool,
    arrivals: Option<Arrivals>,
    /// Completed files are journaled as they complete (flushed whenever the
    /// writer catches up), so a node that crashes mid-attempt resumes with
    /// them; each is re-verified when loaded.
    journal: Option<io::BufWriter<File>>,
    records: Vec<FileRecord>,
    current: Option<OpenFile>,
    /// The last directory created, so a flat snapshot does not ask for its
    /// directory once per file.
    made: Option<PathBuf>,
}

impl Writer<'_> {
    fn begin(&mut self, path: RelPath, at: usize, size: u64) -> Result<(), String> {
        let target = path.join_to(self.dir);
        if let Some(parent) = target.parent()
            && self.made.as_deref() != Some(parent)
        {
            fs::create_dir_all(parent).map_err(|e| format!("{path}: {e}"))?;
            self.made = Some(parent.to_owned());
        }
        let file = create_new(&target).map_err(|e| format!("{path}: {e}"))?;
        self.current = Some(OpenFile { path, at, size, file, hasher: blake3::Hasher::new(), written: 0 });
        Ok(())
    }

    fn data(&mut self, bytes: ChunkBuf) -> Result<(), String> {
        let OpenFile { path, file, hasher, written, .. } = self.current.as_mut().expect("data follows begin");
        let wrote = file.write_all(&bytes).map_err(|e| format!("{path}: {e}"));
        if wrote.is_ok() {
            hasher.update(&bytes);
            *written += bytes.len() as u64;
            self.progress.bytes_done.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.progress.received.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            self.counted.bytes.inc_by(bytes.len() as u64);
        }
        self.pool.give_back(bytes);
        wrote
    }

    fn end(&mut self) -> Result<(), String> {
        let OpenFile { path, at, size, hasher, written, .. } = self.current.take().expect("end follows begin");
        debug_assert_eq!(size, written);
        let record = FileRecord { path, size, blake3: Checksum::of(&hasher) };
        if self.journal.is_none() {
            self.journal = self.dir.parent().and_then(|staging| {
                let file = fs::OpenOptions::new().create(true).append(true).open(staging.join(Held::JOURNAL)).ok()?;
                Some(io::BufWriter::new(file))
            });
        }
        if let (Some(journal), Ok(mut line)) = (self.journal.as_mut(), serde_json::to_vec(&record)) {
            line.push(b'\n');
            let _ = journal.write_all(&line);
        }
        if let Some(arrivals) = &self.arrivals {
            let _ = arrivals.send(Arrived::File { at, path: record.path.clone() });
        }
        self.records.push(record);
        self.progress.files_done.fetch_add(1, Ordering::Relaxed);
        self.counted.files.inc();
        Ok(())
    }

    fn flush_journal(&mut self) {
        if let Some(journal) = self.journal.as_mut() {
            let _ = journal.flush();
        }
    }
}

/// The file the writer is writing.
struct OpenFile {
    path: RelPath,
    /// Its position among the announced entries.
    at: usize,
    size: u64,
    file: File,
    hasher: blake3::Hasher,
    written: u64,
}

/// Creates the file at `target`, never through a link (staging never holds
/// one). A file already there is a leftover of an earlier attempt (torn by a
/// crash, or never verified): it is removed, then the file is created new.
fn create_new(target: &Path) -> io::Result<File> {
    let create = || fs::OpenOptions::new().write(true).create_new(true).open(target);
    match create() {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            remove_file_if_exists(target)?;
            create()
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_files_load_from_new_and_older_held_json_and_journal() {
        let tmp = tempfile::tempdir().unwrap();
        let (staging, data) = (tmp.path(), tmp.path().join("data"));
        fs::create_dir_all(&data).unwrap();
        for (name, bytes) in [("a", &b"abc"[..]), ("b", b"defg"), ("torn", b"xy"), ("j", b"journaled")] {
            fs::write(data.join(name), bytes).unwrap();
        }
        let sum = |bytes: &[u8]| Checksum(*blake3::hash(bytes).as_bytes());
        // An older held.json kept whole records; "torn" lost a byte since.
        let older = format!(
            r#"{{"snapshot_id":"s1","files":{{"a":{{"path":"a","size":3,"blake3":"{}"}},"torn":{{"size":3,"blake3":"{}"}}}}}}"#,
            sum(b"abc"),
            sum(b"xyz")
        );
        fs::write(staging.join(Held::FILE), older).unwrap();
        let line = |path: &str, bytes: &[u8]| {
            let record = FileRecord { path: RelPath::new(path).unwrap(), size: bytes.len() as u64, blake3: sum(bytes) };
            serde_json::to_string(&record).unwrap() + "\n"
        };
        fs::write(staging.join(Held::JOURNAL), line("j", b"journaled") + &line("b", b"other")).unwrap();

        let held = Held::load(staging, &data);
        assert_eq!(held.snapshot_id.as_deref(), Some("s1"));
        let mut names: Vec<&str> = held.files.keys().map(RelPath::as_str).collect();
        names.sort();
        assert_eq!(names, ["a", "j"], "torn and mismatched files are not held");
        assert_eq!(held.files[&RelPath::new("a").unwrap()], HeldFile { size: 3, blake3: sum(b"abc") });

        // Saved in the new form, it loads the same.
        fs::remove_file(staging.join(Held::JOURNAL)).unwrap();
        held.save(staging).unwrap();
        let again = Held::load(staging, &data);
        assert_eq!(again.files, held.files);
        let mut records = again.records();
        records.sort_by(|x, y| x.path.cmp(&y.path));
        assert_eq!(records[1], FileRecord { path: RelPath::new("j").unwrap(), size: 9, blake3: sum(b"journaled") });
    }
}
