//! A partitioned table at the source (Postgres declarative partitioning) is published
//! under its own name, whichever partition a row lives in: rows moving between
//! partitions, and a partition added while the pipeline runs, reach the store, which
//! ends equal to the source. The rows there before the subscriber came are bootstrapped.

mod common;

use common::sub::*;
use common::*;
use kausal::subscriber::Subscriber;
use sqlx::Row as _;
use std::time::Duration;

const SCHEMA: &str = "
CREATE TABLE events (id bigint NOT NULL, region text NOT NULL, body text NOT NULL,
  PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
INSERT INTO events SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 'before ' || g
  FROM generate_series(1, 300) g;
";

async fn source_rows(db: &TestDb) -> Vec<(i64, String, String)> {
    db.client
        .query(
            "SELECT id, region, body FROM events ORDER BY id, region",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn store_rows(store: &sqlx::AnyPool) -> Vec<(i64, String, String)> {
    sqlx::query("SELECT id, region, body FROM events ORDER BY id, region")
        .fetch_all(store)
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partitioned_table_is_published_under_its_name_with_rows_moving_between_partitions() {
    logs();
    let ns = unique("parted");
    let db = TestDb::new(&ns, SCHEMA).await;
    let store_name = format!("{ns}_store");
    let store_url = workload::store_db(&store_name).await;
    declare_queue(&ns, &ns).await;
    let publisher = start(
        config(
            &ns,
            &db.url,
            "[[table]]\nname = \"events\"\ncolumns = [\"*\"]\n",
        ),
        &db,
    )
    .await;
    // The rows already there come by a bootstrap, read through the parent.
    let text = sub_config_text(
        &ns,
        &store_url,
        &format!("[[table]]\nnamespace = \"{ns}\"\nname = \"events\"\n"),
    );
    let path = write_config(&text, &format!("{ns}.sub"));
    let mut bootstrap = Process::kausal(&["bootstrap", "--chunk-rows", "100"], &path);
    let status = bootstrap
        .exit_within(Duration::from_secs(120), "kausal bootstrap")
        .await;
    assert!(status.success(), "kausal bootstrap failed: {status}");
    let cfg = sub_config(
        &ns,
        &store_url,
        &format!("[[table]]\nnamespace = \"{ns}\"\nname = \"events\"\n"),
    );
    let worker = Worker::start(Subscriber::new(cfg));
    db.client
        .batch_execute(
            "INSERT INTO events VALUES (1001, 'eu', 'new eu'), (1002, 'us', 'new us'); \
             UPDATE events SET body = 'changed' WHERE id = 2; \
             UPDATE events SET region = 'us', body = 'moved to us' WHERE id = 4; \
             DELETE FROM events WHERE id = 5;",
        )
        .await
        .unwrap();
    // A partition added while everything runs: its rows are the parent's rows.
    db.client
        .batch_execute(
            "CREATE TABLE events_ap PARTITION OF events FOR VALUES IN ('ap'); \
             INSERT INTO events VALUES (2001, 'ap', 'new ap'); \
             UPDATE events SET region = 'ap', body = 'moved to ap' WHERE id = 6;",
        )
        .await
        .unwrap();
    sqlx::any::install_default_drivers();
    let store = sqlx::AnyPool::connect(&store_url).await.unwrap();
    let expected = source_rows(&db).await;
    assert_eq!(expected.len(), 302);
    eventually(
        Duration::from_secs(60),
        "the store equal to the source",
        || {
            let (store, expected) = (&store, &expected);
            async move { store_rows(store).await == *expected }
        },
    )
    .await;
    let dlq = format!("kausal.{ns}.dlq");
    let letters = kausal::bus::amqp::peek_dead_letters(AMQP, &dlq, 10)
        .await
        .unwrap();
    assert!(letters.is_empty(), "dead-lettered: {:?}", letters[0].reason);
    worker.stop().await;
    store.close().await;
    publisher.stop().await;
    db.drop().await;
    workload::drop_store_db(&store_name).await;
    delete_queues(&ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_publication_made_by_an_earlier_version_is_switched_to_publish_via_the_root() {
    logs();
    let ns = unique("partpub");
    let db = TestDb::new(&ns, SCHEMA).await;
    // What versions before partition support created.
    db.client
        .batch_execute(&format!("CREATE PUBLICATION kausal_{ns} FOR TABLE events"))
        .await
        .unwrap();
    declare_queue(&ns, &ns).await;
    let publisher = start(
        config(
            &ns,
            &db.url,
            "[[table]]\nname = \"events\"\ncolumns = [\"*\"]\n",
        ),
        &db,
    )
    .await;
    let via_root: bool = db
        .client
        .query_one(
            "SELECT pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&format!("kausal_{ns}")],
        )
        .await
        .unwrap()
        .get(0);
    assert!(via_root, "the publication publishes via the partition root");
    publisher.stop().await;
    db.drop().await;
    delete_queues(&ns).await;
}
