//! Postgres → publisher → RabbitMQ → subscriber → Redis cache: the parent/child workload
//! with sessions, updates and deletes; the cache must end equal to the source, and a
//! reader polling Redis meanwhile must never see a message whose user is missing.

mod common;

use common::e2e::*;
use common::sub::*;
use common::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Every row of `<prefix>:<table>:*` as `(id, fields)`.
async fn cached(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
    table: &str,
) -> BTreeMap<i64, BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:{table}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        for key in keys {
            let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
                .arg(&key)
                .query_async(conn)
                .await
                .unwrap();
            let id = key.rsplit(':').next().unwrap().parse().unwrap();
            if !fields.is_empty() {
                out.insert(id, fields);
            }
        }
        if next == 0 {
            return out;
        }
        cursor = next;
    }
}

/// The cache's rows, formatted like `workload::source_rows`.
async fn cache_rows(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> (Vec<String>, Vec<String>) {
    let users = cached(conn, prefix, "users")
        .await
        .values()
        .map(|f| format!("{}|{}|{}", f["id"], f["name"], f["email"]))
        .collect();
    let messages = cached(conn, prefix, "messages")
        .await
        .values()
        .map(|f| format!("{}|{}|{}|{}", f["id"], f["user_id"], f["text"], f["seen"]))
        .collect();
    (users, messages)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_cache_fed_in_causal_order_ends_equal_to_the_source() {
    let e = e2e("rcache").await;
    let prefix = e.ns.clone();
    // The SQLite store only keeps the bookkeeping: tables are `mode = "none"`.
    let tables = format!(
        "[[table]]\nnamespace = \"{0}\"\nname = \"users\"\nmode = \"none\"\n\
         [[table]]\nnamespace = \"{0}\"\nname = \"messages\"\nmode = \"none\"\n\
         [[sink]]\nkind = \"redis\"\nurl = \"{REDIS}\"\nprefix = \"{prefix}\"\n",
        e.ns
    );
    let text = sub_config_text(&e.ns, &sqlite_url(&e.ns), &tables);
    let mut worker = Process::subscriber(&write_config(&text, &format!("{}.sub", e.ns)));

    // A reader polls the cache during the workload: a message present before and after
    // its user was found missing would be a causal violation.
    let client = redis::Client::open(REDIS).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let (violations, checked) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let reader = {
        let (done, violations, checked) = (done.clone(), violations.clone(), checked.clone());
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        let prefix = prefix.clone();
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                for (id, m) in cached(&mut conn, &prefix, "messages").await {
                    let user = format!("{prefix}:users:{}", m["user_id"]);
                    let user_there: bool = redis::cmd("EXISTS")
                        .arg(&user)
                        .query_async(&mut conn)
                        .await
                        .unwrap();
                    if !user_there {
                        let still: bool = redis::cmd("EXISTS")
                            .arg(format!("{prefix}:messages:{id}"))
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        if still {
                            violations.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    checked.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    workload::run(&e.db.url, 5_000, 4, 23).await;
    let source = workload::source_rows(&e.db.url).await;
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let got = cache_rows(&mut conn, &prefix).await;
        if got == source {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cache differs from the source: users {} vs {}, messages {} vs {}",
            got.0.len(),
            source.0.len(),
            got.1.len(),
            source.1.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    done.store(true, Ordering::Relaxed);
    reader.await.unwrap();
    assert!(
        checked.load(Ordering::Relaxed) > 0,
        "the reader checked nothing"
    );
    assert_eq!(
        violations.load(Ordering::Relaxed),
        0,
        "a message was cached while its user was not"
    );
    worker.kill();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: () = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    e.finish().await;
}
