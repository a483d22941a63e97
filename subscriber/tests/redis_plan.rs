//! The chain planned in Redis (one Lua script per stream) must be the chain planned in
//! this process, for random histories, random applied states (complete, or seeded from
//! a store with counters unknown), every ordering mode and chain limit. Runs against
//! the real Redis at 127.0.0.1:6379, under its own key prefix.

use kausal_bus::{Dep, DepKind};
use kausal_subscriber::coord::memory::MemoryCoord;
use kausal_subscriber::coord::redis::RedisCoord;
use kausal_subscriber::coord::{Check, Query};
use kausal_subscriber::txn::TxId;
use kausal_subscriber::Mode;
use std::collections::HashMap;
use std::sync::Arc;

const REDIS: &str = "redis://127.0.0.1:6379";

/// xorshift: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The publisher's dependencies for a random history over a few keys: one operation
/// per key per transaction, reads carry the version of the last write.
fn history(rng: &mut Rng, txns: usize) -> Vec<Vec<Dep>> {
    let mut rw: HashMap<u32, u64> = HashMap::new();
    let mut w: HashMap<u32, u64> = HashMap::new();
    let mut last: HashMap<u32, u64> = HashMap::new();
    let mut last_write: HashMap<u32, u64> = HashMap::new();
    let mut out = Vec::new();
    for i in 0..txns {
        let seq = i as u64 + 1;
        let mut deps: Vec<Dep> = Vec::new();
        for _ in 0..1 + rng.below(3) {
            let k = rng.below(6) as u32;
            if deps.iter().any(|d| d.k == k) {
                continue;
            }
            let c = rw.entry(k).or_insert(0);
            *c += 1;
            deps.push(if rng.below(2) == 0 {
                Dep {
                    k,
                    v: *c,
                    kind: DepKind::Write,
                    after: last.get(&k).copied().unwrap_or(0),
                }
            } else {
                Dep {
                    k,
                    v: w.get(&k).copied().unwrap_or(0),
                    kind: DepKind::Read,
                    after: last_write.get(&k).copied().unwrap_or(0),
                }
            });
        }
        for d in &deps {
            last.insert(d.k, seq);
            if d.kind == DepKind::Write {
                w.insert(d.k, d.v);
                last_write.insert(d.k, seq);
            }
        }
        out.push(deps);
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chain_planned_in_redis_equals_the_chain_planned_in_process() {
    let prefix = format!("plantest{}", std::process::id());
    let redis = RedisCoord::connect(REDIS, &prefix, "app").await.unwrap();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut chained = 0;
    for case in 0..120u64 {
        let ns = format!("ns{case}");
        let len = 20 + rng.below(40) as usize;
        let deps = history(&mut rng, len);
        let memory = MemoryCoord::new();
        // Half the cases start as a store that had applied a prefix before (counters
        // unknown), the others from a fresh generation (every counter known, 0).
        let (through, extra): (u64, Vec<u64>) = if case % 2 == 0 {
            (0, Vec::new())
        } else {
            let t = rng.below(deps.len() as u64 / 2);
            (t, vec![t + 2 + rng.below(3)])
        };
        memory.init(&ns, 1, through, &extra);
        let epoch = redis.epoch().await.unwrap();
        redis.init(&epoch, &ns, 1, through, &extra).await.unwrap();
        // Apply a random set of ready transactions to both, as workers would.
        let ids: Vec<TxId> = (1..=deps.len() as u64)
            .map(|seq| TxId {
                namespace: Arc::from(ns.as_str()),
                generation: 1,
                seq,
            })
            .collect();
        for _ in 0..rng.below(deps.len() as u64) {
            let i = rng.below(deps.len() as u64) as usize;
            let q = [Query {
                id: &ids[i],
                deps: &deps[i],
                table_keys: &[],
            }];
            if memory.check(Mode::Causal, &q) == vec![Check::Ready] {
                memory.applied(&[(&ids[i], Some(&deps[i]))]);
                redis.applied(&[(&ids[i], Some(&deps[i]))]).await.unwrap();
            }
        }
        let table_keys = [rng.below(6) as u32];
        let queries: Vec<Query<'_>> = ids
            .iter()
            .zip(&deps)
            .filter(|_| rng.below(4) != 0)
            .map(|(id, d)| Query {
                id,
                deps: d,
                table_keys: &table_keys,
            })
            .collect();
        for mode in [Mode::Causal, Mode::Key, Mode::Serial] {
            for max in [2, 1_000] {
                let here = memory.plan(mode, &queries, max);
                let there = redis.plan(mode, &queries, max).await.unwrap();
                assert_eq!(here, there, "case {case}, {mode:?}, max {max}");
                chained += here.0.len();
            }
        }
    }
    assert!(chained > 1_000, "the cases chain something ({chained})");
    let client = redis::Client::open(REDIS).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
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
}

#[tokio::test]
async fn a_redis_that_forgot_its_scripts_is_given_them_again() {
    // A Redis of this test's own: `SCRIPT FLUSH` empties the cache of the whole server,
    // which the other tests of this binary use at the same time.
    let server = OwnRedis::start();
    let url = server.url();
    let coord = RedisCoord::connect(&url, "kausal_test_scripts", "app")
        .await
        .unwrap();
    let epoch = coord.epoch().await.unwrap();
    coord.init(&epoch, "shop", 1, 0, &[]).await.unwrap();
    let id = |seq| TxId {
        namespace: Arc::from("shop"),
        generation: 1,
        seq,
    };
    let write = |v, after| Dep {
        k: 7,
        v,
        kind: DepKind::Write,
        after,
    };
    // What a Redis restart does to the script cache (its keys we keep here).
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (first, second) = (id(1), id(2));
    let (d1, d2) = ([write(1, 0)], [write(2, 1)]);
    let queries = [
        Query {
            id: &first,
            deps: &d1,
            table_keys: &[],
        },
        Query {
            id: &second,
            deps: &d2,
            table_keys: &[],
        },
    ];
    let checks = coord.check(Mode::Causal, &queries).await.unwrap();
    assert_eq!(checks[0], Check::Ready);
    assert!(matches!(checks[1], Check::Waiting(_)));
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(coord
        .applied(&[(&first, Some(&d1))])
        .await
        .unwrap()
        .is_empty());
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let (chain, _) = coord.plan(Mode::Causal, &queries[1..], 8).await.unwrap();
    assert_eq!(
        chain,
        vec![0],
        "the second write follows the first, applied"
    );
}

/// A `redis-server` on a free port, killed when dropped; it keeps nothing on disk.
struct OwnRedis {
    port: u16,
    child: std::process::Child,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (run scripts/setup.sh)");
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return OwnRedis { port, child };
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("redis-server did not listen on {port}");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
