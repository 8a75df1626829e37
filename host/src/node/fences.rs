//! The locks a fenced source holds on its plugin's behalf (WASI has no
//! locks): open file description (OFD) byte-range locks, which conflict with
//! the POSIX record locks an engine's own writers take (`fcntl`), and belong
//! to the open file, not to a thread or a process.
//!
//! An engine whose only fence is such a lock (SQLite) would lose it with the
//! node: a crashed source would let its writers in while the move commits.
//! So the open files are also handed to a **keeper**, a `sleep infinity`
//! child that inherits them and does nothing else: the locks last as long as
//! one of the two holds the files, and a node killed while fenced leaves
//! them held. The keeper is recorded under `<data>/fences/`; a restarted
//! node adopts it when it fences again for the same epoch, and kills it when
//! it unfences or retires. (A reboot ends keepers too: an engine's own fence
//! state, as segment-log's term, is what survives that.)

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::plugin::FileLock;

/// The environment variable that names a keeper (checked before one is
/// adopted or killed: a pid may have been reused).
const KEEPER_ENV: &str = "FERRY_FENCE_KEEPER";

/// Locks held per shard, with the epoch that holds them.
#[derive(Default)]
pub struct Fences {
    held: Mutex<HashMap<(String, String), Held>>,
    /// Where keepers are recorded; `None`: no keepers (the locks end with
    /// this process).
    keepers: Option<PathBuf>,
}

struct Held {
    epoch: u64,
    _files: Vec<File>,
    keeper: Option<Keeper>,
}

/// A keeper process and its record.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeeperRecord {
    epoch: u64,
    pid: u32,
    tag: String,
}

struct Keeper {
    record: KeeperRecord,
    path: PathBuf,
    /// Our child, to reap; `None` for one adopted after a restart.
    child: Option<std::process::Child>,
}

impl Keeper {
    /// Starts a keeper that inherits `files`.
    fn spawn(files: &[File], epoch: u64, path: PathBuf) -> std::io::Result<Keeper> {
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("infinity")
            .env(KEEPER_ENV, &tag)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // Its own process group: a signal to the node's group (a
            // terminal's Ctrl-C) leaves the fence standing.
            .process_group(0);
        // SAFETY: between fork and exec only fcntl, which is async-signal-safe,
        // on descriptors this process owns.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        let record = KeeperRecord { epoch, pid: child.id(), tag };
        let keeper = Keeper { record, path, child: Some(child) };
        keeper.save()?;
        Ok(keeper)
    }

    fn save(&self) -> std::io::Result<()> {
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&self.record).expect("a keeper record serializes"))?;
        File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &self.path)
    }

    /// The keeper recorded at `path`, if it still runs.
    fn find(path: &Path) -> Option<Keeper> {
        let record: KeeperRecord = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        let environ = std::fs::read(format!("/proc/{}/environ", record.pid)).ok()?;
        let want = format!("{KEEPER_ENV}={}", record.tag);
        let alive = environ.split(|&b| b == 0).any(|var| var == want.as_bytes());
        if !alive {
            let _ = std::fs::remove_file(path);
            return None;
        }
        Some(Keeper { record, path: path.to_owned(), child: None })
    }

    /// Ends the keeper (its locks go with it) and its record.
    fn end(mut self) {
        match self.child.take() {
            Some(mut child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            // SAFETY: kill(2) on a pid whose environment named our keeper.
            None => unsafe {
                libc::kill(self.record.pid as libc::pid_t, libc::SIGKILL);
            },
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Fences {
    /// Fences whose locks also go to keepers recorded in `dir`.
    pub fn with_keepers(dir: PathBuf) -> Fences {
        Fences { held: Mutex::default(), keepers: Some(dir) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn keeper_path(&self, engine: &str, shard: &str) -> Option<PathBuf> {
        // Engine and shard names are checked: no `/`, no `..`.
        self.keepers.as_ref().map(|dir| dir.join(engine).join(format!("{shard}.json")))
    }

    /// Takes `locks` on files of the shard in `dir` for `epoch`, waiting at
    /// most `within` for writers that hold them (an append in flight
    /// finishes first). Holding them already for `epoch` is success, and so
    /// is a keeper left by this node's previous run for `epoch`.
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
        if let Some(held) = self.lock().get(&key) {
            if held.epoch == epoch {
                return Ok(());
            }
            return Err(format!("{engine}/{shard} is fenced by transfer epoch {}", held.epoch));
        }
        let keeper_path = self.keeper_path(engine, shard);
        if let Some(keeper) = keeper_path.as_deref().and_then(Keeper::find) {
            if keeper.record.epoch != epoch {
                return Err(format!(
                    "{engine}/{shard} is fenced by transfer epoch {} (keeper pid {})",
                    keeper.record.epoch, keeper.record.pid
                ));
            }
            tracing::info!(engine, shard, epoch, pid = keeper.record.pid, "fence locks adopted from a keeper");
            self.lock().insert(key, Held { epoch, _files: Vec::new(), keeper: Some(keeper) });
            return Ok(());
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
        let keeper = match keeper_path {
            Some(path) if !files.is_empty() => match Keeper::spawn(&files, epoch, path) {
                Ok(keeper) => Some(keeper),
                Err(e) => {
                    tracing::warn!(engine, shard, "no keeper for the fence's locks (they end with this process): {e}");
                    None
                }
            },
            _ => None,
        };
        self.lock().insert(key, Held { epoch, _files: files, keeper });
        Ok(())
    }

    /// Releases the locks `epoch` holds on the shard (a keeper left by a
    /// previous run included); whether it held any.
    pub fn release(&self, engine: &str, shard: &str, epoch: u64) -> bool {
        let key = (engine.to_owned(), shard.to_owned());
        let mut held = self.lock();
        if held.get(&key).is_some_and(|h| h.epoch == epoch) {
            let gone = held.remove(&key).expect("checked above");
            drop(held);
            if let Some(keeper) = gone.keeper {
                keeper.end();
            }
            return true;
        }
        drop(held);
        match self.keeper_path(engine, shard).as_deref().and_then(Keeper::find) {
            Some(keeper) if keeper.record.epoch == epoch => {
                keeper.end();
                true
            }
            _ => false,
        }
    }

    /// The epoch holding locks on the shard, if any.
    pub fn holder(&self, engine: &str, shard: &str) -> Option<u64> {
        self.lock().get(&(engine.to_owned(), shard.to_owned())).map(|h| h.epoch)
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

    /// Whether another process can take the lock now.
    fn free_for_a_writer(path: &Path) -> bool {
        let script = format!(
            "import fcntl, sys; f = open({:?}, 'r+')\ntry:\n  fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)\nexcept OSError:\n  sys.exit(1)",
            path.display().to_string()
        );
        std::process::Command::new("python3").args(["-c", &script]).status().unwrap().success()
    }

    #[tokio::test]
    async fn a_keeper_holds_the_locks_after_the_node_is_gone_until_it_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.lock");
        std::fs::write(&path, b"").unwrap();
        let keepers = dir.path().join("fences");

        let fences = Fences::with_keepers(keepers.clone());
        fences.hold("e", "s", dir.path(), 7, &[lock()], Duration::from_secs(2)).await.unwrap();
        assert!(!free_for_a_writer(&path));
        // The node dies without releasing: its files close, the keeper's stay.
        std::mem::forget(fences.lock().remove(&("e".into(), "s".into())).unwrap().keeper.unwrap().child.take());
        drop(fences);
        assert!(!free_for_a_writer(&path), "the lock went with the node");

        // Its next run adopts the keeper for the same epoch, refuses another.
        let again = Fences::with_keepers(keepers.clone());
        assert!(again.hold("e", "s", dir.path(), 8, &[lock()], Duration::from_millis(100)).await.is_err());
        again.hold("e", "s", dir.path(), 7, &[lock()], Duration::from_secs(2)).await.unwrap();
        assert_eq!(again.holder("e", "s"), Some(7));
        assert!(again.release("e", "s", 7));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !free_for_a_writer(&path) {
            assert!(std::time::Instant::now() < deadline, "the keeper still holds the lock");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(std::fs::read_dir(keepers.join("e")).unwrap().next().is_none(), "the keeper's record is left");
    }

    #[test]
    fn lock_files_are_never_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("control.lock")).unwrap();
        assert!(open_lock_file(&dir.path().join("control.lock")).is_err());
    }
}
