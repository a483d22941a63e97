//! Redis behind Sentinel (a primary, a replica, three sentinels, started by the test):
//! the primary is killed mid-stream, the sentinels promote the replica, and the worker
//! processes follow the new primary by themselves (`coordination.url` names the
//! sentinels). The store must end equal to the source, nothing dead-lettered — and no
//! message committed before its user: the store's own foreign key checks that at each
//! commit (deferred), so a causal violation would fail the commit.
//!
//! A failover to a replica that lagged loses the coordinator's newest marks but not the
//! rest; that partial loss is rehearsed on the shared Redis by rewinding the app's state
//! as such a replica would hold it.

mod common;

use common::e2e::*;
use common::redis_sentinel::Sentinel;
use common::sub::*;
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_redis_primary_mid_stream_the_workers_follow_the_new_one() {
    let mut sentinel = Sentinel::start();
    let e = e2e("sentinel").await;
    let store = e.store().await;
    let (workers, writing) = fk_workers_under_load(&e, &store, &sentinel.url(), 8_000, 91).await;
    let before = sentinel.master_port();
    sentinel.kill_primary();
    eventually(Duration::from_secs(60), "a new primary", || async {
        sentinel.master_port().is_some_and(|p| Some(p) != before)
    })
    .await;
    assert_eq!(sentinel.master_port(), Some(sentinel.replica_port));
    ends_equal_with_no_dead_letter(e, store, workers, writing, Duration::from_secs(240)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_forgetting_its_newest_marks_is_healed_from_the_store() {
    let e = e2e("rewind").await;
    let store = e.store().await;
    let (workers, writing) = fk_workers_under_load(&e, &store, REDIS, 4_000, 93).await;
    // What a replica 100 transactions behind holds: the watermark lower, the marks above
    // it and the counters gone. Those transactions are in the store and their messages
    // acked: nothing will record them again, and what depends on them waits on them.
    let client = redis::Client::open(REDIS).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let watermarks: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}:*:w", e.ns))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!watermarks.is_empty(), "the app's state is in Redis");
    for key in watermarks {
        let stream = key.trim_end_matches(":w");
        let w: u64 = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg(w.saturating_sub(100))
            .ignore()
            .cmd("DEL")
            .arg(format!("{stream}:a"))
            .arg(format!("{stream}:c"))
            .ignore()
            .cmd("SET")
            .arg(format!("{stream}:i"))
            .arg("0")
            .ignore()
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    ends_equal_with_no_dead_letter(e, store, workers, writing, Duration::from_secs(120)).await;
}

/// Two worker processes on the deferred-FK map store of `e`, coordinated through the
/// Redis at `redis`, and a workload of `txns` transactions writing meanwhile; returns
/// once the first rows are applied.
async fn fk_workers_under_load(
    e: &E2e,
    store: &sqlx::AnyPool,
    redis: &str,
    txns: u64,
    seed: u64,
) -> ([Process; 2], tokio::task::JoinHandle<u64>) {
    let tables = e.map_store(store, FK_STORE_SCHEMA).await;
    let text = sub_config_text(
        &e.ns,
        &e.store_url,
        &format!(
            "appliers = 2\n[coordination]\nkind = \"redis\"\nurl = \"{redis}\"\nprefix = \"{}\"\n{tables}",
            e.ns
        ),
    );
    let config = write_config(&text, &format!("{}.sub", e.ns));
    let workers = [Process::subscriber(&config), Process::subscriber(&config)];
    let url = e.db.url.clone();
    let writing = tokio::spawn(async move { workload::run(&url, txns, 2, seed).await });
    eventually(
        Duration::from_secs(120),
        "the first rows applied",
        || async {
            sqlx::query_as::<_, (i64,)>("SELECT COUNT(*) FROM users")
                .fetch_one(store)
                .await
                .is_ok_and(|(n,)| n > 200)
        },
    )
    .await;
    (workers, writing)
}

/// After the workload: the store equals the source, no worker stopped, nothing was
/// dead-lettered (a commit failing its foreign key would be); then everything stops.
async fn ends_equal_with_no_dead_letter(
    e: E2e,
    store: sqlx::AnyPool,
    mut workers: [Process; 2],
    writing: tokio::task::JoinHandle<u64>,
    timeout: Duration,
) {
    writing.await.unwrap();
    workload::converge(&e.db.url, &store, timeout).await;
    for w in &mut workers {
        assert!(w.exited().is_none(), "a worker stopped");
    }
    let dead = kausal::bus::amqp::queue_depth(AMQP, &format!("kausal.{}.dlq", e.ns))
        .await
        .unwrap();
    assert_eq!(dead.map(|d| d.0), Some(0), "dead letters: a commit failed");
    for w in &mut workers {
        w.terminate();
    }
    store.close().await;
    e.finish().await;
}
