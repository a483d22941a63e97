//! A 1M-row transaction is published in bounded parts, with bounded publisher memory,
//! from a Postgres and from a MariaDB source.

mod common;

use common::source::{Kind, Source};
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn a_million_row_transaction_is_published_in_parts_with_bounded_memory() {
    million_row_transaction(Kind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_million_row_binlog_transaction_is_published_in_parts_with_bounded_memory() {
    million_row_transaction(Kind::Mariadb).await;
}

async fn million_row_transaction(kind: Kind) {
    let ns = unique("big");
    let mut db = Source::new(
        kind,
        &ns,
        "CREATE TABLE big (id int PRIMARY KEY, h text NOT NULL);",
    )
    .await;
    let mut tap = Tap::new(&ns).await;
    let cfg = write_config(
        // Memory is bounded by the parts queued for publishing (256) plus the messages
        // awaiting confirms (max_in_flight × max_batch_bytes, 128 MiB by default). A
        // source that reads faster than the broker confirms fills both, so the test
        // pins the second to 64 × 512 KiB to make its bound independent of the
        // machine's speed.
        &db.config_text(
            &ns,
            "[tuning]\nmax_in_flight = 64\n[[table]]\nname = \"big\"\ncolumns = [\"*\"]\n",
        ),
        &ns,
    );
    let publisher = Process::spawn(&cfg);
    db.wait_streaming(&ns).await;
    db.exec(match kind {
        Kind::Postgres => {
            "INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 1000000) g"
        }
        // MariaDB's Sequence engine provides seq_1_to_N.
        Kind::Mariadb => "INSERT INTO big SELECT seq, md5(seq) FROM seq_1_to_1000000",
    })
    .await;
    tap.until(Duration::from_secs(600), |r| {
        r.iter().any(|e| e.parts.is_some())
    })
    .await;
    let peak_mib = publisher.peak_rss_kib() / 1024;
    drop(publisher);

    let last = tap.received.iter().find(|e| e.parts.is_some()).unwrap();
    let parts = last.parts.unwrap();
    assert_eq!(parts, 1000, "1,000 parts of 1,000 rows");
    let mut seen: Vec<u32> = tap
        .received
        .iter()
        .filter(|e| e.seq == last.seq)
        .map(|e| e.part)
        .collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen, (0..parts).collect::<Vec<_>>());
    let rows: usize = tap.received.iter().map(|e| e.changes.len()).sum();
    assert_eq!(rows, 1_000_000);
    assert!(tap.received.iter().all(|e| e.changes.len() <= 1000));
    println!("{kind:?}: publisher peak RSS during a 1M-row transaction: {peak_mib} MiB");
    // Bounded: 256 queued parts of 1,000 changes (~0.5 MB each in memory) plus 32 MiB
    // awaiting confirms plus the process itself stay under this (seen: 175–215 MiB);
    // holding the million rows (~60 MB as JSON, several times that as parsed values)
    // would not.
    assert!(peak_mib < 320, "publisher peak RSS {peak_mib} MiB");
    tap.delete().await;
    db.drop().await;
}
