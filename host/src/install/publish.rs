//! Atomic publish of a staged shard.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::sync::fsync_dir;

/// Moves the complete shard in `staged` to `live`, atomically.
///
/// If `live` does not exist, one `rename(2)`. If it does (an older replica),
/// one `renameat2(RENAME_EXCHANGE)` swaps the two directories, so readers see
/// either the old replica or the new one, never neither; the old one is then
/// at `staged` for the caller to remove. Both parents are fsynced.
///
/// Returns whether an older replica was replaced.
pub fn publish(staged: &Path, live: &Path) -> io::Result<bool> {
    let parent = live.parent().ok_or_else(|| io::Error::other("live path has no parent"))?;
    std::fs::create_dir_all(parent)?;
    let replaced = match std::fs::symlink_metadata(live) {
        Ok(meta) if meta.is_dir() => {
            exchange(staged, live)?;
            true
        }
        Ok(_) => return Err(io::Error::other(format!("{} exists and is not a directory", live.display()))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::rename(staged, live)?;
            false
        }
        Err(e) => return Err(e),
    };
    fsync_dir(parent)?;
    if let Some(staged_parent) = staged.parent() {
        fsync_dir(staged_parent)?;
    }
    Ok(replaced)
}

fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated paths for the duration of the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishes_new_and_swaps_old() {
        let tmp = tempfile::tempdir().unwrap();
        let staged = tmp.path().join("staging/t1/data");
        let live = tmp.path().join("shards/e/s");
        std::fs::create_dir_all(&staged).unwrap();
        std::fs::write(staged.join("f"), "v1").unwrap();
        assert!(!publish(&staged, &live).unwrap());
        assert_eq!(std::fs::read_to_string(live.join("f")).unwrap(), "v1");
        assert!(!staged.exists());

        std::fs::create_dir_all(&staged).unwrap();
        std::fs::write(staged.join("f"), "v2").unwrap();
        assert!(publish(&staged, &live).unwrap());
        assert_eq!(std::fs::read_to_string(live.join("f")).unwrap(), "v2");
        // The old replica is where the staged one was.
        assert_eq!(std::fs::read_to_string(staged.join("f")).unwrap(), "v1");
    }

    #[test]
    fn refuses_a_file_in_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        let staged = tmp.path().join("staged");
        std::fs::create_dir(&staged).unwrap();
        std::fs::write(tmp.path().join("live"), "x").unwrap();
        assert!(publish(&staged, &tmp.path().join("live")).is_err());
        assert!(staged.exists());
    }
}
