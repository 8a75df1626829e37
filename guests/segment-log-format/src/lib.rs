//! On-disk format of the `segment-log` engine, a write-ahead log modeled on
//! Neon's safekeeper.
//!
//! A shard directory holds:
//! - `control`: the control file (term, flush and commit positions, segment
//!   size, first retained position), protected by a CRC-32. Version 1 is 60
//!   bytes; version 2 (92 bytes) adds the live-move state ([`LiveState`]:
//!   fence, fence history, retirement) and is written only when that state is
//!   not empty, so a shard never fenced keeps version-1 files that older
//!   readers understand. Both versions are read.
//! - `control.lock`: an empty file that only carries the writers' lock (see
//!   below); never renamed, never part of a snapshot or delta;
//! - `segment-<index as 16 hex digits>`: WAL segments of `segment_size` bytes.
//!   Segment `i` holds log positions `[i * segment_size, (i + 1) * segment_size)`.
//!
//! A segment is a sequence of records `[len: u32 LE][crc32(payload): u32 LE][payload]`.
//! Records never cross a segment boundary; a zero `len` ends the segment's
//! records (the rest is zero padding). The flush position is the position just
//! after the last record; everything up to it is durable on the source.
//!
//! # Writers, terms and fences
//! A writer appends at a term: the control file's `term` when it opened the
//! shard ([`Writer::open`]). Each append runs under an exclusive POSIX record
//! lock (`fcntl`) on byte 0 of `control.lock` ([`WRITER_LOCK`]), and under it
//! re-reads the control file and refuses ([`Control::check_writable`]) if the
//! shard is fenced, retired, or its term is no longer the writer's. (The lock
//! is not on `control` itself: `control` is replaced by a rename on every
//! write, and a lock on a replaced file protects nothing.)
//!
//! A fence ([`Control::fence`]) bumps the term (`T` to `T+1`), and records the
//! fencing epoch and where the old term's history ends (`fence_term = T`,
//! `fence_flush = flush`). Records are never rewritten by a fence, so a
//! position `(T, p)` with `p <= fence_flush` is still on the shard's history
//! ([`Control::same_history`]): a receiver that caught up in term `T` can take
//! its final round under the fence, and ends at `(T+1, fence_flush)`, the
//! position the fence reports. Unfencing clears the epoch and keeps the term:
//! writers re-open and continue at `T+1`. Retiring is for ever.
//!
//! A fence is written without the lock (a plugin instance cannot take one), so
//! it can race with one append in flight, whose control write may undo it.
//! The host therefore fences, takes the locks, and fences again with the same
//! epoch: the second answer is final (idempotent if the first held, a fresh
//! bump if it was undone), since no append can run while the host holds the
//! lock.
//!
//! This crate is pure Rust: the guest plugin reads shards with it, and Ferry's
//! test kit writes shards with it ([`Generator`], and [`Writer`] on Unix).

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

pub const CONTROL_FILE: &str = "control";
pub const CONTROL_MAGIC: &[u8; 8] = b"FSLGCTL1";
/// Length of a version-1 control file.
pub const CONTROL_LEN: usize = 60;
/// Length of a version-2 control file (with a [`LiveState`]).
pub const CONTROL_V2_LEN: usize = 92;
/// Version of the snapshot layout (a snapshot's control file is always
/// version 1: it carries no live state).
pub const FORMAT_VERSION: u32 = 1;
/// The file whose lock writers take around each append.
pub const LOCK_FILE: &str = "control.lock";
/// The byte range of [`LOCK_FILE`] writers lock exclusively: `(offset, length)`.
pub const WRITER_LOCK: (u64, u64) = (0, 1);
pub const RECORD_HEADER_LEN: u64 = 8;
/// Smallest segment a shard may use; large enough for one header and payload.
pub const MIN_SEGMENT_SIZE: u64 = 4096;
/// Largest segment a shard may use (1 GiB).
pub const MAX_SEGMENT_SIZE: u64 = 1 << 30;

/// What state the shard's control file says the shard is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardState {
    /// A live shard, written by the engine.
    Active,
    /// A received snapshot that `apply` has not yet made live.
    Snapshot,
}

impl ShardState {
    fn code(self) -> u32 {
        match self {
            ShardState::Active => 0,
            ShardState::Snapshot => 1,
        }
    }

    fn from_code(code: u32) -> Option<Self> {
        match code {
            0 => Some(ShardState::Active),
            1 => Some(ShardState::Snapshot),
            _ => None,
        }
    }
}

/// The live-move state of a control file; all zero when never fenced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveState {
    /// The transfer epoch holding the fence; 0: not fenced.
    pub fenced_epoch: u64,
    /// The term before the last fence's bump (0: never fenced).
    pub fence_term: u64,
    /// The flush position when the last fence bumped the term.
    pub fence_flush: u64,
    /// The epoch that retired the shard; 0: not retired. Final.
    pub retired_epoch: u64,
}

/// The control file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    pub state: ShardState,
    pub term: u64,
    /// Position just after the last durable record.
    pub flush: u64,
    /// Position up to which records are committed; `commit <= flush`.
    pub commit: u64,
    pub segment_size: u64,
    /// First retained position; a multiple of `segment_size`.
    pub start: u64,
    /// Fence and retirement (version 2 only).
    pub live: LiveState,
}

/// Why a shard's files are not valid, or a write is refused.
#[derive(Debug)]
pub enum FormatError {
    Io {
        path: String,
        source: io::Error,
    },
    Invalid(String),
    /// The shard is fenced, retired, or its term moved past the writer's.
    Fenced(String),
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Io { path, source } => write!(f, "{path}: {source}"),
            FormatError::Invalid(msg) => f.write_str(msg),
            FormatError::Fenced(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for FormatError {}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FormatError + '_ {
    move |source| FormatError::Io { path: path.display().to_string(), source }
}

fn invalid(msg: impl Into<String>) -> FormatError {
    FormatError::Invalid(msg.into())
}

impl Control {
    /// The file's bytes: version 1 if the live state is empty, else 2.
    pub fn encode(&self) -> Vec<u8> {
        let v2 = self.live != LiveState::default();
        let (len, version) = if v2 { (CONTROL_V2_LEN, 2u32) } else { (CONTROL_LEN, 1u32) };
        let mut buf = vec![0u8; len];
        buf[0..8].copy_from_slice(CONTROL_MAGIC);
        buf[8..12].copy_from_slice(&version.to_le_bytes());
        buf[12..16].copy_from_slice(&self.state.code().to_le_bytes());
        buf[16..24].copy_from_slice(&self.term.to_le_bytes());
        buf[24..32].copy_from_slice(&self.flush.to_le_bytes());
        buf[32..40].copy_from_slice(&self.commit.to_le_bytes());
        buf[40..48].copy_from_slice(&self.segment_size.to_le_bytes());
        buf[48..56].copy_from_slice(&self.start.to_le_bytes());
        if v2 {
            buf[56..64].copy_from_slice(&self.live.fenced_epoch.to_le_bytes());
            buf[64..72].copy_from_slice(&self.live.fence_term.to_le_bytes());
            buf[72..80].copy_from_slice(&self.live.fence_flush.to_le_bytes());
            buf[80..88].copy_from_slice(&self.live.retired_epoch.to_le_bytes());
        }
        let crc = crc32fast::hash(&buf[..len - 4]);
        buf[len - 4..].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    pub fn decode(buf: &[u8]) -> Result<Control, FormatError> {
        if buf.len() != CONTROL_LEN && buf.len() != CONTROL_V2_LEN {
            return Err(invalid(format!(
                "control file is {} bytes, expected {CONTROL_LEN} or {CONTROL_V2_LEN}",
                buf.len()
            )));
        }
        if &buf[0..8] != CONTROL_MAGIC {
            return Err(invalid("control file has a wrong magic"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(buf[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
        let len = buf.len();
        let crc = crc32fast::hash(&buf[..len - 4]);
        if crc != u32_at(len - 4) {
            return Err(invalid("control file checksum mismatch"));
        }
        let version = u32_at(8);
        let live = match (version, len) {
            (1, CONTROL_LEN) => LiveState::default(),
            (2, CONTROL_V2_LEN) => LiveState {
                fenced_epoch: u64_at(56),
                fence_term: u64_at(64),
                fence_flush: u64_at(72),
                retired_epoch: u64_at(80),
            },
            (1 | 2, _) => return Err(invalid(format!("control file version {version} is {len} bytes"))),
            _ => return Err(invalid(format!("control file format version {version} is not supported"))),
        };
        let state = ShardState::from_code(u32_at(12))
            .ok_or_else(|| invalid(format!("control file has unknown state {}", u32_at(12))))?;
        let control = Control {
            state,
            term: u64_at(16),
            flush: u64_at(24),
            commit: u64_at(32),
            segment_size: u64_at(40),
            start: u64_at(48),
            live,
        };
        control.check()?;
        Ok(control)
    }

    /// Internal consistency of the fields.
    pub fn check(&self) -> Result<(), FormatError> {
        if !(MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&self.segment_size) {
            return Err(invalid(format!("segment size {} is out of range", self.segment_size)));
        }
        if self.start % self.segment_size != 0 {
            return Err(invalid(format!("start {} is not segment-aligned", self.start)));
        }
        if self.flush < self.start {
            return Err(invalid(format!("flush {} is before start {}", self.flush, self.start)));
        }
        if self.commit > self.flush {
            return Err(invalid(format!("commit {} is past flush {}", self.commit, self.flush)));
        }
        let live = &self.live;
        if live.fenced_epoch != 0
            && (live.fence_term.checked_add(1) != Some(self.term) || live.fence_flush != self.flush)
        {
            return Err(invalid(format!(
                "fenced control file: term {} flush {} do not follow the fence's term {} flush {}",
                self.term, self.flush, live.fence_term, live.fence_flush
            )));
        }
        Ok(())
    }

    /// Whether the position `(term, position)` lies on this shard's history:
    /// in the current term, or in the term a fence bumped from, no further
    /// than where that term ended (a fence writes no record).
    pub fn same_history(&self, term: u64, position: u64) -> bool {
        term == self.term
            || (self.live.fence_term != 0
                && term == self.live.fence_term
                && self.term == term + 1
                && position <= self.live.fence_flush)
    }

    /// Refuses a write by a writer of term `writer_term`: the shard must be
    /// live, not fenced, not retired, and still in the writer's term.
    pub fn check_writable(&self, writer_term: u64) -> Result<(), FormatError> {
        if self.state != ShardState::Active {
            return Err(invalid("the shard is a received snapshot that was never applied"));
        }
        if self.live.retired_epoch != 0 {
            return Err(FormatError::Fenced(format!(
                "the shard was retired by transfer epoch {}: it moved",
                self.live.retired_epoch
            )));
        }
        if self.live.fenced_epoch != 0 {
            return Err(FormatError::Fenced(format!(
                "the shard is fenced by transfer epoch {}",
                self.live.fenced_epoch
            )));
        }
        if self.term != writer_term {
            return Err(FormatError::Fenced(format!(
                "term moved from {writer_term} to {}: re-open the shard",
                self.term
            )));
        }
        Ok(())
    }

    /// The control file with its flush moved to `end` (records written past
    /// it, see [`written_end`]); a fence that holds counts them too.
    pub fn with_written_end(&self, end: u64) -> Control {
        if end <= self.flush {
            return *self;
        }
        let mut live = self.live;
        if live.fenced_epoch != 0 && live.fence_flush == self.flush {
            live.fence_flush = end;
        }
        Control { flush: end, commit: end, live, ..*self }
    }

    /// The control file fenced by `epoch`: the term bumped, the old term's end
    /// recorded. Unchanged if `epoch` holds the fence already.
    pub fn fence(&self, epoch: u64) -> Result<Control, FormatError> {
        if epoch == 0 {
            return Err(invalid("transfer epoch 0 is not an epoch"));
        }
        if self.state != ShardState::Active {
            return Err(invalid("only a live shard can be fenced"));
        }
        if self.live.retired_epoch != 0 {
            return Err(FormatError::Fenced(format!("retired by transfer epoch {}", self.live.retired_epoch)));
        }
        match self.live.fenced_epoch {
            0 => {}
            held if held == epoch => return Ok(*self),
            held => return Err(FormatError::Fenced(format!("fenced by transfer epoch {held}, not {epoch}"))),
        }
        let term = self.term.checked_add(1).ok_or_else(|| invalid("the term cannot grow any more"))?;
        let live = LiveState { fenced_epoch: epoch, fence_term: self.term, fence_flush: self.flush, ..self.live };
        Ok(Control { term, live, ..*self })
    }

    /// The control file with the fence of `epoch` lifted (the term stays
    /// bumped). Unchanged if nothing is fenced; refused if another epoch
    /// holds the fence or the shard is retired.
    pub fn unfence(&self, epoch: u64) -> Result<Control, FormatError> {
        if self.live.retired_epoch != 0 {
            return Err(FormatError::Fenced(format!(
                "retired by transfer epoch {}: it cannot be unfenced",
                self.live.retired_epoch
            )));
        }
        match self.live.fenced_epoch {
            0 => Ok(*self),
            held if held == epoch => Ok(Control { live: LiveState { fenced_epoch: 0, ..self.live }, ..*self }),
            held => Err(FormatError::Fenced(format!("fenced by transfer epoch {held}, not {epoch}"))),
        }
    }

    /// The control file retired by `epoch`: every writer refuses for ever.
    /// Unchanged if `epoch` retired it already; refused if another epoch
    /// holds the fence or retired it.
    pub fn retire(&self, epoch: u64) -> Result<Control, FormatError> {
        if epoch == 0 {
            return Err(invalid("transfer epoch 0 is not an epoch"));
        }
        match self.live.retired_epoch {
            0 => {}
            held if held == epoch => return Ok(*self),
            held => return Err(FormatError::Fenced(format!("retired by transfer epoch {held}, not {epoch}"))),
        }
        if self.live.fenced_epoch != 0 && self.live.fenced_epoch != epoch {
            return Err(FormatError::Fenced(format!(
                "fenced by transfer epoch {}, not {epoch}",
                self.live.fenced_epoch
            )));
        }
        Ok(Control { live: LiveState { retired_epoch: epoch, ..self.live }, ..*self })
    }

    /// The byte ranges of segments that hold `[since, until)`: `(index,
    /// offset in the segment, length)`, in log order.
    pub fn ranges(&self, since: u64, until: u64) -> Vec<(u64, u64, u64)> {
        let mut out = Vec::new();
        let mut at = since;
        while at < until {
            let index = at / self.segment_size;
            let seg_start = index * self.segment_size;
            let end = until.min(seg_start + self.segment_size);
            out.push((index, at - seg_start, end - at));
            at = end;
        }
        out
    }

    pub fn read(dir: &Path) -> Result<Control, FormatError> {
        let path = dir.join(CONTROL_FILE);
        let buf = fs::read(&path).map_err(io_err(&path))?;
        Control::decode(&buf)
    }

    /// Writes the control file crash-safely: a temporary file, fsync, rename.
    pub fn write(&self, dir: &Path) -> Result<(), FormatError> {
        self.write_through(dir, "control.tmp")
    }

    /// [`write`](Self::write) through a temporary file of another name: the
    /// plugin writes fences without the writers' lock, and two writers of one
    /// temporary file would rename each other's bytes.
    pub fn write_through(&self, dir: &Path, tmp_name: &str) -> Result<(), FormatError> {
        let tmp = dir.join(tmp_name);
        let mut file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(&self.encode()).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        drop(file);
        let path = dir.join(CONTROL_FILE);
        fs::rename(&tmp, &path).map_err(io_err(&path))
    }

    /// Indexes of the segments that hold `[start, flush)`.
    pub fn segments(&self) -> std::ops::Range<u64> {
        let first = self.start / self.segment_size;
        let end = self.flush.div_ceil(self.segment_size);
        first..end.max(first)
    }

    /// How many bytes of segment `index` lie before the flush position.
    pub fn used_bytes(&self, index: u64) -> u64 {
        let seg_start = index * self.segment_size;
        self.flush.saturating_sub(seg_start).min(self.segment_size)
    }
}

pub fn segment_name(index: u64) -> String {
    format!("segment-{index:016x}")
}

/// Parses a segment file name back to its index.
pub fn segment_index(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("segment-")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// Reads the used part of segment `index` and checks its records: each CRC,
/// that records end exactly at the used length or at an end marker, and that
/// the file is `expected_len` bytes long. Returns the number of records.
///
/// Streams the file in large reads and checks records in place, without
/// copying them: this is the engine's whole validation cost.
pub fn check_segment(dir: &Path, control: &Control, index: u64, expected_len: u64) -> Result<u64, FormatError> {
    let name = segment_name(index);
    let path = dir.join(&name);
    let mut file = fs::File::open(&path).map_err(io_err(&path))?;
    let len = file.metadata().map_err(io_err(&path))?.len();
    if len != expected_len {
        return Err(invalid(format!("{name} is {len} bytes, expected {expected_len}")));
    }
    let used = control.used_bytes(index);
    let full = used == control.segment_size;
    let mut parser = RecordParser::new(used, full);
    let mut buf = vec![0u8; CHECK_CHUNK.min(used as usize).max(1)];
    let mut read = 0u64;
    while read < used && !parser.done() {
        let want = buf.len().min((used - read) as usize);
        file.read_exact(&mut buf[..want]).map_err(io_err(&path))?;
        read += want as u64;
        parser.feed(&buf[..want]).map_err(|e| invalid(format!("{name}: {e}")))?;
    }
    parser.finish().map_err(|e| invalid(format!("{name}: {e}")))
}

/// Where the complete, CRC-valid records written after `control.flush` end:
/// `control.flush` when there are none. Such records exist when a fence
/// (written without the writers' lock) read the control file just before an
/// append updated it and then overwrote that update: the append was
/// acknowledged, so a fence must count its records. A record that is whole
/// on disk is safe to count even if its writer never heard back.
pub fn written_end(dir: &Path, control: &Control) -> Result<u64, FormatError> {
    let size = control.segment_size;
    let mut position = control.flush;
    loop {
        let index = position / size;
        let path = dir.join(segment_name(index));
        let Ok(mut file) = fs::File::open(&path) else { return Ok(position) };
        let len = file.metadata().map_err(io_err(&path))?.len();
        let offset = position - index * size;
        if offset + RECORD_HEADER_LEN > size.min(len) {
            // No room for a header here: the next record starts a segment.
            if offset + RECORD_HEADER_LEN > size && next_segment_starts_a_record(dir, index + 1, size)? {
                position = (index + 1) * size;
                continue;
            }
            return Ok(position);
        }
        let mut header = [0u8; RECORD_HEADER_LEN as usize];
        io::Seek::seek(&mut file, io::SeekFrom::Start(offset)).map_err(io_err(&path))?;
        file.read_exact(&mut header).map_err(io_err(&path))?;
        let record_len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as u64;
        if record_len == 0 {
            // Zero padding to the segment's end, then the next segment.
            if next_segment_starts_a_record(dir, index + 1, size)? {
                position = (index + 1) * size;
                continue;
            }
            return Ok(position);
        }
        if offset + RECORD_HEADER_LEN + record_len > size.min(len) {
            return Ok(position);
        }
        let mut payload = vec![0u8; record_len as usize];
        if file.read_exact(&mut payload).is_err()
            || crc32fast::hash(&payload) != u32::from_le_bytes(header[4..].try_into().expect("4 bytes"))
        {
            return Ok(position);
        }
        position += RECORD_HEADER_LEN + record_len;
    }
}

/// Whether segment `index` exists and begins with a CRC-valid record.
fn next_segment_starts_a_record(dir: &Path, index: u64, size: u64) -> Result<bool, FormatError> {
    let Ok(mut file) = fs::File::open(dir.join(segment_name(index))) else { return Ok(false) };
    let mut header = [0u8; RECORD_HEADER_LEN as usize];
    if file.read_exact(&mut header).is_err() {
        return Ok(false);
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as u64;
    if len == 0 || len + RECORD_HEADER_LEN > size {
        return Ok(false);
    }
    let mut payload = vec![0u8; len as usize];
    Ok(file.read_exact(&mut payload).is_ok()
        && crc32fast::hash(&payload) == u32::from_le_bytes(header[4..].try_into().expect("4 bytes")))
}

/// Checks the records in `[since, until)` of the shard in `dir`, laid out as
/// `control` says (its segment size): `since` must start a record, and the
/// records must end exactly at `until` (or pad a segment to its end). Reads
/// only those bytes: the cost of a catch-up round is the size of its delta.
/// Returns the number of records.
pub fn check_range(dir: &Path, control: &Control, since: u64, until: u64) -> Result<u64, FormatError> {
    let mut records = 0;
    for (index, offset, length) in control.ranges(since, until) {
        let name = segment_name(index);
        let path = dir.join(&name);
        let mut file = fs::File::open(&path).map_err(io_err(&path))?;
        let len = file.metadata().map_err(io_err(&path))?.len();
        if len < offset + length {
            return Err(invalid(format!("{name} is {len} bytes, shorter than {}", offset + length)));
        }
        io::Seek::seek(&mut file, io::SeekFrom::Start(offset)).map_err(io_err(&path))?;
        let full = offset + length == control.segment_size;
        let mut parser = RecordParser::new(length, full);
        let mut buf = vec![0u8; CHECK_CHUNK.min(length as usize).max(1)];
        let mut read = 0u64;
        while read < length && !parser.done() {
            let want = buf.len().min((length - read) as usize);
            file.read_exact(&mut buf[..want]).map_err(io_err(&path))?;
            read += want as u64;
            parser.feed(&buf[..want]).map_err(|e| invalid(format!("{name} from offset {offset}: {e}")))?;
        }
        records += parser.finish().map_err(|e| invalid(format!("{name} from offset {offset}: {e}")))?;
    }
    Ok(records)
}

const CHECK_CHUNK: usize = 1 << 20;

/// Checks a segment's records as its bytes arrive, in any chunking.
struct RecordParser {
    /// Bytes of the segment that hold records (up to the flush position).
    used: u64,
    /// Whether the segment is used to its end (so an end marker may close it).
    full: bool,
    offset: u64,
    records: u64,
    state: ParseState,
}

enum ParseState {
    Header {
        bytes: [u8; 8],
        have: usize,
    },
    Payload {
        left: u64,
        crc: u32,
        hasher: crc32fast::Hasher,
    },
    /// An end marker or tail padding: the rest is not read.
    Ended,
}

impl RecordParser {
    fn new(used: u64, full: bool) -> Self {
        RecordParser { used, full, offset: 0, records: 0, state: ParseState::Header { bytes: [0; 8], have: 0 } }
    }

    fn done(&self) -> bool {
        matches!(self.state, ParseState::Ended)
    }

    fn feed(&mut self, mut chunk: &[u8]) -> Result<(), String> {
        while !chunk.is_empty() {
            match &mut self.state {
                ParseState::Ended => return Ok(()),
                ParseState::Header { bytes, have } => {
                    let record_start = self.offset - *have as u64;
                    if *have == 0 && self.used - self.offset < RECORD_HEADER_LEN {
                        // Less room than a header: tail padding of a full segment.
                        if !self.full {
                            return Err(format!("truncated record header at offset {record_start}"));
                        }
                        let tail = &chunk[..chunk.len().min((self.used - self.offset) as usize)];
                        if tail.iter().any(|&b| b != 0) {
                            return Err(format!("non-zero padding at offset {record_start}"));
                        }
                        self.offset += tail.len() as u64;
                        chunk = &chunk[tail.len()..];
                        if self.offset == self.used {
                            self.state = ParseState::Ended;
                        }
                        continue;
                    }
                    let take = (8 - *have).min(chunk.len());
                    bytes[*have..*have + take].copy_from_slice(&chunk[..take]);
                    *have += take;
                    self.offset += take as u64;
                    chunk = &chunk[take..];
                    if *have < 8 {
                        continue;
                    }
                    let len = u64::from(u32::from_le_bytes(bytes[0..4].try_into().unwrap()));
                    let crc = u32::from_le_bytes(bytes[4..8].try_into().unwrap());
                    if len == 0 {
                        // End marker: the rest of the segment is padding, so the
                        // flush position must be at the segment's end.
                        if !self.full {
                            return Err(format!("end marker at offset {record_start} before the flush position"));
                        }
                        self.state = ParseState::Ended;
                    } else if len > self.used - self.offset {
                        return Err(format!("record at offset {record_start} runs past the flush position"));
                    } else {
                        self.state = ParseState::Payload { left: len, crc, hasher: crc32fast::Hasher::new() };
                    }
                }
                ParseState::Payload { left, crc, hasher } => {
                    let take = (*left).min(chunk.len() as u64) as usize;
                    hasher.update(&chunk[..take]);
                    *left -= take as u64;
                    self.offset += take as u64;
                    chunk = &chunk[take..];
                    if *left == 0 {
                        let expected = *crc;
                        let ParseState::Payload { hasher, .. } =
                            std::mem::replace(&mut self.state, ParseState::Header { bytes: [0; 8], have: 0 })
                        else {
                            unreachable!()
                        };
                        if hasher.finalize() != expected {
                            return Err(format!("record ending at offset {} fails its CRC", self.offset));
                        }
                        self.records += 1;
                    }
                }
            }
        }
        Ok(())
    }

    fn finish(self) -> Result<u64, String> {
        match self.state {
            ParseState::Ended | ParseState::Header { have: 0, .. } => Ok(self.records),
            ParseState::Header { .. } => Err(format!("truncated record header at offset {}", self.offset)),
            ParseState::Payload { .. } => Err(format!("record runs past offset {}", self.offset)),
        }
    }
}

/// Summary of a checked shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardSummary {
    pub control: Control,
    pub segments: u64,
    pub records: u64,
}

/// Checks a whole shard directory: its [layout](check_layout) and every
/// segment's records.
pub fn check_shard(dir: &Path) -> Result<ShardSummary, FormatError> {
    let control = check_layout(dir)?;
    let mut records = 0;
    for index in control.segments() {
        records += check_segment(dir, &control, index, expected_len(&control, index))?;
    }
    let segments = control.segments();
    Ok(ShardSummary { control, segments: segments.end - segments.start, records })
}

/// How long segment `index` of a shard laid out as `control` is: a received
/// snapshot's last segment is cut at the flush position; a live shard's
/// segments are all full size.
pub fn expected_len(control: &Control, index: u64) -> u64 {
    match control.state {
        ShardState::Snapshot if index + 1 == control.segments().end => control.used_bytes(index),
        _ => control.segment_size,
    }
}

/// Checks the one file `name` of a received snapshot laid out as `control`
/// says (read from the snapshot's meta: the control file may not have
/// arrived yet): a segment's length and records. Other names are left to
/// [`check_layout`]. Returns the number of records.
pub fn check_snapshot_file(dir: &Path, control: &Control, name: &str) -> Result<u64, FormatError> {
    if name == CONTROL_FILE {
        return Ok(0);
    }
    match segment_index(name) {
        Some(index) if control.segments().contains(&index) => {
            check_segment(dir, control, index, expected_len(control, index))
        }
        _ => Err(invalid(format!("unexpected file {name:?} in the snapshot"))),
    }
}

/// Checks a shard directory without reading its records: the control file,
/// every segment it needs present at its expected length, and no other
/// file. With [`check_segment`] on every segment, that is [`check_shard`].
pub fn check_layout(dir: &Path) -> Result<Control, FormatError> {
    let control = Control::read(dir)?;
    let range = control.segments();
    for index in range.clone() {
        let name = segment_name(index);
        let path = dir.join(&name);
        let len = fs::metadata(&path).map_err(io_err(&path))?.len();
        let expected = expected_len(&control, index);
        if len != expected {
            return Err(invalid(format!("{name} is {len} bytes, expected {expected}")));
        }
    }
    // Stray segment files inside the retained range are impossible by
    // construction; files before `start` or after the flush segment are
    // leftovers a snapshot must not carry.
    let entries = fs::read_dir(dir).map_err(io_err(dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == CONTROL_FILE || name == LOCK_FILE {
            continue;
        }
        if control.state == ShardState::Active && (name == "control.tmp" || name == "control.plugin.tmp") {
            continue; // a control write in flight on a live shard
        }
        match segment_index(&name) {
            Some(index) if range.contains(&index) => {}
            Some(index) if control.state == ShardState::Active && index >= range.end => {
                // A live shard may have preallocated segments past the flush.
            }
            _ => return Err(invalid(format!("unexpected file {name:?} in the shard directory"))),
        }
    }
    Ok(control)
}

/// Writes valid shards, for tests, demos and benchmarks.
pub struct Generator {
    pub segment_size: u64,
    pub term: u64,
    /// Seed of the deterministic payload bytes.
    pub seed: u64,
}

impl Default for Generator {
    fn default() -> Self {
        Generator { segment_size: 16 << 20, term: 1, seed: 1 }
    }
}

impl Generator {
    /// Creates a shard in `dir` (created if missing; must not hold a shard)
    /// with at least `target_bytes` of log.
    pub fn create(&self, dir: &Path, target_bytes: u64) -> Result<Control, FormatError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        if dir.join(CONTROL_FILE).exists() {
            return Err(invalid(format!("{} already holds a shard", dir.display())));
        }
        let control = Control {
            state: ShardState::Active,
            term: self.term,
            flush: 0,
            commit: 0,
            segment_size: self.segment_size,
            start: 0,
            live: LiveState::default(),
        };
        control.check()?;
        self.append(dir, control, target_bytes)
    }

    /// Appends records worth about `bytes` to the shard in `dir`, moves flush
    /// and commit, and rewrites the control file (crash-safely). Segments are
    /// not fsynced one by one: this writes test data, not a live log.
    pub fn append(&self, dir: &Path, mut control: Control, bytes: u64) -> Result<Control, FormatError> {
        let target = control.flush + bytes;
        let mut rng = self.seed ^ control.flush.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut payload = Vec::new();
        while control.flush < target {
            let index = control.flush / control.segment_size;
            let seg_start = index * control.segment_size;
            let path = dir.join(segment_name(index));
            let mut file =
                fs::OpenOptions::new().create(true).write(true).truncate(false).open(&path).map_err(io_err(&path))?;
            file.set_len(control.segment_size).map_err(io_err(&path))?;
            let mut out = io::BufWriter::with_capacity(1 << 20, &mut file);
            io::Seek::seek(&mut out, io::SeekFrom::Start(control.flush - seg_start)).map_err(io_err(&path))?;
            loop {
                let room = seg_start + control.segment_size - control.flush;
                if control.flush >= target || room < RECORD_HEADER_LEN + 1 {
                    break;
                }
                rng = xorshift(rng);
                let len = (16 + rng % 4081).min(room - RECORD_HEADER_LEN);
                payload.clear();
                let mut word = rng;
                while payload.len() < len as usize {
                    word = xorshift(word);
                    payload.extend_from_slice(&word.to_le_bytes());
                }
                payload.truncate(len as usize);
                out.write_all(&(len as u32).to_le_bytes()).map_err(io_err(&path))?;
                out.write_all(&crc32fast::hash(&payload).to_le_bytes()).map_err(io_err(&path))?;
                out.write_all(&payload).map_err(io_err(&path))?;
                control.flush += RECORD_HEADER_LEN + len;
            }
            let room = seg_start + control.segment_size - control.flush;
            if control.flush < target && room > 0 {
                // Not enough room for another record: the zero padding that is
                // already there ends the segment; move to the next one.
                control.flush += room;
            }
            out.flush().map_err(io_err(&path))?;
        }
        control.commit = control.flush;
        control.write(dir)?;
        Ok(control)
    }
}

fn xorshift(mut x: u64) -> u64 {
    if x == 0 {
        x = 0x2545_F491_4F6C_DD1D;
    }
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// An appender that honours the lock, the term, the fence and retirement (see
/// the crate's documentation): what a real engine's writer does, for tests
/// and demos of live moves.
#[cfg(unix)]
pub struct Writer {
    dir: std::path::PathBuf,
    lock: fs::File,
    /// The term this writer appends at: the shard's when it was opened.
    term: u64,
    /// How long an append waits for the lock (a fence holds it).
    pub lock_timeout: std::time::Duration,
}

#[cfg(unix)]
impl Writer {
    /// Opens the live shard in `dir` for appending at its current term;
    /// refused if it is fenced or retired.
    pub fn open(dir: &Path) -> Result<Writer, FormatError> {
        let path = dir.join(LOCK_FILE);
        let lock = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut writer =
            Writer { dir: dir.to_owned(), lock, term: 0, lock_timeout: std::time::Duration::from_secs(10) };
        let control = writer.locked(|control| {
            control.check_writable(control.term)?;
            Ok(control)
        })?;
        writer.term = control.term;
        Ok(writer)
    }

    /// The term this writer appends at.
    pub fn term(&self) -> u64 {
        self.term
    }

    /// Appends one record per payload (each 1 byte up to a segment less its
    /// header), durably: segments fsynced, then the control file rewritten.
    /// Returns the new flush position, which acknowledges every record.
    pub fn append(&mut self, payloads: &[&[u8]]) -> Result<u64, FormatError> {
        let term = self.term;
        let dir = self.dir.clone();
        self.locked(|mut control| {
            control.check_writable(term)?;
            let size = control.segment_size;
            let mut touched: Vec<(u64, fs::File)> = Vec::new();
            for payload in payloads {
                let len = payload.len() as u64;
                if len == 0 || len + RECORD_HEADER_LEN > size {
                    return Err(invalid(format!("a record of {len} bytes does not fit a segment of {size}")));
                }
                let mut index = control.flush / size;
                let room = (index + 1) * size - control.flush;
                if room < RECORD_HEADER_LEN + len {
                    // Pad the rest of the segment (explicitly: it must be
                    // zero) and go on in the next one.
                    let file = segment_file(&dir, &mut touched, index, size)?;
                    write_at(file, &vec![0u8; room as usize], control.flush - index * size, &dir, index)?;
                    control.flush += room;
                    index += 1;
                }
                let file = segment_file(&dir, &mut touched, index, size)?;
                let mut record = Vec::with_capacity(payload.len() + 8);
                record.extend_from_slice(&(len as u32).to_le_bytes());
                record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
                record.extend_from_slice(payload);
                write_at(file, &record, control.flush - index * size, &dir, index)?;
                control.flush += RECORD_HEADER_LEN + len;
            }
            for (index, file) in &touched {
                file.sync_data().map_err(io_err(&dir.join(segment_name(*index))))?;
            }
            control.commit = control.flush;
            control.write(&dir)?;
            Ok(control.flush)
        })
    }

    /// Runs `f` on the control file under the writers' lock.
    fn locked<T>(&mut self, f: impl FnOnce(Control) -> Result<T, FormatError>) -> Result<T, FormatError> {
        use std::os::fd::AsRawFd;
        let fd = self.lock.as_raw_fd();
        let path = self.dir.join(LOCK_FILE);
        let deadline = std::time::Instant::now() + self.lock_timeout;
        loop {
            match set_lock(fd, libc::F_WRLCK) {
                Ok(()) => break,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                    if std::time::Instant::now() >= deadline {
                        return Err(FormatError::Fenced(format!(
                            "{} stayed locked for {:?} (a fence holds it)",
                            path.display(),
                            self.lock_timeout
                        )));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(e) => return Err(FormatError::Io { path: path.display().to_string(), source: e }),
            }
        }
        let result = Control::read(&self.dir).and_then(f);
        let unlocked = set_lock(fd, libc::F_UNLCK);
        let value = result?;
        unlocked.map_err(|source| FormatError::Io { path: path.display().to_string(), source })?;
        Ok(value)
    }
}

/// Takes (or with `F_UNLCK` releases) the writers' lock without waiting.
#[cfg(unix)]
fn set_lock(fd: std::os::fd::RawFd, kind: libc::c_int) -> io::Result<()> {
    // SAFETY: an all-zero `flock` is a valid value; the fields that matter are set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = WRITER_LOCK.0 as libc::off_t;
    lock.l_len = WRITER_LOCK.1 as libc::off_t;
    // SAFETY: `fd` is an open descriptor and `lock` a valid `flock`.
    if unsafe { libc::fcntl(fd, libc::F_SETLK, &lock) } == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The open segment `index`, created at full size if missing.
#[cfg(unix)]
fn segment_file<'a>(
    dir: &Path,
    touched: &'a mut Vec<(u64, fs::File)>,
    index: u64,
    size: u64,
) -> Result<&'a fs::File, FormatError> {
    if let Some(at) = touched.iter().position(|(i, _)| *i == index) {
        return Ok(&touched[at].1);
    }
    let path = dir.join(segment_name(index));
    let file = fs::OpenOptions::new().create(true).write(true).truncate(false).open(&path).map_err(io_err(&path))?;
    if file.metadata().map_err(io_err(&path))?.len() < size {
        file.set_len(size).map_err(io_err(&path))?;
    }
    touched.push((index, file));
    Ok(&touched.last().expect("just pushed").1)
}

#[cfg(unix)]
fn write_at(file: &fs::File, bytes: &[u8], offset: u64, dir: &Path, index: u64) -> Result<(), FormatError> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, offset).map_err(io_err(&dir.join(segment_name(index))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn control() -> Control {
        Control {
            state: ShardState::Active,
            term: 3,
            flush: 10_000,
            commit: 9_000,
            segment_size: 4096,
            start: 4096,
            live: LiveState::default(),
        }
    }

    #[test]
    fn version_1_stays_version_1_and_version_2_roundtrips() {
        let plain = control();
        let bytes = plain.encode();
        assert_eq!(bytes.len(), CONTROL_LEN);
        assert_eq!(u32::from_le_bytes(bytes[8..12].try_into().unwrap()), 1);
        assert_eq!(Control::decode(&bytes).unwrap(), plain);

        let fenced = plain.fence(7).unwrap().retire(7).unwrap();
        let bytes = fenced.encode();
        assert_eq!(bytes.len(), CONTROL_V2_LEN);
        assert_eq!(Control::decode(&bytes).unwrap(), fenced);
        let mut bad = bytes.clone();
        bad[60] ^= 1;
        assert!(Control::decode(&bad).unwrap_err().to_string().contains("checksum"));
        // A version-2 header on a version-1 length is refused.
        let mut short = plain.encode();
        short[8] = 2;
        let crc = crc32fast::hash(&short[..56]);
        short[56..].copy_from_slice(&crc.to_le_bytes());
        assert!(Control::decode(&short).is_err());
    }

    #[test]
    fn fence_bumps_the_term_and_keeps_the_old_history() {
        let c = control();
        let f = c.fence(5).unwrap();
        assert_eq!((f.term, f.flush), (4, c.flush));
        assert_eq!(f.live, LiveState { fenced_epoch: 5, fence_term: 3, fence_flush: c.flush, retired_epoch: 0 });
        assert_eq!(f.fence(5).unwrap(), f, "idempotent for its epoch");
        assert!(matches!(f.fence(6), Err(FormatError::Fenced(m)) if m.contains("epoch 5")));
        assert!(matches!(f.check_writable(3), Err(FormatError::Fenced(_))));
        // The old term's history up to the fence, and the new term.
        assert!(f.same_history(3, c.flush) && f.same_history(3, 0) && f.same_history(4, c.flush));
        assert!(!f.same_history(3, c.flush + 1) && !f.same_history(2, 0) && !f.same_history(5, 0));
        // Another term change after the fence forgets the old term.
        assert!(!Control { term: 5, live: LiveState { fenced_epoch: 0, ..f.live }, ..f }.same_history(3, 0));

        assert!(matches!(f.unfence(6), Err(FormatError::Fenced(_))));
        let u = f.unfence(5).unwrap();
        assert_eq!((u.term, u.live.fenced_epoch), (4, 0));
        assert_eq!(u.unfence(5).unwrap(), u, "idempotent");
        assert!(u.check_writable(4).is_ok());
        assert!(matches!(u.check_writable(3), Err(FormatError::Fenced(m)) if m.contains("term moved")));
        assert!(u.same_history(3, c.flush), "unfencing keeps the history");
    }

    #[test]
    fn retire_is_for_ever() {
        let r = control().fence(5).unwrap().retire(5).unwrap();
        assert_eq!(r.retire(5).unwrap(), r);
        assert!(r.retire(6).is_err() && r.unfence(5).is_err() && r.fence(6).is_err());
        assert!(matches!(r.check_writable(r.term), Err(FormatError::Fenced(m)) if m.contains("retired")));
        assert!(control().fence(5).unwrap().retire(6).is_err(), "another epoch's fence");
        assert!(control().fence(0).is_err() && control().retire(0).is_err());
    }

    #[test]
    fn ranges_split_at_segments() {
        let c = control();
        assert_eq!(c.ranges(5000, 5000), vec![]);
        assert_eq!(c.ranges(5000, 6000), vec![(1, 904, 1000)]);
        assert_eq!(c.ranges(5000, 12_288), vec![(1, 904, 3192), (2, 0, 4096)]);
        assert_eq!(c.ranges(8192, 9000), vec![(2, 0, 808)]);
    }

    #[cfg(unix)]
    #[test]
    fn writer_appends_and_honours_the_fence_the_lock_and_retirement() {
        let dir = std::env::temp_dir().join(format!("slf-writer-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        Generator { segment_size: 4096, term: 2, seed: 3 }.create(&dir, 5000).unwrap();
        let mut writer = Writer::open(&dir).unwrap();
        assert_eq!(writer.term(), 2);
        let before = Control::read(&dir).unwrap().flush;
        // Crosses a segment boundary: the rest of the segment is padded.
        let payloads: Vec<Vec<u8>> = (0..20).map(|i| vec![i as u8; 700]).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let flush = writer.append(&refs).unwrap();
        assert!(flush >= before + 20 * 708);
        let summary = check_shard(&dir).unwrap();
        assert_eq!(summary.control.flush, flush);
        assert_eq!(check_range(&dir, &summary.control, before, flush).unwrap(), 20);

        // A fence stops it; after unfencing it must re-open at the new term.
        let control = Control::read(&dir).unwrap();
        control.fence(9).unwrap().write(&dir).unwrap();
        assert!(matches!(writer.append(&[b"x"]), Err(FormatError::Fenced(m)) if m.contains("epoch 9")));
        assert!(Writer::open(&dir).is_err());
        Control::read(&dir).unwrap().unfence(9).unwrap().write(&dir).unwrap();
        assert!(matches!(writer.append(&[b"x"]), Err(FormatError::Fenced(m)) if m.contains("term moved")));
        let mut writer = Writer::open(&dir).unwrap();
        assert_eq!(writer.term(), 3);
        writer.append(&[b"after the fence"]).unwrap();

        // The lock, held elsewhere (another open file description, as the
        // host holds it), makes an append wait, then give up.
        let held = fs::OpenOptions::new().read(true).write(true).open(dir.join(LOCK_FILE)).unwrap();
        let child = unsafe { libc::fork() };
        if child == 0 {
            // The child holds the lock for a while: POSIX locks are per process.
            use std::os::fd::AsRawFd;
            let code = if set_lock(held.as_raw_fd(), libc::F_WRLCK).is_ok() { 0 } else { 1 };
            std::thread::sleep(std::time::Duration::from_millis(500));
            unsafe { libc::_exit(code) };
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
        writer.lock_timeout = std::time::Duration::from_millis(50);
        let err = writer.append(&[b"blocked"]).unwrap_err();
        assert!(matches!(&err, FormatError::Fenced(m) if m.contains("stayed locked")), "{err}");
        let mut status = 0;
        unsafe { libc::waitpid(child, &mut status, 0) };
        assert_eq!(status, 0, "the child took the lock");
        writer.lock_timeout = std::time::Duration::from_secs(10);
        writer.append(&[b"unblocked"]).unwrap();

        let control = Control::read(&dir).unwrap();
        control.fence(10).unwrap().retire(10).unwrap().write(&dir).unwrap();
        assert!(matches!(writer.append(&[b"late"]), Err(FormatError::Fenced(m)) if m.contains("retired")));
        assert!(Writer::open(&dir).is_err());
        check_shard(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn a_fence_counts_records_whose_control_update_it_overwrote() {
        let dir = std::env::temp_dir().join(format!("slf-written-end-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let generator = Generator { segment_size: 4096, term: 5, seed: 3 };
        let before = generator.create(&dir, 6000).unwrap();
        assert_eq!(written_end(&dir, &before).unwrap(), before.flush, "nothing written past the flush");
        let mut writer = Writer::open(&dir).unwrap();
        // Enough records to cross into the next segment (padding included).
        let mut end = 0;
        for i in 0..40u32 {
            end = writer.append(&[&vec![i as u8 + 1; 150]]).unwrap();
        }
        // A fence that read the control file before these appends overwrites it.
        before.write(&dir).unwrap();
        assert_eq!(written_end(&dir, &before).unwrap(), end);
        let fenced = before.fence(9).unwrap();
        let recovered = fenced.with_written_end(written_end(&dir, &fenced).unwrap());
        assert_eq!((recovered.flush, recovered.live.fence_flush, recovered.term), (end, end, 6));
        let _ = fs::remove_dir_all(&dir);
    }
}
