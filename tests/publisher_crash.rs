//! `kill -9` of the publisher in the middle of a 10,000-transaction stream loses nothing:
//! after restarts every transaction arrives, duplicates are byte-identical replays. The
//! same for a Postgres and a MariaDB source.

mod common;

use common::source::{Kind, Source};
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const TXNS: i64 = 10_000;
const WRITERS: i64 = 4;

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_stream_then_restart_loses_nothing_and_replays_identically() {
    kill_9_and_restart(Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_binlog_stream_then_restart_loses_nothing_and_replays_identically() {
    kill_9_and_restart(Kind::Mariadb).await;
}

async fn kill_9_and_restart(kind: Kind) {
    let ns = unique("crash");
    let db = Source::new(kind, &ns, "").await;
    let mut tap = Tap::new(&ns).await;
    let cfg = write_config(
        &db.config_text(&ns, "[[table]]\nname = \"events\"\ncolumns = [\"*\"]\n"),
        &ns,
    );
    let mut publisher = Process::spawn(&cfg);
    db.wait_streaming(&ns).await;

    // Writers: one transaction per row, ids disjoint per writer.
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut writer = db.writer().await;
        writers.push(tokio::spawn(async move {
            let mut id = w + 1;
            while id <= TXNS {
                writer.insert(id, id as i32).await;
                id += WRITERS;
            }
        }));
    }

    // Kill twice while the stream is flowing, restart each time.
    for threshold in [2_000, 6_000] {
        tap.until(Duration::from_secs(120), |r| complete(r) >= threshold)
            .await;
        publisher.kill();
        db.wait_released(&ns).await;
        publisher = Process::spawn(&cfg);
    }
    for w in writers {
        w.await.unwrap();
    }
    tap.until(Duration::from_secs(300), |r| complete(r) >= TXNS as usize)
        .await;
    publisher.kill();

    // Gap-free sequence, every duplicate identical to the first copy.
    let mut first: BTreeMap<u64, &kausal::bus::Envelope> = BTreeMap::new();
    let mut duplicates = 0;
    for e in &tap.received {
        match first.get(&e.seq) {
            Some(earlier) => {
                assert_eq!(
                    serde_json::to_vec(earlier).unwrap(),
                    serde_json::to_vec(e).unwrap(),
                    "replayed envelope {} differs from the original",
                    e.seq
                );
                duplicates += 1;
            }
            None => {
                first.insert(e.seq, e);
            }
        }
    }
    assert_eq!(
        first.keys().copied().collect::<Vec<_>>(),
        (1..=TXNS as u64).collect::<Vec<_>>()
    );
    let ids: BTreeSet<i64> = first
        .values()
        .flat_map(|e| &e.changes)
        .map(|c| c.key["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (1..=TXNS).collect());
    println!(
        "{kind:?}: received {} envelopes for {TXNS} transactions: {duplicates} duplicates \
         after 2 kills",
        tap.received.len()
    );
    tap.delete().await;
    db.drop().await;
}
