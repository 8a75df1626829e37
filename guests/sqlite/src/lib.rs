//! Ferry plugin for shards made of SQLite database files in rollback-journal
//! mode (one `*.db` file or several).
//!
//! - The fence of a snapshot is each file's *file change counter* (header
//!   offset 24), which SQLite bumps on every committed write: the meta
//!   records every file's counter, and `term-check` re-reads them, so a write
//!   during the transfer voids the snapshot.
//! - A hot journal (`<db>-journal`) means a write is in flight: no snapshot
//!   then. WAL-mode databases are refused (their state is not in the file).
//! - `validate` parses the real format: magic, page size, page count × page
//!   size = file size, the schema page's b-tree header.

wit_bindgen::generate!({
    world: "engine",
    path: "../../wit/v0.1.0",
});

use std::fs;
use std::io::Read;
use std::path::Path;

use exports::ferry::engine::hooks::Guest;
use ferry::engine::log::{Level, log};
use ferry::engine::types::{EngineError, EngineInfo, Entry, FileEntry, ShardPosition, SnapshotMeta, SnapshotPlan};

const SHARD: &str = "/shard";
const MAGIC: &[u8; 16] = b"SQLite format 3\0";
const HEADER: usize = 100;
const COUNTER_PREFIX: &str = "counter:";

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

fn io(name: &str, e: std::io::Error) -> EngineError {
    EngineError::Io(format!("{name}: {e}"))
}

fn invalid(name: &str, what: impl std::fmt::Display) -> EngineError {
    EngineError::Invalid(format!("{name}: {what}"))
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

/// The shard's database files, sorted. Refuses what this plugin cannot move
/// safely: hot journals, WAL files, subdirectories, other files.
fn databases(dir: &Path) -> Result<Vec<String>, EngineError> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io("shard directory", e))? {
        let entry = entry.map_err(|e| io("shard directory", e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type().map_err(|e| io(&name, e))?;
        if !kind.is_file() {
            return Err(EngineError::Unsupported(format!("{name} is not a regular file")));
        }
        if name.ends_with("-journal") {
            return Err(EngineError::Other(format!(
                "{name}: a write transaction is in progress (hot journal); retry later"
            )));
        }
        if name.ends_with("-wal") || name.ends_with("-shm") {
            return Err(EngineError::Unsupported(format!("{name}: WAL mode is not supported")));
        }
        names.push(name);
    }
    names.sort();
    if names.is_empty() {
        return Err(EngineError::Invalid("the shard has no database file".into()));
    }
    Ok(names)
}

/// Each file's change counter; the position is their sum.
fn counters(dir: &Path) -> Result<Vec<(String, DbHeader)>, EngineError> {
    let mut out = Vec::new();
    for name in databases(dir)? {
        let header = read_header(dir, &name)?;
        if header.wal {
            return Err(EngineError::Unsupported(format!("{name}: WAL mode is not supported")));
        }
        out.push((name, header));
    }
    Ok(out)
}

fn position(files: &[(String, DbHeader)]) -> u64 {
    files.iter().map(|(_, h)| u64::from(h.change_counter)).sum()
}

/// The counters a snapshot meta records, by file name.
fn recorded(meta: &SnapshotMeta) -> Result<Vec<(String, u32)>, EngineError> {
    let mut out = Vec::new();
    for (key, value) in &meta.attributes {
        if let Some(name) = key.strip_prefix(COUNTER_PREFIX) {
            let counter =
                value.parse().map_err(|_| EngineError::Invalid(format!("meta attribute {key} is not a counter")))?;
            out.push((name.to_owned(), counter));
        }
    }
    if out.is_empty() {
        return Err(EngineError::Invalid("snapshot meta records no database file".into()));
    }
    Ok(out)
}

/// Full structural check of one received database file.
fn check_database(dir: &Path, name: &str, expected_counter: u32) -> Result<(), EngineError> {
    let path = dir.join(name);
    let len = fs::metadata(&path).map_err(|e| io(name, e))?.len();
    let mut file = fs::File::open(&path).map_err(|e| io(name, e))?;
    let mut first = vec![0u8; HEADER.max(512)];
    let read = file.read(&mut first).map_err(|e| io(name, e))?;
    let header = parse_header(name, &first[..read])?;
    if header.change_counter != expected_counter {
        return Err(invalid(
            name,
            format!("change counter {} is not the snapshot's {expected_counter}", header.change_counter),
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

impl Guest for Sqlite {
    fn describe() -> EngineInfo {
        EngineInfo { name: "sqlite".into(), plugin_version: env!("CARGO_PKG_VERSION").into(), snapshot_format: 1 }
    }

    fn shard_status(_shard: String) -> Result<ShardPosition, EngineError> {
        let files = counters(Path::new(SHARD))?;
        Ok(ShardPosition { term: 0, position: position(&files) })
    }

    fn create_snapshot(shard: String) -> Result<SnapshotPlan, EngineError> {
        let files = counters(Path::new(SHARD))?;
        log(Level::Info, &format!("snapshot of {shard}: {} database files", files.len()));
        let attributes =
            files.iter().map(|(name, h)| (format!("{COUNTER_PREFIX}{name}"), h.change_counter.to_string())).collect();
        let entries = files
            .iter()
            .map(|(name, _)| Entry::File(FileEntry { path: name.clone(), offset: 0, length: None }))
            .collect();
        Ok(SnapshotPlan { meta: SnapshotMeta { term: 0, position: position(&files), attributes }, entries })
    }

    fn term_check(_shard: String, meta: SnapshotMeta) -> Result<(), EngineError> {
        let dir = Path::new(SHARD);
        for (name, counter) in recorded(&meta)? {
            if dir.join(format!("{name}-journal")).exists() {
                return Err(EngineError::TermChanged(format!("{name}: a write began during the snapshot")));
            }
            let now = read_header(dir, &name)?.change_counter;
            if now != counter {
                return Err(EngineError::TermChanged(format!(
                    "{name}: change counter moved from {counter} to {now} during the snapshot"
                )));
            }
        }
        Ok(())
    }

    fn validate(_shard: String, meta: SnapshotMeta) -> Result<ShardPosition, EngineError> {
        let dir = Path::new(SHARD);
        let recorded = recorded(&meta)?;
        let present = databases(dir)?;
        let names: Vec<&String> = recorded.iter().map(|(n, _)| n).collect();
        if present.iter().collect::<Vec<_>>() != names {
            return Err(EngineError::Invalid(format!("files {present:?} are not the snapshot's {names:?}")));
        }
        for (name, counter) in &recorded {
            check_database(dir, name, *counter)?;
        }
        let position: u64 = recorded.iter().map(|(_, c)| u64::from(*c)).sum();
        Ok(ShardPosition { term: 0, position })
    }

    fn apply(_shard: String, _meta: SnapshotMeta) -> Result<(), EngineError> {
        // A database file is self-contained in rollback-journal mode: nothing
        // to rewrite for its new home.
        Ok(())
    }
}

export!(Sqlite);
