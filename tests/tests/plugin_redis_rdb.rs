//! The JavaScript Redis RDB plugin (`guests/redis-rdb-js`, built by its
//! `build.sh` into `target/plugins/lang/redis-rdb.wasm`) on dumps written by a
//! real redis-server: it passes the conformance kit with a real write between
//! snapshots, and a replicate between two nodes yields a copy that Redis
//! itself reads back as the same data (redis-check-rdb, DBSIZE, DEBUG DIGEST).
//!
//! Needs `redis-server`, `redis-cli` and `redis-check-rdb` (the build script
//! installs them). Every redis-server listens on a unix socket only and is
//! killed when its guard drops, also when the test fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry::transfer::{State, TransferStatus};
use ferry_tests::node::{NodeOptions, TestCluster};
use ferry_tests::{contents, ferry_bin, kit, tree};
use hyper::Method;
use serde_json::json;

const ENGINE: &str = "redis-rdb";
const WITHIN: Duration = Duration::from_secs(600);

/// The built plugin; a missing build fails the test (it is not skipped).
fn plugin() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins/lang/redis-rdb.wasm");
    assert!(path.exists(), "{} is missing: run guests/redis-rdb-js/build.sh first", path.display());
    path
}

/// A redis-server on a unix socket (no TCP), serving `dir`. Killed on drop.
struct Redis {
    child: Option<Child>,
    socket: PathBuf,
    _sockdir: tempfile::TempDir,
}

impl Redis {
    fn start(dir: &Path) -> Redis {
        let sockdir = tempfile::Builder::new().prefix("ferry-redis-").tempdir().unwrap();
        let socket = sockdir.path().join("redis.sock");
        let child = Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1", "--unixsocket"])
            .arg(&socket)
            .arg("--dir")
            .arg(dir)
            .args(["--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no", "--daemonize", "no"])
            .args(["--enable-debug-command", "local", "--logfile", ""])
            .stdout(Stdio::null())
            .spawn()
            .expect("starting redis-server (run guests/redis-rdb-js/build.sh to install it)");
        let redis = Redis { child: Some(child), socket, _sockdir: sockdir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while redis.try_cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(Instant::now() < deadline, "redis-server on {} did not answer", dir.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    fn try_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli").arg("-s").arg(&self.socket).args(args).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = self.try_cli(args).unwrap_or_else(|| panic!("redis-cli {args:?} failed"));
        assert!(!out.starts_with("ERR") && !out.starts_with("(error)"), "redis-cli {args:?}: {out}");
        out
    }

    /// Sends commands, one a line, through redis-cli's stdin.
    fn script(&self, commands: &str) {
        let mut child = Command::new("redis-cli")
            .arg("-s")
            .arg(&self.socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(commands.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("ERR"), "a command failed: {}", text.lines().find(|l| l.contains("ERR")).unwrap());
    }

    /// SAVE, then SHUTDOWN NOSAVE and wait for the process.
    fn save_and_stop(mut self) {
        assert_eq!(self.cli(&["SAVE"]), "OK");
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.try_cli(&["SHUTDOWN", "NOSAVE"]);
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Commands that write keys of every type: strings (plain, integers, long
/// compressible ones that Redis stores LZF-compressed), small and large
/// lists, sets (intsets and hashtables), hashes, zsets, a stream with a
/// consumer group and pending entries, keys with expiry, a second database.
fn commands(n: usize, seed: &str) -> String {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(format!("SET str:{seed}:{i} value-{i}"));
        out.push(format!("SET int:{seed}:{i} {}", i as i64 * 7919 - 100_000));
        if i % 10 == 0 {
            out.push(format!("SET long:{seed}:{i} {}", format!("abcdefgh{i}").repeat(60)));
        }
        if i % 5 == 0 {
            out.push(format!("RPUSH list:{seed}:{i} a b c {i}"));
            out.push(format!("SADD iset:{seed}:{i} 1 2 3 {i} 70000 {}", i as u64 * 100_000));
            out.push(format!("SADD sset:{seed}:{i} x y z w{i}"));
            out.push(format!("HSET hash:{seed}:{i} f1 v1 f2 {i} name user{i}"));
            out.push(format!("ZADD zset:{seed}:{i} 1 a 2.5 b {i} c"));
            out.push(format!("SET ttl:{seed}:{i} expiring EX {}", 3600 + i));
            out.push(format!("HSET phash:{seed}:{i} a 1"));
            out.push(format!("PEXPIRE phash:{seed}:{i} {}", 9_000_000 + i));
        }
    }
    let join = |f: &dyn Fn(usize) -> String, k: usize| (0..k).map(f).collect::<Vec<_>>().join(" ");
    out.push(format!("RPUSH biglist:{seed} {}", join(&|j| format!("item{j}"), 2000)));
    out.push(format!("SADD bigset:{seed} {}", join(&|j| format!("member{j}"), 600)));
    out.push(format!("SADD bigiset:{seed} {}", join(&|j| format!("{}", j * 1000), 300)));
    out.push(format!("HSET bighash:{seed} {}", join(&|j| format!("field{j} value{j}"), 800)));
    out.push(format!("ZADD bigzset:{seed} {}", join(&|j| format!("{} m{j}", j as f64 * 1.5), 400)));
    for j in 0..200 {
        out.push(format!("XADD stream:{seed} * sensor {j} reading {}", j * 3));
    }
    out.push(format!("XGROUP CREATE stream:{seed} grp 0"));
    out.push(format!("XREADGROUP GROUP grp alice COUNT 20 STREAMS stream:{seed} >"));
    out.push(format!("XREADGROUP GROUP grp bob COUNT 5 STREAMS stream:{seed} >"));
    out.push("SELECT 1".into());
    for i in 0..50 {
        out.push(format!("SET db1:{seed}:{i} other-{i}"));
    }
    out.push("SELECT 0".into());
    out.join("\n") + "\n"
}

/// Writes a dump of a few thousand keys into `dir` with a real redis-server.
fn sample_dump(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let redis = Redis::start(dir);
    redis.script(&commands(1000, "a"));
    assert!(redis.cli(&["DBSIZE"]).parse::<u64>().unwrap() > 3000);
    redis.save_and_stop();
    assert_eq!(tree(dir), vec!["dump.rdb"], "redis-server left other files");
}

/// What Redis makes of the dump in `dir` (copied, so the server writes
/// nothing there): redis-check-rdb passes, then DBSIZE of db 0 and 1 and
/// DEBUG DIGEST.
fn redis_view(dir: &Path) -> (String, String, String) {
    let check = Command::new("redis-check-rdb").arg(dir.join("dump.rdb")).output().expect("redis-check-rdb");
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success() && text.contains("RDB looks OK"), "redis-check-rdb {}: {text}", dir.display());
    let scratch = tempfile::tempdir().unwrap();
    std::fs::copy(dir.join("dump.rdb"), scratch.path().join("dump.rdb")).unwrap();
    let mut redis = Redis::start(scratch.path());
    let view = (redis.cli(&["DBSIZE"]), redis.cli(&["-n", "1", "DBSIZE"]), redis.cli(&["DEBUG", "DIGEST"]));
    redis.stop();
    view
}

/// The kit's `--mutate`: a redis-server on the kit's copy adds a key and
/// SAVEs (a new dump.rdb renamed into place), then shuts down.
const MUTATE: &str = r#"S=$(mktemp -u /tmp/ferry-rdb-mutate.XXXXXX.sock)
redis-server --port 0 --unixsocket "$S" --dir "$FERRY_SHARD_DIR" --dbfilename dump.rdb --save '' --logfile '' >/dev/null & pid=$!
trap 'kill -9 $pid 2>/dev/null; rm -f "$S"' EXIT
for i in $(seq 300); do redis-cli -s "$S" PING >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -s "$S" SET kit:mutated "$$-$RANDOM" | grep -q OK
redis-cli -s "$S" SAVE | grep -q OK
redis-cli -s "$S" SHUTDOWN NOSAVE >/dev/null 2>&1
wait $pid
test -f "$FERRY_SHARD_DIR/dump.rdb""#;

/// Compiled plugins shared by this file's tests, under the workspace target.
fn compiled_cache() -> PathBuf {
    kit::shared_cache("redis-rdb-js-compiled")
}

#[test]
fn the_plugin_passes_the_kit_on_a_real_dump_and_leaves_it_unchanged() {
    let plugin = plugin();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s1");
    sample_dump(&dir);
    let before = contents(&dir);
    // The tests' shared compiled cache: the component compiles once per build.
    let (passed, report, checks) = kit::run(&plugin, &dir, Some(MUTATE), &compiled_cache());
    assert!(passed, "{checks:#?}");
    assert!(checks.iter().all(|(_, outcome, _)| outcome == "passed"), "{checks:#?}");
    assert!(checks.iter().any(|(c, _, _)| c.starts_with("term-check")), "the write check ran: {checks:#?}");
    assert_eq!(report["engine"], ENGINE);
    assert!(contents(&dir) == before, "the kit changed the sample shard");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_dump_is_the_same_data_to_redis() {
    let plugin = plugin();
    // A node compiles its plugins at start into `<data-dir>/state/compiled`;
    // the nodes here share one cache instead, warmed first, so the 12 MB
    // component compiles once per build, not once per node.
    let cache = compiled_cache();
    let warm = Command::new(ferry_bin())
        .args(["plugin", "check"])
        .arg(&plugin)
        .arg("--cache-dir")
        .arg(&cache)
        .output()
        .unwrap();
    assert!(warm.status.success(), "ferry plugin check: {}", String::from_utf8_lossy(&warm.stderr));
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("ferry.toml");
    std::fs::write(&config, format!("[plugin]\ncache_dir = {:?}\n", cache.display().to_string())).unwrap();
    let options = NodeOptions {
        extra_plugins: vec![plugin],
        args: vec!["--config".into(), config.display().to_string()],
        ..Default::default()
    };
    let cluster = TestCluster::start_with(&["r1", "r2"], options).await;
    let [r1, r2] = [&cluster.nodes[0], &cluster.nodes[1]];

    let tmp = tempfile::tempdir().unwrap();
    let sample = tmp.path().join("sample");
    sample_dump(&sample);
    let original = redis_view(&sample);
    let shard = r1.shard_dir(ENGINE, "s1");
    std::fs::create_dir_all(&shard).unwrap();
    std::fs::copy(sample.join("dump.rdb"), shard.join("dump.rdb")).unwrap();
    cluster.wait_replicas(ENGINE, "s1", json!({"r1": "active"}), WITHIN).await;

    let body = json!({"engine": ENGINE, "shard": "s1", "target": "r2"});
    let started: TransferStatus = r2.api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();
    let done = r2.wait_transfer(&started.id, WITHIN).await;
    assert_eq!(done.state, State::Succeeded, "{done:?}");
    assert_eq!(done.bytes_done, done.bytes_total, "{done:?}");
    cluster.wait_replicas(ENGINE, "s1", json!({"r1": "active", "r2": "active"}), WITHIN).await;

    let copy = r2.shard_dir(ENGINE, "s1");
    assert_eq!(tree(&copy), vec!["dump.rdb"]);
    assert_eq!(std::fs::read(copy.join("dump.rdb")).unwrap(), std::fs::read(shard.join("dump.rdb")).unwrap());
    let copied = redis_view(&copy);
    assert_eq!(copied, original, "Redis reads the copy as other data");
    assert!(original.0.parse::<u64>().unwrap() > 3000 && original.1 == "50", "{original:?}");
    assert!(tree(&r2.staging()).is_empty());
}
