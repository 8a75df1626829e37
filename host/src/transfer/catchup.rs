//! Receiver side of one catch-up round: pull the changes after a position
//! from the source, verify them, write them into the replica, and let the
//! plugin move the replica's position.
//!
//! The round's archive (see [`crate::stream::delta`]) is untrusted like a
//! snapshot: it passes the same [`TarGuard`], its control entries the same
//! bounds, and its data entries are unpacked to a scratch directory (memory
//! bounded: streamed to disk by the snapshot's writer thread) and checked
//! against the manifest's BLAKE3 before a byte reaches the replica. Then
//! ranges are written in place, inline files aside and renamed, removals
//! unlinked, one `syncfs` makes it durable, and `apply-changes` moves the
//! position. A round that fails after writing may leave bytes past the
//! replica's position in its files: harmless, the next round rewrites them,
//! and only `apply-changes` moves the position. No retries here: the caller
//! decides.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::AsyncRead;
use tokio_tar::EntryType;
use tokio_util::sync::CancellationToken;

use super::task::StallGuard;
use crate::http::{Client, TRANSFER_EPOCH_HEADER, TRANSFER_ID_HEADER};
use crate::install::sync::syncfs;
use crate::plugin::types::MAX_PLAN_ENTRIES;
use crate::plugin::{DeltaMeta, EngineError, HookError, Plugin, ShardPosition};
use crate::relpath::RelPath;
use crate::stream::blockdiff::{self, BlockFile, FileDigests};
use crate::stream::client::{Changes, ChangesFetchError, ChangesRequest, FetchError, fetch_changes};
use crate::stream::delta::{DELTA_PATH, DeltaEntryInfo, DeltaManifest, DeltaPreamble};
use crate::stream::guard::TarGuard;
use crate::stream::manifest::{ARCHIVE_FORMAT, ERROR_PATH, MANIFEST_PATH};
use crate::stream::receive::{
    CHUNK, FREE_SPACE_RESERVE, FileWriter, Progress, ReceiveError, TransportWatch, copy_entry, entry_path, free_space,
    kind_name, read_json,
};
use crate::stream::{FailureCode, FileRecord, RateLimiter, SourceFailure};

/// What a round did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Round {
    /// What the round covered, as the source planned it.
    pub meta: DeltaMeta,
    /// The replica's position after the round, as `apply-changes` said.
    pub position: ShardPosition,
    /// Data bytes received (ranges and inline files).
    pub bytes: u64,
    /// Entries of the round (ranges, inline files, removals).
    pub entries: usize,
    pub elapsed: Duration,
}

/// Why a round failed. The replica's position is never wrong after any of
/// them (only `apply-changes` moves it).
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    /// The source no longer keeps the history after our position: snapshot
    /// again.
    #[error("history gone: {0}")]
    HistoryGone(String),
    /// The source's history after our position is not ours.
    #[error("term changed: {0}")]
    TermChanged(String),
    /// The engine (or this host) cannot make this delta.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The source gave up for another reason and said why.
    #[error("{0}")]
    Source(SourceFailure),
    /// The source or its archive broke the rules (a checksum mismatch
    /// included), or the source refused the request.
    #[error("bad round: {0}")]
    Refused(String),
    /// The stream broke off, or the source could not be reached; worth
    /// another round.
    #[error("round interrupted: {0}")]
    Interrupted(String),
    /// Our own disk, or our plugin, failed.
    #[error("applying the round: {0}")]
    Local(String),
    #[error("cancelled")]
    Cancelled,
}

impl From<SourceFailure> for RoundError {
    fn from(failure: SourceFailure) -> Self {
        match failure.code {
            Some(FailureCode::HistoryGone) => RoundError::HistoryGone(failure.to_string()),
            Some(FailureCode::TermChanged) => RoundError::TermChanged(failure.to_string()),
            Some(FailureCode::Unsupported) => RoundError::Unsupported(failure.to_string()),
            None => RoundError::Source(failure),
        }
    }
}

impl From<ReceiveError> for RoundError {
    fn from(e: ReceiveError) -> Self {
        match e {
            ReceiveError::Interrupted(why) => RoundError::Interrupted(why),
            ReceiveError::Source(failure) => failure.into(),
            ReceiveError::Refused(why) => RoundError::Refused(why),
            ReceiveError::Mismatch(why) => RoundError::Refused(format!("checksum mismatch: {why}")),
            ReceiveError::Local(why) => RoundError::Local(why),
            e @ ReceiveError::NoSpace { .. } => RoundError::Local(e.to_string()),
            ReceiveError::Cancelled => RoundError::Cancelled,
        }
    }
}

/// Where a round comes from and goes to.
pub struct RoundRequest<'a> {
    pub client: &'a Client,
    /// Base URL of the source node.
    pub source: &'a str,
    pub token: &'a str,
    pub engine: &'a str,
    pub shard: &'a str,
    /// A consensus transfer's id and epoch, sent as with a snapshot pull;
    /// `None` for a direct pull.
    pub transfer: Option<(&'a str, u64)>,
    /// The position the replica holds.
    pub since: ShardPosition,
    /// Emptied, then holds the round's data until it is applied (e.g.
    /// `staging/<transfer-id>/round`).
    pub scratch: &'a Path,
    /// The replica the round is applied to (published, not yet served).
    pub replica: &'a Path,
    /// The receiver's plugin of the engine.
    pub plugin: &'a Plugin,
    pub rate: &'a RateLimiter,
    /// A read that waits longer than this for data breaks the round.
    pub stall_timeout: Duration,
    /// The replica's block digests, kept from round to round.
    pub digests: &'a DigestCache,
}

/// The digests of the replica's files the source compares block by block,
/// kept between rounds: only the blocks a round wrote are hashed again, so a
/// round costs the receiver its changes, not its files. Only rounds write
/// the replica while it is caught up; a round that fails clears it.
#[derive(Clone, Default)]
pub struct DigestCache(Arc<std::sync::Mutex<Digests>>);

/// A file's length and block digests, by file.
type Digests = HashMap<BlockFile, (u64, Vec<u128>)>;

impl DigestCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Digests> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The digests of `files` in `replica`, hashing those not cached.
    fn digests(&self, replica: &Path, files: &[BlockFile]) -> io::Result<Vec<FileDigests>> {
        let mut out = Vec::with_capacity(files.len());
        let mut total = 0usize;
        for file in files {
            let cached = self.lock().get(file).cloned();
            let (length, digests) = match cached {
                Some(found) => found,
                None => {
                    let fresh = blockdiff::digests_of(replica, file)?;
                    self.lock().insert(file.clone(), fresh.clone());
                    fresh
                }
            };
            total += digests.len() * blockdiff::DIGEST_BYTES;
            if total > blockdiff::MAX_DIGEST_BYTES {
                return Err(io::Error::other(format!(
                    "the files compared block by block need more than {} MiB of digests in one round",
                    blockdiff::MAX_DIGEST_BYTES >> 20
                )));
            }
            out.push(FileDigests::new(file, length, &digests));
        }
        Ok(out)
    }

    /// The files whose digests are kept (asked for by an earlier round).
    fn files(&self) -> Vec<BlockFile> {
        let mut files: Vec<BlockFile> = self.lock().keys().cloned().collect();
        files.sort_by(|a, b| a.path.cmp(&b.path).then(a.block_size.cmp(&b.block_size)));
        files
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    /// After a round was written into `replica`: the blocks it wrote are
    /// hashed again, and a file changed any other way is forgotten.
    fn update(&self, replica: &Path, entries: &[DeltaEntryInfo]) -> io::Result<()> {
        let mut cache = self.lock();
        for entry in entries {
            let DeltaEntryInfo::Blocks { path, length, block_size, ranges } = entry else {
                cache.retain(|file, _| &file.path != entry.path());
                continue;
            };
            cache.retain(|file, _| &file.path != path || file.block_size == *block_size);
            let Some((cached_len, digests)) = cache.get_mut(&BlockFile { path: path.clone(), block_size: *block_size })
            else {
                continue;
            };
            let f = File::open(path.join_to(replica))?;
            digests.resize(blockdiff::blocks(*length, *block_size) as usize, 0);
            let bs = u64::from(*block_size);
            for [offset, n] in ranges {
                let first = offset / bs;
                let fresh = blockdiff::hash_range(&f, *offset, *n, *block_size)?;
                digests[first as usize..first as usize + fresh.len()].copy_from_slice(&fresh);
            }
            *cached_len = *length;
        }
        Ok(())
    }
}

/// Pulls one round of changes after `req.since` from the source and applies
/// it to `req.replica`.
///
/// # Cancel safety
/// Pass a token instead of dropping the future: on cancel while receiving,
/// the writer thread is stopped and joined before this returns. Once the
/// replica is being written, the round runs to its end (bounded local work).
pub async fn pull_round(req: &RoundRequest<'_>, cancel: &CancellationToken) -> Result<Round, RoundError> {
    let started = Instant::now();
    let headers = match req.transfer {
        Some((id, epoch)) => vec![(TRANSFER_ID_HEADER, id.to_owned()), (TRANSFER_EPOCH_HEADER, epoch.to_string())],
        None => Vec::new(),
    };
    let mut files = req.digests.files();
    // Asked once for the files a round compares, then with their digests;
    // a third ask means the plan keeps changing under us.
    let mut asks = 0;
    let body = loop {
        let (replica, wanted, cache) = (req.replica.to_owned(), files.clone(), req.digests.clone());
        let digests = tokio::task::spawn_blocking(move || cache.digests(&replica, &wanted))
            .await
            .map_err(|e| RoundError::Local(e.to_string()))?
            .map_err(|e| RoundError::Local(format!("digests of the replica: {e}")))?;
        let request = ChangesRequest { since: req.since, digests };
        let fetched = tokio::select! {
            r = fetch_changes(req.client, req.source, req.token, req.engine, req.shard, &request, &headers, req.stall_timeout) => r,
            _ = cancel.cancelled() => return Err(RoundError::Cancelled),
        };
        match fetched.map_err(fetch_error)? {
            Changes::Archive(body) => break body,
            Changes::NeedDigests(more) if asks < 2 && more.iter().all(|f| !files.contains(f)) => {
                asks += 1;
                if more.len() > MAX_PLAN_ENTRIES {
                    return Err(RoundError::Refused(format!("the source asks for digests of {} files", more.len())));
                }
                files.extend(more);
            }
            Changes::NeedDigests(more) => {
                return Err(RoundError::Interrupted(format!(
                    "the source asks again for digests ({} files): the plan changed",
                    more.len()
                )));
            }
        }
    };
    let body = StallGuard::new(body, req.stall_timeout);
    let received = receive_round(body, req.engine, req.shard, req.since, req.scratch, req.rate, cancel).await;
    let applied = match received {
        Ok(received) => apply_round(&received, req.plugin, req.shard, req.replica, req.digests).await,
        Err(e) => Err(e),
    };
    let mut round = applied.inspect_err(|_| req.digests.clear())?;
    round.elapsed = started.elapsed();
    // The data is in the replica now; the scratch copy only takes space.
    let scratch = req.scratch.to_owned();
    let _ = tokio::task::spawn_blocking(move || fs::remove_dir_all(scratch)).await;
    Ok(round)
}

fn fetch_error(e: ChangesFetchError) -> RoundError {
    let message = e.error.to_string();
    match (e.code.as_deref().and_then(FailureCode::parse), e.error) {
        (Some(FailureCode::HistoryGone), _) => RoundError::HistoryGone(message),
        (Some(FailureCode::TermChanged), _) => RoundError::TermChanged(message),
        (Some(FailureCode::Unsupported), _) => RoundError::Unsupported(message),
        (None, FetchError::Transient(_)) => RoundError::Interrupted(message),
        (None, FetchError::Refused(_)) => RoundError::Refused(message),
    }
}

/// A round received whole and verified, not yet applied.
pub struct ReceivedRound {
    pub preamble: DeltaPreamble,
    /// Where the data entries are, each at its path.
    pub data_dir: PathBuf,
    /// Data bytes received.
    pub bytes: u64,
}

/// Unpacks a round's archive from `reader` into `scratch/data` (`scratch`
/// emptied first) and checks it: announced as the changes of
/// `engine`/`shard` after `since`, every data entry announced, once, of its
/// announced size, and matching the manifest's BLAKE3.
///
/// # Cancel safety
/// As [`crate::stream::receive::receive`]: pass a token, do not drop.
pub async fn receive_round(
    reader: impl AsyncRead + Unpin,
    engine: &str,
    shard: &str,
    since: ShardPosition,
    scratch: &Path,
    rate: &RateLimiter,
    cancel: &CancellationToken,
) -> Result<ReceivedRound, RoundError> {
    let data_dir = scratch.join("data");
    let cleared = data_dir.clone();
    tokio::task::spawn_blocking(move || clear_dir(&cleared))
        .await
        .map_err(|e| RoundError::Local(e.to_string()))?
        .map_err(|e| RoundError::Local(format!("clearing {}: {e}", scratch.display())))?;
    let progress = Arc::new(Progress::default());
    let mut writer = FileWriter::start(data_dir.clone(), progress.clone(), engine, None);
    let result = tokio::select! {
        r = unpack(reader, engine, shard, since, &data_dir, rate, &mut writer) => r,
        _ = cancel.cancelled() => Err(RoundError::Cancelled),
    };
    let outcome = writer.finish().await;
    let (preamble, manifest) = match (result, outcome.error) {
        (Err(RoundError::Cancelled), _) => return Err(RoundError::Cancelled),
        (_, Some(e)) => return Err(RoundError::Local(e)),
        (Err(e), None) => return Err(e),
        (Ok(done), None) => done,
    };
    verify(&manifest, &outcome.records)?;
    let bytes = progress.received.load(Ordering::Relaxed);
    Ok(ReceivedRound { preamble, data_dir, bytes })
}

fn refused<T>(msg: impl Into<String>) -> Result<T, RoundError> {
    Err(RoundError::Refused(msg.into()))
}

async fn unpack(
    reader: impl AsyncRead + Unpin,
    engine: &str,
    shard: &str,
    since: ShardPosition,
    data_dir: &Path,
    rate: &RateLimiter,
    writer: &mut FileWriter,
) -> Result<(DeltaPreamble, DeltaManifest), RoundError> {
    let transport = TransportWatch::new(reader);
    let (broke, ended) = (transport.failed.clone(), transport.ended.clone());
    // An archive that stops early was cut (the network, or a source that
    // stalled or went away), not malformed.
    let read_err = |e: io::Error| {
        if broke.load(Ordering::Relaxed) || ended.load(Ordering::Relaxed) {
            RoundError::Interrupted(crate::http::error_chain(&e))
        } else {
            RoundError::Refused(e.to_string())
        }
    };
    let mut archive = tokio_tar::Archive::new(TarGuard::new(transport));
    let mut entries = archive.entries().map_err(&read_err)?;

    let Some(first) = entries.next().await else {
        return Err(RoundError::Interrupted("the archive ended before its preamble".into()));
    };
    let mut first = first.map_err(&read_err)?;
    let path = entry_path(&first)?;
    if path == ERROR_PATH {
        return Err(read_json::<SourceFailure, _>(&mut first, ERROR_PATH).await?.into());
    }
    if path != DELTA_PATH {
        return refused(format!("first entry is {path:?}, not the delta preamble"));
    }
    let preamble: DeltaPreamble = read_json(&mut first, DELTA_PATH).await?;
    drop(first);
    let announced = check_preamble(&preamble, engine, shard, since)?;

    let needed = preamble.data_bytes();
    let free = free_space(data_dir).map_err(|e| RoundError::Local(format!("free space of the scratch: {e}")))?;
    if needed.saturating_add(FREE_SPACE_RESERVE) > free {
        return Err(ReceiveError::NoSpace { needed, free }.into());
    }

    let mut seen: HashSet<RelPath> = HashSet::new();
    let manifest = loop {
        let Some(entry) = entries.next().await else {
            return Err(RoundError::Interrupted("the archive ended before its manifest".into()));
        };
        let mut entry = entry.map_err(&read_err)?;
        let path = entry_path(&entry)?;
        match path.as_str() {
            MANIFEST_PATH => break read_json::<DeltaManifest, _>(&mut entry, MANIFEST_PATH).await?,
            ERROR_PATH => return Err(read_json::<SourceFailure, _>(&mut entry, ERROR_PATH).await?.into()),
            _ => {}
        }
        let kind = entry.header().entry_type();
        if kind != EntryType::Regular {
            return refused(format!("entry {path:?} is a {}, not a regular file", kind_name(kind)));
        }
        let path = RelPath::new(&path).map_err(|e| RoundError::Refused(format!("entry {e}")))?;
        let Some(&size) = announced.get(&path) else {
            return refused(format!("entry {path} was not announced in the delta preamble"));
        };
        if !seen.insert(path.clone()) {
            return refused(format!("entry {path} appears twice"));
        }
        let header_size = entry.effective_size();
        if header_size != size {
            return refused(format!("entry {path} is {header_size} bytes, the preamble said {size}"));
        }
        copy_entry(&mut entry, &path, seen.len() - 1, size, writer, rate, &read_err).await?;
    };

    if let Some(next) = entries.next().await {
        return match next {
            Ok(entry) => refused(format!("entry {:?} follows the manifest", entry_path(&entry)?)),
            Err(e) => Err(read_err(e)),
        };
    }
    if manifest.format != ARCHIVE_FORMAT || manifest.meta != preamble.meta {
        return refused("the manifest does not describe the announced delta");
    }
    let listed: Vec<(&RelPath, u64)> = manifest.entries.iter().map(|r| (&r.path, r.size)).collect();
    let expected: Vec<(&RelPath, u64)> =
        preamble.entries.iter().filter_map(|e| Some((e.path(), e.data_size()?))).collect();
    if listed != expected {
        return refused("the manifest lists other entries than the delta preamble");
    }
    if seen.len() != announced.len() {
        return refused(format!("the archive holds {} of {} announced data entries", seen.len(), announced.len()));
    }
    Ok((preamble, manifest))
}

/// Checks the preamble; returns the data entries' announced sizes.
fn check_preamble(
    p: &DeltaPreamble,
    engine: &str,
    shard: &str,
    since: ShardPosition,
) -> Result<HashMap<RelPath, u64>, RoundError> {
    if p.format != ARCHIVE_FORMAT {
        return refused(format!("archive format {} is not supported (want {ARCHIVE_FORMAT})", p.format));
    }
    if p.engine != engine || p.shard != shard {
        return refused(format!("the delta is of {}/{}, not {engine}/{shard}", p.engine, p.shard));
    }
    // `until` may be below `since`: an engine's position need not grow when
    // its files are rewritten (a SQLite WAL that was reset).
    if p.meta.since != since.position {
        return refused(format!(
            "the delta covers {}..{}, we asked for the changes after {}",
            p.meta.since, p.meta.until, since.position
        ));
    }
    if p.entries.len() > MAX_PLAN_ENTRIES {
        return refused(format!("{} entries, at most {MAX_PLAN_ENTRIES}", p.entries.len()));
    }
    let mut paths = HashSet::with_capacity(p.entries.len());
    let mut data = HashMap::new();
    for entry in &p.entries {
        let path = entry.path();
        if path.as_str().starts_with(".ferry/") || path.as_str() == ".ferry" {
            return refused(format!("entry {path} is in Ferry's own namespace"));
        }
        if !paths.insert(path) {
            return refused(format!("entry {path} is announced twice"));
        }
        if let DeltaEntryInfo::Range { offset, length, .. } = entry
            && offset.checked_add(*length).is_none_or(|end| end > crate::plugin::types::MAX_DELTA_FILE)
        {
            return refused(format!("entry {path}: range {offset}+{length} is out of bounds"));
        }
        if let DeltaEntryInfo::Blocks { length, block_size, ranges, .. } = entry {
            check_blocks(*length, *block_size, ranges)
                .map_err(|e| RoundError::Refused(format!("entry {path}: {e}")))?;
        }
        if let Some(size) = entry.data_size() {
            data.insert(path.clone(), size);
        }
    }
    for entry in &p.entries {
        if let Some(parent) = entry.path().parents().find(|d| paths.iter().any(|p| p.as_str() == *d)) {
            return refused(format!("entry {} is inside file {parent}", entry.path()));
        }
    }
    Ok(data)
}

/// A blocks entry's ranges: whole blocks (the last may end at `length`),
/// ascending and apart, within the file.
fn check_blocks(length: u64, block_size: u32, ranges: &[[u64; 2]]) -> Result<(), String> {
    if !block_size.is_power_of_two()
        || !(crate::plugin::types::MIN_DIFF_BLOCK..=crate::plugin::types::MAX_DIFF_BLOCK).contains(&block_size)
    {
        return Err(format!("block size {block_size} is out of bounds"));
    }
    if length > crate::plugin::types::MAX_DELTA_FILE {
        return Err(format!("length {length} is out of bounds"));
    }
    if ranges.len() as u64 > blockdiff::blocks(length, block_size) {
        return Err(format!("{} ranges for {length} bytes", ranges.len()));
    }
    let bs = u64::from(block_size);
    let mut end = 0;
    for &[offset, n] in ranges {
        let stop = offset.checked_add(n).filter(|&s| s <= length);
        let Some(stop) = stop else { return Err(format!("range {offset}+{n} is past {length} bytes")) };
        if n == 0 || offset < end || (end > 0 && offset == end) {
            return Err(format!("range {offset}+{n} is empty, out of order or touches the one before"));
        }
        if offset % bs != 0 || (stop % bs != 0 && stop != length) {
            return Err(format!("range {offset}+{n} is not whole blocks of {block_size}"));
        }
        end = stop;
    }
    Ok(())
}

/// Every data entry we wrote must match the source's checksum.
fn verify(manifest: &DeltaManifest, records: &[FileRecord]) -> Result<(), RoundError> {
    let ours: HashMap<&RelPath, &FileRecord> = records.iter().map(|r| (&r.path, r)).collect();
    for record in &manifest.entries {
        match ours.get(&record.path) {
            Some(ours) if ours.size == record.size && ours.blake3 == record.blake3 => {}
            Some(ours) => {
                return refused(format!(
                    "checksum mismatch: {}: received {} bytes with BLAKE3 {}, the source sent {} bytes with {}",
                    record.path, ours.size, ours.blake3, record.size, record.blake3
                ));
            }
            None => return refused(format!("checksum mismatch: {} was never received", record.path)),
        }
    }
    Ok(())
}

/// Writes a verified round into `replica` (ranges in place, inline files
/// aside then renamed, removals), makes it durable with one `syncfs`, then
/// lets the plugin check it and move the replica's position.
pub async fn apply_round(
    received: &ReceivedRound,
    plugin: &Plugin,
    shard: &str,
    replica: &Path,
    digests: &DigestCache,
) -> Result<Round, RoundError> {
    let started = Instant::now();
    let (entries, data_dir, root) = (received.preamble.entries.clone(), received.data_dir.clone(), replica.to_owned());
    let cache = digests.clone();
    tokio::task::spawn_blocking(move || {
        for entry in &entries {
            write_entry(&root, &data_dir, entry).map_err(|e| RoundError::Local(format!("{}: {e}", entry.path())))?;
        }
        syncfs(&root).map_err(|e| RoundError::Local(format!("syncfs of {}: {e}", root.display())))?;
        cache.update(&root, &entries).map_err(|e| RoundError::Local(format!("digests of the replica: {e}")))
    })
    .await
    .map_err(|e| RoundError::Local(e.to_string()))??;
    let meta = &received.preamble.meta;
    let position = plugin.apply_changes(shard, replica, meta).await.map_err(hook_error)?;
    Ok(Round {
        meta: meta.clone(),
        position,
        bytes: received.bytes,
        entries: received.preamble.entries.len(),
        elapsed: started.elapsed(),
    })
}

fn hook_error(e: HookError) -> RoundError {
    match e.engine_error() {
        Some(EngineError::HistoryGone(_)) => RoundError::HistoryGone(e.to_string()),
        Some(EngineError::TermChanged(_)) => RoundError::TermChanged(e.to_string()),
        Some(EngineError::Unsupported(_)) => RoundError::Unsupported(e.to_string()),
        _ => RoundError::Local(e.to_string()),
    }
}

/// Applies one entry under `root`, never through a symlink: parents are
/// checked (and made) one by one, files opened with `O_NOFOLLOW`.
fn write_entry(root: &Path, data_dir: &Path, entry: &DeltaEntryInfo) -> io::Result<()> {
    let path = entry.path();
    for parent in path.parents() {
        let dir = root.join(parent);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(io::Error::other(format!("{parent} is a symlink")));
            }
            Ok(_) => return Err(io::Error::other(format!("{parent} is not a directory"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&dir)?,
            Err(e) => return Err(e),
        }
    }
    let target = path.join_to(root);
    match entry {
        DeltaEntryInfo::Range { offset, length, .. } => {
            copy_at(&mut File::open(path.join_to(data_dir))?, &open_in_place(&target)?, *offset, *length)
        }
        DeltaEntryInfo::Blocks { length, ranges, .. } => {
            let (mut input, output) = (File::open(path.join_to(data_dir))?, open_in_place(&target)?);
            output.set_len(*length)?;
            for [offset, n] in ranges {
                copy_at(&mut input, &output, *offset, *n)?;
            }
            Ok(())
        }
        DeltaEntryInfo::Inline { size, .. } => {
            let name = target.file_name().expect("a relative path has a file name").to_string_lossy();
            let aside = target.with_file_name(format!(".{name}.ferry-inline"));
            let _ = fs::remove_file(&aside);
            let mut input = File::open(path.join_to(data_dir))?;
            let output = fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(&aside)?;
            copy_at(&mut input, &output, 0, *size)?;
            // Renaming replaces a symlink at `target` itself, never its target.
            fs::rename(&aside, &target)
        }
        DeltaEntryInfo::Remove { .. } => match fs::remove_file(&target) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// A replica's file, to be written in place (created if missing; never
/// through a symlink).
fn open_in_place(target: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(target)
}

/// Copies `length` bytes of `input` to `output` at `offset`, a chunk at a time.
fn copy_at(input: &mut File, output: &File, offset: u64, length: u64) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK.min(length as usize)];
    let mut done = 0;
    while done < length {
        let want = (length - done).min(buf.len() as u64) as usize;
        input.read_exact(&mut buf[..want])?;
        output.write_all_at(&buf[..want], offset + done)?;
        done += want as u64;
    }
    Ok(())
}

/// Empties `dir` (creating it if missing).
fn clear_dir(dir: &Path) -> io::Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    fs::create_dir_all(dir)
}
