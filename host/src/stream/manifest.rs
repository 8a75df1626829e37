//! The archive's own entries: preamble, manifest, source failure; and what a
//! receiver sends to resume.

use std::cell::RefCell;
use std::{fmt, io};

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
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

/// The JSON of a [`Manifest`] written from borrowed parts, so a source
/// never holds a second copy of every path (100,000 of them at most).
#[derive(Serialize)]
pub struct ManifestRef<'a, R: Serialize> {
    pub format: u32,
    pub snapshot_id: &'a str,
    pub meta: &'a SnapshotMeta,
    /// Serializes as a sequence of [`FileRecordRef`].
    pub entries: R,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fuzzy: bool,
}

/// A [`FileRecord`]'s JSON from borrowed parts.
#[derive(Serialize)]
pub struct FileRecordRef<'a> {
    pub path: &'a RelPath,
    pub size: u64,
    pub blake3: Checksum,
}

/// Why [`read_checked`] refused a manifest.
#[derive(Debug)]
pub enum Checked<E> {
    /// Not a manifest of the announced snapshot.
    Bad(String),
    /// A record the caller's check refused.
    Failed(E),
}

const OTHER_ENTRIES: &str = "the manifest lists other entries than the preamble";

/// Reads a snapshot's [`Manifest`] from `reader` and checks it as it is
/// parsed, record by record, never holding it whole: it must describe the
/// snapshot `preamble` announced, list its entries in the same order with
/// the same sizes, and pass `check` for each record (the receiver's
/// comparison with the bytes it wrote). Returns whether it is fuzzy.
pub fn read_checked<E>(
    reader: impl io::Read,
    preamble: &Preamble,
    check: impl FnMut(&FileRecord) -> Result<(), E>,
) -> Result<bool, Checked<E>> {
    let (check, failed) = (RefCell::new(check), RefCell::new(None));
    let seed = ManifestSeed { preamble, check: &check, failed: &failed };
    let mut json = serde_json::Deserializer::from_reader(io::BufReader::with_capacity(64 << 10, reader));
    let parsed = seed.deserialize(&mut json).and_then(|header| json.end().map(|()| header));
    if let Some(failure) = failed.into_inner() {
        return Err(failure);
    }
    let header = parsed.map_err(|e| Checked::Bad(format!("{MANIFEST_PATH}: {e}")))?;
    if header.format != ARCHIVE_FORMAT || header.snapshot_id != preamble.snapshot_id || header.meta != preamble.meta {
        return Err(Checked::Bad("the manifest does not describe the announced snapshot".into()));
    }
    Ok(header.fuzzy)
}

/// A manifest's fields other than its records.
struct ManifestHeader {
    format: u32,
    snapshot_id: String,
    meta: SnapshotMeta,
    fuzzy: bool,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    Format,
    SnapshotId,
    Meta,
    Entries,
    Fuzzy,
}

const FIELDS: &[&str] = &["format", "snapshot_id", "meta", "entries", "fuzzy"];

/// The seed of [`read_checked`]'s parse. A refusal is kept in `failed` (the
/// parse itself then stops with a placeholder error).
struct ManifestSeed<'a, F, E> {
    preamble: &'a Preamble,
    check: &'a RefCell<F>,
    failed: &'a RefCell<Option<Checked<E>>>,
}

impl<F, E> Clone for ManifestSeed<'_, F, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<F, E> Copy for ManifestSeed<'_, F, E> {}

impl<F, E> ManifestSeed<'_, F, E> {
    fn refuse<T, D: de::Error>(&self, why: Checked<E>) -> Result<T, D> {
        *self.failed.borrow_mut() = Some(why);
        Err(D::custom("refused"))
    }
}

impl<'de, F: FnMut(&FileRecord) -> Result<(), E>, E> DeserializeSeed<'de> for ManifestSeed<'_, F, E> {
    type Value = ManifestHeader;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<ManifestHeader, D::Error> {
        d.deserialize_struct("Manifest", FIELDS, self)
    }
}

impl<'de, F: FnMut(&FileRecord) -> Result<(), E>, E> Visitor<'de> for ManifestSeed<'_, F, E> {
    type Value = ManifestHeader;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a snapshot manifest")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ManifestHeader, A::Error> {
        fn once<T, E: de::Error>(slot: &mut Option<T>, value: T, name: &'static str) -> Result<(), E> {
            match slot.replace(value) {
                Some(_) => Err(E::duplicate_field(name)),
                None => Ok(()),
            }
        }
        let (mut format, mut snapshot_id, mut meta, mut entries, mut fuzzy) = (None, None, None, None, None);
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Format => once(&mut format, map.next_value()?, "format")?,
                Field::SnapshotId => once(&mut snapshot_id, map.next_value()?, "snapshot_id")?,
                Field::Meta => once(&mut meta, map.next_value()?, "meta")?,
                Field::Fuzzy => once(&mut fuzzy, map.next_value()?, "fuzzy")?,
                Field::Entries => {
                    if entries.is_some() {
                        return Err(de::Error::duplicate_field("entries"));
                    }
                    entries = Some(map.next_value_seed(RecordsSeed(self))?);
                }
            }
        }
        entries.ok_or_else(|| de::Error::missing_field("entries"))?;
        Ok(ManifestHeader {
            format: format.ok_or_else(|| de::Error::missing_field("format"))?,
            snapshot_id: snapshot_id.ok_or_else(|| de::Error::missing_field("snapshot_id"))?,
            meta: meta.ok_or_else(|| de::Error::missing_field("meta"))?,
            fuzzy: fuzzy.unwrap_or(false),
        })
    }
}

/// The manifest's `entries`, each checked as it is parsed.
struct RecordsSeed<'a, F, E>(ManifestSeed<'a, F, E>);

impl<'de, F: FnMut(&FileRecord) -> Result<(), E>, E> DeserializeSeed<'de> for RecordsSeed<'_, F, E> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, F: FnMut(&FileRecord) -> Result<(), E>, E> Visitor<'de> for RecordsSeed<'_, F, E> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of file records")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let RecordsSeed(seed) = self;
        let announced = &seed.preamble.entries;
        let mut at = 0;
        while let Some(record) = seq.next_element::<FileRecord>()? {
            if !announced.get(at).is_some_and(|e| e.path == record.path && e.size == record.size) {
                return seed.refuse(Checked::Bad(OTHER_ENTRIES.into()));
            }
            if let Err(e) = (seed.check.borrow_mut())(&record) {
                return seed.refuse(Checked::Failed(e));
            }
            at += 1;
        }
        if at != announced.len() {
            return seed.refuse(Checked::Bad(OTHER_ENTRIES.into()));
        }
        Ok(())
    }
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

    fn preamble(entries: &[(&str, u64)]) -> Preamble {
        Preamble {
            format: ARCHIVE_FORMAT,
            snapshot_id: "id".into(),
            engine: "e".into(),
            shard: "s".into(),
            snapshot_format: 1,
            meta: SnapshotMeta { term: 1, position: 2, attributes: vec![] },
            entries: entries
                .iter()
                .map(|(p, size)| EntryInfo { path: RelPath::new(p).unwrap(), size: *size })
                .collect(),
            skipped: vec![],
        }
    }

    fn sum(byte: u8) -> Checksum {
        Checksum([byte; 32])
    }

    /// The manifest of `preamble` with one checksum per entry, as a source writes it.
    fn written(p: &Preamble, sums: &[Checksum], fuzzy: bool) -> Vec<u8> {
        let records: Vec<FileRecordRef> = p
            .entries
            .iter()
            .zip(sums)
            .map(|(e, &blake3)| FileRecordRef { path: &e.path, size: e.size, blake3 })
            .collect();
        let manifest =
            ManifestRef { format: ARCHIVE_FORMAT, snapshot_id: &p.snapshot_id, meta: &p.meta, entries: records, fuzzy };
        serde_json::to_vec(&manifest).unwrap()
    }

    fn read(json: &[u8], p: &Preamble) -> Result<bool, Checked<String>> {
        let mut seen = Vec::new();
        let answer = read_checked(json, p, |r: &FileRecord| {
            seen.push(r.path.as_str().to_owned());
            if r.blake3 == sum(0xee) { Err(format!("{} refused", r.path)) } else { Ok(()) }
        });
        if answer.is_ok() {
            assert_eq!(seen, p.entries.iter().map(|e| e.path.as_str()).collect::<Vec<_>>());
        }
        answer
    }

    fn bad(answer: Result<bool, Checked<String>>) -> String {
        match answer {
            Err(Checked::Bad(why)) => why,
            other => panic!("not refused as bad: {other:?}"),
        }
    }

    #[test]
    fn a_written_manifest_reads_back_as_the_format_says() {
        let p = preamble(&[("a", 1), ("b/c", 2)]);
        let json = written(&p, &[sum(1), sum(2)], true);
        let parsed: Manifest = serde_json::from_slice(&json).unwrap();
        assert_eq!(parsed.entries[1], FileRecord { path: RelPath::new("b/c").unwrap(), size: 2, blake3: sum(2) });
        assert!(parsed.fuzzy);
        assert!(read(&json, &p).unwrap());
        assert!(!read(&written(&p, &[sum(1), sum(2)], false), &p).unwrap());
    }

    #[test]
    fn a_manifest_is_checked_record_by_record() {
        let p = preamble(&[("a", 1), ("b", 2)]);
        let swapped = preamble(&[("b", 2), ("a", 1)]);
        assert!(bad(read(&written(&swapped, &[sum(1), sum(2)], false), &p)).contains("other entries"));
        let short = preamble(&[("a", 1)]);
        assert!(bad(read(&written(&short, &[sum(1)], false), &p)).contains("other entries"));
        let longer = preamble(&[("a", 1), ("b", 2), ("c", 3)]);
        assert!(bad(read(&written(&longer, &[sum(1), sum(2), sum(3)], false), &p)).contains("other entries"));
        let resized = preamble(&[("a", 1), ("b", 3)]);
        assert!(bad(read(&written(&resized, &[sum(1), sum(2)], false), &p)).contains("other entries"));
        match read(&written(&p, &[sum(1), sum(0xee)], false), &p) {
            Err(Checked::Failed(why)) => assert_eq!(why, "b refused"),
            other => panic!("the check's refusal is passed on: {other:?}"),
        }
        let mut other = preamble(&[("a", 1), ("b", 2)]);
        other.snapshot_id = "another".into();
        assert!(bad(read(&written(&other, &[sum(1), sum(2)], false), &p)).contains("does not describe"));
    }

    #[test]
    fn a_malformed_manifest_is_refused() {
        let p = preamble(&[("a", 1)]);
        let good = String::from_utf8(written(&p, &[sum(1)], false)).unwrap();
        let extra = good.replacen('{', r#"{"extra":1,"#, 1);
        assert!(bad(read(extra.as_bytes(), &p)).contains("unknown field"));
        let twice = good.replacen('{', r#"{"format":1,"#, 1);
        assert!(bad(read(twice.as_bytes(), &p)).contains("duplicate field"));
        let no_entries = good.replacen(r#""entries""#, r#""fuzzy":false,"x""#, 1);
        assert!(!bad(read(no_entries.as_bytes(), &p)).is_empty());
        assert!(bad(read(&good.as_bytes()[..good.len() - 1], &p)).contains("EOF"));
        assert!(bad(read(format!("{good} {{}}").as_bytes(), &p)).contains("trailing"));
        let missing = r#"{"format":1,"snapshot_id":"id","entries":[]}"#;
        assert!(bad(read(missing.as_bytes(), &preamble(&[]))).contains("missing field `meta`"));
    }

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
