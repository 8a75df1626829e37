//! The engines under test, behind one interface, so every end-to-end test
//! runs each engine through the same code: swap the guest, nothing else.

use std::path::Path;
use std::process::Command;

use crate::segment_log::{Control, Generator, check_shard, segment_name};

pub trait TestEngine: Send + Sync {
    /// The engine name (its plugin's `describe().name`).
    fn name(&self) -> &'static str;
    /// Makes a live shard of about `bytes` in `dir`.
    fn create(&self, dir: &Path, bytes: u64);
    /// Asserts `copy` holds what `original` holds, by the engine's own oracle.
    fn assert_same(&self, original: &Path, copy: &Path);
    /// A committed write to the live shard that voids snapshots in flight.
    fn write(&self, dir: &Path);
}

pub fn all() -> Vec<Box<dyn TestEngine>> {
    vec![Box::new(SegmentLog), Box::new(Sqlite)]
}

pub struct SegmentLog;

impl SegmentLog {
    /// Asserts `copy` is a whole shard that holds every record and segment
    /// of `original`, whatever its term (a live move's replica published
    /// before the fenced round is a term behind a fenced source until its
    /// last round); returns the copy's term.
    pub fn assert_same_data(&self, original: &Path, copy: &Path) -> u64 {
        let summary = check_shard(copy).unwrap_or_else(|e| panic!("{}: {e}", copy.display()));
        let source = Control::read(original).unwrap();
        // A live move's fence history is the replica's own, not the shard's.
        let shard = |c: Control| Control { live: Default::default(), term: 0, ..c };
        assert_eq!(shard(summary.control), shard(source), "control files differ");
        for index in source.segments() {
            let name = segment_name(index);
            let (a, b) = (std::fs::read(original.join(&name)).unwrap(), std::fs::read(copy.join(&name)).unwrap());
            assert!(a == b, "{name} differs");
        }
        summary.control.term
    }
}

impl TestEngine for SegmentLog {
    fn name(&self) -> &'static str {
        "segment-log"
    }

    fn create(&self, dir: &Path, bytes: u64) {
        Generator { segment_size: 1 << 20, term: 1, seed: 42 }.create(dir, bytes).unwrap();
    }

    fn assert_same(&self, original: &Path, copy: &Path) {
        let copy_term = self.assert_same_data(original, copy);
        let source = Control::read(original).unwrap();
        // A live move's fence moves the term: the copy's term is at least
        // the original's.
        assert!(copy_term >= source.term, "the copy's term {copy_term} is behind the original's {}", source.term);
    }

    fn write(&self, dir: &Path) {
        // A new leader: the term moves.
        let control = Control::read(dir).unwrap();
        Control { term: control.term + 1, ..control }.write(dir).unwrap();
    }
}

pub struct Sqlite;

/// Runs Debian's `sqlite3` on `db`.
pub fn sqlite3(db: &Path, sql: &str) -> String {
    let out = Command::new("sqlite3").arg(db).arg(sql).output().expect("sqlite3 is installed by tests/setup.sh");
    assert!(out.status.success(), "sqlite3 {}: {}", db.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

impl TestEngine for Sqlite {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    fn create(&self, dir: &Path, bytes: u64) {
        std::fs::create_dir_all(dir).unwrap();
        let rows = (bytes / 1100).max(10);
        sqlite3(
            &dir.join("main.db"),
            &format!(
                "PRAGMA journal_mode=DELETE; PRAGMA page_size=4096;
                 CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, v BLOB NOT NULL);
                 WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {rows})
                 INSERT INTO t(k, v) SELECT random(), randomblob(1000) FROM n;
                 CREATE INDEX t_k ON t(k);"
            ),
        );
        sqlite3(
            &dir.join("users.db"),
            "PRAGMA journal_mode=DELETE;
             CREATE TABLE users(name TEXT PRIMARY KEY, karma INTEGER);
             INSERT INTO users VALUES ('ada', 10), ('grace', 20), ('barbara', 30);",
        );
    }

    fn assert_same(&self, original: &Path, copy: &Path) {
        for (db, query) in
            [("main.db", "SELECT id, k, hex(v) FROM t ORDER BY id"), ("users.db", "SELECT * FROM users ORDER BY name")]
        {
            assert_eq!(sqlite3(&copy.join(db), "PRAGMA integrity_check").trim(), "ok", "{db}");
            let (a, b) = (sqlite3(&original.join(db), query), sqlite3(&copy.join(db), query));
            assert!(!a.is_empty() && a == b, "{db}: rows differ");
        }
    }

    fn write(&self, dir: &Path) {
        sqlite3(&dir.join("users.db"), "INSERT INTO users VALUES ('edsger', 40)");
    }
}
