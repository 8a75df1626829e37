//! Durable Raft storage in redb (`<data-dir>/state/raft.redb`): the log, the
//! vote, the committed id, the state machine and its snapshot.
//!
//! Every write is one redb transaction committed with immediate durability
//! (fsync) before openraft is told it is done. redb calls block, so they run
//! on tokio's blocking pool.

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
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
use super::state::{Applied, ClusterState, NodeId};

const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// The redb database, shared by the log store and the state machine.
#[derive(Clone)]
pub struct Db(Arc<Database>);

impl Db {
    pub fn open(path: &Path) -> Result<Db, redb::Error> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        tx.open_table(LOG)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(Db(Arc::new(db)))
    }

    /// Forgets everything: log, vote, state machine, snapshot (a node that
    /// joins another cluster starts from that cluster's log).
    pub fn wipe(&self) -> Result<(), redb::Error> {
        let tx = self.0.begin_write()?;
        tx.delete_table(LOG)?;
        tx.delete_table(META)?;
        tx.open_table(LOG)?;
        tx.open_table(META)?;
        tx.commit()?;
        Ok(())
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, redb::Error> {
        let db = self.0.clone();
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
        self.db.get_meta("vote").await.map_err(|e| StorageIOError::read_vote(&io_err(e)).into())
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
        self.remove_logs((Bound::Included(log_id.index), Bound::Unbounded), None).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        self.remove_logs((Bound::Unbounded, Bound::Included(log_id.index)), Some(log_id)).await
    }
}

impl LogStore {
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
        let data: SmData = db.get_meta("sm").await?.unwrap_or_default();
        let applied = watch::channel(data.last_applied.map(|l| l.index).unwrap_or(0)).0;
        Ok(StateMachine { db, data: Arc::new(RwLock::new(data)), applied })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, SmData> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }

    async fn persist(&self) -> StorageResult<()> {
        let snapshot = self.read().clone();
        self.db.put_meta("sm", &snapshot).await.map_err(|e| StorageIOError::write_state_machine(&io_err(e)).into())
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
        let stored = StoredSnapshot { meta: meta.clone(), data: data.clone() };
        self.db.put_meta("snapshot", &stored).await.map_err(|e| StorageIOError::write_snapshot(None, &io_err(e)))?;
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
        self.persist().await?;
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
        self.persist().await?;
        let stored = StoredSnapshot { meta: meta.clone(), data };
        self.db.put_meta("snapshot", &stored).await.map_err(|e| StorageIOError::write_snapshot(None, &io_err(e)))?;
        self.applied.send_replace(meta.last_log_id.map(|l| l.index).unwrap_or(0));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let stored: Option<StoredSnapshot> =
            self.db.get_meta("snapshot").await.map_err(|e| StorageIOError::read_snapshot(None, &io_err(e)))?;
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
}
