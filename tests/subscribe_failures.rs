//! What the subscriber does with what it cannot apply, against a real broker and a real
//! SQLite store: poison messages, a callback that keeps failing, a split transaction
//! the store rejects. Envelopes are published by hand, as in `subscribe_order.rs`.

mod common;

use common::order::*;
use common::sub::*;
use common::AMQP;
use kausal::subscriber::{CallbackError, Event, Subscriber};
use serde_json::{json, Value};
use sqlx::Row as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_go_to_dead_letters_with_a_reason_and_unrelated_work_continues() {
    let mut s = setup("poison").await;
    let cfg = sub_config(
        &s.app,
        &s.url,
        &format!(
            "[[table]]\nnamespace = \"{0}\"\nname = \"users\"\ncolumns = [\"id\", \"nickname\"]\n\
             [[table]]\nnamespace = \"{0}\"\nname = \"messages\"\n",
            s.feed.namespace
        ),
    );
    let mut sub = Subscriber::new(cfg);
    let log = recorder(&mut sub);
    let worker = Worker::start(sub);
    // users lacks the subscribed column `nickname`: a definite error for that transaction.
    let bad = s.feed.txn(
        vec![insert("users", 1, json!({"name": "ada", "email": "a@x"}))],
        None,
    );
    let fine = s.feed.txn(
        vec![insert("messages", 5, json!({"user_id": 9, "text": "hi"}))],
        None,
    );
    s.feed.publish_raw(b"not a kausal message").await;
    s.feed.publish_raw(b"KSL\x09{}").await;
    s.feed
        .publish_raw(b"KSL\x01{\"envelopes\": [{\"seq\": 1}]}")
        .await;
    s.feed.publish(&[bad, fine]).await;
    eventually(
        Duration::from_secs(20),
        "the unrelated message applied",
        || async { log.lock().unwrap().len() == 1 },
    )
    .await;
    let letters = dead_letters(&s.app, 4).await;
    let reasons: Vec<String> = letters
        .iter()
        .map(|l| l.reason.clone().unwrap_or_default())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("not a Kausal message")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("version 9")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("malformed")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("nickname")),
        "{reasons:?}"
    );
    assert_eq!(*log.lock().unwrap(), ["messages:Insert:5"]);
    worker.stop().await;
    delete_queues(&s.app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_callback_is_retried_then_dead_lettered_while_its_dependents_wait() {
    let mut s = setup("cbfail").await;
    let flaky = s.feed.txn(
        vec![insert("users", 1, json!({"name": "flaky", "email": "e"}))],
        None,
    );
    let broken = s.feed.txn(
        vec![insert("users", 2, json!({"name": "broken", "email": "e"}))],
        None,
    );
    let dependent = s.feed.txn(
        vec![insert("messages", 20, json!({"user_id": 2, "text": "x"})).refs("users", 2)],
        None,
    );
    let unrelated = s.feed.txn(
        vec![insert("messages", 30, json!({"user_id": 1, "text": "y"}))],
        None,
    );
    let mut sub = subscriber(&s, "causal");
    let calls = Arc::new(Mutex::new(Vec::<String>::new()));
    let c = calls.clone();
    sub.callbacks().on_insert("users", move |e: Event<Value>| {
        let c = c.clone();
        async move {
            let name = e.new.as_ref().unwrap()["name"]
                .as_str()
                .unwrap()
                .to_string();
            let attempts = {
                let mut c = c.lock().unwrap();
                c.push(name.clone());
                c.iter().filter(|n| **n == name).count()
            };
            match name.as_str() {
                "flaky" if attempts < 3 => Err(CallbackError::transient("mail server down")),
                "broken" => Err(CallbackError::permanent("no such mailbox")),
                _ => Ok(()),
            }
        }
    });
    let log = recorder(&mut sub);
    let worker = Worker::start(sub);
    s.feed.publish(&[flaky, broken, dependent, unrelated]).await;
    eventually(
        Duration::from_secs(30),
        "flaky and unrelated applied",
        || async {
            let l = log.lock().unwrap();
            l.contains(&"users:Insert:1".to_string())
                && l.contains(&"messages:Insert:30".to_string())
        },
    )
    .await;
    let letters = dead_letters(&s.app, 1).await;
    assert!(
        letters[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("no such mailbox"),
        "{letters:?}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let db = store(&s.url).await;
    let ids: Vec<i64> = sqlx::query("SELECT id FROM users ORDER BY id")
        .fetch_all(&db)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, [1], "the broken user must not be stored");
    let msgs: Vec<i64> = sqlx::query("SELECT id FROM messages ORDER BY id")
        .fetch_all(&db)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(msgs, [30], "the dependent of the dead-lettered user waits");
    assert_eq!(
        calls
            .lock()
            .unwrap()
            .iter()
            .filter(|n| *n == "flaky")
            .count(),
        3
    );
    worker.stop().await;
    delete_queues(&s.app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_split_transaction_the_store_rejects_is_dead_lettered_whole() {
    // Three parts of one transaction into a mapped table that does not exist: the store
    // rejects it for good; the dead-letter queue gets all three parts, read back from
    // staging one at a time (one message per part: a huge transaction is never held
    // whole).
    let mut s = setup("splitdead").await;
    let whole = s.feed.txn(
        (1..=6)
            .map(|i| insert("users", i, json!({"name": "u", "email": "e"})))
            .collect(),
        None,
    );
    let parts: Vec<_> = whole
        .changes
        .chunks(2)
        .enumerate()
        .map(|(i, chunk)| {
            let mut p = whole.clone();
            p.part = i as u32;
            p.parts = (i == 2).then_some(3);
            p.changes = chunk.to_vec();
            p.deps = if i == 0 {
                whole.deps.clone()
            } else {
                Vec::new()
            };
            p
        })
        .collect();
    let cfg = sub_config(
        &s.app,
        &s.url,
        &format!(
            "[[table]]\nnamespace = \"{}\"\nname = \"users\"\ninto = \"no_such_table\"\nmode = \"map\"\n",
            s.feed.namespace
        ),
    );
    let worker = Worker::start(Subscriber::new(cfg));
    for p in &parts {
        s.feed.publish(std::slice::from_ref(p)).await;
    }
    let letters = dead_letters(&s.app, 3).await;
    let mut dead = Vec::new();
    for letter in &letters {
        let reason = letter.reason.clone().unwrap_or_default();
        assert!(reason.contains("no_such_table"), "{reason}");
        dead.extend(kausal::bus::decode(&letter.body).unwrap());
    }
    assert_eq!(dead.iter().map(|e| e.part).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(dead.iter().map(|e| e.changes.len()).sum::<usize>(), 6);
    worker.stop().await;
    let db = store(&s.url).await;
    let staged: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM kausal_parts")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(
        staged, 0,
        "the dead-lettered transaction's parts stay staged"
    );
    delete_queues(&s.app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_rabbitmq_dead_letters_itself_is_listed_with_rabbitmqs_reason() {
    // A queue whose messages expire at once (as a laptop's `x-message-ttl` does after
    // its time): RabbitMQ moves the message to the dead-letter queue itself, recording
    // why in `x-death`, not Kausal's `x-kausal-reason`.
    let app = common::unique("ttl");
    let mut spec = kausal::bus::amqp::QueueSpec::durable(&format!("kausal.{app}"), &[&app]);
    spec.message_ttl_ms = Some(1);
    let declaring =
        kausal::bus::amqp::AmqpConsumer::open(AMQP, "kausal", 1, spec.dead_letter_key())
            .await
            .unwrap();
    declaring.declare(&spec).await.unwrap();
    declaring.close().await;
    let publisher = kausal::bus::amqp::AmqpPublisher::connect(AMQP, "kausal")
        .await
        .unwrap();
    publisher
        .publish_to_queue(&spec.name, b"expires")
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    publisher.close().await;
    let dlq = spec.dead_letter_queue();
    let mut letters = Vec::new();
    for _ in 0..100 {
        letters = kausal::bus::amqp::peek_dead_letters(AMQP, &dlq, 1)
            .await
            .unwrap();
        if !letters.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reason = letters
        .first()
        .and_then(|l| l.reason.clone())
        .unwrap_or_default();
    assert!(
        reason.contains("dead-lettered by RabbitMQ")
            && reason.contains("expired")
            && reason.contains(&spec.name),
        "{reason:?}"
    );
    delete_queues(&app).await;
}
