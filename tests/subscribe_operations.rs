//! What an operator sees: a transaction waiting for a missing dependency is reported
//! with the sequence number it waits for; SIGTERM stops a worker cleanly mid-stream
//! without losing anything; a bad config is refused with the key named.

mod common;

use common::e2e::*;
use common::sub::*;
use common::*;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_waiting_for_a_missing_one_is_reported_with_its_sequence_number() {
    let app = unique("waitreport");
    declare_queue(&app, &app).await;
    let mut feed = Feed::new(&app).await;
    let _user = feed.txn(
        vec![insert("users", 1, json!({"name": "ada", "email": "a@x"}))],
        None,
    );
    let message = feed.txn(
        vec![insert("messages", 10, json!({"user_id": 1, "text": "hi"})).refs("users", 1)],
        None,
    );
    let text = sub_config_text(
        &app,
        &sqlite_url(&app),
        &format!(
            "[ordering]\nreport_wait_ms = 300\n\
             [[table]]\nnamespace = \"{app}\"\nname = \"users\"\n\
             [[table]]\nnamespace = \"{app}\"\nname = \"messages\"\n"
        ),
    );
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut worker = Process::subscriber_logged(&write_config(&text, &app), log.clone());
    feed.publish(&[message]).await;
    eventually(Duration::from_secs(20), "a wait report", || {
        let found = log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("still waits for a dependency"));
        async move { found }
    })
    .await;
    let report = log
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("still waits"))
        .cloned()
        .unwrap();
    assert!(report.contains(&format!("tx={app}/1/2")), "{report}");
    assert!(report.contains("waits_for_seq=1"), "{report}");
    worker.kill();
    delete_queues(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_stream_stops_the_worker_cleanly_and_loses_nothing() {
    let e = e2e("sigterm").await;
    let config = e.redis_config("");
    let url = e.db.url.clone();
    let writing = tokio::spawn(async move { workload::run(&url, 5_000, 4, 29).await });
    for _ in 0..3 {
        let mut worker = Process::subscriber(&config);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let status = worker.terminate();
        assert!(status.success(), "a stopped worker exits 0, got {status}");
    }
    writing.await.unwrap();
    let mut worker = Process::subscriber(&config);
    let store = e.store().await;
    workload::converge(&e.db.url, &store, Duration::from_secs(180)).await;
    worker.kill();
    e.finish().await;
}

#[tokio::test]
async fn a_config_with_an_unknown_key_is_refused_naming_it() {
    let app = unique("badcfg");
    let text = sub_config_text(&app, "sqlite://x.db", "[ordering]\nmdoe = \"causal\"\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
        .args(["subscribe", "--config"])
        .arg(write_config(&text, &app))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("mdoe"), "{err}");
}
