//! A real SQLite application for live-move tests: `tests/sqlite_writer.py`
//! (Python's `sqlite3` module, one long-lived connection with a busy
//! timeout) inserting rows at a steady rate and logging every acknowledged
//! one, switching to the new owner when the old replica is retired.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What a writer run did (its JSON summary).
#[derive(Debug, serde::Deserialize)]
pub struct Summary {
    pub acked: u64,
    /// Every error its connection got: after a cut-over, the old replica's.
    pub errors: Vec<String>,
    pub switched: bool,
    /// The longest time between two acknowledged writes.
    pub longest_gap_ms: u64,
}

pub struct SqliteWriter {
    child: Child,
    work: PathBuf,
}

impl SqliteWriter {
    /// Starts writing to `db` (the table `acks` is created if missing), then
    /// to `then` once `db` is retired; acks and the stop file live in `work`.
    pub fn start(db: &Path, then: Option<&Path>, rate: u32, work: &Path) -> SqliteWriter {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("sqlite_writer.py");
        let mut cmd = Command::new("python3");
        cmd.arg(script).arg("--db").arg(db).arg("--rate").arg(rate.to_string());
        cmd.arg("--acks").arg(work.join("acks")).arg("--stop").arg(work.join("stop"));
        if let Some(then) = then {
            cmd.arg("--then").arg(then);
        }
        let child = cmd.stdout(Stdio::piped()).spawn().expect("python3 is installed by tests/setup.sh");
        SqliteWriter { child, work: work.to_owned() }
    }

    /// The sequence numbers acknowledged so far.
    pub fn acked(&self) -> Vec<u64> {
        acked(&self.work.join("acks"))
    }

    /// Waits until at least `n` writes were acknowledged.
    pub async fn wait_acked(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.acked().len() < n {
            assert!(
                Instant::now() < deadline,
                "the SQLite writer stopped acknowledging ({} acked)",
                self.acked().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the writer and returns its summary.
    pub fn stop(mut self) -> Summary {
        std::fs::write(self.work.join("stop"), b"").unwrap();
        let out = std::mem::replace(&mut self.child, Command::new("true").spawn().unwrap()).wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "the SQLite writer failed: {text}");
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("writer summary {text:?}: {e}"))
    }
}

impl Drop for SqliteWriter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The sequence numbers in an acks file.
pub fn acked(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The sequence numbers the database holds (Debian's `sqlite3`).
pub fn rows(db: &Path) -> Vec<u64> {
    crate::engines::sqlite3(db, "SELECT seq FROM acks ORDER BY seq").lines().filter_map(|l| l.parse().ok()).collect()
}
