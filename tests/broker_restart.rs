//! RabbitMQ restarted while the publisher is publishing: nothing is lost and the
//! publisher reconnects by itself. Alone in its test binary because it stops the shared
//! broker (cargo runs test binaries one after another).

mod common;

use common::source::{Kind, Source};
use common::*;
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

const TXNS: i64 = 3_000;

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_restart_while_publishing_loses_nothing() {
    logs();
    // A Postgres and a MariaDB publisher go through the same broker restart.
    let mut runs = Vec::new();
    for kind in [Kind::Postgres, Kind::Mariadb] {
        let ns = unique("broker");
        let db = Source::new(kind, &ns, "").await;
        let tap = Tap::new(&ns).await;
        let publisher = Process::spawn(&write_config(
            &db.config_text(&ns, "[[table]]\nname = \"events\"\ncolumns = [\"*\"]\n"),
            &ns,
        ));
        db.wait_streaming(&ns).await;
        let mut w = db.writer().await;
        let writer = tokio::spawn(async move {
            for id in 1..=TXNS {
                w.insert(id, 0).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        runs.push((kind, db, tap, publisher, writer));
    }
    for (_, _, tap, _, _) in &mut runs {
        tap.until(Duration::from_secs(60), |r| complete(r) >= 300)
            .await;
    }
    // The broker goes away (all connections closed) and comes back with its durable
    // queues and persistent messages, while the applications keep writing.
    tokio::task::spawn_blocking(|| {
        rabbitmqctl(&["stop_app"]);
        std::thread::sleep(Duration::from_secs(3));
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    })
    .await
    .unwrap();
    for (kind, db, mut tap, publisher, writer) in runs {
        writer.await.unwrap();
        tap.until(Duration::from_secs(180), |r| complete(r) >= TXNS as usize)
            .await;
        drop(publisher);
        let seqs: BTreeSet<u64> = tap.received.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=TXNS as u64).collect(), "{kind:?}");
        let ids: BTreeSet<i64> = tap
            .received
            .iter()
            .flat_map(|e| &e.changes)
            .map(|c| c.key["id"].as_i64().unwrap())
            .collect();
        assert_eq!(ids, (1..=TXNS).collect(), "{kind:?}");
        println!(
            "{kind:?}: {} envelopes received for {TXNS} transactions",
            tap.received.len()
        );
        tap.delete().await;
        db.drop().await;
    }
}
