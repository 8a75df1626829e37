//! Relative paths from untrusted sources (guest plans, tar entries).
//!
//! A [`RelPath`] is `/`-separated, relative and normalised: no leading `/`, no
//! `.` or `..` component, no empty component, no NUL or `\`, at most
//! [`MAX_PATH_LEN`] bytes and [`MAX_COMPONENT_LEN`] bytes per component. Joined
//! onto a directory, it can only name something inside that directory (as long
//! as no symlink inside is followed; the install code never creates one).

use std::fmt;
use std::path::{Path, PathBuf};

pub const MAX_PATH_LEN: usize = 4096;
pub const MAX_COMPONENT_LEN: usize = 255;

/// A validated relative path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct RelPath(String);

/// Why a path was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("path {path:?} {reason}")]
pub struct RelPathError {
    pub path: String,
    pub reason: &'static str,
}

impl RelPath {
    pub fn new(path: &str) -> Result<RelPath, RelPathError> {
        let refuse = |reason| Err(RelPathError { path: path.chars().take(200).collect(), reason });
        if path.is_empty() {
            return refuse("is empty");
        }
        if path.len() > MAX_PATH_LEN {
            return refuse("is too long");
        }
        if path.starts_with('/') {
            return refuse("is absolute");
        }
        if path.contains('\0') {
            return refuse("contains NUL");
        }
        if path.contains('\\') {
            return refuse("contains a backslash");
        }
        for component in path.split('/') {
            match component {
                "" => return refuse("has an empty component"),
                "." => return refuse("has a '.' component"),
                ".." => return refuse("has a '..' component"),
                c if c.len() > MAX_COMPONENT_LEN => return refuse("has a component that is too long"),
                _ => {}
            }
        }
        Ok(RelPath(path.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `dir` joined with this path; always inside `dir`.
    pub fn join_to(&self, dir: &Path) -> PathBuf {
        dir.join(&self.0)
    }

    /// The parent directories of this path, outermost first (`a`, `a/b` for `a/b/c`).
    pub fn parents(&self) -> impl Iterator<Item = &str> {
        self.0.match_indices('/').map(|(at, _)| &self.0[..at])
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Lets sets of paths be probed with a `&str`; a `RelPath` hashes as its string.
impl std::borrow::Borrow<str> for RelPath {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl<'de> serde::Deserialize<'de> for RelPath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RelPath::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_normal_paths() {
        for ok in ["control", "a/b/c", "segment-0000000000000001", "..a", "a..", ".hidden"] {
            assert!(RelPath::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_escapes_and_oddities() {
        for (bad, why) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("a/../../b", "'..'"),
            ("..", "'..'"),
            ("./a", "'.'"),
            ("a//b", "empty component"),
            ("a/", "empty component"),
            ("a\\..\\b", "backslash"),
            ("a\0b", "NUL"),
        ] {
            let err = RelPath::new(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        assert!(RelPath::new(&"x".repeat(256)).is_err());
        assert!(RelPath::new(&"a/".repeat(2100)).is_err());
    }

    #[test]
    fn parents_outermost_first() {
        let p = RelPath::new("a/b/c").unwrap();
        assert_eq!(p.parents().collect::<Vec<_>>(), ["a", "a/b"]);
        assert_eq!(RelPath::new("f").unwrap().parents().count(), 0);
    }
}
