//! Durable Raft storage in redb (`<data-dir>/state/raft.redb`): the log, the
//! vote, the committed id, the state machine and its snapshot.
//!
//! Every write is one redb transaction committed with immediate durability
//! (fsync) before openraft is told it is done. redb calls block, so they run
//! on tokio's blocking pool.
//!
//! The state machine's snapshot is stored as its meta (JSON) and its data as
//! raw bytes, under two keys written together; a database from before that
//! (one JSON value whose data was an array of numbers) is still read.
//!
//! The state machine itself is written with each snapshot (every
//! `snapshot_policy` entries) and each installed one, in the same
//! transaction and from the same bytes as the snapshot's data, not on every
//! apply:
//! writing all of it per entry made an entry's cost grow with the replica
//! table (a 10,000-shard table is megabytes). The committed id is written
//! before entries are applied, so at start openraft re-applies the committed
//! entries after the stored state machine (`get_initial_state`), and the
//! log keeps them until a snapshot covers them.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, LogState, RaftLogReader, RaftSnapshotBuilder, Snapshot, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::TypeConfig;
use super::guard::MAX_TERM;
use super::state::{Applied, ClusterState, NodeId};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// Keys of the stored snapshot: meta as JSON, data as raw bytes.
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "snapshot_data";
/// The state machine as of the last snapshot (the same bytes as its data).
const STATE_MACHINE: &str = "sm";
/// The snapshot as one JSON value, data as an array of numbers (older
/// databases); replaced by the two keys above on the next write.
const LEGACY_SNAPSHOT: &str = "snapshot";

/// How far above the highest term in its own log a poisoned vote is put
/// back: past any term this node may have voted in before it was poisoned
/// (each leader writes an entry of its term), so it never votes twice in one.
const REPAIRED_VOTE_MARGIN: u64 = 1000;

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// The redb database, shared by the log store and the state machine.
#[derive(Clone)]
pub struct Db {
    db: Arc<Database>,
    /// The index of the last entry in the stored log (0: none), kept with
    /// every write: openraft's metrics lag behind it.
    logged: Arc<AtomicU64>,
    /// Size of the stored snapshot's data, in bytes (0: none).
    snapshot_bytes: Arc<AtomicU64>,
    /// Run redb calls on the calling task instead of tokio's blocking pool
    /// (an in-memory database under the deterministic simulation, where a
    /// thread pool's timing would make a run unrepeatable).
    inline: bool,
}

impl Db {
    pub fn open(path: &Path) -> Result<Db, redb::Error> {
        Db::from_database(Database::create(path)?, false)
    }

    /// A database in memory whose calls run inline: the storage of a node in
    /// the deterministic simulation (`host/tests/consensus_sim.rs`). It
    /// outlives a Raft that is shut down, so a simulated restart reopens the
    /// same log, vote and state machine.
    pub fn in_memory() -> Result<Db, redb::Error> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        Db::from_database(db, true)
    }

    fn from_database(db: Database, inline: bool) -> Result<Db, redb::Error> {
        let tx = db.begin_write()?;
        let last = tx.open_table(LOG)?.last()?.map(|(k, _)| k.value()).unwrap_or(0);
        let snapshot = {
            let meta = tx.open_table(META)?;
            let data = meta.get(SNAPSHOT_DATA)?.or(meta.get(LEGACY_SNAPSHOT)?);
            data.map_or(0, |v| v.value().len() as u64)
        };
        tx.commit()?;
        let (logged, snapshot_bytes) = (Arc::new(AtomicU64::new(last)), Arc::new(snapshot.into()));
        Ok(Db { db: Arc::new(db), logged, snapshot_bytes, inline })
    }

    /// Size of the stored state-machine snapshot, in bytes.
    pub fn snapshot_bytes(&self) -> u64 {
        self.snapshot_bytes.load(Ordering::Relaxed)
    }

    /// The index of the last entry in the stored log, 0 if there is none.
    pub fn logged_index(&self) -> u64 {
        self.logged.load(Ordering::SeqCst)
    }

    /// Forgets everything: log, vote, state machine, snapshot (a node that
    /// joins another cluster starts from that cluster's log).
    pub fn wipe(&self) -> Result<(), redb::Error> {
        let tx = self.db.begin_write()?;
        tx.delete_table(LOG)?;
        tx.delete_table(META)?;
        tx.open_table(LOG)?;
        tx.open_table(META)?;
        tx.commit()?;
        self.logged.store(0, Ordering::SeqCst);
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, redb::Error> {
        let db = self.db.clone();
        if self.inline {
            return f(&db);
        }
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .unwrap_or_else(|e| Err(redb::Error::Io(std::io::Error::other(e))))
    }

    async fn get_meta<T: serde::de::DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
    ) -> Result<Option<T>, redb::Error> {
        self.blocking(move |db| {
            let tx = db.begin_read()?;
            let table = tx.open_table(META)?;
            Ok(match table.get(key)? {
                Some(v) => Some(serde_json::from_slice(v.value()).map_err(|e| redb::Error::Io(e.into()))?),
                None => None,
            })
        })
        .await
    }

    async fn put_meta<T: Serialize>(&self, key: &'static str, value: &T) -> Result<(), redb::Error> {
        let bytes = serde_json::to_vec(value).map_err(|e| redb::Error::Io(e.into()))?;
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            tx.open_table(META)?.insert(key, bytes.as_slice())?;
            tx.commit()?;
            Ok(())
        })
        .await
    }
}

impl Db {
    /// Writes a raw meta value, as an older or damaged database may hold it.
    #[cfg(test)]
    pub(crate) async fn put_meta_for_test<T: Serialize>(&self, key: &'static str, value: &T) {
        self.put_meta(key, value).await.unwrap();
    }

    /// Stores a snapshot (meta as JSON, data as it is) and, from the same
    /// bytes, the state machine, in one transaction.
    async fn put_snapshot(&self, meta: &SnapshotMeta<NodeId, BasicNode>, data: Vec<u8>) -> Result<(), redb::Error> {
        let meta = serde_json::to_vec(meta).map_err(|e| redb::Error::Io(e.into()))?;
        let (size, bytes) = (data.len() as u64, self.snapshot_bytes.clone());
        self.blocking(move |db| {
            let tx = db.begin_write()?;
            {
                let mut table = tx.open_table(META)?;
                table.insert(SNAPSHOT_META, meta.as_slice())?;
                table.insert(SNAPSHOT_DATA, data.as_slice())?;
                // The snapshot's data is the state machine as of it: what a
                // restart starts from.
                table.insert(STATE_MACHINE, data.as_slice())?;
                table.remove(LEGACY_SNAPSHOT)?;
            }
            tx.commit()?;
            bytes.store(size, Ordering::Relaxed);
            Ok(())
        })
        .await
    }

    /// The stored snapshot, in either form.
    async fn get_snapshot(&self) -> Result<Option<StoredSnapshot>, redb::Error> {
        self.blocking(|db| {
            let tx = db.begin_read()?;
            let table = tx.open_table(META)?;
            let json = |e: serde_json::Error| redb::Error::Io(e.into());
            if let (Some(meta), Some(data)) = (table.get(SNAPSHOT_META)?, table.get(SNAPSHOT_DATA)?) {
                let meta = serde_json::from_slice(meta.value()).map_err(json)?;
                return Ok(Some(StoredSnapshot { meta, data: data.value().to_vec() }));
            }
            match table.get(LEGACY_SNAPSHOT)? {
                Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(json)?)),
                None => Ok(None),
            }
        })
        .await
    }
}

fn io_err(e: redb::Error) -> std::io::Error {
    std::io::Error::other(e)
}

/// The log store.
#[derive(Clone)]
pub struct LogStore {
    db: Db,
}

impl LogStore {
    pub fn new(db: Db) -> LogStore {
        LogStore { db }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let (start, end) = (range.start_bound().cloned(), range.end_bound().cloned());
        self.db
            .blocking(move |db| {
                let tx = db.begin_read()?;
                let table = tx.open_table(LOG)?;
                let mut out = Vec::new();
                for item in table.range::<u64>((start, end))? {
                    let (_, v) = item?;
                    out.push(serde_json::from_slice(v.value()).map_err(|e| redb::Error::Io(e.into()))?);
                }
                Ok(out)
            })
            .await
            .map_err(|e| StorageIOError::read_logs(&io_err(e)).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let purged: Option<LogId<NodeId>> =
            self.db.get_meta("last_purged").await.map_err(|e| StorageIOError::read_logs(&io_err(e)))?;
        let last: Option<Entry<TypeConfig>> = self
            .db
            .blocking(|db| {
                let tx = db.begin_read()?;
                let table = tx.open_table(LOG)?;
                Ok(match table.last()? {
                    Some((_, v)) => Some(serde_json::from_slice(v.value()).map_err(|e| redb::Error::Io(e.into()))?),
                    None => None,
                })
            })
            .await
            .map_err(|e| StorageIOError::read_logs(&io_err(e)))?;
        Ok(LogState { last_purged_log_id: purged, last_log_id: last.map(|e| e.log_id).or(purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.db.put_meta("vote", vote).await.map_err(|e| StorageIOError::write_vote(&io_err(e)).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        let vote: Option<Vote<NodeId>> =
            self.db.get_meta("vote").await.map_err(|e| StorageIOError::read_vote(&io_err(e)))?;
        match vote {
            Some(poisoned) if poisoned.leader_id.term > MAX_TERM => self.repair_vote(poisoned).await.map(Some),
            vote => Ok(vote),
        }
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.db.put_meta("committed", &committed).await.map_err(|e| StorageIOError::write(&io_err(e)).into())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self
            .db
            .get_meta::<Option<LogId<NodeId>>>("committed")
            .await
            .map_err(|e| StorageIOError::read(&io_err(e)))?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut rows = Vec::new();
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            rows.push((entry.log_id.index, bytes));
        }
        let last = rows.last().map(|(index, _)| *index);
        let result = self
            .db
            .blocking(move |db| {
                let tx = db.begin_write()?;
                {
                    let mut table = tx.open_table(LOG)?;
                    for (index, bytes) in &rows {
                        table.insert(*index, bytes.as_slice())?;
                    }
                }
                tx.commit()?; // durable (fsync) before the callback
                Ok(())
            })
            .await;
        match result {
            Ok(()) => {
                if let Some(last) = last {
                    // Appends follow a truncation of anything after them.
                    self.db.logged.store(last, Ordering::SeqCst);
                }
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let e = io_err(e);
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(&e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.remove_logs((Bound::Included(log_id.index), Bound::Unbounded), None).await?;
        self.db.logged.fetch_min(log_id.index.saturating_sub(1), Ordering::SeqCst);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.remove_logs((Bound::Unbounded, Bound::Included(log_id.index)), Some(log_id)).await
    }
}

impl LogStore {
    /// A persisted vote beyond [`MAX_TERM`] can only come from a forged
    /// message (before the guard existed); openraft would overflow on it
    /// (`term + 1`) and panic at every start. It is replaced by an
    /// uncommitted vote a margin above the highest term this node's own log
    /// and state machine hold, loudly. A log whose own terms are poisoned is
    /// not repaired: the node refuses to start, saying so.
    async fn repair_vote(&mut self, poisoned: Vote<NodeId>) -> StorageResult<Vote<NodeId>> {
        let log = self.get_log_state().await?;
        let committed = self.read_committed().await?;
        let sm: Option<SmData> =
            self.db.get_meta(STATE_MACHINE).await.map_err(|e| StorageIOError::read_vote(&io_err(e)))?;
        let applied = sm.and_then(|sm| sm.last_applied);
        let terms = [log.last_log_id, log.last_purged_log_id, committed, applied];
        let highest = terms.iter().flatten().map(|id| id.leader_id.term).max().unwrap_or(0);
        if highest > MAX_TERM {
            let message = format!(
                "the Raft log holds term {highest}, beyond {MAX_TERM}: it was poisoned by a forged message; \
                 remove state/raft.redb and join the cluster again"
            );
            return Err(StorageIOError::read_logs(&std::io::Error::other(message)).into());
        }
        let repaired = Vote::new(highest + REPAIRED_VOTE_MARGIN, poisoned.leader_id.node_id);
        tracing::error!(
            poisoned = %poisoned,
            repaired = %repaired,
            "the persisted Raft vote has a term beyond {MAX_TERM}, which only a forged message makes; \
             replaced by a vote above this node's own log"
        );
        self.save_vote(&repaired).await?;
        Ok(repaired)
    }

    async fn remove_logs(&self, range: (Bound<u64>, Bound<u64>), purged: Option<LogId<NodeId>>) -> StorageResult<()> {
        let purged = purged.map(|p| serde_json::to_vec(&p).expect("log id serializes"));
        self.db
            .blocking(move |db| {
                let tx = db.begin_write()?;
                {
                    let mut table = tx.open_table(LOG)?;
                    table.retain_in::<u64, _>(range, |_, _| false)?;
                    if let Some(purged) = &purged {
                        tx.open_table(META)?.insert("last_purged", purged.as_slice())?;
                    }
                }
                tx.commit()?;
                Ok(())
            })
            .await
            .map_err(|e| StorageIOError::write_logs(&io_err(e)).into())
    }
}

/// What the state machine persists.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SmData {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, BasicNode>,
    pub state: ClusterState,
}

/// A stored snapshot; as one JSON value only in older databases.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// The state machine: the cluster state in memory (read by the node), its
/// copy in redb, and a watch of the last applied index.
#[derive(Clone)]
pub struct StateMachine {
    db: Db,
    pub data: Arc<RwLock<SmData>>,
    pub applied: watch::Sender<u64>,
}

impl StateMachine {
    pub async fn load(db: Db) -> Result<StateMachine, redb::Error> {
        let data: SmData = db.get_meta(STATE_MACHINE).await?.unwrap_or_default();
        let applied = watch::channel(data.last_applied.map(|l| l.index).unwrap_or(0)).0;
        Ok(StateMachine { db, data: Arc::new(RwLock::new(data)), applied })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, SmData> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let sm = self.read().clone();
        let data = serde_json::to_vec(&sm).map_err(|e| StorageIOError::read_state_machine(&e))?;
        let snapshot_id = match sm.last_applied {
            Some(l) => format!("{}-{}", l.leader_id, l.index),
            None => "empty".into(),
        };
        let meta = SnapshotMeta { last_log_id: sm.last_applied, last_membership: sm.last_membership, snapshot_id };
        self.db
            .put_snapshot(&meta, data.clone())
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, &io_err(e)))?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        let sm = self.read();
        Ok((sm.last_applied, sm.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<Applied>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let last = {
            let mut sm = self.data.write().unwrap_or_else(|e| e.into_inner());
            for entry in entries {
                let index = entry.log_id.index;
                sm.last_applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => out.push(Applied { index, error: None }),
                    EntryPayload::Normal(command) => out.push(sm.state.apply(index, &command)),
                    EntryPayload::Membership(membership) => {
                        sm.last_membership = StoredMembership::new(Some(entry.log_id), membership);
                        out.push(Applied { index, error: None });
                    }
                }
            }
            sm.last_applied.map(|l| l.index).unwrap_or(0)
        };
        self.applied.send_replace(last);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let data = snapshot.into_inner();
        let installed: SmData =
            serde_json::from_slice(&data).map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        {
            let mut sm = self.data.write().unwrap_or_else(|e| e.into_inner());
            *sm = SmData {
                last_applied: meta.last_log_id,
                last_membership: meta.last_membership.clone(),
                state: installed.state,
            };
        }
        self.db.put_snapshot(meta, data).await.map_err(|e| StorageIOError::write_snapshot(None, &io_err(e)))?;
        self.applied.send_replace(meta.last_log_id.map(|l| l.index).unwrap_or(0));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let stored = self.db.get_snapshot().await.map_err(|e| StorageIOError::read_snapshot(None, &io_err(e)))?;
        Ok(stored.map(|s| Snapshot { meta: s.meta, snapshot: Box::new(Cursor::new(s.data)) }))
    }
}

#[cfg(test)]
mod tests {
    use openraft::testing::{StoreBuilder, Suite};

    use super::*;

    struct Builder;

    impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> StorageResult<(tempfile::TempDir, LogStore, StateMachine)> {
            let dir = tempfile::tempdir().unwrap();
            let db = Db::open(&dir.path().join("raft.redb")).unwrap();
            let sm = StateMachine::load(db.clone()).await.unwrap();
            Ok((dir, LogStore::new(db), sm))
        }
    }

    /// openraft's own storage conformance suite, against redb.
    #[test]
    fn redb_store_conforms() {
        Suite::test_all(Builder).unwrap();
    }

    fn open() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("raft.redb")).unwrap();
        (dir, db)
    }

    fn meta() -> SnapshotMeta<NodeId, BasicNode> {
        SnapshotMeta {
            last_log_id: Some(LogId::new(openraft::CommittedLeaderId::new(2, 1), 7)),
            last_membership: Default::default(),
            snapshot_id: "2-1-7".into(),
        }
    }

    #[tokio::test]
    async fn snapshots_are_stored_as_raw_bytes() {
        let (_dir, db) = open();
        // A state machine's bytes, as `build_snapshot` makes them (they are
        // also stored as the state machine a restart loads).
        let data = serde_json::to_vec(&SmData::default()).unwrap();
        db.put_snapshot(&meta(), data.clone()).await.unwrap();
        let raw = db
            .blocking(|db| {
                let tx = db.begin_read()?;
                Ok(tx.open_table(META)?.get(SNAPSHOT_DATA)?.map(|v| v.value().to_vec()))
            })
            .await
            .unwrap();
        assert_eq!(raw.as_deref(), Some(data.as_slice()), "not stored as the bytes themselves");
        let mut sm = StateMachine::load(db).await.unwrap();
        let snapshot = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(snapshot.meta, meta());
        assert_eq!(snapshot.snapshot.into_inner(), data);
    }

    #[tokio::test]
    async fn a_snapshot_in_the_old_form_is_still_read_and_replaced() {
        let (_dir, db) = open();
        let data = b"{}".to_vec();
        // The old form: one JSON value, data as an array of numbers.
        db.put_meta(LEGACY_SNAPSHOT, &StoredSnapshot { meta: meta(), data: data.clone() }).await.unwrap();
        let stored: serde_json::Value = db.get_meta(LEGACY_SNAPSHOT).await.unwrap().unwrap();
        assert_eq!(stored["data"], serde_json::json!([123, 125]));
        let mut sm = StateMachine::load(db.clone()).await.unwrap();
        let snapshot = sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!((snapshot.meta, snapshot.snapshot.into_inner()), (meta(), data));
        db.put_snapshot(&meta(), b"{ }".to_vec()).await.unwrap();
        assert!(db.get_meta::<serde_json::Value>(LEGACY_SNAPSHOT).await.unwrap().is_none());
        assert_eq!(sm.get_current_snapshot().await.unwrap().unwrap().snapshot.into_inner(), b"{ }");
    }

    #[tokio::test]
    async fn a_poisoned_vote_is_repaired_at_load() {
        let (_dir, db) = open();
        db.put_meta("vote", &Vote::new_committed(u64::MAX, 5)).await.unwrap();
        let entry: Entry<TypeConfig> =
            Entry { log_id: LogId::new(openraft::CommittedLeaderId::new(3, 1), 4), payload: EntryPayload::Blank };
        let row = serde_json::to_vec(&entry).unwrap();
        db.blocking(move |db| {
            let tx = db.begin_write()?;
            tx.open_table(LOG)?.insert(4, row.as_slice())?;
            tx.commit()?;
            Ok(())
        })
        .await
        .unwrap();
        let mut store = LogStore::new(db.clone());
        let vote = store.read_vote().await.unwrap().unwrap();
        assert_eq!(vote, Vote::new(3 + REPAIRED_VOTE_MARGIN, 5));
        // Persisted: the next start reads the repaired vote as it is.
        assert_eq!(db.get_meta::<Vote<NodeId>>("vote").await.unwrap(), Some(vote));

        // A log poisoned itself is refused with a clear error, not a panic.
        db.put_meta("vote", &Vote::new_committed(u64::MAX, 5)).await.unwrap();
        db.put_meta("committed", &Some(LogId::new(openraft::CommittedLeaderId::new(u64::MAX, 5), 9))).await.unwrap();
        let error = store.read_vote().await.unwrap_err().to_string();
        assert!(error.contains("poisoned"), "{error}");
    }
}
