//! The archive's own entries: preamble, manifest, source failure; and what a
//! receiver sends to resume.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::plugin::SnapshotMeta;
use crate::relpath::RelPath;

pub const ARCHIVE_FORMAT: u32 = 1;
pub const PREAMBLE_PATH: &str = ".ferry/snapshot.json";
pub const MANIFEST_PATH: &str = ".ferry/manifest.json";
pub const ERROR_PATH: &str = ".ferry/error.json";
/// Largest preamble, manifest or error entry a receiver reads.
pub const MAX_CONTROL_ENTRY: u64 = 64 << 20;

/// A BLAKE3 hash, as 64 hex digits in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Checksum(pub [u8; 32]);

impl Checksum {
    pub fn of(hasher: &blake3::Hasher) -> Checksum {
        Checksum(*hasher.finalize().as_bytes())
    }
}

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(blake3::Hash::from_bytes(self.0).to_hex().as_str())
    }
}

impl fmt::Debug for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Checksum({self})")
    }
}

impl Serialize for Checksum {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        blake3::Hash::from_hex(&s).map(|h| Checksum(*h.as_bytes())).map_err(serde::de::Error::custom)
    }
}

/// An entry's path and size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryInfo {
    pub path: RelPath,
    pub size: u64,
}

/// A file's path, size and checksum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: RelPath,
    pub size: u64,
    pub blake3: Checksum,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preamble {
    pub format: u32,
    pub snapshot_id: String,
    pub engine: String,
    pub shard: String,
    /// The source plugin's snapshot format version.
    pub snapshot_format: u32,
    pub meta: SnapshotMeta,
    pub entries: Vec<EntryInfo>,
    /// Entries not sent because the receiver holds them, verified by the source.
    pub skipped: Vec<RelPath>,
}

impl Preamble {
    pub fn total_bytes(&self) -> u64 {
        self.entries.iter().map(|e| e.size).sum()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub snapshot_id: String,
    pub meta: SnapshotMeta,
    pub entries: Vec<FileRecord>,
    /// The shard was written to while it was read (its term-check failed)
    /// and the source sent it anyway, for a live move: the files may mix
    /// two states. Only a live move's receiver accepts it, and its rounds,
    /// the last under the fence, make it exact.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fuzzy: bool,
}

/// Why a source gave up on a snapshot or a delta mid-stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("source failed at {step}: {message}")]
pub struct SourceFailure {
    pub step: String,
    pub message: String,
    /// Set when the engine's answer decides what the receiver does next
    /// (start over with a snapshot, compare blocks): a catch-up round tells
    /// them apart by this rather than by the message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<FailureCode>,
}

/// The failures of a catch-up round a receiver acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureCode {
    /// The history after the receiver's position is not kept: snapshot again.
    HistoryGone,
    /// The source's history after that position is not the receiver's.
    TermChanged,
    /// The engine (or the host, for block-diff entries) has no such delta.
    Unsupported,
}

impl FailureCode {
    /// The stable `code` of an API error answer.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCode::HistoryGone => "history-gone",
            FailureCode::TermChanged => "term-changed",
            FailureCode::Unsupported => "unsupported",
        }
    }

    /// The inverse of [`FailureCode::as_str`].
    pub fn parse(code: &str) -> Option<FailureCode> {
        [FailureCode::HistoryGone, FailureCode::TermChanged, FailureCode::Unsupported]
            .into_iter()
            .find(|c| c.as_str() == code)
    }
}

/// Body of a snapshot request: what the receiver already holds of which
/// snapshot. Empty for a fresh pull.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    #[serde(default)]
    pub snapshot_id: Option<String>,
    #[serde(default)]
    pub have: Vec<FileRecord>,
}

/// What identifies one entry of a snapshot.
pub enum IdEntry<'a> {
    File { path: &'a RelPath, offset: u64, size: u64 },
    Inline { path: &'a RelPath, contents: &'a [u8] },
}

/// Identity of a snapshot: changes when the meta or the plan changes.
pub fn snapshot_id<'a>(
    engine: &str,
    shard: &str,
    meta: &SnapshotMeta,
    entries: impl IntoIterator<Item = IdEntry<'a>>,
) -> String {
    let mut hasher = blake3::Hasher::new();
    let header = serde_json::to_vec(&(ARCHIVE_FORMAT, engine, shard, meta)).expect("meta serializes");
    hasher.update(&header);
    for entry in entries {
        match entry {
            IdEntry::File { path, offset, size } => {
                hasher.update(b"F");
                hasher.update(path.as_str().as_bytes());
                hasher.update(&[0]);
                hasher.update(&offset.to_le_bytes());
                hasher.update(&size.to_le_bytes());
            }
            IdEntry::Inline { path, contents } => {
                hasher.update(b"I");
                hasher.update(path.as_str().as_bytes());
                hasher.update(&[0]);
                hasher.update(blake3::hash(contents).as_bytes());
            }
        }
    }
    hasher.finalize().to_hex()[..32].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_json_is_hex() {
        let mut h = blake3::Hasher::new();
        h.update(b"abc");
        let c = Checksum::of(&h);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json.len(), 66);
        assert_eq!(serde_json::from_str::<Checksum>(&json).unwrap(), c);
        assert!(serde_json::from_str::<Checksum>("\"zz\"").is_err());
    }

    #[test]
    fn snapshot_id_follows_meta_and_plan() {
        let meta = SnapshotMeta { term: 1, position: 2, attributes: vec![] };
        let p = RelPath::new("a").unwrap();
        let file = |size| [IdEntry::File { path: &p, offset: 0, size }];
        let base = snapshot_id("e", "s", &meta, file(10));
        assert_eq!(base, snapshot_id("e", "s", &meta, file(10)));
        assert_ne!(base, snapshot_id("e", "s", &meta, file(11)));
        let moved = SnapshotMeta { term: 2, ..meta.clone() };
        assert_ne!(base, snapshot_id("e", "s", &moved, file(10)));
        let inline = |c: &'static [u8]| [IdEntry::Inline { path: &p, contents: c }];
        assert_ne!(snapshot_id("e", "s", &meta, inline(b"x")), snapshot_id("e", "s", &meta, inline(b"y")));
    }
}
