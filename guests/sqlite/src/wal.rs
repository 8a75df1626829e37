//! What a WAL file holds, read as SQLite's recovery does (the format:
//! <https://sqlite.org/fileformat2.html#the_write_ahead_log>): a 32-byte
//! header, then frames of a 24-byte header and a page. A frame belongs to the
//! WAL while its salts are the header's and its checksum continues the chain;
//! the WAL's content is the valid prefix up to its last commit frame.

use std::fs;
use std::io::{BufReader, Read};
use std::path::Path;

use super::{EngineError, io};

const HEADER: usize = 32;
const FRAME_HEADER: usize = 24;
const MAGIC_LE: u32 = 0x377f_0682;
const MAGIC_BE: u32 = 0x377f_0683;

/// A WAL as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WalState {
    /// File length (frames past the valid prefix included).
    pub len: u64,
    /// Checkpoint sequence: moves each time the WAL is reset.
    pub sequence: u32,
    pub salts: (u32, u32),
    /// Commit frames in the valid prefix.
    pub commits: u64,
}

impl WalState {
    /// `sequence:salt1:salt2:commits`, as metas record it.
    pub fn describe(&self) -> String {
        format!("{}:{}:{}:{}", self.sequence, self.salts.0, self.salts.1, self.commits)
    }
}

fn fields(described: &str) -> Option<(&str, u64)> {
    let (generation, commits) = described.rsplit_once(':')?;
    Some((generation, commits.parse().ok()?))
}

/// The commits a recorded WAL state counts.
pub fn commits_of(described: &str) -> u64 {
    fields(described).map_or(0, |(_, c)| c)
}

/// Whether the WAL `now` still holds the prefix `then` described: the same
/// generation (not reset), at least as many commits.
pub fn same_prefix(then: &str, now: &str) -> bool {
    match (fields(then), fields(now)) {
        (Some((a, c)), Some((b, d))) => a == b && d >= c,
        _ => false,
    }
}

/// Reads the WAL `name` of a database whose pages are `page_size` bytes:
/// `None` when there is none (or it is empty). A WAL whose header is not
/// valid holds nothing (SQLite ignores it).
pub fn read(dir: &Path, name: &str, page_size: u64) -> Result<Option<WalState>, EngineError> {
    let file = match fs::File::open(dir.join(name)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(name, e)),
    };
    let len = file.metadata().map_err(|e| io(name, e))?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let empty = WalState { len, sequence: 0, salts: (0, 0), commits: 0 };
    let mut header = [0u8; HEADER];
    if (len as usize) < HEADER {
        return Ok(Some(empty));
    }
    reader.read_exact(&mut header).map_err(|e| io(name, e))?;
    let magic = be32(&header, 0);
    let big_endian = match magic {
        MAGIC_BE => true,
        MAGIC_LE => false,
        _ => return Ok(Some(empty)),
    };
    if u64::from(be32(&header, 8)) != page_size || be32(&header, 4) != 3_007_000 {
        return Ok(Some(empty));
    }
    let mut sum = checksum(big_endian, &header[..24], (0, 0));
    if sum != (be32(&header, 24), be32(&header, 28)) {
        return Ok(Some(empty));
    }
    let salts = (be32(&header, 16), be32(&header, 20));
    let sequence = be32(&header, 12);
    let mut commits = 0;
    let frame_len = FRAME_HEADER as u64 + page_size;
    let mut frame = vec![0u8; frame_len as usize];
    let mut at = HEADER as u64;
    while at + frame_len <= len {
        if reader.read_exact(&mut frame).is_err() {
            break;
        }
        if (be32(&frame, 8), be32(&frame, 12)) != salts {
            break;
        }
        let next = checksum(big_endian, &frame[FRAME_HEADER..], checksum(big_endian, &frame[..8], sum));
        if next != (be32(&frame, 16), be32(&frame, 20)) {
            break;
        }
        sum = next;
        if be32(&frame, 4) != 0 {
            commits += 1;
        }
        at += frame_len;
    }
    Ok(Some(WalState { len, sequence, salts, commits }))
}

fn be32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(buf[at..at + 4].try_into().expect("4 bytes"))
}

/// SQLite's WAL checksum over `data` (a multiple of 8 bytes), continuing
/// from `(s1, s2)`; words are read in the byte order the magic names.
fn checksum(big_endian: bool, data: &[u8], (mut s1, mut s2): (u32, u32)) -> (u32, u32) {
    for pair in data.chunks_exact(8) {
        let word = |b: &[u8]| {
            let b: [u8; 4] = b.try_into().expect("4 bytes");
            if big_endian { u32::from_be_bytes(b) } else { u32::from_le_bytes(b) }
        };
        s1 = s1.wrapping_add(word(&pair[..4]).wrapping_add(s2));
        s2 = s2.wrapping_add(word(&pair[4..]).wrapping_add(s1));
    }
    (s1, s2)
}
