//! Durability primitives.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// fsync of a file (data and metadata).
pub fn fsync_file(file: &File) -> io::Result<()> {
    file.sync_all()
}

/// fsync of a directory, which makes the names in it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Flushes every dirty page and inode of the file system holding `path`, in
/// one call (`syncfs(2)`): cheaper than an fsync per file when a snapshot has
/// thousands of small files. Since Linux 5.8 it reports writeback errors.
pub fn syncfs(path: &Path) -> io::Result<()> {
    let dir = File::open(path)?;
    // SAFETY: `dir` is an open descriptor for the duration of the call.
    let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}
