//! How operators run `ferry`: the sample config documents every key and
//! passes `ferry config check`, which refuses bad ones; the CLI finds the
//! local node from its config without flags; shell completions; the systemd
//! unit passes `systemd-analyze verify`, and `serve` tells systemd when it
//! is ready.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use ferry::node::config::Config;
use ferry_tests::ferry_bin;
use ferry_tests::node::{NodeOptions, TestNode};

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../host/contrib").join(path)
}

fn ferry(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(ferry_bin());
    cmd.args(args).env_remove("FERRY_CONFIG").env_remove("FERRY_NODE").env_remove("FERRY_TOKEN_FILE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// Every key of a config, as `table.key`.
fn keys(value: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    if let Some(map) = value.as_object() {
        for (k, v) in map {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            if v.is_object() {
                keys(v, &key, out);
            } else {
                out.push(key);
            }
        }
    }
}

#[test]
fn the_sample_config_documents_every_key_and_passes_the_check() {
    let sample = contrib("ferry.toml");
    let out = ferry(&["config", "check", sample.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("ok: node node-1"), "{}", text(&out));

    // A config with every optional table, so their keys are listed too.
    let mut full = Config {
        auth: Some(Default::default()),
        tls: Some(ferry::http::tls::TlsFiles { cert_file: "c".into(), key_file: "k".into(), ca_file: "a".into() }),
        ..Config::default()
    };
    full.rate_limit = Some(1);
    let mut all = Vec::new();
    keys(&serde_json::to_value(&full).unwrap(), "", &mut all);
    let lines: Vec<String> = std::fs::read_to_string(&sample)
        .unwrap()
        .lines()
        .map(|l| l.trim_start_matches('#').trim().to_owned())
        .collect();
    for key in &all {
        let name = key.rsplit('.').next().unwrap();
        assert!(lines.iter().any(|l| l.starts_with(&format!("{name} = "))), "the sample does not document {key}");
    }

    // Bad configs are refused with the reason.
    let dir = tempfile::tempdir().unwrap();
    for (body, want) in [
        ("node_id = \"a\"\npause_budget = 5\n", "unknown field `pause_budget`"),
        ("node_id = \"a\"\npause_budget_ms = 5\n", "pause_budget_ms must be 10 to 600000"),
        ("node_id = \"A b\"\n", "node"),
        ("listen = \"nowhere\"\n", "listen"),
    ] {
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, body).unwrap();
        let out = ferry(&["config", "check", file.to_str().unwrap()], &[]);
        assert!(!out.status.success() && text(&out).contains(want), "{body:?}: {}", text(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_finds_the_local_node_from_its_config() {
    let node = TestNode::start("local", NodeOptions::default());
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join("ferry/ferry.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    let listen = node.url.trim_start_matches("http://");
    // The node's own token is in its data dir (`state/token`).
    std::fs::copy(&node.token_file, node.data_dir.join("state/token")).ok();
    std::fs::write(
        &config,
        format!("node_id = \"local\"\nlisten = \"{listen}\"\ndata_dir = {:?}\n", node.data_dir.display().to_string()),
    )
    .unwrap();

    // Found at $XDG_CONFIG_HOME/ferry/ferry.toml, or named by FERRY_CONFIG.
    for env in [("XDG_CONFIG_HOME", home.path()), ("FERRY_CONFIG", config.as_path())] {
        let out = ferry(&["cluster", "status", "--json"], &[env]);
        assert!(out.status.success(), "{env:?}: {}", text(&out));
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(status["node"], "local", "{status}");
    }

    // Without a config or a token file: a clear error.
    let empty = tempfile::tempdir().unwrap();
    let out = ferry(&["cluster", "status"], &[("XDG_CONFIG_HOME", empty.path()), ("HOME", empty.path())]);
    assert!(!out.status.success() && text(&out).contains("--token-file"), "{}", text(&out));
    // A FERRY_CONFIG that names nothing is an error, not a silent default.
    let out = ferry(&["cluster", "status"], &[("FERRY_CONFIG", &empty.path().join("none.toml"))]);
    assert!(!out.status.success() && text(&out).contains("FERRY_CONFIG"), "{}", text(&out));
}

#[test]
fn completions_are_valid_shell() {
    let out = ferry(&["completions", "bash"], &[]);
    assert!(out.status.success(), "{}", text(&out));
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("_ferry") && script.contains("transfer"), "{script}");
    let mut bash = Command::new("bash").arg("-n").stdin(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(&mut bash.stdin.take().unwrap(), script.as_bytes()).unwrap();
    let checked = bash.wait_with_output().unwrap();
    assert!(checked.status.success(), "bash -n: {}", String::from_utf8_lossy(&checked.stderr));
    for shell in ["zsh", "fish"] {
        let out = ferry(&["completions", shell], &[]);
        assert!(out.status.success() && out.stdout.len() > 1000, "{shell}: {}", text(&out));
    }
    assert!(!ferry(&["completions", "tcsh"], &[]).status.success());
}

#[test]
fn the_systemd_unit_verifies_and_serve_notifies_readiness() {
    // The unit as installed, with this build's binary where it expects
    // /usr/local/bin/ferry: systemd-analyze prints nothing for a sound unit.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(contrib("ferry.service")).unwrap();
    assert!(unit.contains("Type=notify"));
    let unit_file = dir.path().join("ferry.service");
    std::fs::write(&unit_file, unit.replace("/usr/local/bin/ferry", ferry_bin().to_str().unwrap())).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit_file)
        .output()
        .expect("systemd-analyze is installed by tests/setup.sh (Debian's systemd)");
    assert!(out.status.success() && text(&out).trim().is_empty(), "systemd-analyze verify: {}", text(&out));

    // `serve` under NOTIFY_SOCKET sends READY=1 once it listens.
    let socket_path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    let mut child = Command::new(ferry_bin())
        .args(["serve", "--node-id", "notified", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--plugins-dir")
        .arg(&plugins)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("FERRY_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let got = socket.recv(&mut buf);
    let _ = child.kill();
    let _ = child.wait();
    let message = String::from_utf8_lossy(&buf[..got.expect("serve never notified systemd")]).into_owned();
    assert!(message.starts_with("READY=1\nSTATUS=listening on http://127.0.0.1:"), "{message:?}");
}
