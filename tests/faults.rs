//! The fault-injection suite (issue 8): one seeded random workload (users and messages
//! with a foreign key, sessions, updates of the same rows, deletes) flows from Postgres
//! through a `kausal publish` process and RabbitMQ into `observer` worker processes that
//! share the queue through Redis and apply to a Postgres store; each test injects one
//! kind of fault while it runs, repeatedly, and then checks:
//! - the store equals the source row by row, and no published sequence number is
//!   missing from the store (envelopes lost);
//! - the observer's callback log: no message handled before its user (causal
//!   violations), no callback key seen twice (duplicates) except re-runs of a store
//!   transaction that a `kill -9` interrupted before its commit (by design: the
//!   idempotency key is there for this case);
//! - recovery: from the end of each fault until the store applied every transaction
//!   committed at the source before it (a marker transaction).
//!
//! Each test prints its row of the table in docs/faults.md (`--nocapture`). RabbitMQ's
//! outage runs in its own binary (tests/faults_broker.rs).

mod common;

use common::cluster::{Cluster, PrivateRedis};
use common::faults::{Dice, Pipeline, Servers};
use std::time::Instant;

const TXNS: u64 = 4_000;

#[tokio::test(flavor = "multi_thread")]
async fn publisher_killed_at_random_moments_loses_nothing_and_keeps_causal_order() {
    let mut p = Pipeline::start("fpub", Servers::shared(), 2, "").await;
    let writing = p.workload(TXNS, 101);
    let mut dice = Dice(0x9E37_79B9_7F4A_7C15);
    let mut kills = 0;
    while !writing.is_finished() || kills < 3 {
        dice.pause(300, 1_500).await;
        p.kill_and_restart_publisher().await;
        kills += 1;
        p.recovered(Instant::now()).await;
    }
    let inserts = writing.await.unwrap();
    let tally = p.finish("publisher kill -9", kills, inserts).await;
    tally.report();
    // No worker crashed: a replay reaching two workers at once must not run a
    // callback twice (the store claims a transaction before its callbacks run).
    assert_eq!(
        tally.duplicates + tally.reruns_after_crash,
        0,
        "duplicate callbacks"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_killed_at_random_lose_nothing_and_keep_causal_order() {
    let mut p = Pipeline::start("fwork", Servers::shared(), 3, "").await;
    let writing = p.workload(TXNS, 202);
    let mut dice = Dice(0x2545_F491_4F6C_DD1D);
    let (mut one, mut all) = (0, 0);
    while !writing.is_finished() || one < 3 || all < 2 {
        dice.pause(500, 1_500).await;
        // Every third fault takes all workers down at once: nothing is left running
        // that could have the state of the killed ones in memory.
        let victims: Vec<usize> = if (one + all) % 3 == 2 {
            all += 1;
            (0..3).collect()
        } else {
            one += 1;
            vec![dice.below(3) as usize]
        };
        for &v in &victims {
            p.kill_worker(v);
        }
        for &v in &victims {
            p.restart_worker(v, &[]);
        }
        p.recovered(Instant::now()).await;
    }
    let inserts = writing.await.unwrap();
    let tally = p
        .finish("worker kill -9 (one / all)", one + all, inserts)
        .await;
    println!("({one} kills of one worker, {all} of all three)");
    tally.report();
    assert_eq!(
        tally.duplicates, 0,
        "duplicate callbacks not explained by a kill"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_restarted_empty_loses_nothing_and_keeps_causal_order() {
    // A Redis of this test's own: restarting the shared one would flush other tests.
    let mut redis = PrivateRedis::start();
    let servers = Servers {
        redis: redis.url(),
        ..Servers::shared()
    };
    let mut p = Pipeline::start("fredis", servers, 2, "").await;
    let writing = p.workload(TXNS, 303);
    let mut dice = Dice(0x1234_5678_9ABC_DEF1);
    let mut restarts = 0;
    while !writing.is_finished() || restarts < 2 {
        dice.pause(500, 1_500).await;
        redis.down();
        dice.pause(1_000, 2_000).await;
        redis.up();
        restarts += 1;
        p.recovered(Instant::now()).await;
    }
    let inserts = writing.await.unwrap();
    let tally = p
        .finish("Redis stopped, restarted empty", restarts, inserts)
        .await;
    tally.report();
    assert_eq!(
        tally.duplicates + tally.reruns_after_crash,
        0,
        "duplicate callbacks"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_source_and_store_restarted_lose_nothing_and_keep_causal_order() {
    // Clusters of this test's own: the source under the publisher, and the store.
    let source = Cluster::logical();
    let store = Cluster::logical();
    let servers = Servers {
        source: format!("postgres://postgres@127.0.0.1:{}", source.port),
        store: format!("postgres://postgres@127.0.0.1:{}", store.port),
        ..Servers::shared()
    };
    // A store restart can fail the observer's own read of the store: its callback error
    // is transient, and must not run out of attempts while the server is away.
    let mut p = Pipeline::start("fpg", servers, 2, "[callbacks]\nattempts = 1000\n").await;
    let mut dice = Dice(0x0F0F_1234_ABCD_5555);
    let (mut source_restarts, mut store_restarts, mut inserts) = (0, 0, 0);
    for round in 0..4u64 {
        // The workload's writers do not survive a source restart (a broken connection
        // makes them spin), so the source restarts between chunks of the workload, the
        // publisher still streaming; the store restarts in the middle of one.
        let writing = p.workload(TXNS / 4, 404 + round);
        dice.pause(500, 1_000).await;
        let mode = if round < 2 { "fast" } else { "immediate" };
        tokio::task::block_in_place(|| store.restart(mode));
        store_restarts += 1;
        let store_up = Instant::now();
        inserts += writing.await.unwrap();
        p.recovered(store_up).await;
        tokio::task::block_in_place(|| source.restart(mode));
        let up = Instant::now();
        source_restarts += 1;
        p.recovered(up).await;
    }
    let tally = p
        .finish(
            "Postgres source and store restarted (fast, immediate)",
            source_restarts + store_restarts,
            inserts,
        )
        .await;
    tally.report();
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_messages_are_dead_lettered_with_a_reason_and_everything_else_applied() {
    let mut p = Pipeline::start("fpoison", Servers::shared(), 2, "").await;
    let writing = p.workload(TXNS, 505);
    let mut dice = Dice(0x5555_AAAA_1234_4321);
    let envelope = format!(
        r#"{{"namespace":"{}","generation":1,"seq":1,"position":"x","commit_ts_us":0,"txid":"1"}}"#,
        p.ns
    );
    let next_major = kausal::bus::envelope::FORMAT_MAJOR + 1;
    let poison: Vec<(&str, Vec<u8>)> = vec![
        (
            "garbage bytes",
            b"\x00\xffnot a kausal message at all".to_vec(),
        ),
        (
            "a newer format version",
            [
                &b"KSL"[..],
                &[next_major],
                format!(r#"{{"envelopes":[{envelope}]}}"#).as_bytes(),
            ]
            .concat(),
        ),
        (
            "valid framing and JSON, fields missing",
            [
                &b"KSL\x01"[..],
                format!(r#"{{"envelopes":[{{"namespace":"{}","seq":1}}]}}"#, p.ns).as_bytes(),
            ]
            .concat(),
        ),
        (
            "valid framing, no envelopes",
            b"KSL\x01{\"envelopes\":[]}".to_vec(),
        ),
    ];
    let bus = kausal::bus::amqp::AmqpPublisher::connect(common::AMQP, "kausal")
        .await
        .unwrap();
    let rk = kausal::bus::amqp::changes_routing_key(&p.ns);
    for (_, body) in &poison {
        dice.pause(300, 1_000).await;
        bus.publish(&rk, body).await.unwrap().wait().await.unwrap();
        p.recovered(Instant::now()).await;
    }
    bus.close().await;
    let inserts = writing.await.unwrap();
    for i in 0..p.workers.len() {
        assert!(!p.worker_exited(i), "worker {i} died on a poison message");
    }
    let dlq = format!("kausal.{}.dlq", p.ns);
    let dead = kausal::bus::amqp::peek_dead_letters(common::AMQP, &dlq, 100)
        .await
        .unwrap();
    for (what, body) in &poison {
        let letter = dead
            .iter()
            .find(|d| &d.body == body)
            .unwrap_or_else(|| panic!("{what}: not in {dlq}"));
        let reason = letter.reason.as_deref().unwrap_or_default();
        println!("{what}: dead-lettered, reason: {reason}");
        assert!(
            reason.starts_with("cannot decode the message:"),
            "{what}: {reason}"
        );
    }
    assert_eq!(dead.len(), poison.len(), "only the poison is dead-lettered");
    let tally = p
        .finish(
            "poison messages on the exchange",
            poison.len() as u32,
            inserts,
        )
        .await;
    tally.report();
    assert_eq!(
        tally.duplicates + tally.reruns_after_crash,
        0,
        "duplicate callbacks"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_locked_for_20_seconds_keeps_worker_memory_bounded() {
    let mut p = Pipeline::start("fslow", Servers::shared(), 2, "").await;
    // The workers create the mirrored tables with the first rows they apply.
    let first = p.workload(200, 606);
    let mut inserts = first.await.unwrap();
    p.recovered(Instant::now()).await;
    let before: Vec<u64> = p.workers.iter().map(|w| w.peak_rss_kib()).collect();
    // Another session holds the store's tables while the publisher pushes thousands of
    // transactions: the workers can apply nothing and must not buffer the queue.
    let store = common::connect(&p.store_url).await;
    store
        .batch_execute("BEGIN; LOCK TABLE users, messages IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let writing = p.workload(TXNS, 607);
    tokio::time::sleep(std::time::Duration::from_secs(20)).await;
    store.batch_execute("COMMIT").await.unwrap();
    let unlocked = Instant::now();
    inserts += writing.await.unwrap();
    p.recovered(unlocked).await;
    let peak: Vec<u64> = p.workers.iter().map(|w| w.peak_rss_kib()).collect();
    println!("worker peak RSS before the lock {before:?} KiB, after {peak:?} KiB");
    for kib in &peak {
        assert!(
            *kib < 300 * 1024,
            "a worker grew to {kib} KiB behind a slow store"
        );
    }
    let tally = p
        .finish("store locked for 20 s (slow sink)", 1, inserts)
        .await;
    tally.report();
    assert_eq!(
        tally.duplicates + tally.reruns_after_crash,
        0,
        "duplicate callbacks"
    );
}

// The crash point is compiled in with `--features failpoints` (scripts/test.sh builds
// with every feature).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread")]
async fn workers_crashing_between_store_commit_and_ack_lose_nothing() {
    use kausal::subscriber::sink::fault::ENV;
    let mut p = Pipeline::start("fabort", Servers::shared(), 0, "").await;
    let mut dice = Dice(0x7777_0000_3333_9999);
    for _ in 0..2 {
        let n = (5 + dice.below(40)).to_string();
        let (w, id) = p.spawn_worker(&[(ENV, &n)]);
        p.workers.push(w);
        p.add_slot(id);
    }
    let writing = p.workload(TXNS, 707);
    let mut armed = [true, true];
    let (mut crashes, mut last) = (0, Instant::now());
    // Recovery is measured once, after the last crash: two workers crashing every few
    // dozen commits leave no quiet moment to measure one crash at a time.
    while armed.iter().any(|a| *a) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let done = writing.is_finished() && crashes >= 3;
        for (i, armed) in armed.iter_mut().enumerate() {
            if p.worker_exited(i) {
                // It died right after a store commit: restart it with a new crash point
                // while the workload runs.
                p.worker_died(i);
                crashes += 1;
                last = Instant::now();
                let n = (5 + dice.below(40)).to_string();
                *armed = !done;
                let env: Vec<(&str, &str)> = if *armed { vec![(ENV, &n)] } else { vec![] };
                p.restart_worker(i, &env);
            } else if done && *armed {
                // The stream is drained before its crash point: disarm it.
                p.kill_worker(i);
                p.restart_worker(i, &[]);
                *armed = false;
            }
        }
    }
    p.recovered(last).await;
    let inserts = writing.await.unwrap();
    let tally = p
        .finish(
            "worker aborts after store commit, before ack",
            crashes,
            inserts,
        )
        .await;
    tally.report();
    assert_eq!(
        tally.duplicates, 0,
        "duplicate callbacks not explained by a crash"
    );
}
