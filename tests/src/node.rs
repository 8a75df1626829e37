//! Real `ferry serve` processes on 127.0.0.1, for end-to-end tests.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry::http::ApiClient;
use ferry::transfer::TransferStatus;
use hyper::Method;
use serde_json::json;

use crate::ferry_bin;

/// How long a node may take to apply a transfer another node committed.
const LEARN_WITHIN: Duration = Duration::from_secs(5);

pub const TOKEN: &str = "test-token-0123456789abcdef";
/// Scoped credentials of test nodes started with [`Credentials::Scoped`].
pub const NODE_TOKEN: &str = "node-token-0123456789abcdef";
pub const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";
pub const READ_TOKEN: &str = "read-token-0123456789abcdef";

/// How a test node authenticates.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Credentials {
    /// One token ([`TOKEN`]) for every scope.
    #[default]
    Single,
    /// [`NODE_TOKEN`], [`ADMIN_TOKEN`] and [`READ_TOKEN`]; the kit's own
    /// calls use the admin token.
    Scoped,
}

/// A cluster CA and its node certificates, made with `ferry cluster
/// init-ca` / `issue-cert` (for 127.0.0.1).
#[derive(Clone, Debug)]
pub struct TestPki {
    pub dir: std::sync::Arc<tempfile::TempDir>,
}

impl TestPki {
    pub fn new() -> TestPki {
        let dir = tempfile::Builder::new().prefix("ferry-pki-").tempdir().unwrap();
        let ok =
            Command::new(ferry_bin()).args(["cluster", "init-ca", "--dir"]).arg(dir.path()).status().unwrap().success();
        assert!(ok, "ferry cluster init-ca");
        TestPki { dir: std::sync::Arc::new(dir) }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// The certificate and key of node `name`, issued on first use.
    pub fn node(&self, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (self.dir.path().join(format!("{name}.crt")), self.dir.path().join(format!("{name}.key")));
        if !cert.exists() {
            let ok = Command::new(ferry_bin())
                .args(["cluster", "issue-cert", "--ca-dir"])
                .arg(self.dir.path())
                .args(["--name", name, "--host", "127.0.0.1", "--host", "localhost"])
                .status()
                .unwrap()
                .success();
            assert!(ok, "ferry cluster issue-cert {name}");
        }
        (cert, key)
    }

    /// A client that trusts this CA (no client certificate: an operator's).
    pub fn client(&self) -> ferry::http::Client {
        ferry::http::tls_client(ferry::http::tls::client_config(&self.ca(), None).unwrap())
    }
}

impl Default for TestPki {
    fn default() -> Self {
        Self::new()
    }
}

/// Options of one test node.
#[derive(Clone, Debug, Default)]
pub struct NodeOptions {
    /// Extra `ferry serve` flags.
    pub args: Vec<String>,
    /// Data directory to use instead of a fresh one (for restarts).
    pub data_dir: Option<PathBuf>,
    /// Listen on this port (a cluster member keeps its address across
    /// restarts); default: a free port chosen now.
    pub port: Option<u16>,
    /// Run the node with a file-size limit (RLIMIT_FSIZE) of this many bytes,
    /// SIGXFSZ ignored: writes past it fail with EFBIG, like a full disk.
    pub file_size_limit: Option<u64>,
    /// Start the node with this soft limit of open files (the hard limit
    /// unchanged).
    pub fd_soft_limit: Option<u64>,
    pub credentials: Credentials,
    /// Refuse direct pulls from other loopback nodes (by default the kit
    /// allows `http://127.0.0.1:*` and `https://127.0.0.1:*` as sources).
    pub strict_sources: bool,
    /// Serve TLS with a certificate from this CA.
    pub tls: Option<TestPki>,
    /// Plugins to put in the plugins dir besides segment-log and sqlite
    /// (e.g. `plugins::MISBEHAVE`).
    pub extra_plugins: Vec<PathBuf>,
    /// Append the node's log (its stderr) to this file instead of the test's.
    pub log_file: Option<PathBuf>,
    /// Leave the log filter to `ferry serve`'s default (no `FERRY_LOG`).
    pub default_log_level: bool,
    /// Run the node in this network namespace, listening on its address
    /// (see [`crate::faults::net::Lab`]); default: 127.0.0.1 here.
    pub netns: Option<NodeNet>,
}

/// Where a node in a network namespace runs.
#[derive(Clone, Debug)]
pub struct NodeNet {
    /// The namespace file (`/run/netns/<name>`).
    pub path: PathBuf,
    pub ip: std::net::Ipv4Addr,
}

impl NodeOptions {
    /// Options for nodes that move shards live while the tests check that
    /// no acknowledged write is lost: a write-pause budget of 1 s. The
    /// default (250 ms) is sized for release builds; a debug-build node on
    /// a loaded 2-core CI runner spends 100 to 400 ms on a round's fixed
    /// cost alone (guest calls through unoptimised WASI, two commits), more
    /// than the writers add, so the lag never shrinks under it and the move
    /// is refused as not converging. The pause itself is measured by the
    /// throughput harness's live workload, in a release build.
    pub fn live_moves() -> NodeOptions {
        NodeOptions { args: vec!["--pause-budget-ms".into(), "1000".into()], ..NodeOptions::default() }
    }
}

/// A running node. Killed (SIGKILL) when dropped.
pub struct TestNode {
    pub name: String,
    pub url: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub token_file: PathBuf,
    pub plugins_dir: PathBuf,
    /// The token the kit's own calls use.
    pub token: String,
    pub tls: Option<TestPki>,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl TestNode {
    /// Starts a node with every built guest in its plugins dir.
    pub fn start(name: &str, options: NodeOptions) -> TestNode {
        let dir = tempfile::Builder::new().prefix(&format!("ferry-{name}-")).tempdir().unwrap();
        let data_dir = options.data_dir.clone().unwrap_or_else(|| dir.path().join("data"));
        let plugins_dir = dir.path().join("plugins");
        std::fs::create_dir_all(&plugins_dir).unwrap();
        let extra = options.extra_plugins.iter().map(PathBuf::as_path);
        for plugin in [crate::plugins::SEGMENT_LOG, crate::plugins::SQLITE].map(Path::new).into_iter().chain(extra) {
            std::fs::copy(plugin, plugins_dir.join(plugin.file_name().unwrap())).unwrap();
        }
        let token_file = dir.path().join("token");
        let token = match options.credentials {
            Credentials::Single => TOKEN,
            Credentials::Scoped => {
                for (file, token) in
                    [("node-token", NODE_TOKEN), ("admin-token", ADMIN_TOKEN), ("read-token", READ_TOKEN)]
                {
                    write_private(&dir.path().join(file), token);
                }
                ADMIN_TOKEN
            }
        };
        write_private(&token_file, token);
        let port = options.port.unwrap_or_else(free_port);
        let mut node = TestNode {
            name: name.to_owned(),
            url: String::new(),
            port,
            data_dir,
            token_file,
            plugins_dir,
            token: token.to_owned(),
            tls: options.tls.clone(),
            child: None,
            _dir: dir,
        };
        node.spawn(&options);
        node
    }

    fn spawn(&mut self, options: &NodeOptions) {
        let name = self.name.clone();
        let mut cmd = Command::new(ferry_bin());
        let ip = options.netns.as_ref().map_or(std::net::Ipv4Addr::LOCALHOST, |n| n.ip);
        cmd.arg("serve")
            .args(["--node-id", &name, "--listen", &format!("{ip}:{}", self.port)])
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--plugins-dir")
            .arg(&self.plugins_dir)
            .args(&options.args);
        if options.default_log_level {
            cmd.env_remove("FERRY_LOG");
        } else {
            cmd.env("FERRY_LOG", std::env::var("FERRY_LOG").unwrap_or_else(|_| "warn,openraft=off".into()));
        }
        cmd.stdout(Stdio::piped()).stderr(match &options.log_file {
            Some(path) => {
                let file = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
                Stdio::from(file)
            }
            None => Stdio::inherit(),
        });
        if options.log_file.is_some() {
            // Plain text in the file, for tests to read.
            cmd.env("NO_COLOR", "1");
        }
        let dir = self.token_file.parent().unwrap().to_owned();
        match options.credentials {
            Credentials::Single => {
                cmd.arg("--token-file").arg(&self.token_file);
            }
            Credentials::Scoped => {
                for flag in ["node", "admin", "read"] {
                    cmd.arg(format!("--{flag}-token-file")).arg(dir.join(format!("{flag}-token")));
                }
            }
        }
        if !options.strict_sources {
            cmd.args(["--allow-source", "http://127.0.0.1:*", "--allow-source", "https://127.0.0.1:*"]);
        }
        if let Some(pki) = &options.tls {
            let (cert, key) = pki.node(&name);
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key).arg("--tls-ca").arg(pki.ca());
        }
        if let Some(limit) = options.file_size_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    libc_setrlimit_fsize(limit);
                    Ok(())
                });
            }
        }
        if let Some(soft) = options.fd_soft_limit {
            use std::os::unix::process::CommandExt;
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                    libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
                    limit.rlim_cur = soft.min(limit.rlim_max);
                    libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                    Ok(())
                });
            }
        }
        // Opened here, joined between fork and exec; closed after the spawn.
        let netns = options
            .netns
            .as_ref()
            .map(|n| std::fs::File::open(&n.path).unwrap_or_else(|e| panic!("{}: {e}", n.path.display())));
        if let Some(file) = &netns {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let fd = file.as_raw_fd();
            // SAFETY: setns(2) is async-signal-safe; `fd` stays open until
            // the spawn below has returned.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("starting ferry serve");
        drop(netns);
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("node {name} did not start: {:?}", child.wait());
            }
        };
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://") || w.starts_with("https://"))
            .expect("ready line has the URL");
        self.url = url.to_owned();
        self.child = Some(child);
    }

    /// The node's peak resident memory (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM").unwrap() * 1024
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node is running").id()
    }

    /// Stops the node with SIGSTOP (it keeps its sockets; peers time out).
    pub fn pause(&self) {
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(self.pid() as i32, libc::SIGSTOP) };
    }

    /// Resumes a node stopped by [`TestNode::pause`].
    pub fn resume(&self) {
        // SAFETY: as in `pause`.
        unsafe { libc::kill(self.pid() as i32, libc::SIGCONT) };
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the node with SIGKILL and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the node with SIGTERM and waits for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("node is running");
        // SAFETY: kill(2) on our own, not yet reaped, child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().unwrap()
    }

    /// Starts the node again on the same data directory and port.
    pub fn restart(&mut self, options: NodeOptions) {
        self.kill();
        self.spawn(&options);
    }

    /// A client of the node with the kit's token (the admin one when scoped).
    pub fn api(&self) -> ApiClient {
        self.api_as(&self.token)
    }

    /// A client of the node with another token.
    pub fn api_as(&self, token: &str) -> ApiClient {
        match &self.tls {
            Some(pki) => ApiClient::with_client(pki.client(), &self.url, token.into()),
            None => ApiClient::new(&self.url, token.into()),
        }
    }

    pub fn shard_dir(&self, engine: &str, shard: &str) -> PathBuf {
        self.data_dir.join("shards").join(engine).join(shard)
    }

    pub fn staging(&self) -> PathBuf {
        self.data_dir.join("staging")
    }

    pub async fn start_transfer(&self, engine: &str, shard: &str, source: &str) -> anyhow::Result<TransferStatus> {
        let body = json!({ "engine": engine, "shard": shard, "source": source });
        Ok(self.api().call(Method::POST, "/v1/transfers", Some(&body)).await?)
    }

    /// The transfer's status; a follower gets up to [`LEARN_WITHIN`] to
    /// learn a transfer just committed.
    pub async fn transfer(&self, id: &str) -> TransferStatus {
        self.wait_until(id, LEARN_WITHIN, |_| true).await
    }

    /// The transfer's status, or `None` while this node does not know it: a
    /// transfer through consensus reaches a follower a moment after the
    /// leader committed it.
    async fn known_transfer(&self, id: &str) -> Option<TransferStatus> {
        match self.api().call(Method::GET, &format!("/v1/transfers/{id}"), None).await {
            Ok(status) => Some(status),
            Err(e) if e.to_string().starts_with("404") => None,
            Err(e) => panic!("GET /v1/transfers/{id}: {e}"),
        }
    }

    /// Polls until the transfer ends.
    pub async fn wait_transfer(&self, id: &str, within: Duration) -> TransferStatus {
        let deadline = Instant::now() + within;
        loop {
            let status = self.known_transfer(id).await;
            if let Some(status) = &status
                && status.state.is_final()
            {
                return status.clone();
            }
            assert!(Instant::now() < deadline, "transfer did not end in {within:?}: {status:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until `check` holds for the transfer's status.
    pub async fn wait_until(
        &self,
        id: &str,
        within: Duration,
        check: impl Fn(&TransferStatus) -> bool,
    ) -> TransferStatus {
        let deadline = Instant::now() + within;
        loop {
            let status = self.known_transfer(id).await;
            if let Some(status) = &status {
                if check(status) {
                    return status.clone();
                }
                assert!(!status.state.is_final(), "transfer ended first: {status:?}");
            }
            assert!(Instant::now() < deadline, "condition not reached in {within:?}: {status:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn write_private(path: &Path, contents: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A port that was free a moment ago.
/// A size field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`, …), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no {field} in /proc/{pid}/status")))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.kill();
        kill_fence_keepers(&self.data_dir.join("fences"));
    }
}

/// Ends the fence keepers a node left (`sleep` processes that hold a fenced
/// shard's locks past the node's death, by design): a test's node is gone
/// for good.
fn kill_fence_keepers(dir: &Path) {
    let Ok(engines) = std::fs::read_dir(dir) else { return };
    for record in engines.flatten().filter_map(|e| std::fs::read_dir(e.path()).ok()).flatten().flatten() {
        let Ok(record) = serde_json::from_slice::<serde_json::Value>(&std::fs::read(record.path()).unwrap_or_default())
        else {
            continue;
        };
        let (Some(pid), Some(tag)) = (record["pid"].as_u64(), record["tag"].as_str()) else { continue };
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let want = format!("FERRY_FENCE_KEEPER={tag}");
        if environ.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
            // SAFETY: kill(2) on a pid whose environment names the keeper.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
}

/// Between fork and exec: ignore SIGXFSZ and cap file sizes.
fn libc_setrlimit_fsize(limit: u64) {
    let rlimit = libc::rlimit { rlim_cur: limit, rlim_max: limit };
    // SAFETY: async-signal-safe libc calls with valid arguments.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit);
    }
}

/// A cluster of test nodes, all joined to the first.
pub struct TestCluster {
    pub nodes: Vec<TestNode>,
}

impl TestCluster {
    pub async fn start(names: &[&str]) -> TestCluster {
        Self::start_with(names, NodeOptions::default()).await
    }

    /// Every node started with `options` (their `port` is ignored).
    pub async fn start_with(names: &[&str], options: NodeOptions) -> TestCluster {
        let nodes: Vec<TestNode> =
            names.iter().map(|n| TestNode::start(n, NodeOptions { port: None, ..options.clone() })).collect();
        Self::join(nodes).await
    }

    /// A cluster of nodes already started: each joins the first.
    pub async fn join(nodes: Vec<TestNode>) -> TestCluster {
        for node in &nodes[1..] {
            let body = json!({ "to": nodes[0].url });
            let api = node.api().timeout(Duration::from_secs(120));
            let _: serde_json::Value = api.call(Method::POST, "/v1/cluster/join", Some(&body)).await.expect("join");
        }
        let cluster = TestCluster { nodes };
        cluster.wait_agreement(Duration::from_secs(30)).await;
        cluster
    }

    /// Waits until every running node sees all members, the same leader and
    /// the same applied index; returns the status of the first.
    pub async fn wait_agreement(&self, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let mut statuses = Vec::new();
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                match node.api().call::<serde_json::Value>(Method::GET, "/v1/cluster", None).await {
                    Ok(status) => statuses.push(status),
                    Err(_) => break,
                }
            }
            let running = self.nodes.iter().filter(|n| n.child.is_some()).count();
            if statuses.len() == running && !statuses.is_empty() {
                let first = &statuses[0];
                let agree = statuses.iter().all(|s| {
                    s["leader"]["id"] == first["leader"]["id"]
                        && !first["leader"].is_null()
                        && s["last_applied"] == first["last_applied"]
                        && s["members"].as_array().map(|m| m.len()) == Some(self.nodes.len())
                        && s["members"].as_array().unwrap().iter().all(|m| m["name"] != "")
                });
                if agree {
                    return first.clone();
                }
            }
            assert!(Instant::now() < deadline, "no agreement in {within:?}: {statuses:#?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The replica table as node `i` sees it.
    pub async fn shards(&self, i: usize) -> serde_json::Value {
        self.nodes[i].api().call(Method::GET, "/v1/shards", None).await.unwrap()
    }

    /// Waits until every running node shows `want` as its replica table.
    pub async fn wait_shards(&self, want: &serde_json::Value, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut all = true;
            for (i, node) in self.nodes.iter().enumerate() {
                if node.child.is_some() && &self.shards(i).await != want {
                    all = false;
                }
            }
            if all {
                return;
            }
            assert!(Instant::now() < deadline, "replica tables differ from {want}: {}", self.shards(0).await);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn leader_index(&self, status: &serde_json::Value) -> usize {
        let leader = status["leader"]["name"].as_str().unwrap();
        self.nodes.iter().position(|n| n.name == leader).unwrap()
    }
}

impl TestCluster {
    /// Waits until every running node shows `replicas` (node name → state)
    /// for `engine`/`shard`; `null` means the row is absent.
    pub async fn wait_replicas(&self, engine: &str, shard: &str, replicas: serde_json::Value, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let mut all = true;
            let mut seen = serde_json::Value::Null;
            for (i, node) in self.nodes.iter().enumerate() {
                if node.child.is_none() {
                    continue;
                }
                let table = self.shards(i).await;
                let row = table
                    .as_array()
                    .and_then(|rows| rows.iter().find(|r| r["engine"] == engine && r["shard"] == shard))
                    .map(|r| r["replicas"].clone())
                    .unwrap_or(serde_json::Value::Null);
                if row != replicas {
                    all = false;
                    seen = row;
                }
            }
            if all {
                return;
            }
            assert!(Instant::now() < deadline, "{engine}/{shard}: want {replicas}, a node shows {seen}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
