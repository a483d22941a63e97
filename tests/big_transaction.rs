//! A 1M-row transaction is published in bounded parts, with bounded publisher memory.

mod common;

use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn a_million_row_transaction_is_published_in_parts_with_bounded_memory() {
    let ns = unique("big");
    let db = TestDb::new(
        &ns,
        "CREATE TABLE big (id int PRIMARY KEY, h text NOT NULL);",
    )
    .await;
    let mut tap = Tap::new(&ns).await;
    let cfg = write_config(
        &config_text(
            &ns,
            &db.url,
            "[[table]]\nname = \"big\"\ncolumns = [\"*\"]\n",
        ),
        &ns,
    );
    let publisher = Process::spawn(&cfg);
    wait_for_slot(&db.client, &format!("kausal_{ns}")).await;
    db.client
        .batch_execute("INSERT INTO big SELECT g, md5(g::text) FROM generate_series(1, 1000000) g")
        .await
        .unwrap();
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
    println!("publisher peak RSS during a 1M-row transaction: {peak_mib} MiB");
    // Bounded: the rows alone are ~60 MB as JSON; holding them all would exceed this.
    assert!(peak_mib < 256, "publisher peak RSS {peak_mib} MiB");
    tap.delete().await;
    db.drop().await;
}
