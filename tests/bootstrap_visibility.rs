//! A bootstrap chunk never misses a transaction the stream published before it.
//!
//! Postgres writes a transaction's commit record to the WAL before the transaction is
//! visible to other sessions. The stream may publish such a transaction before a chunk
//! whose read does not show it yet; the chunk, versioned after the transaction, would
//! then carry the row's old value for good. Here a synchronous standby that never
//! answers holds an update in exactly that state (committed in the WAL, decoded and
//! published, invisible) while a subscriber bootstraps.
//!
//! `synchronous_standby_names` is a server-wide setting: it makes every other session's
//! commit wait too. So this test has a binary of its own (cargo runs test binaries one
//! after another), and the setting is put back however the test ends (and by
//! `scripts/test.sh` before a run).

mod common;

use common::boot::{bootstraps, sqlite_store};
use common::sub::*;
use common::*;
use std::time::{Duration, Instant};

const USERS: i64 = 3_000;
/// The row the held update changes: in the fourth chunk of 500 (today no chunk of the
/// table goes out while a transaction that touched it is invisible; the test asks only
/// that the chunk holding the row does not).
const HELD_ROW: i64 = 1_700;

/// A synchronous standby that does not exist: commits wait for it (invisible) until
/// dropped.
struct AbsentStandby;

impl AbsentStandby {
    async fn on(client: &tokio_postgres::Client) -> AbsentStandby {
        // One statement each: ALTER SYSTEM cannot run inside a transaction block.
        for sql in [
            "ALTER SYSTEM SET synchronous_standby_names = 'kausal_test_absent_standby'",
            "SELECT pg_reload_conf()",
        ] {
            client.batch_execute(sql).await.unwrap();
        }
        AbsentStandby
    }
}

impl Drop for AbsentStandby {
    fn drop(&mut self) {
        let status = std::process::Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qAt",
            ])
            .args(["-c", "ALTER SYSTEM RESET synchronous_standby_names"])
            .args(["-c", "SELECT pg_reload_conf()"])
            .status();
        assert!(
            status.is_ok_and(|s| s.success()),
            "could not reset synchronous_standby_names: run `ALTER SYSTEM RESET \
             synchronous_standby_names; SELECT pg_reload_conf();` as postgres"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_chunk_read_while_a_published_update_is_not_yet_visible_is_read_again() {
    logs();
    let ns = unique("bootvis");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    db.client
        .batch_execute(&format!(
            "INSERT INTO users SELECT g, 'user' || g, 'u' || g || '@example.com' \
             FROM generate_series(1, {USERS}) g"
        ))
        .await
        .unwrap();
    let publisher = start(config(&ns, &db.url, workload::PUBLISHED), &db).await;

    // The update commits into the WAL (the stream decodes and publishes it) but stays
    // invisible while it waits for the standby.
    let standby = AbsentStandby::on(&db.client).await;
    let url = db.url.clone();
    let held = tokio::spawn(async move {
        let writer = connect(&url).await;
        writer
            .execute(
                "UPDATE users SET name = 'renamed while held' WHERE id = $1",
                &[&HELD_ROW],
            )
            .await
            .unwrap();
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = db
            .client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event = 'SyncRep'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if waiting == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the update never waited for the standby"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The subscriber starts after the update was published: only the chunk can bring
    // the row to it.
    let sqlite = sqlite_url(&ns);
    let text = sub_config_text(&ns, &sqlite, &workload::subscribed(&ns));
    let cfg = write_config(&text, &format!("{ns}.sub"));
    let mut worker = Process::kausal(&["bootstrap", "--chunk-rows", "500"], &cfg);
    let store = sqlite_store(&sqlite).await;
    let users_applied =
        |b: &[(String, i32, i64)]| b.iter().find(|x| x.0 == "users").map_or(0, |x| x.2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while bootstraps(&store).await.is_empty() {
        assert!(Instant::now() < deadline, "the bootstrap never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // While the update is invisible, the chunk holding its row is read again and again
    // and never applied.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let applied = users_applied(&bootstraps(&store).await);
    assert!(
        applied < HELD_ROW,
        "the chunk with the held row was applied ({applied} rows) while its update \
         was invisible"
    );
    drop(standby);
    held.await.unwrap();

    workload::converge(&db.url, &store, Duration::from_secs(60)).await;
    worker
        .exit_within(Duration::from_secs(60), "`kausal bootstrap` (when done)")
        .await;
    publisher.stop().await;
    db.drop().await;
}
