//! RabbitMQ restarted while the publisher is publishing: nothing is lost and the
//! publisher reconnects by itself. Alone in its test binary because it stops the shared
//! broker (cargo runs test binaries one after another).

mod common;

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
    let ns = unique("broker");
    let db = TestDb::new(&ns, "CREATE TABLE events (id bigint PRIMARY KEY);").await;
    let mut tap = Tap::new(&ns).await;
    let publisher = start(
        config(
            &ns,
            &db.url,
            "[[table]]\nname = \"events\"\ncolumns = [\"*\"]\n",
        ),
        &db,
    )
    .await;
    let url = db.url.clone();
    let writer = tokio::spawn(async move {
        let c = connect(&url).await;
        for id in 1..=TXNS {
            c.execute("INSERT INTO events VALUES ($1)", &[&id])
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    tap.until(Duration::from_secs(60), |r| complete(r) >= 300)
        .await;
    // The broker goes away (all connections closed) and comes back with its durable
    // queues and persistent messages, while the application keeps writing.
    tokio::task::spawn_blocking(|| {
        rabbitmqctl(&["stop_app"]);
        std::thread::sleep(Duration::from_secs(3));
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    })
    .await
    .unwrap();
    writer.await.unwrap();
    tap.until(Duration::from_secs(180), |r| complete(r) >= TXNS as usize)
        .await;
    publisher.stop().await;
    let seqs: BTreeSet<u64> = tap.received.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=TXNS as u64).collect());
    let ids: BTreeSet<i64> = tap
        .received
        .iter()
        .flat_map(|e| &e.changes)
        .map(|c| c.key["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, (1..=TXNS).collect());
    println!(
        "{} envelopes received for {TXNS} transactions",
        tap.received.len()
    );
    tap.delete().await;
    db.drop().await;
}
