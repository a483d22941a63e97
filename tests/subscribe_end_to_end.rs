//! Postgres → publisher → RabbitMQ → subscriber workers → store, with a seeded random
//! workload from concurrent writers; the store must end equal to the source, row by row,
//! and callbacks must see the world in causal order.

mod common;

use common::e2e::*;
use common::sub::*;
use common::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TXNS: u64 = 20_000;

#[tokio::test(flavor = "multi_thread")]
async fn four_worker_processes_never_call_back_a_message_before_its_user() {
    let e = e2e("fanout").await;
    let config = e.redis_config("");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut workers: Vec<Process> = (0..4)
        .map(|_| Process::example("observer", &config, lines.clone()))
        .collect();
    let inserts = workload::run(&e.db.url, 4_000, 4, 7).await;
    let store = e.store().await;
    workload::converge(&e.db.url, &store, Duration::from_secs(240)).await;
    observer_saw_every_message_after_its_user(&lines, inserts).await;
    for w in &mut workers {
        w.kill();
    }
    e.finish().await;
}

/// One worker chaining dependent transactions into one store transaction although it has
/// callbacks (`callbacks.chain`): the observer reads users through its event's store
/// transaction, so a message chained after its user's insert still finds the user.
#[tokio::test(flavor = "multi_thread")]
async fn chained_callbacks_reading_through_the_event_never_miss_the_user() {
    let e = e2e("chaincb").await;
    let text = sub_config_text(
        &e.ns,
        &e.store_url,
        &format!("[callbacks]\nchain = true\n{}", workload::subscribed(&e.ns)),
    );
    let config = write_config(&text, &format!("{}.sub", e.ns));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut worker = Process::example("observer", &config, lines.clone());
    let inserts = workload::run(&e.db.url, 4_000, 4, 17).await;
    let store = e.store().await;
    workload::converge(&e.db.url, &store, Duration::from_secs(240)).await;
    observer_saw_every_message_after_its_user(&lines, inserts).await;
    worker.kill();
    e.finish().await;
}

/// Subscribers read both wire formats: a publisher told to write format 1 (for
/// subscribers built before format 2) feeds today's worker to the same end as the
/// default format 2 does in the other tests.
#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_writing_the_old_wire_format_feeds_a_subscriber_to_the_same_end() {
    let e = e2e_with("format1", "[tuning]\nwire_format = 1\n").await;
    let mut tap = Tap::new(&e.ns).await;
    let text = sub_config_text(&e.ns, &e.store_url, &workload::subscribed(&e.ns));
    let config = write_config(&text, &format!("{}.sub", e.ns));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut worker = Process::example("observer", &config, lines.clone());
    let inserts = workload::run(&e.db.url, 2_000, 4, 29).await;
    let store = e.store().await;
    workload::converge(&e.db.url, &store, Duration::from_secs(240)).await;
    observer_saw_every_message_after_its_user(&lines, inserts).await;
    tap.until(Duration::from_secs(30), |r| !r.is_empty()).await;
    assert_eq!(
        tap.formats,
        std::collections::BTreeSet::from([1]),
        "the publisher wrote format 1 only"
    );
    worker.kill();
    tap.delete().await;
    e.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn random_workload_of_20000_transactions_ends_equal_to_the_source() {
    let e = e2e("random").await;
    // One worker process (the default, in-memory coordination) into SQLite.
    let sqlite = sqlite_url(&e.ns);
    let text = sub_config_text(&e.ns, &sqlite, &workload::subscribed(&e.ns));
    let mut worker = Process::subscriber(&write_config(&text, &format!("{}.sub", e.ns)));
    workload::run(&e.db.url, TXNS, 4, 11).await;
    sqlx::any::install_default_drivers();
    let store = sqlx::AnyPool::connect(&sqlite).await.unwrap();
    workload::converge(&e.db.url, &store, Duration::from_secs(300)).await;
    worker.kill();
    e.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn random_workload_ends_equal_to_the_source_with_workers_killed_at_random() {
    let e = e2e("kill9").await;
    let config = e.redis_config("");
    let mut workers: Vec<Process> = (0..3).map(|_| Process::subscriber(&config)).collect();
    let url = e.db.url.clone();
    let writing = tokio::spawn(async move { workload::run(&url, TXNS, 4, 13).await });
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut kills = 0;
    while !writing.is_finished() {
        tokio::time::sleep(Duration::from_millis(1_500 + rng % 2_000)).await;
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let victim = (rng % 3) as usize;
        workers[victim].kill();
        kills += 1;
        workers[victim] = Process::subscriber(&config);
    }
    writing.await.unwrap();
    assert!(
        kills >= 3,
        "the workload ended before enough kills ({kills})"
    );
    let store = e.store().await;
    workload::converge(&e.db.url, &store, Duration::from_secs(300)).await;
    for w in &mut workers {
        w.kill();
    }
    e.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn random_workload_ends_equal_to_the_source_after_redis_lost_its_state() {
    let e = e2e("flush").await;
    let config = e.redis_config("");
    let mut workers: Vec<Process> = (0..2).map(|_| Process::subscriber(&config)).collect();
    let url = e.db.url.clone();
    let writing = tokio::spawn(async move { workload::run(&url, TXNS, 4, 17).await });
    // Twice during the run, every key of this app disappears from Redis (what a Redis
    // restart does to it; other tests share the server, so not FLUSHALL).
    let client = redis::Client::open(REDIS).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        // The workers keep their state under the app's prefix once they apply (a loaded
        // machine may take a while to start them).
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let keys = loop {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}:*", e.ns))
                .query_async(&mut conn)
                .await
                .unwrap();
            if !keys.is_empty() {
                break keys;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the workers kept no state under the app's prefix"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    writing.await.unwrap();
    let store = e.store().await;
    workload::converge(&e.db.url, &store, Duration::from_secs(300)).await;
    for w in &mut workers {
        w.kill();
    }
    e.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_split_across_worker_processes_is_applied_whole_and_in_order() {
    // Parts of 100 changes: a 5,000-row transaction becomes 50 envelopes, spread by the
    // broker over three worker processes.
    let e = e2e_with(
        "split",
        "[tuning]\nmax_part_changes = 100\nmax_batch_envelopes = 4",
    )
    .await;
    let config = e.redis_config("");
    let mut workers: Vec<Process> = (0..3).map(|_| Process::subscriber(&config)).collect();
    let c = connect(&e.db.url).await;
    c.batch_execute(
        "BEGIN;
         INSERT INTO users SELECT g, 'bulk' || g, g || '@example.com' FROM generate_series(1, 5000) g;
         COMMIT;
         INSERT INTO messages (id, user_id, text) VALUES (1, 4999, 'after the bulk insert');
         BEGIN;
         UPDATE users SET name = name || '!' WHERE id % 2 = 0;
         DELETE FROM users WHERE id % 7 = 0 AND id <> 4999;
         COMMIT;",
    )
    .await
    .unwrap();
    let store = e.store().await;
    workload::converge(&e.db.url, &store, Duration::from_secs(180)).await;
    // Staged parts are cleaned up once applied.
    let staged: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM kausal_parts")
        .fetch_one(&store)
        .await
        .unwrap();
    assert_eq!(staged, 0, "staged parts left behind");
    for w in &mut workers {
        w.kill();
    }
    e.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn random_workload_into_a_mariadb_store_ends_equal_to_the_source() {
    let e = e2e("maria").await;
    sqlx::any::install_default_drivers();
    let admin = sqlx::AnyPool::connect("mysql://kausal:kausal@127.0.0.1:3306/mysql")
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {}", e.ns)))
        .execute(&admin)
        .await
        .unwrap();
    let url = format!("mysql://kausal:kausal@127.0.0.1:3306/{}", e.ns);
    let text = sub_config_text(&e.ns, &url, &workload::subscribed(&e.ns));
    let mut worker = Process::subscriber(&write_config(&text, &format!("{}.sub", e.ns)));
    workload::run(&e.db.url, 5_000, 4, 31).await;
    let store = sqlx::AnyPool::connect(&url).await.unwrap();
    workload::converge(&e.db.url, &store, Duration::from_secs(240)).await;
    worker.kill();
    store.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {}", e.ns)))
        .execute(&admin)
        .await
        .unwrap();
    e.finish().await;
}
