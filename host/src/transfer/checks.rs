//! An engine's checks of single files, run while the rest of a snapshot
//! streams (optional interface `file-checks` of contract 0.2.0).
//!
//! Without them a receiver validates the whole shard after its last byte:
//! for a large shard that is a second pass as long as a good part of the
//! stream. With them, each file is checked as soon as the writer has it all,
//! in batches (whatever completed while the previous batch ran, so a shard
//! of many small files costs few calls), and what is left after the last
//! byte is the files not checked yet and `validate`'s cross-file checks.
//!
//! A check reads bytes the manifest has not verified yet. That is sound
//! because the checked file is never written again (a file sent anew is
//! removed first, and its new bytes are checked when they arrive), and the
//! pipeline trusts a check only once the archive verified: a mismatch is
//! reported as one, never as the engine's complaint about corrupt bytes.
//! A batch that fails while streaming is simply not counted as checked: it
//! is checked again, on verified bytes, after the last byte, and fails the
//! transfer then if it still fails.
//!
//! The checks made while streaming are background work: they run on a
//! runtime of their own whose threads have a lower scheduling priority
//! (nice 10), so on a node short of CPU they take what the stream leaves
//! and never slow it down. Once the last byte is in, they stop, and what
//! is left runs at full priority in [`FileChecks::finish`].

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::plugin::{MAX_CHECK_PATHS, Plugin, SnapshotMeta};
use crate::relpath::RelPath;
use crate::stream::manifest::EntryInfo;
use crate::stream::receive::{Arrivals, Arrived};

/// The checks of one transfer, across its attempts.
pub(super) struct FileChecks {
    plugin: Arc<Plugin>,
    shard: String,
    data_dir: PathBuf,
    /// The snapshot the files belong to: checks of another snapshot's files
    /// do not count.
    snapshot: Option<(String, SnapshotMeta)>,
    /// By position among the snapshot's entries: one byte a file, not a
    /// copy of its path.
    checked: Vec<bool>,
    /// Set after a failed batch: the rest waits for the end.
    stalled: bool,
}

impl FileChecks {
    /// Checks for `plugin`'s files of `shard` received into `data_dir`, if
    /// the plugin checks single files; with the sender the receiver reports
    /// arrivals to.
    pub(super) fn new(
        plugin: &Arc<Plugin>,
        shard: &str,
        data_dir: PathBuf,
    ) -> Option<(FileChecks, Arrivals, mpsc::UnboundedReceiver<Arrived>)> {
        if !plugin.checks_files() {
            return None;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let checks = FileChecks {
            plugin: plugin.clone(),
            shard: shard.to_owned(),
            data_dir,
            snapshot: None,
            checked: Vec::new(),
            stalled: false,
        };
        Some((checks, tx, rx))
    }

    /// Checks files as they arrive, until every sender is gone or `stop` is
    /// cancelled.
    ///
    /// # Cancel safety
    /// Cancel safe: a check dropped mid-call only reads, and its file is
    /// simply not counted as checked.
    pub(super) async fn run(&mut self, mut arrivals: mpsc::UnboundedReceiver<Arrived>, stop: &CancellationToken) {
        let mut batch: Vec<(usize, RelPath)> = Vec::new();
        loop {
            let first = tokio::select! {
                next = arrivals.recv() => next,
                _ = stop.cancelled() => return,
            };
            let Some(first) = first else { return };
            self.take(first, &mut batch);
            while batch.len() < MAX_CHECK_PATHS {
                match arrivals.try_recv() {
                    Ok(next) => self.take(next, &mut batch),
                    Err(_) => break,
                }
            }
            if batch.is_empty() || self.stalled {
                batch.clear();
                continue;
            }
            let Some((_, meta)) = &self.snapshot else {
                batch.clear();
                continue;
            };
            let paths: Vec<String> = batch.iter().map(|(_, p)| p.as_str().to_owned()).collect();
            let (plugin, shard, dir, meta) =
                (self.plugin.clone(), self.shard.clone(), self.data_dir.clone(), meta.clone());
            let mut call = Background(background().spawn(async move {
                plugin.check_files(&shard, &dir, &meta, &paths).await.map_err(|e| e.to_string())
            }));
            let checked = tokio::select! {
                r = &mut call.0 => r.unwrap_or_else(|e| Err(format!("the check task failed: {e}"))),
                _ = stop.cancelled() => return,
            };
            match checked {
                Ok(()) => {
                    for (at, _) in batch.drain(..) {
                        self.checked[at] = true;
                    }
                }
                Err(e) => {
                    tracing::info!(shard = %self.shard, "checking files while streaming failed, left for the end: {e}");
                    self.stalled = true;
                    batch.clear();
                }
            }
        }
    }

    fn take(&mut self, arrived: Arrived, batch: &mut Vec<(usize, RelPath)>) {
        match arrived {
            Arrived::Snapshot { id, meta, entries } => {
                if self.snapshot.as_ref().is_none_or(|(held, m)| *held != id || *m != meta)
                    || self.checked.len() != entries
                {
                    self.checked = vec![false; entries];
                    batch.clear();
                    self.snapshot = Some((id, meta));
                }
            }
            Arrived::File { at, path } if at < self.checked.len() => {
                // Arrived again: sent anew, so its earlier check is void.
                self.checked[at] = false;
                batch.push((at, path));
            }
            // Not of the snapshot announced (never sent by the receiver).
            Arrived::File { .. } => {}
        }
    }

    /// After the archive verified: checks, with the archive's `meta`, every
    /// one of the snapshot's `entries` not checked while streaming. Returns
    /// how many that was.
    pub(super) async fn finish(
        &self,
        snapshot_id: &str,
        meta: &SnapshotMeta,
        entries: &[EntryInfo],
    ) -> Result<usize, crate::plugin::HookError> {
        let same = self.snapshot.as_ref().is_some_and(|(id, m)| id == snapshot_id && m == meta)
            && self.checked.len() == entries.len();
        let mut left = entries.iter().enumerate().filter(|(at, _)| !same || !self.checked[*at]).map(|(_, e)| &e.path);
        let mut done = 0;
        loop {
            // A batch of paths at a time, not all of them at once.
            let batch: Vec<String> = left.by_ref().take(MAX_CHECK_PATHS).map(|p| p.as_str().to_owned()).collect();
            if batch.is_empty() {
                return Ok(done);
            }
            self.plugin.check_files(&self.shard, &self.data_dir, meta, &batch).await?;
            done += batch.len();
        }
    }
}

/// A check running on the background runtime, aborted when dropped (a
/// check only reads: stopping it loses nothing).
struct Background<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Background<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The runtime of the checks made while streaming: one worker, threads at
/// nice [`BACKGROUND_NICE`] (its blocking threads too, which do the guest's
/// file reads).
fn background() -> &'static tokio::runtime::Handle {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(8)
                .thread_name("ferry-checks")
                .on_thread_start(lower_priority)
                .enable_all()
                .build()
                .expect("building the background check runtime")
        })
        .handle()
}

/// How much lower the background threads' priority is.
const BACKGROUND_NICE: libc::c_int = 10;

/// Lowers the calling thread's priority (Linux's nice is per thread).
fn lower_priority() {
    // SAFETY: gettid has no preconditions; setpriority only reads its
    // arguments.
    let failed = unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE) != 0
    };
    if failed {
        tracing::debug!("cannot lower the check thread's priority: {}", std::io::Error::last_os_error());
    }
}
