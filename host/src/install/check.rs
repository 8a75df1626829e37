//! What a staged shard may hold before it is published: regular files and
//! directories, nothing else.
//!
//! The receiver writes only regular files, but a plugin's `apply` runs with
//! the staging directory read-write and can make symlinks (WASI allows
//! `symlink-at` with any target text, `../../etc/passwd` included). Published,
//! such a link would lead the engine, and anything serving the shard, out of
//! the data directory.

use std::fmt;
use std::fs::FileType;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

/// A kind of entry a shard may not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forbidden {
    Symlink,
    BlockDevice,
    CharDevice,
    Fifo,
    Socket,
    /// A type the platform reports that is none of the above.
    Unknown,
}

impl Forbidden {
    fn of(ty: FileType) -> Option<Forbidden> {
        Some(if ty.is_file() || ty.is_dir() {
            return None;
        } else if ty.is_symlink() {
            Forbidden::Symlink
        } else if ty.is_block_device() {
            Forbidden::BlockDevice
        } else if ty.is_char_device() {
            Forbidden::CharDevice
        } else if ty.is_fifo() {
            Forbidden::Fifo
        } else if ty.is_socket() {
            Forbidden::Socket
        } else {
            Forbidden::Unknown
        })
    }
}

impl fmt::Display for Forbidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Forbidden::Symlink => "symlink",
            Forbidden::BlockDevice => "block device",
            Forbidden::CharDevice => "character device",
            Forbidden::Fifo => "fifo",
            Forbidden::Socket => "socket",
            Forbidden::Unknown => "file of unknown type",
        })
    }
}

/// Why a staged tree cannot be published. Paths are relative to the tree and
/// quoted with escapes (a plugin chose them).
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error(
        "{path:?} is a {kind}{}: a shard may hold only regular files and directories",
        target.as_ref().map(|t| format!(" to {t:?}")).unwrap_or_default()
    )]
    Forbidden { path: PathBuf, kind: Forbidden, target: Option<PathBuf> },
    #[error("cannot check {path:?}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Checks that `root` is a directory holding, at any depth, only regular
/// files and directories. Never follows a link: each entry's own type is
/// what counts. Returns the first offending entry.
pub fn check_tree(root: &Path) -> Result<(), TreeError> {
    let io_error = |path: &Path, source| TreeError::Io { path: relative(root, path), source };
    let meta = std::fs::symlink_metadata(root).map_err(|e| io_error(root, e))?;
    if let Some(kind) = Forbidden::of(meta.file_type()) {
        return Err(forbidden(root, root, kind));
    }
    if !meta.is_dir() {
        return Err(io_error(root, io::Error::new(io::ErrorKind::NotADirectory, "not a directory")));
    }
    // A stack, not recursion: a plugin decides how deep the tree is.
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).map_err(|e| io_error(&dir, e))? {
            let entry = entry.map_err(|e| io_error(&dir, e))?;
            let path = entry.path();
            // The directory entry's own type (lstat if the file system does
            // not say): a link is reported as a link.
            let ty = entry.file_type().map_err(|e| io_error(&path, e))?;
            if let Some(kind) = Forbidden::of(ty) {
                return Err(forbidden(root, &path, kind));
            }
            if ty.is_dir() {
                dirs.push(path);
            }
        }
    }
    Ok(())
}

fn forbidden(root: &Path, path: &Path, kind: Forbidden) -> TreeError {
    let target = (kind == Forbidden::Symlink).then(|| std::fs::read_link(path).ok()).flatten();
    TreeError::Forbidden { path: relative(root, path), kind, target }
}

fn relative(root: &Path, path: &Path) -> PathBuf {
    match path.strip_prefix(root) {
        Ok(rel) if rel.as_os_str().is_empty() => PathBuf::from("."),
        Ok(rel) => rel.to_owned(),
        Err(_) => path.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/b/file"), "x").unwrap();
        std::fs::write(dir.path().join("top"), "y").unwrap();
        dir
    }

    #[test]
    fn files_and_directories_pass() {
        let dir = tree();
        check_tree(dir.path()).unwrap();
        let empty = tempfile::tempdir().unwrap();
        check_tree(empty.path()).unwrap();
    }

    #[test]
    fn a_symlink_anywhere_is_named_with_its_target() {
        let dir = tree();
        symlink("../../../../etc/passwd", dir.path().join("a/b/link")).unwrap();
        let err = check_tree(dir.path()).unwrap_err();
        assert!(matches!(&err, TreeError::Forbidden { kind: Forbidden::Symlink, .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "\"a/b/link\" is a symlink to \"../../../../etc/passwd\": \
             a shard may hold only regular files and directories"
        );
        // A link to a directory is not followed into, nor taken for one.
        let dir = tree();
        symlink("/", dir.path().join("root")).unwrap();
        assert!(matches!(check_tree(dir.path()), Err(TreeError::Forbidden { kind: Forbidden::Symlink, .. })));
    }

    #[test]
    fn fifos_and_sockets_are_refused() {
        let dir = tree();
        let fifo = std::ffi::CString::new(dir.path().join("a/fifo").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let err = check_tree(dir.path()).unwrap_err();
        assert!(matches!(&err, TreeError::Forbidden { kind: Forbidden::Fifo, .. }), "{err}");
        assert!(err.to_string().starts_with("\"a/fifo\" is a fifo:"), "{err}");

        let dir = tree();
        let _socket = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
        let err = check_tree(dir.path()).unwrap_err();
        assert!(matches!(&err, TreeError::Forbidden { kind: Forbidden::Socket, .. }), "{err}");
    }

    #[test]
    fn the_root_must_be_a_real_directory() {
        let dir = tree();
        let link = dir.path().join("link");
        symlink(dir.path().join("a"), &link).unwrap();
        assert!(matches!(check_tree(&link), Err(TreeError::Forbidden { kind: Forbidden::Symlink, .. })));
        assert!(matches!(check_tree(&dir.path().join("top")), Err(TreeError::Io { .. })));
        assert!(matches!(check_tree(&dir.path().join("missing")), Err(TreeError::Io { .. })));
    }

    #[test]
    fn odd_names_are_quoted() {
        let dir = tree();
        symlink("x", dir.path().join("a\nFORGED")).unwrap();
        let err = check_tree(dir.path()).unwrap_err().to_string();
        assert!(err.starts_with("\"a\\nFORGED\" is a symlink"), "{err}");
    }
}
