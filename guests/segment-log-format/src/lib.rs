//! On-disk format of the `segment-log` engine, a write-ahead log modeled on
//! Neon's safekeeper.
//!
//! A shard directory holds:
//! - `control`: a 60-byte control file (term, flush and commit positions,
//!   segment size, first retained position), protected by a CRC-32;
//! - `segment-<index as 16 hex digits>`: WAL segments of `segment_size` bytes.
//!   Segment `i` holds log positions `[i * segment_size, (i + 1) * segment_size)`.
//!
//! A segment is a sequence of records `[len: u32 LE][crc32(payload): u32 LE][payload]`.
//! Records never cross a segment boundary; a zero `len` ends the segment's
//! records (the rest is zero padding). The flush position is the position just
//! after the last record; everything up to it is durable on the source.
//!
//! This crate is pure Rust with no WASI-specific code: the guest plugin reads
//! shards with it, and Ferry's test kit writes shards with it.

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

pub const CONTROL_FILE: &str = "control";
pub const CONTROL_MAGIC: &[u8; 8] = b"FSLGCTL1";
pub const CONTROL_LEN: usize = 60;
pub const FORMAT_VERSION: u32 = 1;
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
}

/// Why a shard's files are not valid.
#[derive(Debug)]
pub enum FormatError {
    Io { path: String, source: io::Error },
    Invalid(String),
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Io { path, source } => write!(f, "{path}: {source}"),
            FormatError::Invalid(msg) => f.write_str(msg),
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
    pub fn encode(&self) -> [u8; CONTROL_LEN] {
        let mut buf = [0u8; CONTROL_LEN];
        buf[0..8].copy_from_slice(CONTROL_MAGIC);
        buf[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        buf[12..16].copy_from_slice(&self.state.code().to_le_bytes());
        buf[16..24].copy_from_slice(&self.term.to_le_bytes());
        buf[24..32].copy_from_slice(&self.flush.to_le_bytes());
        buf[32..40].copy_from_slice(&self.commit.to_le_bytes());
        buf[40..48].copy_from_slice(&self.segment_size.to_le_bytes());
        buf[48..56].copy_from_slice(&self.start.to_le_bytes());
        let crc = crc32fast::hash(&buf[..56]);
        buf[56..60].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    pub fn decode(buf: &[u8]) -> Result<Control, FormatError> {
        if buf.len() != CONTROL_LEN {
            return Err(invalid(format!("control file is {} bytes, expected {CONTROL_LEN}", buf.len())));
        }
        if &buf[0..8] != CONTROL_MAGIC {
            return Err(invalid("control file has a wrong magic"));
        }
        let u32_at = |at: usize| u32::from_le_bytes(buf[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().unwrap());
        let crc = crc32fast::hash(&buf[..56]);
        if crc != u32_at(56) {
            return Err(invalid("control file checksum mismatch"));
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(invalid(format!("control file format version {version} is not supported")));
        }
        let state = ShardState::from_code(u32_at(12))
            .ok_or_else(|| invalid(format!("control file has unknown state {}", u32_at(12))))?;
        let control = Control {
            state,
            term: u64_at(16),
            flush: u64_at(24),
            commit: u64_at(32),
            segment_size: u64_at(40),
            start: u64_at(48),
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
        Ok(())
    }

    pub fn read(dir: &Path) -> Result<Control, FormatError> {
        let path = dir.join(CONTROL_FILE);
        let buf = fs::read(&path).map_err(io_err(&path))?;
        Control::decode(&buf)
    }

    /// Writes the control file crash-safely: a temporary file, fsync, rename.
    pub fn write(&self, dir: &Path) -> Result<(), FormatError> {
        let tmp = dir.join("control.tmp");
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

/// Checks a whole shard directory. A received snapshot's last segment may be
/// cut at the flush position; a live shard's segments are all full size.
pub fn check_shard(dir: &Path) -> Result<ShardSummary, FormatError> {
    let control = Control::read(dir)?;
    let range = control.segments();
    let mut records = 0;
    for index in range.clone() {
        let full = control.segment_size;
        let expected = match control.state {
            ShardState::Snapshot if index + 1 == range.end => control.used_bytes(index),
            _ => full,
        };
        records += check_segment(dir, &control, index, expected)?;
    }
    // Stray segment files inside the retained range are impossible by
    // construction; files before `start` or after the flush segment are
    // leftovers a snapshot must not carry.
    let entries = fs::read_dir(dir).map_err(io_err(dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name == CONTROL_FILE {
            continue;
        }
        match segment_index(&name) {
            Some(index) if range.contains(&index) => {}
            Some(index) if control.state == ShardState::Active && index >= range.end => {
                // A live shard may have preallocated segments past the flush.
            }
            _ => return Err(invalid(format!("unexpected file {name:?} in the shard directory"))),
        }
    }
    Ok(ShardSummary { control, segments: range.end - range.start, records })
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
