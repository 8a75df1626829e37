//! The data directory. Its layout is fixed; other tools rely on it:
//!
//! ```text
//! <data-dir>/shards/<engine>/<shard>/   live replicas
//! <data-dir>/staging/<transfer-id>/      receiving work (never served)
//! <data-dir>/state/                      the node's own state
//! ```

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use crate::plugin::types::check_engine_name;

/// A name that cannot name a directory of the layout (an engine, a shard or
/// a transfer id that breaks its rule): no path is made from it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadName(pub String);

#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// Creates the layout under `root` if missing. Staging and shards must be
    /// on one file system, so a publish is a rename.
    pub fn open(root: &Path) -> io::Result<DataDir> {
        let data = DataDir { root: root.to_owned() };
        for dir in [data.shards_root(), data.staging_root(), data.state()] {
            std::fs::create_dir_all(&dir)?;
        }
        Ok(data)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn shards_root(&self) -> PathBuf {
        self.root.join("shards")
    }

    /// `shards/<engine>/`, for a valid engine name only.
    pub fn engine_dir(&self, engine: &str) -> Result<PathBuf, BadName> {
        check_engine_name(engine).map_err(BadName)?;
        Ok(self.shards_root().join(engine))
    }

    /// Where the live replica of `shard` of `engine` is; both names are
    /// checked, so the path is always directly under `shards/<engine>/`.
    pub fn shard(&self, engine: &str, shard: &str) -> Result<PathBuf, BadName> {
        check_shard_id(shard).map_err(BadName)?;
        Ok(self.engine_dir(engine)?.join(shard))
    }

    pub fn staging_root(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// A transfer's staging directory, for a valid transfer id only.
    pub fn staging(&self, transfer: &str) -> Result<PathBuf, BadName> {
        check_transfer_id(transfer).map_err(BadName)?;
        Ok(self.staging_root().join(transfer))
    }

    pub fn state(&self) -> PathBuf {
        self.root.join("state")
    }

    /// Removes the live replica `engine`/`shard` and fsyncs its parent.
    /// Only ever a real directory (not a symlink) directly under
    /// `shards/<engine>/`, itself a real directory: anything else is an
    /// error and nothing is removed. `Ok(false)` if there was nothing.
    pub fn remove_shard(&self, engine: &str, shard: &str) -> io::Result<bool> {
        let dir = self.shard(engine, shard).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let parent = self.engine_dir(engine).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        if !real_dir(&parent)? || !real_dir(&dir)? {
            return Ok(false);
        }
        // remove_dir_all never follows symlinks, so a directory swapped for
        // one meanwhile loses only the link.
        fs::remove_dir_all(&dir)?;
        crate::install::sync::fsync_dir(&parent)?;
        Ok(true)
    }

    /// Removes a transfer's staging directory (`Ok(false)`: there was none).
    pub fn remove_staging(&self, transfer: &str) -> io::Result<bool> {
        check_transfer_id(transfer).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        self.remove_staging_entry(OsStr::new(transfer))
    }

    /// Removes the entry `name` of `staging/`, whatever it is: a real
    /// directory with its contents, anything else (a file, a symlink) by
    /// unlinking the entry itself, never what a symlink points to. `name`
    /// must be one plain path component.
    pub fn remove_staging_entry(&self, name: &OsStr) -> io::Result<bool> {
        let mut components = Path::new(name).components();
        if !matches!((components.next(), components.next()), (Some(Component::Normal(_)), None)) {
            let message = format!("{name:?} is not a name in staging/");
            return Err(io::Error::new(io::ErrorKind::InvalidInput, message));
        }
        let path = self.staging_root().join(name);
        let result = match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_dir() => fs::remove_dir_all(&path),
            Ok(_) => fs::remove_file(&path),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Whether `path` is a real directory: `false` if it does not exist, an
/// error if it is something else (a symlink, a file).
fn real_dir(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_dir() => Ok(true),
        Ok(_) => Err(io::Error::other(format!("{} is not a real directory; nothing removed", path.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Transfer ids name staging directories: 1-64 of `A-Z a-z 0-9 _ -`
/// (Ferry makes them as 32 hex digits).
pub fn check_transfer_id(id: &str) -> Result<(), String> {
    let ok =
        !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!("transfer id {:?} is not 1-64 of A-Z, a-z, 0-9, '_', '-'", id.chars().take(80).collect::<String>()))
    }
}

/// Shard ids name directories: 1-128 of `A-Z a-z 0-9 . _ -`, not starting
/// with `.` (so never `.`, `..` or a hidden name).
pub fn check_shard_id(shard: &str) -> Result<(), String> {
    let ok = !shard.is_empty()
        && shard.len() <= 128
        && !shard.starts_with('.')
        && shard.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "shard id {:?} is not 1-128 of A-Z, a-z, 0-9, '.', '_', '-' (not starting with '.')",
            shard.chars().take(140).collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ids() {
        for ok in ["s1", "shard-7", "a.b_c", "X"] {
            assert!(check_shard_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_shard_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn transfer_ids() {
        for ok in ["0123abcd", "a", "0f3c2d9e8b7a41c6a5d4e3f2a1b0c9d8", "t-1_X"] {
            assert!(check_transfer_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "../x", "/abs", "a/b", "a.b", "a b", &"x".repeat(65)] {
            assert!(check_transfer_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_are_made_of_valid_names_only() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(dir.path()).unwrap();
        assert_eq!(data.shard("sqlite", "s1").unwrap(), dir.path().join("shards/sqlite/s1"));
        for (engine, shard) in [("/abs/dir", "s"), ("../../x", "s"), ("sqlite", ".."), ("sqlite", "a/b"), ("", "s")] {
            assert!(data.shard(engine, shard).is_err(), "{engine}/{shard}");
        }
        assert!(data.staging("../x").is_err());
        assert!(data.remove_shard("../../x", "s").is_err());
        assert!(data.remove_staging("..").is_err());
        for name in ["..", ".", "a/b", "/abs", ""] {
            assert!(data.remove_staging_entry(OsStr::new(name)).is_err(), "{name}");
        }
    }

    #[test]
    fn removal_never_follows_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::open(&dir.path().join("data")).unwrap();
        let victim = dir.path().join("victim");
        fs::create_dir_all(victim.join("sub")).unwrap();
        fs::write(victim.join("sub/file"), b"keep").unwrap();

        // A symlinked engine dir, a symlinked shard dir: refused, victim kept.
        std::os::unix::fs::symlink(&victim, data.shards_root().join("linked")).unwrap();
        assert!(data.remove_shard("linked", "sub").is_err());
        fs::create_dir_all(data.shards_root().join("sqlite")).unwrap();
        std::os::unix::fs::symlink(&victim, data.shard("sqlite", "s").unwrap()).unwrap();
        assert!(data.remove_shard("sqlite", "s").is_err());
        // A symlink in staging: the link goes, never its target.
        std::os::unix::fs::symlink(&victim, data.staging_root().join("t1")).unwrap();
        assert!(data.remove_staging("t1").unwrap());
        assert!(!data.staging_root().join("t1").exists());
        assert_eq!(fs::read(victim.join("sub/file")).unwrap(), b"keep");

        // A real replica is removed; a missing one is not an error.
        let real = data.shard("sqlite", "r").unwrap();
        fs::create_dir_all(real.join("d")).unwrap();
        fs::write(real.join("d/f"), b"x").unwrap();
        assert!(data.remove_shard("sqlite", "r").unwrap());
        assert!(!real.exists());
        assert!(!data.remove_shard("sqlite", "r").unwrap());
        assert!(!data.remove_shard("segment-log", "r").unwrap());
    }
}
