//! The operator's commands against running subscribers and publishers: `kausal status`,
//! the metrics endpoints, `kausal dlq`, `kausal subscriber release`, `kausal doctor`.
//! Envelopes come from a hand-driven feed (dependencies from the publisher's tracker)
//! or a real publisher; the commands run as the `kausal` binary, as an operator would.

mod common;

use common::cli::{free_port, kausal};
use common::sub::*;
use common::unique;
use kausal::subscriber::{CallbackError, Event, Subscriber};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn tables(ns: &str) -> String {
    format!(
        "[[table]]\nnamespace = \"{ns}\"\nname = \"users\"\n\
         [[table]]\nnamespace = \"{ns}\"\nname = \"messages\"\n"
    )
}

/// Records `<table>:<op>:<id>` per callback; fails users named "poison" while `poison`.
fn recorder(sub: &mut Subscriber, poison: Arc<AtomicBool>) -> Arc<Mutex<Vec<String>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    for table in ["users", "messages"] {
        let log = log.clone();
        let poison = poison.clone();
        sub.callbacks().on_change(table, move |e: Event<Value>| {
            let log = log.clone();
            let poison = poison.clone();
            async move {
                let name = e.new.as_ref().and_then(|r| r.get("name")).cloned();
                if poison.load(Ordering::SeqCst) && name == Some(json!("poison")) {
                    return Err(CallbackError::transient("the mail service refused user 1"));
                }
                log.lock()
                    .unwrap()
                    .push(format!("{}:{:?}:{}", e.table, e.op, e.key["id"]));
                Ok(())
            }
        });
    }
    log
}

async fn status_json(config: &std::path::Path) -> Value {
    let (_, out, err) = kausal(&["status", "--json", "--config", config.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out} {err}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_waiting_for_a_lost_one_shows_in_status_and_proceeds_once_released() {
    common::logs();
    let app = unique("release");
    let mut feed = Feed::new(&app).await;
    let url = sqlite_url(&app);
    declare_queue(&app, &app).await;
    let text = sub_config_text(
        &app,
        &url,
        &format!("[ordering]\nreport_wait_ms = 500\n{}", tables(&app)),
    );
    let config = common::write_config(&text, &app);
    let mut sub = Subscriber::new(toml::from_str(&text).unwrap());
    let log = recorder(&mut sub, Arc::new(AtomicBool::new(false)));
    let worker = Worker::start(sub);

    let ada = feed.txn(
        vec![insert("users", 1, json!({"name": "ada", "email": "a@x"}))],
        None,
    );
    // Seq 2 is lost on the way: never published.
    let _lost = feed.txn(
        vec![insert("users", 2, json!({"name": "bob", "email": "b@x"}))],
        None,
    );
    let hello = feed.txn(
        vec![insert("messages", 10, json!({"user_id": 2, "text": "hi"})).refs("users", 2)],
        None,
    );
    feed.publish(&[ada]).await;
    eventually(Duration::from_secs(20), "user 1 applied", || async {
        log.lock().unwrap().len() == 1
    })
    .await;
    feed.publish(&[hello]).await;

    // The worker reports what its waiting transaction waits for, through the store.
    let mut waiting = Value::Null;
    for _ in 0..100 {
        let s = status_json(&config).await;
        let w = &s["subscribers"][0]["workers"][0];
        if w["waiting_count"] == 1 {
            waiting = w.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(waiting["state"], "running", "{waiting}");
    assert_eq!(
        waiting["waiting"][0]["tx"],
        format!("{app}/1/3"),
        "{waiting}"
    );
    assert_eq!(waiting["waiting"][0]["waits_for_seq"], 2, "{waiting}");
    let (_, human, _) = kausal(&["status", "--config", config.to_str().unwrap()]);
    assert!(
        human.contains(&format!("{app}/1/3 waits for seq 2")),
        "{human}"
    );
    assert!(
        human.contains(&format!("applied through     {app}/1/1")),
        "{human}"
    );
    let (code, out, _) = kausal(&["doctor", "--config", config.to_str().unwrap()]);
    assert!(
        out.contains("waits for seq 2") && out.contains("kausal subscriber release"),
        "{out}"
    );
    assert_eq!(code, 0, "a long wait is a warning, not a failure: {out}");

    // A sequence number nothing waits for is refused, naming where to look.
    let cfg = config.to_str().unwrap();
    let (code, _, err) = kausal(&["subscriber", "release", "--config", cfg, "--seq", "7"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("no running worker") && err.contains("kausal status"),
        "{err}"
    );

    let (code, _, err) = kausal(&["subscriber", "release", "--config", cfg, "--seq", "2"]);
    assert_eq!(code, 0, "{err}");
    eventually(Duration::from_secs(20), "the message applied", || async {
        log.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(
        *log.lock().unwrap(),
        ["users:Insert:1", "messages:Insert:10"]
    );
    let mut released = Value::Null;
    for _ in 0..50 {
        let s = status_json(&config).await;
        released = s["subscribers"][0].clone();
        if released["workers"][0]["released"] == 1 && released["streams"][0]["applied_through"] == 3
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(released["workers"][0]["released"], 1, "{released}");
    assert_eq!(released["workers"][0]["waiting_count"], 0, "{released}");
    assert_eq!(released["streams"][0]["applied_through"], 3, "{released}");
    worker.stop().await;
    // A clean stop removes the worker's row.
    let s = status_json(&config).await;
    assert_eq!(s["subscribers"][0]["workers"], json!([]), "{s}");
    delete_queues(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_letter_is_listed_with_its_reason_and_a_retry_goes_through_the_causal_gate() {
    common::logs();
    let app = unique("dlq");
    let mut feed = Feed::new(&app).await;
    let url = sqlite_url(&app);
    declare_queue(&app, &app).await;
    let port = free_port();
    let text = sub_config_text(
        &app,
        &url,
        &format!(
            "[callbacks]\nattempts = 2\nbackoff_ms = 10\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n{}",
            tables(&app)
        ),
    );
    let config = common::write_config(&text, &app);
    let cfg = config.to_str().unwrap();
    let poison = Arc::new(AtomicBool::new(true));
    let mut sub = Subscriber::new(toml::from_str(&text).unwrap());
    let log = recorder(&mut sub, poison.clone());
    let worker = Worker::start(sub);

    let user = feed.txn(
        vec![insert(
            "users",
            1,
            json!({"name": "poison", "email": "p@x"}),
        )],
        None,
    );
    let message = feed.txn(
        vec![insert("messages", 10, json!({"user_id": 1, "text": "welcome"})).refs("users", 1)],
        None,
    );
    let other = feed.txn(
        vec![insert("users", 3, json!({"name": "cy", "email": "c@x"}))],
        None,
    );
    feed.publish(&[user, message, other]).await;
    eventually(Duration::from_secs(30), "user 3 applied", || async {
        log.lock().unwrap().iter().any(|l| l == "users:Insert:3")
    })
    .await;
    // Garbage on the exchange: a second dead letter, with its own reason.
    feed.publish_raw(b"not an envelope").await;

    let mut listed = Vec::new();
    for _ in 0..100 {
        let (_, out, _) = kausal(&["dlq", "list", "--json", "--config", cfg]);
        listed = out
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect();
        if listed.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["transactions"], json!([format!("{app}/1/1")]));
    assert_eq!(listed[0]["tables"], json!(["users"]));
    let reason = listed[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("the mail service refused user 1"),
        "{reason}"
    );
    assert!(
        listed[1]["reason"]
            .as_str()
            .unwrap()
            .contains("cannot decode"),
        "{:?}",
        listed[1]
    );
    // Listing took nothing away; the human form says the same.
    let (_, human, _) = kausal(&["dlq", "list", "--config", cfg]);
    assert!(human.contains(&format!("#1    {app}/1/1")), "{human}");
    assert!(human.contains("the mail service refused user 1"), "{human}");
    let (code, shown, _) = kausal(&["dlq", "show", "--seq", "1", "--config", cfg]);
    assert_eq!(code, 0);
    assert!(shown.contains("\"poison\""), "{shown}");

    // The message waits for its user, which is dead-lettered: nothing ran for it.
    assert!(!log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.starts_with("messages")));
    // Gauges follow within the status interval (2 s).
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = kausal::ops::get(&format!("127.0.0.1:{port}"), "/metrics")
            .await
            .unwrap();
        if metrics.contains("kausal_subscriber_transactions_waiting 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        metrics.contains("kausal_subscriber_dead_letters_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kausal_subscriber_transactions_waiting 1"),
        "{metrics}"
    );
    assert!(metrics.contains("# HELP kausal_subscriber_transactions_waiting Transactions in the causal gate waiting for a dependency.\n"), "{metrics}");

    // Fixed downstream; sent back, the user runs, then the message that waited for it.
    poison.store(false, Ordering::SeqCst);
    let (code, _, err) = kausal(&["dlq", "retry", "--seq", "1", "--config", cfg]);
    assert_eq!(code, 0, "{err}");
    eventually(
        Duration::from_secs(20),
        "user and message applied",
        || async { log.lock().unwrap().len() == 3 },
    )
    .await;
    assert_eq!(
        *log.lock().unwrap(),
        ["users:Insert:3", "users:Insert:1", "messages:Insert:10"]
    );
    // The garbage is dropped; the queue is empty.
    let (code, _, err) = kausal(&["dlq", "drop", "--index", "1", "--config", cfg]);
    assert_eq!(code, 0, "{err}");
    let (_, out, _) = kausal(&["dlq", "list", "--json", "--config", cfg]);
    assert_eq!(out.trim(), "", "dead letters left: {out}");
    let (code, _, err) = kausal(&["dlq", "retry", "--all", "--config", cfg]);
    assert_ne!(code, 0);
    assert!(err.contains("no dead letter matches"), "{err}");
    let metrics = kausal::ops::get(&format!("127.0.0.1:{port}"), "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.contains("kausal_subscriber_transactions_applied_total 3"),
        "{metrics}"
    );
    worker.stop().await;
    delete_queues(&app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_envelope_numbered_far_ahead_of_the_stream_is_dead_lettered_and_the_stream_goes_on() {
    common::logs();
    let app = unique("ahead");
    let mut feed = Feed::new(&app).await;
    let url = sqlite_url(&app);
    declare_queue(&app, &app).await;
    let text = sub_config_text(&app, &url, &tables(&app));
    let mut sub = Subscriber::new(toml::from_str(&text).unwrap());
    let log = recorder(&mut sub, Arc::new(AtomicBool::new(false)));
    let worker = Worker::start(sub);
    let first = feed.txn(
        vec![insert("users", 1, json!({"name": "ada", "email": "a@x"}))],
        None,
    );
    feed.publish(&[first]).await;
    eventually(Duration::from_secs(20), "user 1 applied", || async {
        log.lock().unwrap().len() == 1
    })
    .await;
    // A forged envelope claiming a number far in the future (it has no dependencies,
    // so without the check it would be applied and its number taken).
    let mut forged = feed.txn(
        vec![insert(
            "users",
            66,
            json!({"name": "mallory", "email": "m@x"}),
        )],
        None,
    );
    let real_seq = forged.seq;
    forged.seq = 5_000_000;
    forged.deps.clear();
    feed.publish(&[forged]).await;
    let real = feed.txn(
        vec![insert("users", 2, json!({"name": "bob", "email": "b@x"}))],
        None,
    );
    assert_eq!(real.seq, real_seq + 1);
    // The forged one's own seq (2) is never published: release it so seq 3 runs.
    let mut fill = real.clone();
    fill.seq = real_seq;
    fill.changes.clear();
    fill.deps.clear();
    feed.publish(&[fill, real]).await;
    eventually(Duration::from_secs(20), "user 2 applied", || async {
        log.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(*log.lock().unwrap(), ["users:Insert:1", "users:Insert:2"]);
    let dlq = format!("kausal.{app}.dlq");
    let letters = kausal::bus::amqp::peek_dead_letters(common::AMQP, &dlq, 10)
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    let reason = letters[0].reason.clone().unwrap();
    assert!(
        reason.contains("5000000") && reason.contains("max_seq_ahead"),
        "{reason}"
    );
    worker.stop().await;
    delete_queues(&app).await;
}
