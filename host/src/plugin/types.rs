//! Host-side values of the plugin contract.
//!
//! These are independent of any one WIT version: each supported contract
//! version converts its bindgen types into these, checking on the way in
//! everything a guest could get wrong (a guest's reply is untrusted input).

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::relpath::RelPath;

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
        if self.attributes.len() > MAX_ATTRIBUTES {
            return refuse(format!("{} attributes, at most {MAX_ATTRIBUTES}", self.attributes.len()));
        }
        for (key, value) in &self.attributes {
            if key.is_empty() || key.len() > MAX_ATTRIBUTE_KEY || value.len() > MAX_ATTRIBUTE_VALUE {
                return refuse(format!(
                    "attribute {:?} is empty or too long (key ≤ {MAX_ATTRIBUTE_KEY}, value ≤ {MAX_ATTRIBUTE_VALUE} bytes)",
                    key.chars().take(80).collect::<String>()
                ));
            }
        }
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
        let mut seen = HashSet::with_capacity(raw.len());
        let mut inline_total = 0usize;
        let mut entries = Vec::with_capacity(raw.len());
        for entry in raw {
            let entry = match entry {
                RawEntry::File { path, offset, length } => {
                    let path = RelPath::new(&path).map_err(|e| ReplyError(format!("plan entry {e}")))?;
                    if let Some(len) = length
                        && offset.checked_add(len).is_none()
                    {
                        return refuse(format!("plan entry {path}: range overflows"));
                    }
                    PlanEntry::File { path, offset, length }
                }
                RawEntry::Inline { path, contents } => {
                    let path = RelPath::new(&path).map_err(|e| ReplyError(format!("plan entry {e}")))?;
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
            if !seen.insert(entry.path().clone()) {
                return refuse(format!("plan names {} twice", entry.path()));
            }
            entries.push(entry);
        }
        // A file and a directory of the same name cannot both exist.
        for entry in &entries {
            if let Some(parent) = entry.path().parents().find(|p| seen.contains(*p as &str)) {
                return refuse(format!("plan entry {} is inside file {parent}", entry.path()));
            }
        }
        Ok(SnapshotPlan { meta, entries })
    }
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
