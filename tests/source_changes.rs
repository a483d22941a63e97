//! Schema changes at the source while the pipeline runs: nothing is skipped, the store
//! follows or the error names the recovery.

mod common;

use common::sub::*;
use common::*;
use kausal::subscriber::Subscriber;
use sqlx::Row as _;
use std::time::Duration;

async fn store_values(store: &sqlx::AnyPool) -> Vec<(i64, String)> {
    sqlx::query("SELECT id, CAST(qty AS TEXT) FROM items ORDER BY id")
        .fetch_all(store)
        .await
        .unwrap_or_default()
        .iter()
        .map(|r| {
            (
                r.get::<i64, _>(0),
                r.get::<Option<String>, _>(1).unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_column_type_changed_at_the_source_widens_the_mirrored_column_and_nothing_is_lost() {
    logs();
    let ns = unique("retype");
    let db = TestDb::new(
        &ns,
        "CREATE TABLE items (id bigint PRIMARY KEY, qty int NOT NULL);",
    )
    .await;
    let store_name = format!("{ns}_store");
    let store_url = workload::store_db(&store_name).await;
    declare_queue(&ns, &ns).await;
    let publisher = start(
        config(
            &ns,
            &db.url,
            "[[table]]\nname = \"items\"\ncolumns = [\"*\"]\n",
        ),
        &db,
    )
    .await;
    let cfg = sub_config(
        &ns,
        &store_url,
        &format!("[[table]]\nnamespace = \"{ns}\"\nname = \"items\"\n"),
    );
    let worker = Worker::start(Subscriber::new(cfg));
    db.client
        .batch_execute("INSERT INTO items VALUES (1, 1), (2, 2)")
        .await
        .unwrap();
    sqlx::any::install_default_drivers();
    let store = sqlx::AnyPool::connect(&store_url).await.unwrap();
    eventually(Duration::from_secs(30), "the first rows", || async {
        store_values(&store).await.len() == 2
    })
    .await;

    // The application's migration: quantities become free text.
    db.client
        .batch_execute(
            "ALTER TABLE items ALTER COLUMN qty TYPE text; \
             UPDATE items SET qty = 'many' WHERE id = 1; \
             INSERT INTO items VALUES (3, 'n/a');",
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the rows after the change",
        || async {
            store_values(&store).await
                == vec![(1, "many".into()), (2, "2".into()), (3, "n/a".into())]
        },
    )
    .await;
    let column_type: String = sqlx::query_scalar(
        "SELECT data_type::text FROM information_schema.columns \
         WHERE table_name = 'items' AND column_name = 'qty'",
    )
    .fetch_one(&store)
    .await
    .unwrap();
    assert_eq!(column_type, "text");
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
async fn a_published_table_dropped_at_the_source_is_named_and_the_other_tables_keep_flowing() {
    logs();
    let ns = unique("dropped");
    let db = TestDb::new(
        &ns,
        "CREATE TABLE items (id bigint PRIMARY KEY, qty int NOT NULL); \
         CREATE TABLE notes (id bigint PRIMARY KEY, body text NOT NULL);",
    )
    .await;
    let tables = "[[table]]\nname = \"items\"\ncolumns = [\"*\"]\n\
                  [[table]]\nname = \"notes\"\ncolumns = [\"*\"]\n";
    let pub_cfg = write_config(&config_text(&ns, &db.url, tables), &format!("{ns}.pub"));
    let log_path = std::env::temp_dir().join(format!("kausal-tests/{ns}.publisher.log"));
    let spawn = |log: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
            .args(["publish", "--config"])
            .arg(&pub_cfg)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            // No checkpoint after the first: a restart replays the WAL from the start,
            // the dropped table's change included (what happens when the publisher is
            // killed before its next checkpoint).
            .env("KAUSAL_CHECKPOINT_INTERVAL_MS", "600000")
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    };
    let mut publisher = spawn(&log_path);
    wait_for_slot(&db.client, &format!("kausal_{ns}")).await;
    let mut tap = Tap::new(&ns).await;

    db.client
        .batch_execute("INSERT INTO items VALUES (1, 1); DROP TABLE items; INSERT INTO notes VALUES (1, 'after');")
        .await
        .unwrap();
    // Nothing is skipped: the insert before the drop and the note after it are published.
    tap.until(Duration::from_secs(30), |envs| {
        let tables: Vec<&str> = envs
            .iter()
            .flat_map(|e| e.changes.iter().map(|c| c.table.as_str()))
            .collect();
        tables.contains(&"items") && tables.contains(&"notes")
    })
    .await;
    // The publisher says which table is gone and what to do, and keeps running.
    eventually(
        Duration::from_secs(30),
        "the publisher names the dropped table",
        || async {
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .contains("a published table no longer exists at the source")
        },
    )
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("public.items") && log.contains("remove it from [[table]]"),
        "{log}"
    );
    assert!(
        publisher.try_wait().unwrap().is_none(),
        "the publisher stopped: {log}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
        .args(["status", "--config"])
        .arg(&pub_cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("published table public.items does not exist at the source"),
        "{text}"
    );

    // A restart refuses, naming it; without it in the configuration, it runs on.
    let _ = publisher.kill();
    let _ = publisher.wait();
    wait_for_slot_released(&db.client, &format!("kausal_{ns}")).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
        .args(["publish", "--config"])
        .arg(&pub_cfg)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("items"), "{err}");
    std::fs::write(
        &pub_cfg,
        config_text(
            &ns,
            &db.url,
            "[[table]]\nname = \"notes\"\ncolumns = [\"*\"]\n",
        ),
    )
    .unwrap();
    let mut publisher = spawn(&log_path);
    wait_for_slot(&db.client, &format!("kausal_{ns}")).await;
    db.client
        .batch_execute("INSERT INTO notes VALUES (2, 'still flowing')")
        .await
        .unwrap();
    tap.until(Duration::from_secs(30), |envs| {
        envs.iter().flat_map(|e| e.changes.iter()).any(|c| {
            c.new
                .as_ref()
                .is_some_and(|n| n.get("body") == Some(&serde_json::json!("still flowing")))
        })
    })
    .await;
    let _ = publisher.kill();
    let _ = publisher.wait();
    tap.delete().await;
    wait_for_slot_released(&db.client, &format!("kausal_{ns}")).await;
    db.drop().await;
}
