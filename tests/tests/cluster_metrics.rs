//! `GET /metrics` on a real 3-node cluster, read by Prometheus's own tools:
//! `promtool check metrics` accepts every node's exposition, and a real
//! Prometheus server (Debian's, installed by `tests/setup.sh`), scraping the
//! three nodes with the `read` credential from a file, sees the bytes
//! counter grow while a transfer runs. The shipped alert rules pass
//! `promtool check rules`, and the dashboard's and the rules' queries name
//! only metrics the nodes export.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry::transfer::{State, TransferStatus};
use ferry_tests::engines::{SegmentLog, TestEngine};
use ferry_tests::node::{NodeOptions, TestCluster, free_port};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

const WITHIN: Duration = Duration::from_secs(120);

fn contrib(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../host/contrib").join(path)
}

/// A GET with a bearer token; the status and the body.
async fn get(url: &str, token: &str) -> (StatusCode, String) {
    let client = ferry::http::client();
    let request = ferry::http::request(Method::GET, url, token, None).unwrap();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let body = ferry::http::read_bounded(response.into_body(), 16 << 20, Duration::from_secs(10)).await.unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

/// Runs `promtool` with `args`, `stdin` fed in; its status and output.
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by tests/setup.sh (Debian's prometheus package)");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// The sample names of an exposition.
fn names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap().to_owned())
        .collect()
}

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts a Prometheus server that scrapes `targets` (host:port) every
    /// second with the bearer token in `token_file`.
    fn start(targets: &[String], token_file: &Path) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             rule_files: [{rules:?}]\n\
             scrape_configs:\n  - job_name: ferry\n    metrics_path: /metrics\n    \
             authorization:\n      credentials_file: {token:?}\n    \
             static_configs:\n      - targets: {targets:?}\n",
            rules = contrib("prometheus/ferry-alerts.yml").display().to_string(),
            token = token_file.display().to_string(),
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let (ok, out) = promtool(&["check", "config", config_file.to_str().unwrap()], "");
        assert!(ok, "promtool check config: {out}");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus is installed by tests/setup.sh");
        Prometheus { child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }

    /// An instant query's result vector.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let url = format!("{}/api/v1/query?query={}", self.url, encode(expr));
        let client = ferry::http::client();
        let request = ferry::http::request(Method::GET, &url, "", None).unwrap();
        let Ok(response) = client.request(request).await else { return Vec::new() };
        let body = ferry::http::read_bounded(response.into_body(), 16 << 20, Duration::from_secs(10)).await.unwrap();
        let answer: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        answer["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// A query's single value, if it has one.
    async fn value(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr).await;
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

/// Percent-encodes a query for a URL.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_cluster_and_sees_a_transfer_move_bytes() {
    // The budget of the live-move tests (NodeOptions::live_moves): the
    // segment-log replica is caught up and fenced at its end.
    let args = ["--rate-limit", "4M", "--pause-budget-ms", "1000"].map(String::from).to_vec();
    let options = NodeOptions { args, ..Default::default() };
    let cluster = TestCluster::start_with(&["m1", "m2", "m3"], options).await;
    cluster.wait_agreement(WITHIN).await;
    let [m1, m2, _] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    SegmentLog.create(&m1.shard_dir("segment-log", "big"), 40 << 20);
    cluster.wait_replicas("segment-log", "big", json!({"m1": "active"}), WITHIN).await;

    // The endpoint needs a credential; every node's exposition passes
    // promtool's parser and its linter (names, units, suffixes).
    let (status, _) = get(&format!("{}/metrics", m1.url), "wrong").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    for node in &cluster.nodes {
        let (status, text) = get(&format!("{}/metrics", node.url), &node.token).await;
        assert_eq!(status, StatusCode::OK, "{text}");
        let (ok, out) = promtool(&["check", "metrics"], &text);
        assert!(ok && out.trim().is_empty(), "{}: promtool check metrics: {out}\n{text}", node.name);
        for want in ["ferry_raft_term", "ferry_replicas", "ferry_build_info", "ferry_stream_slots"] {
            assert!(names(&text).contains(want), "{}: no {want} in\n{text}", node.name);
        }
    }

    // A real Prometheus scrapes all three with the token from a file.
    let targets: Vec<String> = cluster.nodes.iter().map(|n| n.url.trim_start_matches("http://").to_owned()).collect();
    let prometheus = Prometheus::start(&targets, &m1.token_file);
    let deadline = Instant::now() + WITHIN;
    while prometheus.value("sum(up{job=\"ferry\"})").await != Some(3.0) {
        assert!(Instant::now() < deadline, "Prometheus never scraped all three: {:?}", prometheus.query("up").await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // 40 MiB at 4 MiB/s: about ten seconds, several scrapes.
    let body = json!({"engine": "segment-log", "shard": "big", "source": "m1", "target": "m2"});
    let started: TransferStatus = m1.api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();
    let received = "sum(ferry_stream_received_bytes_total{job=\"ferry\",engine=\"segment-log\"})";
    let mut seen: Vec<f64> = Vec::new();
    let mut running_seen = false;
    loop {
        let status = m2.transfer(&started.id).await;
        if let Some(v) = prometheus.value(received).await
            && seen.last() != Some(&v)
        {
            seen.push(v);
        }
        running_seen |= prometheus.value("sum(ferry_transfers{state=\"running\"})").await == Some(1.0);
        if status.state.is_final() {
            assert_eq!(status.state, State::Succeeded, "{status:?}");
            break;
        }
        assert!(Instant::now() < deadline, "the transfer did not end: {status:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // After the end, Prometheus catches up with the whole shard.
    let total = (40u64 << 20) as f64;
    while seen.last().is_none_or(|&v| v < total) {
        assert!(Instant::now() < deadline, "the bytes counter stopped at {seen:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        if let Some(v) = prometheus.value(received).await
            && seen.last() != Some(&v)
        {
            seen.push(v);
        }
    }
    let during: Vec<&f64> = seen.iter().filter(|&&v| v > 0.0 && v < total).collect();
    assert!(during.len() >= 2, "the bytes counter did not grow during the transfer: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "a counter went down: {seen:?}");
    assert!(running_seen, "Prometheus never saw the transfer running");
    eprintln!("bytes received, as Prometheus saw them: {seen:?}");

    // The source counted what it sent; the target its finished transfer and
    // its stages; hooks were counted by outcome.
    // (Each re-queried: the scrape that saw the end on the target may have
    // come before the source's last one.)
    let sent = "sum(ferry_stream_sent_bytes_total{engine=\"segment-log\"})";
    let finished = "ferry_transfers_finished_total{outcome=\"succeeded\",engine=\"segment-log\"}";
    let validate = "sum(ferry_hook_calls_total{hook=\"validate\",outcome=\"ok\"})";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = prometheus.value(&format!("sum({finished})")).await;
        let (f, v) = (prometheus.value(sent).await, prometheus.value(validate).await);
        if s.is_some_and(|s| s >= 1.0) && f.is_some_and(|f| f >= total) && v.is_some_and(|v| v >= 1.0) {
            break;
        }
        assert!(Instant::now() < deadline, "finished {s:?}, sent {f:?}, validate calls {v:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // What the dashboard and the alert rules query, the nodes export (after
    // a live transfer, which touched every family).
    let mut exported = BTreeSet::new();
    for node in &cluster.nodes {
        exported.extend(names(&get(&format!("{}/metrics", node.url), &node.token).await.1));
    }
    assert_queries_exported(&exported);

    // The alert rules load into this Prometheus and none fires on a
    // healthy cluster.
    // (Not the pause alert: a debug-build node on a loaded runner may pause
    // writes past any budget, and then the alert is right to fire.)
    let rules = prometheus.query("ALERTS{alertstate=\"firing\",alertname!=\"FerryWritePauseOverBudget\"}").await;
    assert!(rules.is_empty(), "alerts firing on a healthy cluster: {rules:?}");
}

/// The shipped alert rules pass `promtool check rules`.
#[test]
fn the_alert_rules_pass_promtool() {
    let rules = contrib("prometheus/ferry-alerts.yml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()], "");
    assert!(ok && out.contains("SUCCESS"), "promtool check rules: {out}");
}

/// Every `ferry_*` metric the dashboard's panels and the alert rules query
/// is in `exported` (metric names of real expositions).
fn assert_queries_exported(exported: &BTreeSet<String>) {
    let known = |name: &str| {
        ["", "_total", "_bucket", "_sum", "_count"].iter().any(|suffix| exported.contains(&format!("{name}{suffix}")))
            || exported.contains(name)
    };
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(contrib("grafana/ferry-dashboard.json")).unwrap()).unwrap();
    let mut exprs: Vec<String> = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().unwrap().to_owned());
        }
    }
    let rules = std::fs::read_to_string(contrib("prometheus/ferry-alerts.yml")).unwrap();
    exprs.extend(rules.lines().filter_map(|l| l.trim().strip_prefix("expr:")).map(|e| e.trim().to_owned()));
    assert!(exprs.len() >= 20, "{exprs:?}");
    for expr in &exprs {
        let words: Vec<&str> = expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).collect();
        let metrics: Vec<&&str> = words.iter().filter(|w| w.starts_with("ferry_")).collect();
        assert!(!metrics.is_empty() || expr.contains("up{"), "{expr:?} queries no ferry metric");
        for word in metrics {
            assert!(known(word), "{expr:?} queries {word}, which no node exported");
        }
    }
}
