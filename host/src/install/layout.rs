//! The data directory. Its layout is fixed; other tools rely on it:
//!
//! ```text
//! <data-dir>/shards/<engine>/<shard>/   live replicas
//! <data-dir>/staging/<transfer-id>/      receiving work (never served)
//! <data-dir>/state/                      the node's own state
//! ```

use std::io;
use std::path::{Path, PathBuf};

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

    pub fn engine_dir(&self, engine: &str) -> PathBuf {
        self.shards_root().join(engine)
    }

    /// Where the live replica of `shard` of `engine` is.
    pub fn shard(&self, engine: &str, shard: &str) -> PathBuf {
        self.engine_dir(engine).join(shard)
    }

    pub fn staging_root(&self) -> PathBuf {
        self.root.join("staging")
    }

    pub fn staging(&self, transfer: &str) -> PathBuf {
        self.staging_root().join(transfer)
    }

    pub fn state(&self) -> PathBuf {
        self.root.join("state")
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
}
