//! The operator page, `GET /ui`, in a real browser: headless Chromium
//! (Debian's, installed by `tests/setup.sh`) driven by playwright-core
//! (`tests/ui/drive.mjs`) against a real 3-node cluster with a running
//! transfer. The page shows the members and the transfer progressing, and a
//! cancel from the page cancels it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferry::transfer::{State, TransferStatus};
use ferry_tests::engines::{SegmentLog, TestEngine};
use ferry_tests::node::{NodeOptions, TestCluster};
use hyper::Method;
use serde_json::json;

const WITHIN: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_transfer_progressing_and_cancels_it() {
    // 64 MiB at 4 MiB/s: the transfer runs for longer than the page needs.
    let options = NodeOptions { args: vec!["--rate-limit".into(), "4M".into()], ..Default::default() };
    let cluster = TestCluster::start_with(&["u1", "u2", "u3"], options).await;
    cluster.wait_agreement(WITHIN).await;
    let [u1, u2, _] = [&cluster.nodes[0], &cluster.nodes[1], &cluster.nodes[2]];
    SegmentLog.create(&u1.shard_dir("segment-log", "shown"), 64 << 20);
    cluster.wait_replicas("segment-log", "shown", json!({"u1": "active"}), WITHIN).await;
    let body = json!({"engine": "segment-log", "shard": "shown", "source": "u1", "target": "u2"});
    let started: TransferStatus = u1.api().call(Method::POST, "/v1/transfers", Some(&body)).await.unwrap();

    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("ui");
    assert!(ui.join("node_modules/playwright-core").is_dir(), "playwright-core is installed by tests/setup.sh");
    let shot = tempfile::tempdir().unwrap();
    let screenshot = shot.path().join("ui.png");
    // The page is served by the target, which shows its byte progress.
    let out = Command::new("node")
        .arg(ui.join("drive.mjs"))
        .env("URL", &u2.url)
        .env("TOKEN", &u2.token)
        .env("TRANSFER", &started.id)
        .env("SCREENSHOT", &screenshot)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "the page test failed: {said}{}", String::from_utf8_lossy(&out.stderr));
    let seen: serde_json::Value = serde_json::from_str(said.trim()).unwrap();
    assert_eq!(seen["members"], 3, "{seen}");
    assert_eq!(seen["leader"], 1, "{seen}");
    assert!(seen["later"].as_u64() > seen["first"].as_u64(), "{seen}");
    let png = std::fs::read(&screenshot).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    if let Ok(keep) = std::env::var("FERRY_UI_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).unwrap();
    }

    // The cancel from the page ended the transfer, cluster-wide.
    let done = u2.wait_transfer(&started.id, WITHIN).await;
    assert_eq!(done.state, State::Cancelled, "{done:?}");
    cluster.wait_replicas("segment-log", "shown", json!({"u1": "active"}), WITHIN).await;

    // The page itself needs no credential and holds no data; the API it
    // calls does.
    let (page, api) = (format!("{}/ui", u2.url), format!("{}/v1/transfers", u2.url));
    for (url, want) in [(page, 200u16), (api, 401)] {
        let request = ferry::http::request(Method::GET, &url, "wrong-token", None).unwrap();
        let response = ferry::http::client().request(request).await.unwrap();
        assert_eq!(response.status().as_u16(), want, "{url}");
    }
}
