//! The host's generic block diff, for files an engine rewrites in place
//! (SQLite's pages): the receiver sends a digest of every block of its copy,
//! the source reads its file, hashes the same blocks and sends only those
//! whose digest differs (what `sqlite3_rsync` does with pages, without an
//! engine of its own on either side).
//!
//! A digest is the 128-bit XXH3 of the block's bytes: the blocks come from
//! the engine's own writes, not from an adversary, and the bytes that are
//! sent are still checked end to end by the round's BLAKE3 manifest. The
//! file's last block may be short; a block the receiver does not have
//! (its copy is shorter) always differs.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};

use crate::relpath::RelPath;

/// Bytes of one digest.
pub const DIGEST_BYTES: usize = 16;
/// Most digest bytes a round's request may carry (all files together):
/// 8 GiB of compared files in 4 KiB blocks, within a request body's bound
/// once in Base64.
pub const MAX_DIGEST_BYTES: usize = 32 << 20;
/// Bytes read at a time while hashing.
const READ_CHUNK: usize = 1 << 20;

/// A file the source compares block by block, and needs the receiver's
/// digests of.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockFile {
    pub path: RelPath,
    pub block_size: u32,
}

/// The receiver's digests of its copy of a file, in blocks of `block_size`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigests {
    pub path: RelPath,
    pub block_size: u32,
    /// The receiver's file length (0: no such file).
    pub length: u64,
    /// Base64 of one [`DIGEST_BYTES`]-byte digest per block, in order.
    pub digests: String,
}

impl FileDigests {
    /// Computes the digests of `path` (relative to `root`); a missing file
    /// has none.
    pub fn of(root: &Path, file: &BlockFile) -> io::Result<FileDigests> {
        let (length, digests) = digests_of(root, file)?;
        Ok(FileDigests::new(file, length, &digests))
    }

    pub fn new(file: &BlockFile, length: u64, digests: &[u128]) -> FileDigests {
        let bytes: Vec<u8> = digests.iter().flat_map(|d| d.to_le_bytes()).collect();
        FileDigests { path: file.path.clone(), block_size: file.block_size, length, digests: BASE64.encode(bytes) }
    }

    pub fn file(&self) -> BlockFile {
        BlockFile { path: self.path.clone(), block_size: self.block_size }
    }

    /// The digests, checked to be as many as the length's blocks.
    pub fn decode(&self) -> Result<Vec<u128>, String> {
        let bytes = BASE64.decode(&self.digests).map_err(|e| format!("{}: digests: {e}", self.path))?;
        if bytes.len() % DIGEST_BYTES != 0 {
            return Err(format!("{}: digests are not {DIGEST_BYTES}-byte values", self.path));
        }
        let digests: Vec<u128> = bytes
            .chunks_exact(DIGEST_BYTES)
            .map(|b| u128::from_le_bytes(b.try_into().expect("chunks_exact gives DIGEST_BYTES")))
            .collect();
        if digests.len() as u64 != blocks(self.length, self.block_size) {
            return Err(format!(
                "{}: {} digests for {} bytes in blocks of {}",
                self.path,
                digests.len(),
                self.length,
                self.block_size
            ));
        }
        Ok(digests)
    }
}

/// The length of `file` (relative to `root`) and the digest of each of its
/// blocks; a missing file has none.
pub fn digests_of(root: &Path, file: &BlockFile) -> io::Result<(u64, Vec<u128>)> {
    match File::open(file.path.join_to(root)) {
        Ok(f) => {
            let length = f.metadata()?.len();
            Ok((length, hash_blocks(&f, length, file.block_size)?))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok((0, Vec::new())),
        Err(e) => Err(e),
    }
}

/// Blocks of `block_size` in `length` bytes (the last one may be short).
pub fn blocks(length: u64, block_size: u32) -> u64 {
    length.div_ceil(u64::from(block_size))
}

pub fn digest(block: &[u8]) -> u128 {
    xxhash_rust::xxh3::xxh3_128(block)
}

/// The digest of every block of the first `length` bytes of `file`.
pub fn hash_blocks(file: &File, length: u64, block_size: u32) -> io::Result<Vec<u128>> {
    let mut out = Vec::with_capacity(blocks(length, block_size) as usize);
    each_block(file, length, block_size, |_, block| {
        out.push(digest(block));
    })?;
    Ok(out)
}

/// The digests of the blocks in bytes `[offset, offset + length)` of `file`
/// (`offset` at a block's start; the last block may be short).
pub fn hash_range(file: &File, offset: u64, length: u64, block_size: u32) -> io::Result<Vec<u128>> {
    let mut out = Vec::with_capacity(blocks(length, block_size) as usize);
    let mut buf = vec![0u8; (block_size as usize).max(READ_CHUNK / block_size as usize * block_size as usize)];
    let mut at = 0u64;
    while at < length {
        let want = ((length - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..want], offset + at)?;
        out.extend(buf[..want].chunks(block_size as usize).map(digest));
        at += want as u64;
    }
    Ok(out)
}

/// The byte ranges `(offset, length)` of the first `length` bytes of `file`
/// whose blocks differ from `theirs` (adjacent blocks merged), and the
/// bytes they hold. A file shorter than `length` is an error: it changed
/// under the plan, and the round is taken again.
pub fn differing_ranges(
    file: &File,
    length: u64,
    block_size: u32,
    theirs: &[u128],
) -> io::Result<(Vec<(u64, u64)>, u64)> {
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut total = 0;
    each_block(file, length, block_size, |index, block| {
        if theirs.get(index as usize) != Some(&digest(block)) {
            let offset = index * u64::from(block_size);
            let len = block.len() as u64;
            total += len;
            match ranges.last_mut() {
                Some((start, n)) if *start + *n == offset => *n += len,
                _ => ranges.push((offset, len)),
            }
        }
    })?;
    Ok((ranges, total))
}

/// Calls `f(index, bytes)` for each block of the first `length` bytes.
fn each_block(file: &File, length: u64, block_size: u32, mut f: impl FnMut(u64, &[u8])) -> io::Result<()> {
    let block = block_size as usize;
    let chunk = READ_CHUNK.max(block) / block * block;
    let mut buf = vec![0u8; chunk.min(length as usize)];
    let mut at = 0u64;
    while at < length {
        let want = ((length - at) as usize).min(buf.len());
        file.read_exact_at(&mut buf[..want], at).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                io::Error::other(format!("the file shrank below {length} bytes while being compared"))
            } else {
                e
            }
        })?;
        for (i, bytes) in buf[..want].chunks(block).enumerate() {
            f(at / u64::from(block_size) + i as u64, bytes);
        }
        at += want as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), bytes).unwrap();
        let f = File::open(dir.path().join("f")).unwrap();
        (dir, f)
    }

    #[test]
    fn only_differing_and_missing_blocks_are_sent() {
        let old: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let (_d1, f_old) = file_with(&old);
        let theirs = hash_blocks(&f_old, old.len() as u64, 1024).unwrap();
        assert_eq!(theirs.len(), 10);

        let mut new = old.clone();
        new[1500] ^= 1; // block 1
        new[2048] ^= 1; // block 2, adjacent: merged
        new[9000] ^= 1; // block 8
        new.extend_from_slice(&[7u8; 3000]); // blocks 9 (now longer) .. 12
        let (_d2, f_new) = file_with(&new);
        let (ranges, total) = differing_ranges(&f_new, new.len() as u64, 1024, &theirs).unwrap();
        assert_eq!(ranges, vec![(1024, 2048), (8192, new.len() as u64 - 8192)]);
        assert_eq!(total, 2048 + new.len() as u64 - 8192);

        let same = differing_ranges(&f_old, old.len() as u64, 1024, &theirs).unwrap();
        assert_eq!(same, (vec![], 0));
    }

    #[test]
    fn digests_round_trip_and_are_counted() {
        let (dir, _f) = file_with(&[1u8; 5000]);
        let file = BlockFile { path: RelPath::new("f").unwrap(), block_size: 4096 };
        let digests = FileDigests::of(dir.path(), &file).unwrap();
        assert_eq!(digests.length, 5000);
        assert_eq!(digests.decode().unwrap().len(), 2);
        let missing = FileDigests::of(dir.path(), &BlockFile { path: RelPath::new("g").unwrap(), block_size: 512 });
        assert_eq!(missing.unwrap().decode().unwrap(), Vec::<u128>::new());
        let lying = FileDigests { length: 9000, ..digests };
        assert!(lying.decode().unwrap_err().contains("2 digests for 9000 bytes"));
    }

    #[test]
    fn a_file_that_shrank_is_an_error() {
        let (_d, f) = file_with(&[0u8; 100]);
        let err = differing_ranges(&f, 4096, 512, &[]).unwrap_err();
        assert!(err.to_string().contains("shrank"), "{err}");
    }
}
