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
//! staging file system's free space.
//!
//! Writes run on a writer thread fed by a bounded channel, so the network and
//! the disk work in parallel with bounded memory; chunk buffers go back and
//! forth through a small pool rather than being allocated per chunk. Durability is the caller's:
//! one `syncfs` of the staging file system once the archive is complete and
//! verified flushes every file and directory in one call (measured faster
//! than an fsync per file for both many small files and a few large ones,
//! whose early fsyncs compete with the source's reads) and reports writeback
//! errors (Linux ≥ 5.8).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::mpsc;
use tokio_tar::EntryType;
use tokio_util::sync::CancellationToken;

use super::buffer::{BufferPool, ChunkBuf};
use super::guard::TarGuard;
use super::manifest::{
    ARCHIVE_FORMAT, Checksum, ERROR_PATH, FileRecord, MANIFEST_PATH, MAX_CONTROL_ENTRY, Manifest, PREAMBLE_PATH,
    Preamble, SourceFailure,
};
use super::ratelimit::RateLimiter;
use crate::plugin::types::MAX_PLAN_ENTRIES;
use crate::relpath::RelPath;

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
    fn reset(&self, preamble: &Preamble, held: u64, held_files: u64) {
        self.bytes_total.store(preamble.total_bytes(), Ordering::Relaxed);
        self.files_total.store(preamble.entries.len() as u64, Ordering::Relaxed);
        self.bytes_done.store(held, Ordering::Relaxed);
        self.files_done.store(held_files, Ordering::Relaxed);
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

/// What a complete archive delivered.
pub struct Complete {
    pub preamble: Preamble,
    pub manifest: Manifest,
}

/// What one receiver remembers between attempts of one transfer, kept in
/// `held.json` beside the data so a restarted node resumes too.
#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Held {
    /// Snapshot the held files belong to.
    pub snapshot_id: Option<String>,
    /// Files complete in the data directory, with the checksum of what we wrote.
    pub files: HashMap<RelPath, FileRecord>,
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
                    held.files.insert(record.path.clone(), record);
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
}

/// What a receiver is told as an archive arrives, so that work on single
/// files (an engine's `check-files`) runs while later files stream: first
/// which snapshot it is, then each file once all its bytes are written.
/// Those bytes are verified against the manifest only at the archive's end.
#[derive(Debug)]
pub enum Arrived {
    Snapshot { id: String, meta: crate::plugin::SnapshotMeta },
    File(RelPath),
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
    let outcome = writer.finish().await;
    for record in outcome.records {
        held.files.insert(record.path.clone(), record);
    }
    let (preamble, manifest) = match (result, outcome.error) {
        (Err(ReceiveError::Cancelled), _) => return Err(ReceiveError::Cancelled),
        (_, Some(e)) => return Err(ReceiveError::Local(e)),
        (Err(e), None) => return Err(e),
        (Ok(done), None) => done,
    };
    verify(&manifest, held)?;
    Ok(Complete { preamble, manifest })
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
) -> Result<(Preamble, Manifest), ReceiveError> {
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
    let announced = check_preamble(&preamble, engine, shard)?;
    if preamble.snapshot_format != snapshot_format {
        return refused(format!(
            "snapshot format {} is not the one the local {engine} plugin reads ({snapshot_format}): \
             install the same plugin version on both nodes",
            preamble.snapshot_format
        ));
    }

    // A different snapshot than the one we hold files of: start over from zero.
    if held.snapshot_id.as_deref() != Some(preamble.snapshot_id.as_str()) {
        if !preamble.skipped.is_empty() {
            return refused("the source skips files of a snapshot we do not hold");
        }
        if !held.files.is_empty() {
            tracing::info!(shard, "snapshot changed since the last attempt; starting over");
        }
        clear_dir(data_dir).map_err(|e| ReceiveError::Local(format!("clearing staging: {e}")))?;
        held.files.clear();
        held.snapshot_id = Some(preamble.snapshot_id.clone());
    }
    let skipped: HashSet<&RelPath> = preamble.skipped.iter().collect();
    for path in &skipped {
        match held.files.get(*path) {
            Some(record) if record.size == announced[*path] => {}
            _ => return refused(format!("the source skips {path}, which we do not hold")),
        }
    }
    // Held files the source sends again are replaced.
    let resent: Vec<RelPath> = held.files.keys().filter(|p| !skipped.contains(p)).cloned().collect();
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
    let held_bytes: u64 = preamble.skipped.iter().map(|p| announced[p]).sum();
    // What is still to come must fit, with a reserve, before a byte of it is
    // written (files sent again were removed above, so their space counts).
    let needed = preamble.total_bytes().saturating_sub(held_bytes);
    let fs_dir = data_dir.ancestors().find(|d| d.exists()).unwrap_or(data_dir);
    let free = free_space(fs_dir).map_err(|e| ReceiveError::Local(format!("free space of staging: {e}")))?;
    if needed.saturating_add(FREE_SPACE_RESERVE) > free {
        return Err(ReceiveError::NoSpace { needed, free });
    }
    progress.reset(&preamble, held_bytes, preamble.skipped.len() as u64);
    if let Some(arrivals) = arrivals {
        // Closed only when its reader is gone, which is the caller's business.
        let _ = arrivals.send(Arrived::Snapshot { id: preamble.snapshot_id.clone(), meta: preamble.meta.clone() });
    }

    // 2. Data entries, then the manifest.
    let mut seen: HashSet<RelPath> = HashSet::new();
    let manifest = loop {
        let Some(entry) = entries.next().await else {
            return Err(ReceiveError::Interrupted("the archive ended before its manifest".into()));
        };
        let mut entry = entry.map_err(&read_err)?;
        let path = entry_path(&entry)?;
        match path.as_str() {
            MANIFEST_PATH => break read_json::<Manifest, _>(&mut entry, MANIFEST_PATH).await?,
            ERROR_PATH => return Err(ReceiveError::Source(read_json(&mut entry, ERROR_PATH).await?)),
            _ => {}
        }
        let kind = entry.header().entry_type();
        if kind != EntryType::Regular {
            return refused(format!("entry {path:?} is a {}, not a regular file", kind_name(kind)));
        }
        let path = RelPath::new(&path).map_err(|e| ReceiveError::Refused(format!("entry {e}")))?;
        let Some(&size) = announced.get(&path) else {
            return refused(format!("entry {path} was not announced in the preamble"));
        };
        if skipped.contains(&path) {
            return refused(format!("entry {path} was announced as skipped"));
        }
        if !seen.insert(path.clone()) {
            return refused(format!("entry {path} appears twice"));
        }
        // The size the reader will deliver (PAX `size` overrides included).
        let header_size = entry.effective_size();
        if header_size != size {
            return refused(format!("entry {path} is {header_size} bytes, the preamble said {size}"));
        }
        copy_entry(&mut entry, &path, size, writer, rate, &read_err).await?;
    };

    // 3. Nothing may follow the manifest.
    if let Some(next) = entries.next().await {
        return match next {
            Ok(entry) => refused(format!("entry {:?} follows the manifest", entry_path(&entry)?)),
            Err(e) => Err(read_err(e)),
        };
    }
    if manifest.format != ARCHIVE_FORMAT
        || manifest.snapshot_id != preamble.snapshot_id
        || manifest.meta != preamble.meta
    {
        return refused("the manifest does not describe the announced snapshot");
    }
    let listed: Vec<(&RelPath, u64)> = manifest.entries.iter().map(|r| (&r.path, r.size)).collect();
    let expected: Vec<(&RelPath, u64)> = preamble.entries.iter().map(|e| (&e.path, e.size)).collect();
    if listed != expected {
        return refused("the manifest lists other entries than the preamble");
    }
    if seen.len() + skipped.len() != preamble.entries.len() {
        return refused(format!(
            "the archive holds {} of {} announced entries",
            seen.len() + skipped.len(),
            preamble.entries.len()
        ));
    }
    Ok((preamble, manifest))
}

/// Copies one data entry of `size` bytes from the archive to `writer`, at
/// the node's rate. `read_err` says what a failed read is (the network's, or
/// the archive's own); an entry that ends short is an interruption.
pub(crate) async fn copy_entry<E: From<ReceiveError>>(
    entry: &mut (impl AsyncRead + Unpin),
    path: &RelPath,
    size: u64,
    writer: &mut FileWriter,
    rate: &RateLimiter,
    read_err: &impl Fn(io::Error) -> E,
) -> Result<(), E> {
    let whole = size <= CHUNK as u64;
    if !whole {
        writer.begin(path.clone(), size).await?;
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
            writer.whole(path.clone(), buf).await?;
            return Ok(());
        }
        writer.data(buf).await?;
        if left == 0 {
            writer.end().await?;
            return Ok(());
        }
    }
}

/// Every file we hold must match the source's checksum.
fn verify(manifest: &Manifest, held: &Held) -> Result<(), ReceiveError> {
    for record in &manifest.entries {
        match held.files.get(&record.path) {
            Some(ours) if ours.size == record.size && ours.blake3 == record.blake3 => {}
            Some(ours) => {
                return Err(ReceiveError::Mismatch(format!(
                    "{}: received {} bytes with BLAKE3 {}, the source sent {} bytes with {}",
                    record.path, ours.size, ours.blake3, record.size, record.blake3
                )));
            }
            None => return Err(ReceiveError::Mismatch(format!("{} was never received", record.path))),
        }
    }
    Ok(())
}

fn check_preamble(p: &Preamble, engine: &str, shard: &str) -> Result<HashMap<RelPath, u64>, ReceiveError> {
    if p.format != ARCHIVE_FORMAT {
        return refused(format!("archive format {} is not supported (want {ARCHIVE_FORMAT})", p.format));
    }
    if p.engine != engine || p.shard != shard {
        return refused(format!("the archive is of {}/{}, not {engine}/{shard}", p.engine, p.shard));
    }
    if p.entries.len() > MAX_PLAN_ENTRIES {
        return refused(format!("{} entries, at most {MAX_PLAN_ENTRIES}", p.entries.len()));
    }
    let mut announced = HashMap::with_capacity(p.entries.len());
    for entry in &p.entries {
        if entry.path.as_str().starts_with(".ferry/") || entry.path.as_str() == ".ferry" {
            return refused(format!("entry {} is in Ferry's own namespace", entry.path));
        }
        if announced.insert(entry.path.clone(), entry.size).is_some() {
            return refused(format!("entry {} is announced twice", entry.path));
        }
    }
    for entry in &p.entries {
        if let Some(parent) = entry.path.parents().find(|p| announced.contains_key(*p)) {
            return refused(format!("entry {} is inside file {parent}", entry.path));
        }
    }
    if let Some(unknown) = p.skipped.iter().find(|s| !announced.contains_key(*s)) {
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
    // Refused by its header before a byte is read; the bound on reading
    // holds even if the header lied.
    let declared = entry.effective_size();
    if declared > MAX_CONTROL_ENTRY {
        return refused(format!("{name} is {declared} bytes, at most {MAX_CONTROL_ENTRY}"));
    }
    let mut buf = Vec::new();
    let n = entry.take(MAX_CONTROL_ENTRY + 1).read_to_end(&mut buf).await.map_err(interrupted)?;
    if n as u64 > MAX_CONTROL_ENTRY {
        return refused(format!("{name} is larger than {MAX_CONTROL_ENTRY} bytes"));
    }
    serde_json::from_slice(&buf).map_err(|e| ReceiveError::Refused(format!("{name}: {e}")))
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
    Begin(RelPath, u64),
    Data(ChunkBuf),
    End,
    /// A whole file in one chunk: begin, data and end.
    Whole(RelPath, ChunkBuf),
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

    pub(crate) async fn begin(&self, path: RelPath, size: u64) -> Result<(), ReceiveError> {
        self.send(WriteMsg::Begin(path, size)).await
    }

    pub(crate) async fn data(&self, bytes: ChunkBuf) -> Result<(), ReceiveError> {
        self.send(WriteMsg::Data(bytes)).await
    }

    pub(crate) async fn whole(&self, path: RelPath, bytes: ChunkBuf) -> Result<(), ReceiveError> {
        self.send(WriteMsg::Whole(path, bytes)).await
    }

    pub(crate) async fn end(&self) -> Result<(), ReceiveError> {
        self.send(WriteMsg::End).await
    }

    /// Stops the thread (a file not yet ended is removed) and collects what
    /// it completed.
    pub(crate) async fn finish(&mut self) -> WriterOutcome {
        self.tx.take();
        let thread = self.thread.take().expect("finish is called once");
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
            WriteMsg::Begin(path, size) => writer.begin(path, size),
            WriteMsg::Data(bytes) => writer.data(bytes),
            WriteMsg::End => writer.end(),
            WriteMsg::Whole(path, bytes) => {
                writer.begin(path, bytes.len() as u64).and_then(|()| writer.data(bytes)).and_then(|()| writer.end())
            }
        };
        if let Err(e) = step {
            error = Some(e);
            break;
        }
    }
    writer.flush_journal();
    // A file begun but not ended is incomplete: it must not stay.
    if let Some((path, ..)) = writer.current.take() {
        let _ = fs::remove_file(path.join_to(dir));
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
    current: Option<(RelPath, u64, File, blake3::Hasher, u64)>,
    /// The last directory created, so a flat snapshot does not ask for its
    /// directory once per file.
    made: Option<PathBuf>,
}

impl Writer<'_> {
    fn begin(&mut self, path: RelPath, size: u64) -> Result<(), String> {
        let target = path.join_to(self.dir);
        if let Some(parent) = target.parent()
            && self.made.as_deref() != Some(parent)
        {
            fs::create_dir_all(parent).map_err(|e| format!("{path}: {e}"))?;
            self.made = Some(parent.to_owned());
        }
        let file = create_new(&target).map_err(|e| format!("{path}: {e}"))?;
        self.current = Some((path, size, file, blake3::Hasher::new(), 0));
        Ok(())
    }

    fn data(&mut self, bytes: ChunkBuf) -> Result<(), String> {
        let (path, _, file, hasher, written) = self.current.as_mut().expect("data follows begin");
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
        let (path, size, _file, hasher, written) = self.current.take().expect("end follows begin");
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
            let _ = arrivals.send(Arrived::File(record.path.clone()));
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
