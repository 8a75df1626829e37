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
        Self::check(path)?;
        Ok(RelPath(path.to_owned()))
    }

    /// As [`RelPath::new`], keeping `path`'s allocation.
    pub fn from_string(path: String) -> Result<RelPath, RelPathError> {
        Self::check(&path)?;
        Ok(RelPath(path))
    }

    fn check(path: &str) -> Result<(), RelPathError> {
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
        Ok(())
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
        RelPath::from_string(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// The positions of a list's paths, sorted by path: finds an entry of a
/// list by its path without a map that holds a second copy of every path
/// (a plan or a preamble has up to 100,000). `path(i)` is the list's i-th
/// path, the same function for every call on one index.
pub struct PathIndex(Vec<u32>);

impl PathIndex {
    /// Indexes the `len` paths `path(0..len)` (`len` fits in a `u32`).
    pub fn new<'a>(len: usize, path: impl Fn(usize) -> &'a RelPath) -> PathIndex {
        let mut sorted: Vec<u32> = (0..len as u32).collect();
        sorted.sort_unstable_by(|&a, &b| path(a as usize).cmp(path(b as usize)));
        PathIndex(sorted)
    }

    /// The position of `wanted`.
    pub fn find<'a>(&self, path: impl Fn(usize) -> &'a RelPath, wanted: &str) -> Option<usize> {
        let found = self.0.binary_search_by(|&at| path(at as usize).as_str().cmp(wanted)).ok()?;
        Some(self.0[found] as usize)
    }

    /// A path the list holds twice.
    pub fn duplicate<'a>(&self, path: impl Fn(usize) -> &'a RelPath) -> Option<&'a RelPath> {
        let pair = self.0.windows(2).find(|w| path(w[0] as usize) == path(w[1] as usize))?;
        Some(path(pair[0] as usize))
    }

    /// A path inside another path of the list (a file cannot also be a
    /// directory): the inner path and the outer one.
    pub fn nested<'a>(&self, path: impl Fn(usize) -> &'a RelPath + Copy) -> Option<(&'a RelPath, &'a str)> {
        self.0.iter().map(|&at| path(at as usize)).find_map(|inner| {
            inner.parents().find(|outer| self.find(path, outer).is_some()).map(|outer| (inner, outer))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_index_finds_paths_duplicates_and_files_used_as_directories() {
        let paths: Vec<RelPath> = ["b/c", "a", "b/d", "e"].iter().map(|p| RelPath::new(p).unwrap()).collect();
        let at = |i: usize| &paths[i];
        let index = PathIndex::new(paths.len(), at);
        assert_eq!(index.find(at, "b/d"), Some(2));
        assert_eq!(index.find(at, "a"), Some(1));
        assert_eq!(index.find(at, "b"), None);
        assert_eq!(index.duplicate(at), None);
        assert_eq!(index.nested(at), None);
        let mut more = paths.clone();
        more.extend([RelPath::new("a").unwrap(), RelPath::new("e/f").unwrap()]);
        let at = |i: usize| &more[i];
        let index = PathIndex::new(more.len(), at);
        assert_eq!(index.duplicate(at).map(RelPath::as_str), Some("a"));
        assert_eq!(index.nested(at).map(|(inner, outer)| (inner.as_str(), outer)), Some(("e/f", "e")));
    }

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
