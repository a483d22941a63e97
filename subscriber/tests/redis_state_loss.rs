//! Gate state in Redis that loses writes: a seeding must never install a store read
//! older than state Redis lost meanwhile, and state that missed applies (a failover to
//! a replica that lagged, an older seeding) is healed by merging the store's record.
//! Against the real Redis at 127.0.0.1:6379, each test under a key prefix of its own.

use kausal_bus::{Dep, DepKind};
use kausal_subscriber::coord::redis::RedisCoord;
use kausal_subscriber::coord::{Check, Coordinator, Query, Seeded};
use kausal_subscriber::txn::TxId;
use kausal_subscriber::Mode;
use std::sync::Arc;

const REDIS: &str = "redis://127.0.0.1:6379";

async fn coordinator(prefix: &str) -> Coordinator {
    let prefix = format!("{prefix}_{}", std::process::id());
    forget(&prefix).await;
    Coordinator::Redis(RedisCoord::connect(REDIS, &prefix, "app").await.unwrap())
}

/// What a Redis restarted empty, or an operator's `DEL`, does to the app: its keys gone.
async fn forget(prefix: &str) {
    let client = redis::Client::open(REDIS).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    for key in keys {
        let _: i64 = redis::cmd("DEL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

fn id(seq: u64) -> TxId {
    TxId {
        namespace: Arc::from("shop"),
        generation: 1,
        seq,
    }
}

/// Transaction `seq` writes key 7 at `version`, after transaction `after` wrote it.
fn write(version: u64, after: u64) -> [Dep; 1] {
    [Dep {
        k: 7,
        v: version,
        kind: DepKind::Write,
        after,
    }]
}

async fn check(coord: &Coordinator, seq: u64, deps: &[Dep]) -> Check {
    let tx = id(seq);
    let query = Query {
        id: &tx,
        deps,
        table_keys: &[],
    };
    coord.check(Mode::Causal, &[query]).await.unwrap()[0]
}

#[tokio::test]
async fn a_store_read_older_than_a_redis_restart_is_not_seeded() {
    let prefix = format!("kausal_test_stale_{}", std::process::id());
    let coord = coordinator("kausal_test_stale").await;
    // A worker takes the epoch and reads the store: transactions 1 and 2 applied.
    let epoch = coord.epoch().await.unwrap();
    let (through, applied) = (2, Vec::new());
    // Meanwhile another worker seeds, applies transaction 3 (recorded in Redis, its
    // delivery acked), and Redis restarts empty.
    let other = coord.epoch().await.unwrap();
    coord.init(&other, "shop", 1, 2, &[]).await.unwrap();
    coord
        .applied(&[(&id(3), Some(&write(3, 2)))])
        .await
        .unwrap();
    forget(&prefix).await;
    // The first worker's read does not show transaction 3: seeding it would make
    // transaction 4 wait for a transaction that never comes again.
    let stale = coord
        .init(&epoch, "shop", 1, through, &applied)
        .await
        .unwrap();
    assert_eq!(
        stale,
        Seeded::Stale,
        "a read from before the restart is refused"
    );
    assert_eq!(coord.watermark("shop", 1).await.unwrap(), None);
    // Read again under the new epoch: the store shows transaction 3.
    let epoch = coord.epoch().await.unwrap();
    let seeded = coord.init(&epoch, "shop", 1, 3, &[]).await.unwrap();
    assert_eq!(seeded, Seeded::Done);
    assert_eq!(check(&coord, 4, &write(4, 3)).await, Check::Ready);
    forget(&prefix).await;
}

#[tokio::test]
async fn state_that_missed_applies_is_healed_from_the_store() {
    let prefix = format!("kausal_test_heal_{}", std::process::id());
    let coord = coordinator("kausal_test_heal").await;
    // Nothing to heal before the state exists: merging creates nothing.
    assert!(!coord.merge("shop", 1, 5, &[]).await.unwrap());
    assert_eq!(coord.watermark("shop", 1).await.unwrap(), None);
    let epoch = coord.epoch().await.unwrap();
    coord.init(&epoch, "shop", 1, 2, &[]).await.unwrap();
    // The store applied 3 and 5, but Redis lost the record (a failover to a replica
    // that had not received it): 4 waits for 3, 6 for 5.
    assert!(matches!(
        check(&coord, 4, &write(4, 3)).await,
        Check::Waiting(_)
    ));
    assert!(coord.merge("shop", 1, 3, &[5]).await.unwrap());
    assert_eq!(coord.watermark("shop", 1).await.unwrap(), Some(3));
    assert_eq!(check(&coord, 4, &write(4, 3)).await, Check::Ready);
    // 5 is applied too: once 4 is, the watermark passes it.
    coord
        .applied(&[(&id(4), Some(&write(4, 3)))])
        .await
        .unwrap();
    assert_eq!(coord.watermark("shop", 1).await.unwrap(), Some(5));
    assert_eq!(check(&coord, 6, &write(6, 5)).await, Check::Ready);
    // The store's record merged again changes nothing.
    coord.merge("shop", 1, 3, &[5]).await.unwrap();
    assert_eq!(coord.watermark("shop", 1).await.unwrap(), Some(5));
    forget(&prefix).await;
}
