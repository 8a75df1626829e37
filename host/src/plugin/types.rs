//! Host-side values of the plugin contract.
//!
//! These are independent of any one WIT version: each supported contract
//! version converts its bindgen types into these, checking on the way in
//! everything a guest could get wrong (a guest's reply is untrusted input).

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::relpath::{PathIndex, RelPath};

/// Most entries one snapshot plan may have.
pub const MAX_PLAN_ENTRIES: usize = 100_000;
/// Largest inline entry (a control file, a manifest).
pub const MAX_INLINE_ENTRY: usize = 16 << 20;
/// Largest sum of all inline entries of a plan.
pub const MAX_INLINE_TOTAL: usize = 64 << 20;
pub const MAX_ATTRIBUTES: usize = 64;
pub const MAX_ATTRIBUTE_KEY: usize = 128;
pub const MAX_ATTRIBUTE_VALUE: usize = 4096;
/// Longest error message kept from a guest.
pub const MAX_GUEST_MESSAGE: usize = 4096;
/// Most locks one fence may ask the host to hold.
pub const MAX_FENCE_LOCKS: usize = 16;
/// Smallest block of a block-diff entry.
pub const MIN_DIFF_BLOCK: u32 = 512;
/// Largest block of a block-diff entry.
pub const MAX_DIFF_BLOCK: u32 = 1 << 20;
/// Largest file a delta entry may describe (1 PiB): far past any shard, and
/// far from where offset arithmetic could overflow.
pub const MAX_DELTA_FILE: u64 = 1 << 50;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EngineInfo {
    pub name: String,
    pub plugin_version: String,
    pub snapshot_format: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardPosition {
    pub term: u64,
    pub position: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub term: u64,
    pub position: u64,
    pub attributes: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum PlanEntry {
    /// Bytes `[offset, offset + length)` of the shard's file at `path`,
    /// streamed by the host.
    File { path: RelPath, offset: u64, length: Option<u64> },
    /// A file the guest generated.
    Inline {
        path: RelPath,
        #[serde(with = "base64_bytes")]
        contents: Vec<u8>,
    },
}

impl PlanEntry {
    pub fn path(&self) -> &RelPath {
        match self {
            PlanEntry::File { path, .. } | PlanEntry::Inline { path, .. } => path,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotPlan {
    pub meta: SnapshotMeta,
    pub entries: Vec<PlanEntry>,
}

/// An error the engine reported through the contract's `engine-error`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", content = "message", rename_all = "kebab-case")]
pub enum EngineError {
    #[error("invalid: {0}")]
    Invalid(String),
    #[error("io: {0}")]
    Io(String),
    #[error("term changed: {0}")]
    TermChanged(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("{0}")]
    Other(String),
    /// Contract 0.2.0: the history after the requested position is gone; the
    /// host starts over with a snapshot.
    #[error("history gone: {0}")]
    HistoryGone(String),
    /// Contract 0.2.0: another transfer epoch holds the fence, or the shard
    /// is retired.
    #[error("fenced: {0}")]
    Fenced(String),
}

/// Why a guest's reply was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReplyError(pub String);

fn refuse<T>(msg: impl Into<String>) -> Result<T, ReplyError> {
    Err(ReplyError(msg.into()))
}

/// Cuts a guest-supplied message to a sane length on a char boundary.
pub fn clip_message(mut s: String) -> String {
    if s.len() > MAX_GUEST_MESSAGE {
        let mut end = MAX_GUEST_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// A guest's message as the host keeps it: clipped, and escaped to one line.
/// Error messages of an engine end up in the node's log as much as its log
/// messages do.
pub fn guest_message(s: String) -> String {
    let s = clip_message(s);
    if let Cow::Owned(escaped) = escape_guest_text(&s) {
        return escaped;
    }
    s
}

/// Guest text as one unambiguous log line: `\`, newline, CR and tab become
/// `\\`, `\n`, `\r`, `\t`; every other control character, the Unicode
/// line and paragraph separators and the bidi overrides become `\u{..}`. A
/// guest can then never start a line of its own or pass for the host.
pub fn escape_guest_text(text: &str) -> Cow<'_, str> {
    let needs = |c: char| {
        c == '\\'
            || c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(needs) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if needs(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

impl EngineInfo {
    /// An engine name names directories: 1-64 of `a-z`, `0-9`, `-`.
    pub fn check(self) -> Result<EngineInfo, ReplyError> {
        check_engine_name(&self.name).map_err(ReplyError)?;
        if self.plugin_version.is_empty()
            || self.plugin_version.len() > 64
            || self.plugin_version.chars().any(char::is_control)
        {
            return refuse(format!(
                "plugin version {:?} is not 1-64 printable characters",
                clip_message(self.plugin_version)
            ));
        }
        Ok(self)
    }
}

pub fn check_engine_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!("engine name {:?} is not 1-64 of a-z, 0-9 and '-'", name.chars().take(80).collect::<String>()))
    }
}

impl SnapshotMeta {
    pub fn check(self) -> Result<SnapshotMeta, ReplyError> {
        check_attributes(&self.attributes)?;
        Ok(self)
    }
}

/// An entry as the guest sent it, before its path is checked.
pub enum RawEntry {
    File { path: String, offset: u64, length: Option<u64> },
    Inline { path: String, contents: Vec<u8> },
}

impl SnapshotPlan {
    /// Checks a guest's plan: bounded size, valid unique paths, sane ranges.
    pub fn from_guest(meta: SnapshotMeta, raw: Vec<RawEntry>) -> Result<SnapshotPlan, ReplyError> {
        let meta = meta.check()?;
        if raw.len() > MAX_PLAN_ENTRIES {
            return refuse(format!("plan has {} entries, at most {MAX_PLAN_ENTRIES}", raw.len()));
        }
        let mut inline_total = 0usize;
        let mut entries = Vec::with_capacity(raw.len());
        for entry in raw {
            let entry = match entry {
                RawEntry::File { path, offset, length } => {
                    let path = RelPath::from_string(path).map_err(|e| ReplyError(format!("plan entry {e}")))?;
                    if let Some(len) = length
                        && offset.checked_add(len).is_none()
                    {
                        return refuse(format!("plan entry {path}: range overflows"));
                    }
                    PlanEntry::File { path, offset, length }
                }
                RawEntry::Inline { path, contents } => {
                    let path = RelPath::from_string(path).map_err(|e| ReplyError(format!("plan entry {e}")))?;
                    if contents.len() > MAX_INLINE_ENTRY {
                        return refuse(format!(
                            "plan entry {path}: inline entry of {} bytes, at most {MAX_INLINE_ENTRY}",
                            contents.len()
                        ));
                    }
                    inline_total += contents.len();
                    if inline_total > MAX_INLINE_TOTAL {
                        return refuse(format!("inline entries exceed {MAX_INLINE_TOTAL} bytes in all"));
                    }
                    PlanEntry::Inline { path, contents }
                }
            };
            entries.push(entry);
        }
        unique_paths(entries.len(), |at| entries[at].path(), "plan", "plan entry")?;
        Ok(SnapshotPlan { meta, entries })
    }
}

/// What one catch-up round covers: the changes after `since` up to `until`,
/// within `term` (contract 0.2.0).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeltaMeta {
    pub term: u64,
    pub since: u64,
    pub until: u64,
    pub attributes: Vec<(String, String)>,
}

impl DeltaMeta {
    pub fn check(self) -> Result<DeltaMeta, ReplyError> {
        check_attributes(&self.attributes)?;
        if self.until < self.since {
            return refuse(format!("delta ends at {} before it starts at {}", self.until, self.since));
        }
        Ok(self)
    }

    /// Where the receiver stands once the round is applied.
    pub fn end(&self) -> ShardPosition {
        ShardPosition { term: self.term, position: self.until }
    }
}

/// One entry of a delta plan. Paths follow the snapshot plan's rules.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum DeltaEntry {
    /// Bytes `[offset, offset + length)` of the source's `path`, written at
    /// the same offset of the receiver's `path` (created or extended).
    Range { path: RelPath, offset: u64, length: u64 },
    /// The receiver's `path` becomes equal to the source's, `length` bytes,
    /// by sending only the blocks of `block_size` bytes whose digest differs.
    BlockDiff { path: RelPath, block_size: u32, length: u64 },
    /// Replaces the receiver's whole file.
    Inline {
        path: RelPath,
        #[serde(with = "base64_bytes")]
        contents: Vec<u8>,
    },
    /// The receiver removes this file.
    Remove { path: RelPath },
}

impl DeltaEntry {
    pub fn path(&self) -> &RelPath {
        match self {
            DeltaEntry::Range { path, .. }
            | DeltaEntry::BlockDiff { path, .. }
            | DeltaEntry::Inline { path, .. }
            | DeltaEntry::Remove { path } => path,
        }
    }
}

/// The changes of one catch-up round, checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaPlan {
    pub meta: DeltaMeta,
    pub entries: Vec<DeltaEntry>,
}

/// A delta entry as the guest sent it, before its path is checked.
pub enum RawDeltaEntry {
    Range { path: String, offset: u64, length: u64 },
    BlockDiff { path: String, block_size: u32, length: u64 },
    Inline { path: String, contents: Vec<u8> },
    Remove { path: String },
}

impl DeltaPlan {
    /// Checks a guest's delta plan as strictly as a snapshot plan: bounded
    /// size, valid unique paths, sane ranges and block sizes.
    pub fn from_guest(meta: DeltaMeta, raw: Vec<RawDeltaEntry>) -> Result<DeltaPlan, ReplyError> {
        let meta = meta.check()?;
        if raw.len() > MAX_PLAN_ENTRIES {
            return refuse(format!("delta plan has {} entries, at most {MAX_PLAN_ENTRIES}", raw.len()));
        }
        let path = |p: String| RelPath::from_string(p).map_err(|e| ReplyError(format!("delta entry {e}")));
        let mut inline_total = 0usize;
        let mut entries = Vec::with_capacity(raw.len());
        for entry in raw {
            let entry = match entry {
                RawDeltaEntry::Range { path: p, offset, length } => {
                    let path = path(p)?;
                    if length == 0 {
                        return refuse(format!("delta entry {path}: empty range"));
                    }
                    if offset.checked_add(length).is_none_or(|end| end > MAX_DELTA_FILE) {
                        return refuse(format!("delta entry {path}: range {offset}+{length} is out of bounds"));
                    }
                    DeltaEntry::Range { path, offset, length }
                }
                RawDeltaEntry::BlockDiff { path: p, block_size, length } => {
                    let path = path(p)?;
                    if !block_size.is_power_of_two() || !(MIN_DIFF_BLOCK..=MAX_DIFF_BLOCK).contains(&block_size) {
                        return refuse(format!(
                            "delta entry {path}: block size {block_size} is not a power of two in \
                             [{MIN_DIFF_BLOCK}, {MAX_DIFF_BLOCK}]"
                        ));
                    }
                    if length > MAX_DELTA_FILE {
                        return refuse(format!("delta entry {path}: length {length} is out of bounds"));
                    }
                    DeltaEntry::BlockDiff { path, block_size, length }
                }
                RawDeltaEntry::Inline { path: p, contents } => {
                    let path = path(p)?;
                    if contents.len() > MAX_INLINE_ENTRY {
                        return refuse(format!(
                            "delta entry {path}: inline entry of {} bytes, at most {MAX_INLINE_ENTRY}",
                            contents.len()
                        ));
                    }
                    inline_total += contents.len();
                    if inline_total > MAX_INLINE_TOTAL {
                        return refuse(format!("inline entries exceed {MAX_INLINE_TOTAL} bytes in all"));
                    }
                    DeltaEntry::Inline { path, contents }
                }
                RawDeltaEntry::Remove { path: p } => DeltaEntry::Remove { path: path(p)? },
            };
            entries.push(entry);
        }
        unique_paths(entries.len(), |at| entries[at].path(), "delta plan", "delta entry")?;
        Ok(DeltaPlan { meta, entries })
    }
}

/// A POSIX record lock (`fcntl`) the host takes on a file of the live shard
/// and holds while the shard is fenced.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileLock {
    pub path: RelPath,
    pub offset: u64,
    /// Bytes locked; never 0 (which would mean "to the end" to `fcntl`: the
    /// plugin names its range).
    pub length: u64,
    pub exclusive: bool,
}

/// What a fence returned: the last position any write can have, and the
/// locks the host must hold until `unfence` or `retire`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceInfo {
    pub last: ShardPosition,
    pub locks: Vec<FileLock>,
}

/// A lock as the guest sent it, before its path is checked.
pub struct RawFileLock {
    pub path: String,
    pub offset: u64,
    pub length: u64,
    pub exclusive: bool,
}

impl FenceInfo {
    /// Checks a guest's fence info: a few locks, on valid paths, of ranges
    /// `fcntl` can take (`off_t` is signed), none named twice.
    pub fn from_guest(last: ShardPosition, raw: Vec<RawFileLock>) -> Result<FenceInfo, ReplyError> {
        if raw.len() > MAX_FENCE_LOCKS {
            return refuse(format!("fence asks for {} locks, at most {MAX_FENCE_LOCKS}", raw.len()));
        }
        let mut locks: Vec<FileLock> = Vec::with_capacity(raw.len());
        for lock in raw {
            let path = RelPath::new(&lock.path).map_err(|e| ReplyError(format!("fence lock {e}")))?;
            if lock.length == 0 || lock.offset.checked_add(lock.length).is_none_or(|end| end > i64::MAX as u64) {
                return refuse(format!(
                    "fence lock {path}: range {}+{} is empty or out of bounds",
                    lock.offset, lock.length
                ));
            }
            let lock = FileLock { path, offset: lock.offset, length: lock.length, exclusive: lock.exclusive };
            if locks.contains(&lock) {
                return refuse(format!("fence names the lock on {} twice", lock.path));
            }
            locks.push(lock);
        }
        Ok(FenceInfo { last, locks })
    }
}

/// Refuses a plan that names a path twice, or a path inside another (a
/// file and a directory of the same name cannot both exist).
fn unique_paths<'a>(
    len: usize,
    path: impl Fn(usize) -> &'a RelPath + Copy,
    plan: &str,
    entry: &str,
) -> Result<(), ReplyError> {
    let index = PathIndex::new(len, path);
    if let Some(twice) = index.duplicate(path) {
        return refuse(format!("{plan} names {twice} twice"));
    }
    if let Some((inner, file)) = index.nested(path) {
        return refuse(format!("{entry} {inner} is inside file {file}"));
    }
    Ok(())
}

fn check_attributes(attributes: &[(String, String)]) -> Result<(), ReplyError> {
    if attributes.len() > MAX_ATTRIBUTES {
        return refuse(format!("{} attributes, at most {MAX_ATTRIBUTES}", attributes.len()));
    }
    for (key, value) in attributes {
        if key.is_empty() || key.len() > MAX_ATTRIBUTE_KEY || value.len() > MAX_ATTRIBUTE_VALUE {
            return refuse(format!(
                "attribute {:?} is empty or too long (key ≤ {MAX_ATTRIBUTE_KEY}, value ≤ {MAX_ATTRIBUTE_VALUE} bytes)",
                key.chars().take(80).collect::<String>()
            ));
        }
    }
    Ok(())
}

mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(path: &str) -> RawEntry {
        RawEntry::Inline { path: path.into(), contents: vec![1] }
    }

    fn meta() -> SnapshotMeta {
        SnapshotMeta { term: 1, position: 2, attributes: vec![] }
    }

    #[test]
    fn guest_text_is_one_line() {
        assert!(matches!(escape_guest_text("plain text, é"), Cow::Borrowed(_)));
        assert_eq!(
            escape_guest_text("a\nFORGED\r\t\\ \u{1b}[31m \u{7f} \u{85} \u{2028} \u{202e}"),
            "a\\nFORGED\\r\\t\\\\ \\u{1b}[31m \\u{7f} \\u{85} \\u{2028} \\u{202e}"
        );
        // Clipped first, then escaped.
        let long = guest_message("x\ny".repeat(2000));
        assert!(long.starts_with("x\\ny") && long.ends_with('…') && !long.contains('\n'), "{long}");
        assert_eq!(long.len(), 1365 * 4 + 1 + '…'.len_utf8());
    }

    #[test]
    fn good_plan_passes() {
        let plan = SnapshotPlan::from_guest(
            meta(),
            vec![inline("control"), RawEntry::File { path: "seg/1".into(), offset: 0, length: Some(10) }],
        )
        .unwrap();
        assert_eq!(plan.entries.len(), 2);
    }

    #[test]
    fn bad_plans_are_refused() {
        let cases: Vec<(Vec<RawEntry>, &str)> = vec![
            (vec![inline("a"), inline("a")], "twice"),
            (vec![inline("/abs")], "absolute"),
            (vec![inline("a/../b")], "'..'"),
            (vec![inline("a"), inline("a/b")], "inside file a"),
            (vec![RawEntry::File { path: "f".into(), offset: u64::MAX, length: Some(2) }], "overflows"),
            (vec![RawEntry::Inline { path: "big".into(), contents: vec![0; MAX_INLINE_ENTRY + 1] }], "at most"),
        ];
        for (entries, want) in cases {
            let err = SnapshotPlan::from_guest(meta(), entries).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?} in {err:?}");
        }
    }

    fn delta_meta() -> DeltaMeta {
        DeltaMeta { term: 1, since: 10, until: 20, attributes: vec![] }
    }

    fn range(path: &str, offset: u64, length: u64) -> RawDeltaEntry {
        RawDeltaEntry::Range { path: path.into(), offset, length }
    }

    fn diff(block_size: u32) -> RawDeltaEntry {
        RawDeltaEntry::BlockDiff { path: "db".into(), block_size, length: 8192 }
    }

    #[test]
    fn good_delta_plan_passes() {
        let plan = DeltaPlan::from_guest(
            delta_meta(),
            vec![
                range("seg/1", 10, 10),
                diff(4096),
                RawDeltaEntry::Inline { path: "control".into(), contents: vec![1] },
                RawDeltaEntry::Remove { path: "old".into() },
            ],
        )
        .unwrap();
        assert_eq!(plan.entries.len(), 4);
        let json = serde_json::to_string(&plan).unwrap();
        assert!(json.contains(r#""kind":"block-diff""#), "{json}");
        assert_eq!(serde_json::from_str::<DeltaPlan>(&json).unwrap(), plan);
        // An empty round is a valid plan.
        DeltaPlan::from_guest(DeltaMeta { until: 10, ..delta_meta() }, vec![]).unwrap();
    }

    #[test]
    fn bad_delta_plans_are_refused() {
        let cases: Vec<(DeltaMeta, Vec<RawDeltaEntry>, &str)> = vec![
            (DeltaMeta { until: 9, ..delta_meta() }, vec![], "before it starts"),
            (delta_meta(), vec![range("a", 0, 1), RawDeltaEntry::Remove { path: "a".into() }], "twice"),
            (delta_meta(), vec![range("/abs", 0, 1)], "absolute"),
            (delta_meta(), vec![range("a/../b", 0, 1)], "'..'"),
            (delta_meta(), vec![range("a", 0, 1), range("a/b", 0, 1)], "inside file a"),
            (delta_meta(), vec![range("a", 0, 0)], "empty range"),
            (delta_meta(), vec![range("a", u64::MAX, 2)], "out of bounds"),
            (delta_meta(), vec![range("a", MAX_DELTA_FILE, 1)], "out of bounds"),
            (delta_meta(), vec![diff(4000)], "power of two"),
            (delta_meta(), vec![diff(256)], "power of two"),
            (delta_meta(), vec![diff(2 << 20)], "power of two"),
            (
                delta_meta(),
                vec![RawDeltaEntry::BlockDiff { path: "db".into(), block_size: 4096, length: u64::MAX }],
                "out of bounds",
            ),
            (
                delta_meta(),
                vec![RawDeltaEntry::Inline { path: "big".into(), contents: vec![0; MAX_INLINE_ENTRY + 1] }],
                "at most",
            ),
            (DeltaMeta { attributes: vec![(String::new(), "v".into())], ..delta_meta() }, vec![], "empty or too long"),
        ];
        for (meta, entries, want) in cases {
            let err = DeltaPlan::from_guest(meta, entries).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?} in {err:?}");
        }
        let many = (0..=MAX_PLAN_ENTRIES).map(|i| RawDeltaEntry::Remove { path: format!("f{i}") }).collect();
        assert!(DeltaPlan::from_guest(delta_meta(), many).unwrap_err().to_string().contains("at most"));
    }

    #[test]
    fn fence_info_is_checked() {
        let last = ShardPosition { term: 2, position: 5 };
        let lock =
            |path: &str, offset: u64, length: u64| RawFileLock { path: path.into(), offset, length, exclusive: true };
        let info = FenceInfo::from_guest(last, vec![lock("control.lock", 0, 1), lock("db", 1 << 30, 2)]).unwrap();
        assert_eq!(info.locks.len(), 2);
        assert_eq!(info.locks[0].path.as_str(), "control.lock");
        assert!(FenceInfo::from_guest(last, vec![]).unwrap().locks.is_empty());
        let cases: Vec<(Vec<RawFileLock>, &str)> = vec![
            (vec![lock("../x", 0, 1)], "'..'"),
            (vec![lock("x", 0, 0)], "empty or out of bounds"),
            (vec![lock("x", i64::MAX as u64, 1)], "empty or out of bounds"),
            (vec![lock("x", 0, 1), lock("x", 0, 1)], "twice"),
            ((0..=MAX_FENCE_LOCKS as u64).map(|i| lock("x", i, 1)).collect(), "at most"),
        ];
        for (locks, want) in cases {
            let err = FenceInfo::from_guest(last, locks).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?} in {err:?}");
        }
    }

    #[test]
    fn engine_names() {
        assert!(check_engine_name("segment-log").is_ok());
        for bad in ["", "Upper", "a/b", "-x", &"a".repeat(65)] {
            assert!(check_engine_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn plan_json_roundtrip() {
        let plan = SnapshotPlan::from_guest(meta(), vec![inline("control")]).unwrap();
        let json = serde_json::to_string(&plan).unwrap();
        assert!(json.contains(r#""kind":"inline""#), "{json}");
        assert_eq!(serde_json::from_str::<SnapshotPlan>(&json).unwrap(), plan);
    }
}
