//! The locks a fenced source holds on its plugin's behalf (WASI has no
//! locks): open file description (OFD) byte-range locks, which conflict with
//! the POSIX record locks an engine's own writers take (`fcntl`), and belong
//! to this process's open file, not to a thread. Closing the file releases
//! them, so a crashed node holds none: the engine's own fence state (a term,
//! a fence marker) must keep writers out until the node is back and has
//! fenced again.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use crate::plugin::FileLock;

/// Locks held per shard, with the epoch that holds them.
#[derive(Default)]
pub struct Fences(Mutex<HashMap<(String, String), Held>>);

struct Held {
    epoch: u64,
    _files: Vec<File>,
}

impl Fences {
    /// Takes `locks` on files of the shard in `dir` for `epoch`, waiting at
    /// most `within` for writers that hold them (an append in flight
    /// finishes first). Holding them already for `epoch` is success.
    pub async fn hold(
        &self,
        engine: &str,
        shard: &str,
        dir: &Path,
        epoch: u64,
        locks: &[FileLock],
        within: Duration,
    ) -> Result<(), String> {
        let key = (engine.to_owned(), shard.to_owned());
        if let Some(held) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
            if held.epoch == epoch {
                return Ok(());
            }
            return Err(format!("{engine}/{shard} is fenced by transfer epoch {}", held.epoch));
        }
        let deadline = tokio::time::Instant::now() + within;
        let mut files = Vec::with_capacity(locks.len());
        for lock in locks {
            let path = lock.path.join_to(dir);
            let file = open_lock_file(&path).map_err(|e| format!("{}: {e}", lock.path))?;
            loop {
                match try_lock(&file, lock) {
                    Ok(true) => break,
                    Ok(false) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Ok(false) => {
                        return Err(format!(
                            "{}: a writer held bytes {}+{} for more than {within:?}",
                            lock.path, lock.offset, lock.length
                        ));
                    }
                    Err(e) => return Err(format!("{}: locking: {e}", lock.path)),
                }
            }
            files.push(file);
        }
        self.0.lock().unwrap_or_else(|e| e.into_inner()).insert(key, Held { epoch, _files: files });
        Ok(())
    }

    /// Releases the locks `epoch` holds on the shard; whether it held any.
    pub fn release(&self, engine: &str, shard: &str, epoch: u64) -> bool {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = (engine.to_owned(), shard.to_owned());
        if held.get(&key).is_some_and(|h| h.epoch == epoch) {
            held.remove(&key);
            true
        } else {
            false
        }
    }

    /// The epoch holding locks on the shard, if any.
    pub fn holder(&self, engine: &str, shard: &str) -> Option<u64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&(engine.to_owned(), shard.to_owned())).map(|h| h.epoch)
    }
}

/// Opens (creating if needed) a lock file of the shard, never through a
/// symlink, and only a regular file.
fn open_lock_file(path: &Path) -> std::io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(file)
}

/// One non-blocking OFD lock attempt: `Ok(false)` when someone holds it.
fn try_lock(file: &File, lock: &FileLock) -> std::io::Result<bool> {
    // SAFETY: a zeroed flock is a valid value; the fields are set below.
    let mut request: libc::flock = unsafe { std::mem::zeroed() };
    request.l_type = if lock.exclusive { libc::F_WRLCK } else { libc::F_RDLCK } as libc::c_short;
    request.l_whence = libc::SEEK_SET as libc::c_short;
    request.l_start = lock.offset as libc::off_t;
    request.l_len = lock.length as libc::off_t;
    // SAFETY: fcntl on an open fd with a valid flock (l_pid 0, as OFD locks require).
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &request) };
    if rc == 0 {
        return Ok(true);
    }
    match std::io::Error::last_os_error() {
        e if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        e => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relpath::RelPath;

    fn lock() -> FileLock {
        FileLock { path: RelPath::new("control.lock").unwrap(), offset: 0, length: 1, exclusive: true }
    }

    /// A POSIX record lock as an engine's writer takes it, from a child
    /// process (POSIX locks of this process would not conflict with it).
    fn writer_holds_lock(path: &Path, seconds: u32) -> std::process::Child {
        let script = format!(
            "import fcntl, time; f = open({:?}, 'r+'); fcntl.lockf(f, fcntl.LOCK_EX, 1, 0); print('locked', flush=True); time.sleep({seconds})",
            path.display().to_string()
        );
        let mut child = std::process::Command::new("python3")
            .args(["-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.as_mut().unwrap()), &mut line).unwrap();
        assert_eq!(line.trim(), "locked");
        child
    }

    #[tokio::test]
    async fn fences_wait_for_a_writer_and_belong_to_one_epoch() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("control.lock"), b"").unwrap();
        let fences = Fences::default();

        // A writer holds the lock for longer than we wait: refused, nothing held.
        let mut writer = writer_holds_lock(&dir.path().join("control.lock"), 3);
        let err = fences.hold("e", "s", dir.path(), 7, &[lock()], Duration::from_millis(200)).await.unwrap_err();
        assert!(err.contains("more than"), "{err}");
        assert_eq!(fences.holder("e", "s"), None);
        writer.kill().unwrap();
        writer.wait().unwrap();

        fences.hold("e", "s", dir.path(), 7, &[lock()], Duration::from_secs(2)).await.unwrap();
        fences.hold("e", "s", dir.path(), 7, &[lock()], Duration::from_secs(2)).await.unwrap();
        assert!(fences.hold("e", "s", dir.path(), 8, &[lock()], Duration::from_secs(2)).await.is_err());
        assert_eq!(fences.holder("e", "s"), Some(7));
        assert!(!fences.release("e", "s", 8));
        assert!(fences.release("e", "s", 7));
        assert_eq!(fences.holder("e", "s"), None);
    }

    #[test]
    fn lock_files_are_never_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("control.lock")).unwrap();
        assert!(open_lock_file(&dir.path().join("control.lock")).is_err());
    }
}
