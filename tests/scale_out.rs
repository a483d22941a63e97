//! Worker processes joining and leaving a partitioned app while a workload with foreign
//! keys and sessions runs: the store must end equal to the source, every callback's
//! effect must be committed once, and no child row may ever be committed before its
//! parent — checked by the store itself, through a real foreign key.

mod common;

use common::e2e::*;
use common::sub::*;
use common::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TXNS: u64 = 20_000;

#[tokio::test(flavor = "multi_thread")]
async fn workers_joining_leaving_and_redis_losing_its_state_keep_order_and_lose_nothing() {
    let e = e2e("scaleout").await;
    let store = e.store().await;
    // The observer records each callback's effect in `notified`.
    let schema = format!("{FK_STORE_SCHEMA}; CREATE TABLE notified (message_id bigint NOT NULL)");
    let tables = e.map_store(&store, &schema).await;
    let text = sub_config_text(
        &e.ns,
        &e.store_url,
        &format!(
            "appliers = 2\n[coordination]\nkind = \"redis\"\nurl = \"{REDIS}\"\nprefix = \"{}\"\n\
             [callbacks]\nchain = true\n{tables}",
            e.ns
        ),
    );
    let config = write_config(&text, &format!("{}.sub", e.ns));
    // The observer records each message it handles in `notified`, in the store
    // transaction; its stdout says whether the user was there.
    std::env::set_var("OBSERVER_RECORD", "1");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut workers: Vec<Process> = (0..3)
        .map(|_| Process::example("observer", &config, lines.clone()))
        .collect();
    let url = e.db.url.clone();
    let writing = tokio::spawn(async move { workload::run(&url, TXNS, 4, 23).await });
    tokio::time::sleep(Duration::from_secs(4)).await;
    // Every live worker consumes a share of the partitions, none twice.
    let spread = partitions_by_worker(&store).await;
    workers[0].kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    workers.push(Process::example("observer", &config, lines.clone()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let client = redis::Client::open(REDIS).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*", e.ns))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        !keys.is_empty(),
        "the workers keep their state under the app's prefix"
    );
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    let inserts = writing.await.unwrap();
    workload::converge(&e.db.url, &store, Duration::from_secs(300)).await;
    observer_saw_every_message_after_its_user_despite_a_kill(&lines, inserts).await;
    let (rows, distinct): (i64, i64) =
        sqlx::query_as("SELECT COUNT(*), COUNT(DISTINCT message_id) FROM notified")
            .fetch_one(&store)
            .await
            .unwrap();
    assert_eq!(rows, distinct, "a callback's effect was committed twice");
    assert_eq!(
        rows as u64, inserts,
        "one committed callback effect per message"
    );
    let dead = kausal::bus::amqp::peek_dead_letters(AMQP, &format!("kausal.{}.dlq", e.ns), 5)
        .await
        .unwrap();
    assert!(
        dead.is_empty(),
        "nothing was dead-lettered (a foreign key failure would be): {:?}",
        dead.iter().map(|d| d.reason.clone()).collect::<Vec<_>>()
    );
    assert!(spread.len() >= 2, "the partitions were spread: {spread:?}");
    for w in &mut workers {
        w.kill();
    }
    e.finish().await;
}

/// The partitions each live worker reported consuming (`kausal_workers`); asserts that
/// no partition is consumed twice and all 8 are consumed.
async fn partitions_by_worker(store: &sqlx::AnyPool) -> Vec<Vec<u32>> {
    let mut seen = Vec::new();
    for _ in 0..300 {
        let rows: Vec<(String,)> = sqlx::query_as("SELECT body FROM kausal_workers")
            .fetch_all(store)
            .await
            .unwrap_or_default();
        let shares: Vec<Vec<u32>> = rows
            .iter()
            .map(|(body,)| {
                let s: kausal::subscriber::status::WorkerStatus =
                    serde_json::from_str(body).unwrap();
                s.partitions
            })
            .collect();
        let mut all: Vec<u32> = shares.iter().flatten().copied().collect();
        all.sort();
        if shares.len() == 3 && all == (0..8).collect::<Vec<u32>>() {
            return shares;
        }
        seen = shares;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("three workers never reported disjoint shares of the 8 partitions; last seen {seen:?}");
}
