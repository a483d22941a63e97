//! The causal gate against a real broker and a real SQLite store, with transactions
//! delivered in orders a live publisher would rarely produce: the feed publishes
//! envelopes by hand (dependencies from the publisher's own tracker) in any order.

mod common;

use common::order::*;
use common::sub::*;
use common::unique;
use kausal::subscriber::Subscriber;
use serde_json::json;
use sqlx::Row as _;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn a_message_delivered_before_its_user_waits_for_it_in_causal_mode() {
    common::logs();
    let mut s = setup("causal_fk").await;
    let user = s.feed.txn(
        vec![insert("users", 1, json!({"name": "ada", "email": "a@x"}))],
        None,
    );
    let message = s.feed.txn(
        vec![insert("messages", 10, json!({"user_id": 1, "text": "hi"})).refs("users", 1)],
        None,
    );
    let mut sub = subscriber(&s, "causal");
    let log = recorder(&mut sub);
    let worker = Worker::start(sub);

    s.feed.publish(&[message]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        log.lock().unwrap().is_empty(),
        "the message ran before its user: {:?}",
        log.lock().unwrap()
    );

    s.feed.publish(&[user]).await;
    eventually(Duration::from_secs(20), "both applied", || async {
        log.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(
        *log.lock().unwrap(),
        ["users:Insert:1", "messages:Insert:10"]
    );
    let db = store(&s.url).await;
    assert_eq!(count(&db, "messages").await, 1);
    worker.stop().await;
    delete_queues(&s.app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn key_mode_applies_a_message_without_waiting_for_its_user() {
    let mut s = setup("key_fk").await;
    let _user = s.feed.txn(
        vec![insert("users", 1, json!({"name": "ada", "email": "a@x"}))],
        None,
    );
    let message = s.feed.txn(
        vec![insert("messages", 10, json!({"user_id": 1, "text": "hi"})).refs("users", 1)],
        None,
    );
    let mut sub = subscriber(&s, "key");
    let log = recorder(&mut sub);
    let worker = Worker::start(sub);
    s.feed.publish(&[message]).await;
    eventually(Duration::from_secs(20), "the message applied", || async {
        log.lock().unwrap().len() == 1
    })
    .await;
    let db = store(&s.url).await;
    assert_eq!(count(&db, "messages").await, 1);
    assert_eq!(
        count(&db, "users").await,
        0,
        "key mode does not wait for referenced rows"
    );
    worker.stop().await;
    delete_queues(&s.app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn key_mode_still_applies_writes_of_one_row_in_order() {
    let mut s = setup("key_row").await;
    let first = s.feed.txn(
        vec![insert("users", 1, json!({"name": "v1", "email": "a@x"}))],
        None,
    );
    let mut second_row = insert("users", 1, json!({"name": "v2", "email": "a@x"}));
    second_row.op = kausal::bus::Op::Update;
    let second = s.feed.txn(vec![second_row], None);
    let mut sub = subscriber(&s, "key");
    let log = recorder(&mut sub);
    let worker = Worker::start(sub);
    s.feed.publish(&[second]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        log.lock().unwrap().is_empty(),
        "the second write overtook the first"
    );
    s.feed.publish(&[first]).await;
    eventually(Duration::from_secs(20), "both applied", || async {
        log.lock().unwrap().len() == 2
    })
    .await;
    let db = store(&s.url).await;
    let name: String = sqlx::query("SELECT name FROM users WHERE id = 1")
        .fetch_one(&db)
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "v2");
    worker.stop().await;
    delete_queues(&s.app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn causal_mode_applies_an_independent_transaction_without_waiting_for_earlier_ones() {
    let mut s = setup("causal_indep").await;
    let _first = s.feed.txn(
        vec![insert("users", 1, json!({"name": "ada", "email": "a@x"}))],
        None,
    );
    let second = s.feed.txn(
        vec![insert("users", 2, json!({"name": "bob", "email": "b@x"}))],
        None,
    );
    let mut sub = subscriber(&s, "causal");
    let log = recorder(&mut sub);
    let worker = Worker::start(sub);
    s.feed.publish(&[second]).await;
    eventually(
        Duration::from_secs(20),
        "user 2 applied before 1 arrives",
        || async { log.lock().unwrap().len() == 1 },
    )
    .await;
    worker.stop().await;
    delete_queues(&s.app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn serial_mode_waits_for_every_earlier_transaction() {
    let mut s = setup("serial").await;
    let first = s.feed.txn(
        vec![insert("users", 1, json!({"name": "ada", "email": "a@x"}))],
        None,
    );
    let second = s.feed.txn(
        vec![insert("users", 2, json!({"name": "bob", "email": "b@x"}))],
        None,
    );
    let third = s.feed.txn(
        vec![insert("users", 3, json!({"name": "cy", "email": "c@x"}))],
        None,
    );
    let mut sub = subscriber(&s, "serial");
    let log = recorder(&mut sub);
    let worker = Worker::start(sub);
    s.feed.publish(&[third]).await;
    s.feed.publish(&[second]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        log.lock().unwrap().is_empty(),
        "serial mode ran ahead: {:?}",
        log.lock().unwrap()
    );
    s.feed.publish(&[first]).await;
    eventually(Duration::from_secs(20), "all applied", || async {
        log.lock().unwrap().len() == 3
    })
    .await;
    assert_eq!(
        *log.lock().unwrap(),
        ["users:Insert:1", "users:Insert:2", "users:Insert:3"]
    );
    worker.stop().await;
    delete_queues(&s.app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn same_session_transactions_apply_in_commit_order_across_tables() {
    // "Unfriend, then post": two unrelated tables, one session.
    let mut s = setup("session").await;
    let unfriend = s.feed.txn(vec![delete("users", 7)], Some("alice"));
    let post = s.feed.txn(
        vec![insert(
            "messages",
            1,
            json!({"user_id": 3, "text": "photo"}),
        )],
        Some("alice"),
    );
    let mut sub = subscriber(&s, "causal");
    let log = recorder(&mut sub);
    let worker = Worker::start(sub);
    s.feed.publish(&[post]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        log.lock().unwrap().is_empty(),
        "the post overtook the unfriend of its session"
    );
    s.feed.publish(&[unfriend]).await;
    eventually(Duration::from_secs(20), "both applied", || async {
        log.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(
        *log.lock().unwrap(),
        ["users:Delete:7", "messages:Insert:1"]
    );
    worker.stop().await;
    delete_queues(&s.app).await;

    // Without the session tag the post does not wait.
    let mut s = setup("nosession").await;
    let _unfriend = s.feed.txn(vec![delete("users", 7)], None);
    let post = s.feed.txn(
        vec![insert(
            "messages",
            1,
            json!({"user_id": 3, "text": "photo"}),
        )],
        None,
    );
    let mut sub = subscriber(&s, "causal");
    let log = recorder(&mut sub);
    let worker = Worker::start(sub);
    s.feed.publish(&[post]).await;
    eventually(Duration::from_secs(20), "untagged post applied", || async {
        log.lock().unwrap().len() == 1
    })
    .await;
    worker.stop().await;
    delete_queues(&s.app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_is_not_deleted_before_a_child_that_referenced_it_is_applied() {
    // Write after read: 1 inserts the user, 2 a message referencing it, 3 deletes the user.
    let mut s = setup("war").await;
    let user = s.feed.txn(
        vec![insert("users", 1, json!({"name": "ada", "email": "a@x"}))],
        None,
    );
    let message = s.feed.txn(
        vec![insert("messages", 10, json!({"user_id": 1, "text": "hi"})).refs("users", 1)],
        None,
    );
    let gone = s.feed.txn(vec![delete("users", 1)], None);
    let mut sub = subscriber(&s, "causal");
    let log = recorder(&mut sub);
    let worker = Worker::start(sub);
    s.feed.publish(&[user, gone]).await;
    eventually(Duration::from_secs(20), "the user applied", || async {
        !log.lock().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        *log.lock().unwrap(),
        ["users:Insert:1"],
        "the delete overtook the message that read the user"
    );
    s.feed.publish(&[message]).await;
    eventually(Duration::from_secs(20), "all applied", || async {
        log.lock().unwrap().len() == 3
    })
    .await;
    assert_eq!(
        *log.lock().unwrap(),
        ["users:Insert:1", "messages:Insert:10", "users:Delete:1"]
    );
    worker.stop().await;
    delete_queues(&s.app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redelivered_and_replayed_envelopes_change_nothing_and_fire_callbacks_once() {
    let mut s = setup("dups").await;
    let mut txns = Vec::new();
    for i in 1..=20 {
        txns.push(s.feed.txn(
            vec![insert(
                "users",
                i,
                json!({"name": format!("u{i}"), "email": "e"}),
            )],
            Some("one"),
        ));
    }
    let mut sub = subscriber(&s, "causal");
    let log = recorder(&mut sub);
    let worker = Worker::start(sub);
    s.feed.publish(&txns).await;
    eventually(Duration::from_secs(20), "all applied", || async {
        log.lock().unwrap().len() == 20
    })
    .await;
    // A publisher replay regroups envelopes differently; duplicates within one message too.
    for t in &txns {
        s.feed.publish(std::slice::from_ref(t)).await;
    }
    s.feed
        .publish(&[txns[3].clone(), txns[3].clone(), txns[19].clone()])
        .await;
    // A new transaction after the duplicates shows when they have all been handled.
    let last = s.feed.txn(
        vec![insert("users", 99, json!({"name": "last", "email": "e"}))],
        Some("one"),
    );
    s.feed.publish(&[last]).await;
    eventually(Duration::from_secs(20), "the last applied", || async {
        log.lock().unwrap().len() >= 21
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        log.lock().unwrap().len(),
        21,
        "a callback fired twice: {:?}",
        log.lock().unwrap()
    );
    let db = store(&s.url).await;
    assert_eq!(count(&db, "users").await, 21);
    worker.stop().await;
    delete_queues(&s.app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_window_full_of_waiting_transactions_is_moved_aside_so_the_missing_one_arrives() {
    // Transactions of one session. After the first is applied, 4 and 3 arrive before
    // 2 and fill a window of two messages: they wait for 2, which waits behind them.
    let s = setup("handback").await;
    let mut feed = s.feed;
    let t: Vec<_> = (1..=4)
        .map(|i| {
            feed.txn(
                vec![insert("users", i, json!({"name": "u", "email": "e"}))],
                Some("chain"),
            )
        })
        .collect();
    let text = sub_config_text(&s.app, &s.url, &tables(&feed.namespace))
        .replace("prefetch = 64", "prefetch = 2");
    let mut sub = Subscriber::new(toml::from_str(&text).unwrap());
    let log = recorder(&mut sub);
    let worker = Worker::start(sub);
    feed.publish(&t[0..1]).await;
    eventually(Duration::from_secs(20), "the first applied", || async {
        log.lock().unwrap().len() == 1
    })
    .await;
    feed.publish(&t[3..4]).await;
    feed.publish(&t[2..3]).await;
    feed.publish(&t[1..2]).await;
    eventually(Duration::from_secs(30), "all applied", || async {
        log.lock().unwrap().len() == 4
    })
    .await;
    assert_eq!(
        *log.lock().unwrap(),
        [
            "users:Insert:1",
            "users:Insert:2",
            "users:Insert:3",
            "users:Insert:4"
        ]
    );
    worker.stop().await;
    delete_queues(&s.app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_whose_queue_came_late_joins_at_the_first_transaction_it_receives() {
    common::logs();
    let app = unique("join");
    let mut feed = Feed::new(&app).await;
    // Three transactions of one session published before the app's queue exists: lost
    // to it. The next ones depend on them.
    let early: Vec<_> = (1..=3)
        .map(|i| {
            feed.txn(
                vec![insert("users", i, json!({"name": "early", "email": "e"}))],
                Some("s"),
            )
        })
        .collect();
    feed.publish(&early).await;
    let url = sqlite_url(&app);
    declare_queue(&app, &app).await;
    let late: Vec<_> = (4..=5)
        .map(|i| {
            feed.txn(
                vec![insert("users", i, json!({"name": "late", "email": "e"}))],
                Some("s"),
            )
        })
        .collect();
    feed.publish(&late).await;
    let mut sub = Subscriber::new(sub_config(&app, &url, &tables(&app)));
    let log = recorder(&mut sub);
    let worker = Worker::start(sub);
    eventually(
        Duration::from_secs(20),
        "the late transactions applied",
        || async { log.lock().unwrap().len() == 2 },
    )
    .await;
    assert_eq!(*log.lock().unwrap(), ["users:Insert:4", "users:Insert:5"]);
    worker.stop().await;
    // A restart keeps the join point (it is in the store), and the stream goes on.
    let more = feed.txn(
        vec![insert("users", 6, json!({"name": "later", "email": "e"}))],
        Some("s"),
    );
    feed.publish(&[more]).await;
    let mut sub = Subscriber::new(sub_config(&app, &url, &tables(&app)));
    let log = recorder(&mut sub);
    let worker = Worker::start(sub);
    eventually(
        Duration::from_secs(20),
        "the next transaction applied",
        || async { log.lock().unwrap().len() == 1 },
    )
    .await;
    worker.stop().await;
    delete_queues(&app).await;
}
