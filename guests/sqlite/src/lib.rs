//! Ferry plugin for shards made of SQLite database files (one `*.db` file or
//! several), in rollback-journal or WAL mode. Contract 0.2.0: it moves live.
//!
//! A shard's files: each database, its `-wal` file (WAL mode), and its
//! `-journal` and `-shm` files, which are never copied (a journal only
//! exists while a write is in flight, or after a crash, as a hot journal;
//! the `-shm` index is rebuilt by the first connection).
//!
//! - Position: in rollback mode, the sum of each database's *file change
//!   counter* (header offset 24, bumped by every commit). In WAL mode,
//!   commits go to the WAL: a database adds the commits of its WAL's valid
//!   prefix (checksums and salts checked) and the WAL's checkpoint sequence
//!   times 2^32, so that the position moves on every commit. A WAL deleted
//!   when the last connection closes starts its sequence again: positions
//!   may then go down, which the host allows (it compares them for
//!   equality under the fence).
//! - Snapshot: the databases and WALs as they are. `term-check` compares
//!   every database's counter, size and modification time and every WAL's
//!   salts: a write during the copy makes the snapshot void, or, for a live
//!   move, fuzzy (the host's rounds complete it).
//! - `validate`: magic, page size, page count x page size = file size, the
//!   schema page's b-tree header; a WAL's header checksum and its commits.
//! - Catch-up: every round compares every database and WAL block by block
//!   (the host's block diff: the target's digests go to the source, which
//!   sends the pages that differ). A round read while writes went on may mix
//!   two states; the round under the fence is exact. A database in rollback
//!   mode has its WAL removed on the target, and the other way round.
//! - Fence: SQLite's own lock bytes, held by the host: the RESERVED byte of
//!   a database in rollback mode; the WAL write and checkpoint locks of the
//!   `-shm` file (and a shared lock on the database, so that a closing
//!   connection cannot delete the WAL) in WAL mode. Writers with a busy
//!   timeout wait; readers go on. The plugin marks the fence in
//!   `.ferry-fence` (the epoch), which is how it knows a round is exact.
//! - Retire: the databases' magic is overwritten and their change counter
//!   bumped, the WAL's magic and the `-shm` index cleared, so that a
//!   connection still open on the old replica fails at its next
//!   transaction ("file is not a database") instead of writing into files
//!   that are about to be removed.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

use ferry_plugin_sdk::{
    BlockDiffEntry, DeltaEntry, DeltaMeta, DeltaPlan, EngineError, EngineInfo, Entry, FenceInfo, FileChecks, FileEntry,
    FileLock, Hooks, Level, Live, ShardPosition, SnapshotMeta, SnapshotPlan, attribute, invalid, io_error as io, log,
};

mod wal;

use ferry_plugin_sdk::SHARD;
const MAGIC: &[u8; 16] = b"SQLite format 3\0";
const HEADER: usize = 100;
const COUNTER_PREFIX: &str = "counter:";
const FILE_PREFIX: &str = "file:";
const WAL_PREFIX: &str = "wal:";
/// The plugin's fence marker: the epoch, or `retired <epoch>`.
const FENCE_FILE: &str = ".ferry-fence";
/// SQLite's lock bytes (`os.h`): the RESERVED byte and the SHARED range of
/// a database file; the WAL write and checkpoint locks of a `-shm` file.
const RESERVED_BYTE: u64 = 0x4000_0001;
const SHARED_FIRST: u64 = 0x4000_0002;
const SHARED_SIZE: u64 = 510;
const WAL_WRITE_LOCK: u64 = 120;
/// Blocks in which the host compares a WAL (frames are not a power of two).
const WAL_BLOCK: u32 = 4096;
const JOURNAL_MAGIC: [u8; 8] = [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];
const RETIRED_MAGIC: &[u8; 16] = b"ferry: retired\0\0";

struct Sqlite;

/// What a database file's header says.
#[derive(Debug, PartialEq)]
struct DbHeader {
    page_size: u64,
    change_counter: u32,
    /// Page count from the header, when the header vouches for it.
    page_count: Option<u32>,
    wal: bool,
}

fn parse_header(name: &str, buf: &[u8]) -> Result<DbHeader, EngineError> {
    if buf.len() < HEADER || &buf[..16] != MAGIC {
        return Err(invalid(name, "not an SQLite 3 database (bad magic)"));
    }
    let be16 = |at: usize| u16::from_be_bytes([buf[at], buf[at + 1]]);
    let be32 = |at: usize| u32::from_be_bytes(buf[at..at + 4].try_into().unwrap());
    let page_size = match be16(16) {
        1 => 65536,
        n => u64::from(n),
    };
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return Err(invalid(name, format!("page size {page_size} is not a power of two in 512..=65536")));
    }
    let (write_version, read_version) = (buf[18], buf[19]);
    if !(1..=2).contains(&write_version) || !(1..=2).contains(&read_version) {
        return Err(invalid(name, format!("file format versions {write_version}/{read_version} are not 1 or 2")));
    }
    if buf[21] != 64 || buf[22] != 32 || buf[23] != 32 {
        return Err(invalid(name, "payload fractions are not 64/32/32"));
    }
    let change_counter = be32(24);
    // The in-header size is valid only if "version-valid-for" matches the counter.
    let page_count = (be32(92) == change_counter && be32(28) > 0).then(|| be32(28));
    Ok(DbHeader { page_size, change_counter, page_count, wal: write_version == 2 || read_version == 2 })
}

fn read_header(dir: &Path, name: &str) -> Result<DbHeader, EngineError> {
    let mut file = fs::File::open(dir.join(name)).map_err(|e| io(name, e))?;
    let mut buf = [0u8; HEADER];
    file.read_exact(&mut buf).map_err(|e| io(name, e))?;
    parse_header(name, &buf)
}

/// One database of the shard, as it is now.
struct Db {
    name: String,
    header: DbHeader,
    len: u64,
    /// Modification time (ns), to tell a checkpoint that did not move the
    /// counter.
    mtime: u64,
    /// Its WAL, in WAL mode, when there is one.
    wal: Option<wal::WalState>,
}

impl Db {
    fn wal_name(&self) -> String {
        format!("{}-wal", self.name)
    }

    fn position(&self) -> u64 {
        let counter = u64::from(self.header.change_counter);
        match &self.wal {
            Some(w) => (u64::from(w.sequence) << 32) + counter + w.commits,
            None => counter,
        }
    }

    /// What the snapshot and round metas record of it.
    fn attributes(&self) -> Vec<(String, String)> {
        let mut out = vec![
            (format!("{COUNTER_PREFIX}{}", self.name), self.header.change_counter.to_string()),
            (format!("{FILE_PREFIX}{}", self.name), format!("{}:{}", self.len, self.mtime)),
        ];
        if let Some(w) = &self.wal {
            out.push((format!("{WAL_PREFIX}{}", self.name), w.describe()));
        }
        out
    }
}

fn is_database_name(name: &str) -> bool {
    !name.starts_with('.') && !name.ends_with("-wal") && !name.ends_with("-shm") && !name.ends_with("-journal")
}

/// The shard's database files, sorted. Refuses subdirectories and other
/// kinds of files.
fn databases(dir: &Path) -> Result<Vec<String>, EngineError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io("shard directory", e))? {
        let entry = entry.map_err(|e| io("shard directory", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type().map_err(|e| io(&name, e))?;
        if !kind.is_file() {
            return Err(EngineError::Unsupported(format!("{name} is not a regular file")));
        }
        if is_database_name(&name) {
            names.push(name);
        }
    }
    names.sort();
    if names.is_empty() {
        return Err(EngineError::Invalid("the shard has no database file".into()));
    }
    Ok(names)
}

/// Every database of the shard, with its WAL.
fn scan(dir: &Path) -> Result<Vec<Db>, EngineError> {
    let mut out = Vec::new();
    for name in databases(dir)? {
        let meta = fs::metadata(dir.join(&name)).map_err(|e| io(&name, e))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as u64);
        let header = read_header(dir, &name)?;
        let wal_name = format!("{name}-wal");
        let wal = if header.wal { wal::read(dir, &wal_name, header.page_size)? } else { None };
        out.push(Db { name, header, len: meta.len(), mtime, wal });
    }
    Ok(out)
}

fn position(dbs: &[Db]) -> u64 {
    dbs.iter().map(Db::position).fold(0, u64::wrapping_add)
}

/// The counters a meta records, by file name.
fn recorded(attributes: &[(String, String)]) -> Result<Vec<(String, u32)>, EngineError> {
    let mut out = Vec::new();
    for (key, value) in attributes {
        if let Some(name) = key.strip_prefix(COUNTER_PREFIX) {
            let counter =
                value.parse().map_err(|_| EngineError::Invalid(format!("meta attribute {key} is not a counter")))?;
            out.push((name.to_owned(), counter));
        }
    }
    if out.is_empty() {
        return Err(EngineError::Invalid("the meta records no database file".into()));
    }
    Ok(out)
}

/// A hot journal: a writer crashed mid-commit and the database must be
/// rolled back by opening it. (A journal of a write in flight is hot too,
/// but under the fence no write is in flight.)
fn hot_journal(dir: &Path, db: &str) -> Result<bool, EngineError> {
    let name = format!("{db}-journal");
    let mut file = match fs::File::open(dir.join(&name)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(io(&name, e)),
    };
    let mut magic = [0u8; 8];
    match file.read_exact(&mut magic) {
        Ok(()) => Ok(magic == JOURNAL_MAGIC),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(io(&name, e)),
    }
}

/// The fence marker: `Some(epoch)` while fenced, `Err` once retired.
fn fence_marker(dir: &Path) -> Result<Option<Result<u64, u64>>, EngineError> {
    let text = match fs::read_to_string(dir.join(FENCE_FILE)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(FENCE_FILE, e)),
    };
    let bad = || EngineError::Invalid(format!("{FENCE_FILE} holds {text:?}"));
    let text = text.trim();
    Ok(Some(match text.strip_prefix("retired ") {
        Some(epoch) => Err(epoch.parse().map_err(|_| bad())?),
        None => Ok(text.parse().map_err(|_| bad())?),
    }))
}

fn write_marker(dir: &Path, contents: &str) -> Result<(), EngineError> {
    let tmp = format!("{FENCE_FILE}.tmp");
    fs::write(dir.join(&tmp), contents).map_err(|e| io(FENCE_FILE, e))?;
    fs::rename(dir.join(&tmp), dir.join(FENCE_FILE)).map_err(|e| io(FENCE_FILE, e))
}

/// Writes `bytes` at `offset` of `name`, if the file exists.
fn overwrite(dir: &Path, name: &str, offset: u64, bytes: &[u8]) -> Result<(), EngineError> {
    let mut file = match fs::OpenOptions::new().write(true).open(dir.join(name)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io(name, e)),
    };
    file.seek(SeekFrom::Start(offset)).map_err(|e| io(name, e))?;
    file.write_all(bytes).map_err(|e| io(name, e))?;
    file.sync_data().map_err(|e| io(name, e))
}

/// Full structural check of one received database file.
fn check_database(dir: &Path, name: &str, expected_counter: Option<u32>) -> Result<(), EngineError> {
    let path = dir.join(name);
    let len = fs::metadata(&path).map_err(|e| io(name, e))?.len();
    let mut file = fs::File::open(&path).map_err(|e| io(name, e))?;
    let mut first = vec![0u8; HEADER.max(512)];
    let read = file.read(&mut first).map_err(|e| io(name, e))?;
    let header = parse_header(name, &first[..read])?;
    if let Some(expected) = expected_counter.filter(|&c| c != header.change_counter) {
        return Err(invalid(
            name,
            format!("change counter {} is not the snapshot's {expected}", header.change_counter),
        ));
    }
    if len == 0 || len % header.page_size != 0 {
        return Err(invalid(name, format!("size {len} is not a multiple of the page size {}", header.page_size)));
    }
    if let Some(pages) = header.page_count {
        if u64::from(pages) * header.page_size != len {
            return Err(invalid(
                name,
                format!("header says {pages} pages of {} bytes, the file has {len} bytes", header.page_size),
            ));
        }
    }
    // Page 1 holds the schema table: a table b-tree page after the 100-byte header.
    let mut page = vec![0u8; header.page_size as usize];
    page[..read].copy_from_slice(&first[..read]);
    file.read_exact(&mut page[read..]).map_err(|e| io(name, e))?;
    let kind = page[HEADER];
    let header_len = match kind {
        0x0D => 8,
        0x05 => 12,
        other => return Err(invalid(name, format!("schema page has b-tree type {other:#04x}"))),
    };
    let cells = u16::from_be_bytes([page[HEADER + 3], page[HEADER + 4]]) as usize;
    let content = match u16::from_be_bytes([page[HEADER + 5], page[HEADER + 6]]) {
        0 => 65536,
        n => n as usize,
    };
    let pointers_end = HEADER + header_len + 2 * cells;
    if pointers_end > page.len() || content > page.len() || (cells > 0 && content < pointers_end) {
        return Err(invalid(name, "schema page's cell layout is out of bounds"));
    }
    for i in 0..cells {
        let at = HEADER + header_len + 2 * i;
        let cell = u16::from_be_bytes([page[at], page[at + 1]]) as usize;
        if cell < content || cell >= page.len() {
            return Err(invalid(name, format!("schema cell {i} points outside the content area")));
        }
    }
    Ok(())
}

/// Checks a replica fully: every database, every WAL's valid prefix.
fn check_all(dir: &Path, counters: Option<&[(String, u32)]>) -> Result<Vec<Db>, EngineError> {
    let dbs = scan(dir)?;
    if let Some(counters) = counters {
        let names: Vec<&String> = counters.iter().map(|(n, _)| n).collect();
        let present: Vec<&String> = dbs.iter().map(|d| &d.name).collect();
        if present != names {
            return Err(EngineError::Invalid(format!("files {present:?} are not the source's {names:?}")));
        }
    }
    for db in &dbs {
        let expected = counters.and_then(|c| c.iter().find(|(n, _)| *n == db.name)).map(|(_, c)| *c);
        check_database(dir, &db.name, expected)?;
    }
    Ok(dbs)
}

impl Hooks for Sqlite {
    fn describe() -> EngineInfo {
        EngineInfo { name: "sqlite".into(), plugin_version: env!("CARGO_PKG_VERSION").into(), snapshot_format: 2 }
    }

    fn shard_status(_shard: String) -> Result<ShardPosition, EngineError> {
        Ok(ShardPosition { term: 0, position: position(&scan(Path::new(SHARD))?) })
    }

    fn create_snapshot(shard: String) -> Result<SnapshotPlan, EngineError> {
        let dir = Path::new(SHARD);
        let dbs = scan(dir)?;
        log(Level::Info, &format!("snapshot of {shard}: {} database files", dbs.len()));
        let mut entries = Vec::new();
        for db in &dbs {
            entries.push(Entry::File(FileEntry { path: db.name.clone(), offset: 0, length: Some(db.len) }));
            if let Some(w) = &db.wal {
                entries.push(Entry::File(FileEntry { path: db.wal_name(), offset: 0, length: Some(w.len) }));
            }
        }
        let attributes = dbs.iter().flat_map(Db::attributes).collect();
        Ok(SnapshotPlan { meta: SnapshotMeta { term: 0, position: position(&dbs), attributes }, entries })
    }

    fn term_check(_shard: String, meta: SnapshotMeta) -> Result<(), EngineError> {
        let dir = Path::new(SHARD);
        let now = scan(dir)?;
        for db in &now {
            for (key, value) in db.attributes() {
                let then = attribute(&meta.attributes, &key);
                // A WAL that grew past the copied prefix is fine: the
                // prefix did not change. Anything else moved.
                let same = match (key.starts_with(WAL_PREFIX), then) {
                    (true, Some(then)) => wal::same_prefix(then, &value),
                    (_, then) => then == Some(value.as_str()),
                };
                if !same {
                    return Err(EngineError::TermChanged(format!(
                        "{}: written during the snapshot ({key}: {} -> {value})",
                        db.name,
                        then.unwrap_or("none")
                    )));
                }
            }
            if hot_journal(dir, &db.name)? {
                return Err(EngineError::TermChanged(format!(
                    "{}: a write was in flight during the snapshot",
                    db.name
                )));
            }
        }
        Ok(())
    }

    fn validate(_shard: String, meta: SnapshotMeta) -> Result<ShardPosition, EngineError> {
        let dir = Path::new(SHARD);
        let counters = recorded(&meta.attributes)?;
        let dbs = check_all(dir, Some(&counters))?;
        for db in &dbs {
            // The copy's WAL is the snapshot's generation, with at least its
            // commits: frames appended while it was read extend the valid
            // prefix (the checksum chain ends at the first torn frame).
            let then = attribute(&meta.attributes, &format!("{WAL_PREFIX}{}", db.name));
            let now = db.wal.as_ref().map(wal::WalState::describe);
            let same = match (then, now.as_deref()) {
                (None, None) => true,
                (Some(then), Some(now)) => wal::same_prefix(then, now),
                (Some(then), None) => wal::commits_of(then) == 0,
                (None, Some(_)) => false,
            };
            if !same {
                return Err(invalid(&db.name, format!("the WAL holds {now:?}, the snapshot's held {then:?}")));
            }
        }
        Ok(ShardPosition { term: 0, position: position(&dbs) })
    }

    fn apply(_shard: String, _meta: SnapshotMeta) -> Result<(), EngineError> {
        // A database and its WAL are self-contained: nothing to rewrite for
        // their new home (the first connection rebuilds the `-shm` index).
        Ok(())
    }
}

impl Live for Sqlite {
    fn changes_since(_shard: String, since: ShardPosition) -> Result<DeltaPlan, EngineError> {
        let dir = Path::new(SHARD);
        let marker = fence_marker(dir)?;
        if let Some(Err(epoch)) = marker {
            return Err(EngineError::Fenced(format!("retired by transfer epoch {epoch}")));
        }
        let fenced = matches!(marker, Some(Ok(_)));
        let dbs = scan(dir)?;
        let mut entries = Vec::new();
        for db in &dbs {
            let block_size = db.header.page_size as u32;
            entries.push(DeltaEntry::BlockDiff(BlockDiffEntry { path: db.name.clone(), block_size, length: db.len }));
            match &db.wal {
                Some(w) => entries.push(DeltaEntry::BlockDiff(BlockDiffEntry {
                    path: db.wal_name(),
                    block_size: WAL_BLOCK,
                    length: w.len,
                })),
                None => entries.push(DeltaEntry::Remove(db.wal_name())),
            }
        }
        let mut attributes: Vec<(String, String)> = dbs.iter().flat_map(Db::attributes).collect();
        if fenced {
            attributes.push(("fenced".into(), "1".into()));
        }
        let meta = DeltaMeta { term: 0, since: since.position, until: position(&dbs), attributes };
        Ok(DeltaPlan { meta, entries })
    }

    fn delta_check(_shard: String, meta: DeltaMeta) -> Result<(), EngineError> {
        // A round read while writes went on is repaired by the next one;
        // under the fence, nothing may have moved.
        if attribute(&meta.attributes, "fenced") != Some("1") {
            return Ok(());
        }
        let now = position(&scan(Path::new(SHARD))?);
        if now != meta.until {
            return Err(EngineError::TermChanged(format!(
                "the shard moved from {} to {now} under the fence: a writer ignores SQLite's locks",
                meta.until
            )));
        }
        Ok(())
    }

    fn apply_changes(_shard: String, meta: DeltaMeta) -> Result<ShardPosition, EngineError> {
        let dir = Path::new(SHARD);
        if attribute(&meta.attributes, "fenced") == Some("1") {
            // The exact round: the replica must be whole.
            let counters = recorded(&meta.attributes)?;
            let dbs = check_all(dir, Some(&counters))?;
            return Ok(ShardPosition { term: 0, position: position(&dbs) });
        }
        // A round read under writes may leave a page 1 from one state and a
        // WAL from another: the position is a best guess until the fence.
        match scan(dir) {
            Ok(dbs) => Ok(ShardPosition { term: 0, position: position(&dbs) }),
            Err(e) => {
                log(Level::Info, &format!("the replica is between states after a round under writes: {e:?}"));
                Ok(ShardPosition { term: 0, position: meta.since })
            }
        }
    }

    fn fence(_shard: String, epoch: u64) -> Result<FenceInfo, EngineError> {
        let dir = Path::new(SHARD);
        match fence_marker(dir)? {
            Some(Ok(e)) | Some(Err(e)) if e != epoch => {
                return Err(EngineError::Fenced(format!("fenced by transfer epoch {e}")));
            }
            Some(Err(_)) => return Err(EngineError::Fenced(format!("retired by transfer epoch {epoch}"))),
            _ => {}
        }
        let dbs = scan(dir)?;
        let mut locks = Vec::new();
        for db in &dbs {
            if !db.header.wal {
                if hot_journal(dir, &db.name)? {
                    // Under the host's lock no write is in flight: a crashed
                    // writer left it. Until it is rolled back the file is not
                    // the database.
                    return Err(EngineError::Other(format!(
                        "{}: a hot journal (a writer crashed mid-commit); open the database once to roll it back",
                        db.name
                    )));
                }
                locks.push(FileLock { path: db.name.clone(), offset: RESERVED_BYTE, length: 1, exclusive: true });
            } else {
                locks.push(FileLock {
                    path: format!("{}-shm", db.name),
                    offset: WAL_WRITE_LOCK,
                    length: 2,
                    exclusive: true,
                });
                locks.push(FileLock {
                    path: db.name.clone(),
                    offset: SHARED_FIRST,
                    length: SHARED_SIZE,
                    exclusive: false,
                });
            }
        }
        write_marker(dir, &epoch.to_string())?;
        Ok(FenceInfo { last: ShardPosition { term: 0, position: position(&dbs) }, locks })
    }

    fn unfence(_shard: String, epoch: u64) -> Result<(), EngineError> {
        let dir = Path::new(SHARD);
        match fence_marker(dir)? {
            None => Ok(()),
            Some(Ok(e)) if e == epoch => fs::remove_file(dir.join(FENCE_FILE)).map_err(|e| io(FENCE_FILE, e)),
            Some(Ok(e)) => Err(EngineError::Fenced(format!("fenced by transfer epoch {e}"))),
            Some(Err(e)) => Err(EngineError::Fenced(format!("retired by transfer epoch {e}"))),
        }
    }

    fn retire(_shard: String, epoch: u64) -> Result<(), EngineError> {
        let dir = Path::new(SHARD);
        match fence_marker(dir)? {
            Some(Err(e)) if e == epoch => return Ok(()),
            Some(Ok(e)) | Some(Err(e)) if e != epoch => {
                return Err(EngineError::Fenced(format!("fenced by transfer epoch {e}")));
            }
            _ => {}
        }
        for name in databases(dir)? {
            // The WAL and its index first: a connection that looks again
            // finds no valid WAL, reads page 1 from the database file, and
            // fails on its magic. The counter moves so that a connection in
            // rollback mode does not trust its cached page 1.
            overwrite(dir, &format!("{name}-wal"), 0, &[0u8; 32])?;
            overwrite(dir, &format!("{name}-shm"), 0, &[0u8; 136])?;
            let counter = read_header(dir, &name).map(|h| h.change_counter).unwrap_or(0).wrapping_add(1);
            overwrite(dir, &name, 24, &counter.to_be_bytes())?;
            overwrite(dir, &name, 92, &counter.to_be_bytes())?;
            overwrite(dir, &name, 0, RETIRED_MAGIC)?;
        }
        write_marker(dir, &format!("retired {epoch}"))?;
        log(Level::Info, &format!("retired by transfer epoch {epoch}"));
        Ok(())
    }
}

/// A database is checked with its WAL, and its counters against the meta,
/// all in `validate`: no check here stands on one file alone.
impl FileChecks for Sqlite {
    fn check_files(_shard: String, _meta: SnapshotMeta, _paths: Vec<String>) -> Result<(), EngineError> {
        Ok(())
    }
}

ferry_plugin_sdk::export_engine!(Sqlite);
