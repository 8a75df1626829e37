//! Which shard directories appeared or went under `shards/`, from inotify
//! (the `notify` crate), so that the registrar looks at those and not at all
//! of `shards/`.
//!
//! Watches are not recursive: one on `shards/` and one on each
//! `shards/<engine>/`, so a node with 10,000 shards holds a handful of
//! inotify watches, and writes inside a shard (the engine's own files) cause
//! no events at all. What the kernel cannot tell (its queue overflowed, a
//! watch could not be added) asks the registrar for a full rescan instead,
//! which it also runs now and then as a safety net.

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::consensus::state::ShardKey;

/// Events waiting for the registrar; beyond that it rescans instead.
const QUEUE: usize = 4096;

/// What the registrar should look at.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Shard directories that may have appeared or gone.
    pub shards: BTreeSet<ShardKey>,
    /// Look at everything: the events cannot say what changed.
    pub rescan: bool,
}

pub struct ShardWatch {
    root: PathBuf,
    watcher: RecommendedWatcher,
    events: mpsc::Receiver<notify::Result<notify::Event>>,
    /// An event was dropped (the queue was full): rescan.
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Engine directories being watched.
    engines: BTreeSet<String>,
}

impl ShardWatch {
    /// Starts watching `root` (the data dir's `shards/`) and every engine
    /// directory in it. The caller scans everything once afterwards: what
    /// appeared before the watches were in place has no event.
    pub fn start(root: &Path) -> notify::Result<ShardWatch> {
        let (tx, events) = mpsc::channel(QUEUE);
        let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let dropped = lost.clone();
        let mut watcher = notify::recommended_watcher(move |event| {
            if tx.try_send(event).is_err() {
                dropped.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        })?;
        watcher.watch(root, RecursiveMode::NonRecursive)?;
        let mut watch = ShardWatch { root: root.to_owned(), watcher, events, lost, engines: BTreeSet::new() };
        for entry in std::fs::read_dir(root)? {
            let entry = entry?;
            if let (Ok(kind), Some(name)) = (entry.file_type(), entry.file_name().to_str())
                && kind.is_dir()
            {
                watch.watch_engine(name)?;
            }
        }
        Ok(watch)
    }

    fn watch_engine(&mut self, engine: &str) -> notify::Result<()> {
        if !self.engines.contains(engine) {
            self.watcher.watch(&self.root.join(engine), RecursiveMode::NonRecursive)?;
            self.engines.insert(engine.to_owned());
        }
        Ok(())
    }

    /// Waits for the next events, then takes every event already queued.
    /// None: the watcher's thread ended, and nothing tells of changes any
    /// more.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: an event is taken from the queue only once this returns.
    pub async fn changed(&mut self) -> Option<Changes> {
        let mut changes = Changes::default();
        // Some events change nothing (a directory opened to be read).
        while changes == Changes::default() {
            let first = self.events.recv().await?;
            self.add(first, &mut changes);
            while let Ok(event) = self.events.try_recv() {
                self.add(event, &mut changes);
            }
            if self.lost.swap(false, std::sync::atomic::Ordering::Relaxed) {
                changes.rescan = true;
            }
        }
        Some(changes)
    }

    fn add(&mut self, event: notify::Result<notify::Event>, changes: &mut Changes) {
        let event = match event {
            // Reads of a directory (its listing): nothing changed.
            Ok(event) if matches!(event.kind, notify::EventKind::Access(_)) => return,
            Ok(event) if !event.need_rescan() => event,
            _ => {
                changes.rescan = true;
                return;
            }
        };
        for path in &event.paths {
            let Ok(rest) = path.strip_prefix(&self.root) else { continue };
            let names: Vec<&str> = rest
                .components()
                .filter_map(|c| match c {
                    Component::Normal(name) => name.to_str(),
                    _ => None,
                })
                .collect();
            match names[..] {
                // An engine directory: watch it, and look at all its shards
                // (they may have come before the watch).
                [engine] => {
                    let engine = engine.to_owned();
                    if path.is_dir() {
                        if self.watch_engine(&engine).is_err() {
                            changes.rescan = true;
                        }
                        match std::fs::read_dir(path) {
                            Ok(entries) => changes.shards.extend(
                                entries
                                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                                    .map(|shard| (engine.clone(), shard)),
                            ),
                            Err(_) => changes.rescan = true,
                        }
                    } else if self.engines.remove(&engine) {
                        // Gone with its shards: the table's entries for them
                        // are the registrar's to check.
                        changes.rescan = true;
                    }
                }
                [engine, shard] => {
                    changes.shards.insert((engine.to_owned(), shard.to_owned()));
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn next(watch: &mut ShardWatch) -> Changes {
        tokio::time::timeout(Duration::from_secs(5), watch.changed())
            .await
            .expect("an event within 5 s")
            .expect("the watch goes on")
    }

    #[tokio::test]
    async fn new_shards_and_engines_are_named_and_writes_inside_a_shard_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("e/s1")).unwrap();
        let mut watch = ShardWatch::start(root).unwrap();

        std::fs::create_dir(root.join("e/s2")).unwrap();
        let changes = next(&mut watch).await;
        assert_eq!(changes, Changes { shards: BTreeSet::from([("e".into(), "s2".into())]), rescan: false });

        // A file written inside a shard is the engine's: no event.
        std::fs::write(root.join("e/s1/data"), b"x").unwrap();
        // A new engine, with a shard made before its watch existed.
        std::fs::create_dir_all(root.join("f/t1")).unwrap();
        let mut seen = BTreeSet::new();
        while !seen.contains(&("f".to_string(), "t1".to_string())) {
            let changes = next(&mut watch).await;
            assert!(!changes.rescan);
            seen.extend(changes.shards);
        }
        assert!(!seen.iter().any(|(_, s)| s == "data"), "{seen:?}");

        // A shard made in the new engine afterwards has its own event.
        std::fs::create_dir(root.join("f/t2")).unwrap();
        let mut seen = BTreeSet::new();
        while !seen.contains(&("f".to_string(), "t2".to_string())) {
            seen.extend(next(&mut watch).await.shards);
        }

        // A shard removed is named too (its replica is the registrar's to check).
        std::fs::remove_dir(root.join("e/s2")).unwrap();
        let mut seen = BTreeSet::new();
        while !seen.contains(&("e".to_string(), "s2".to_string())) {
            seen.extend(next(&mut watch).await.shards);
        }
    }
}
