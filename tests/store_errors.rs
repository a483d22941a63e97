//! A store that fails for a reason that passes (out of disk space, as Postgres reports
//! it) holds the transaction back and applies it once the reason is gone: nothing is
//! dead-lettered, nothing lost. The error comes from the real server: a trigger on the
//! store table raises SQLSTATE 53100 (disk_full) while a flag says the disk is full,
//! and counts its calls in a sequence (which a rollback does not undo).

mod common;

use common::e2e::e2e;
use common::sub::*;
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn a_store_out_of_disk_space_holds_the_transaction_until_space_returns_and_loses_nothing() {
    let e = e2e("diskfull").await;
    let text = sub_config_text(&e.ns, &e.store_url, &workload::subscribed(&e.ns));
    let cfg = write_config(&text, &format!("{}.sub", e.ns));
    let mut worker = Process::subscriber(&cfg);
    workload::run(&e.db.url, 50, 2, 5).await;
    let store = e.store().await;
    workload::converge(&e.db.url, &store, Duration::from_secs(60)).await;

    let store_client = connect(&e.store_url).await;
    store_client
        .batch_execute(
            "CREATE TABLE disk (is_full boolean NOT NULL); INSERT INTO disk VALUES (true);
             CREATE SEQUENCE writes_refused;
             CREATE FUNCTION refuse_when_full() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF (SELECT is_full FROM disk) THEN
                 PERFORM nextval('writes_refused');
                 RAISE EXCEPTION 'could not extend file: No space left on device'
                   USING ERRCODE = 'disk_full';
               END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_when_full BEFORE INSERT OR UPDATE ON users
               FOR EACH ROW EXECUTE FUNCTION refuse_when_full();",
        )
        .await
        .unwrap();
    e.db.client
        .batch_execute("INSERT INTO users VALUES (900000001, 'while full', 'full@example.com')")
        .await
        .unwrap();
    // Refused, and tried again (a definite error would have dead-lettered it at once).
    eventually(Duration::from_secs(60), "three refused writes", || async {
        let row = store_client
            .query_one(
                "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM writes_refused",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0) >= 3
    })
    .await;
    let dlq = format!("kausal.{}.dlq", e.ns);
    let depth = kausal::bus::amqp::queue_depth(AMQP, &dlq).await.unwrap();
    assert_eq!(
        depth.map(|d| d.0),
        Some(0),
        "dead-lettered while the disk was full"
    );
    let held = store_client
        .query_one("SELECT count(*) FROM users WHERE id = 900000001", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(held, 0, "written while the disk was full");

    // Space returns: the held transaction applies, and what came after it too.
    store_client
        .batch_execute("UPDATE disk SET is_full = false")
        .await
        .unwrap();
    workload::run(&e.db.url, 50, 2, 6).await;
    workload::converge(&e.db.url, &store, Duration::from_secs(60)).await;
    let depth = kausal::bus::amqp::queue_depth(AMQP, &dlq).await.unwrap();
    assert_eq!(depth.map(|d| d.0), Some(0), "{dlq}");
    worker.terminate();
    store.close().await;
    e.finish().await;
}
