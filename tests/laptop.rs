//! The laptop subscriber: one command (`kausal subscribe --bootstrap`) fills a local
//! SQLite file with masked rows and follows the stream, from a durable queue with an
//! explicit expiry — a sleeping laptop loses nothing, a forgotten one's queue goes away
//! and the subscriber says so instead of silently missing changes.

mod common;

use common::sub::*;
use common::*;
use kausal::subscriber::mask::{apply, Mask};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SALT: &str = "a laptop test salt, sixteen bytes or more";

fn laptop_config(ns: &str, app: &str, sqlite: &str, expires: &str) -> PathBuf {
    let salt = std::env::temp_dir().join(format!("kausal-tests/{app}.salt"));
    std::fs::write(&salt, format!("{SALT}\n")).unwrap();
    let text = format!(
        "app = \"{app}\"\n\
         [broker]\nurl = \"{AMQP}\"\nqueue_expires = \"{expires}\"\n\
         [store]\nurl = \"{sqlite}\"\n\
         [masking]\nsalt_file = \"{}\"\n\
         [[table]]\nnamespace = \"{ns}\"\nname = \"users\"\n\
         mask = {{ email = \"hash\", name = \"redact\" }}\n",
        salt.display()
    );
    write_config(&text, &format!("{app}.{}", expires.replace(' ', "")))
}

async fn prefill(db: &TestDb, from: i64, to: i64) {
    db.client
        .batch_execute(&format!(
            "INSERT INTO users SELECT g, 'user' || g, 'u' || g || '@example.com' \
             FROM generate_series({from}, {to}) g"
        ))
        .await
        .unwrap();
}

/// The source's users as the laptop must hold them: name redacted, email hashed.
async fn masked_source(db: &TestDb) -> Vec<(i64, Option<String>, Option<String>)> {
    let rows = db
        .client
        .query("SELECT id, email FROM users ORDER BY id", &[])
        .await
        .unwrap();
    rows.iter()
        .map(|r| {
            let email: String = r.get(1);
            let hashed = apply(Mask::Hash, &Value::String(email), SALT.as_bytes());
            (r.get(0), None, hashed.as_str().map(str::to_string))
        })
        .collect()
}

async fn laptop_rows(store: &sqlx::AnyPool) -> Vec<(i64, Option<String>, Option<String>)> {
    use sqlx::Row;
    sqlx::query("SELECT id, name, email FROM users ORDER BY id")
        .fetch_all(store)
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect()
        })
        .unwrap_or_default()
}

async fn converge_masked(db: &TestDb, store: &sqlx::AnyPool) {
    let want = masked_source(db).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = laptop_rows(store).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the laptop store differs from the masked source: {} rows vs {}; first \
             difference: {:?}",
            got.len(),
            want.len(),
            got.iter().zip(&want).find(|(g, w)| g != w)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the publisher confirmed everything written so far (it confirms a
/// position once RabbitMQ has the transactions before it).
async fn wait_for_publication(db: &TestDb) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let lsn: String = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    loop {
        let done: bool = db
            .client
            .query_one(
                "SELECT coalesce(bool_and(confirmed_flush_lsn >= $1::text::pg_lsn), false) \
                 FROM pg_replication_slots WHERE database = current_database()",
                &[&lsn],
            )
            .await
            .unwrap()
            .get(0);
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the publisher never confirmed {lsn}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `kausal subscribe` expecting it to stop by itself; its exit status and stderr.
fn subscribe_until_it_exits(cfg: &Path) -> (std::process::ExitStatus, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
        .args(["subscribe", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "warn")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start kausal");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("`kausal subscribe` kept running: it should have refused to start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn store_file_bytes(sqlite: &str) -> Vec<u8> {
    let path = sqlite.trim_start_matches("sqlite://");
    let mut bytes = Vec::new();
    for suffix in ["", "-wal"] {
        bytes.extend(std::fs::read(format!("{path}{suffix}")).unwrap_or_default());
    }
    bytes
}

#[tokio::test(flavor = "multi_thread")]
async fn a_laptop_holds_masked_rows_only_and_catches_up_after_sleeping() {
    logs();
    let ns = unique("laptop");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    prefill(&db, 1, 2_000).await;
    let publisher = start(config(&ns, &db.url, workload::PUBLISHED), &db).await;
    let sqlite = sqlite_url(&ns);
    let cfg = laptop_config(&ns, &ns, &sqlite, "1h");
    // Published before the laptop's queue exists: only its bootstrap brings this.
    db.client
        .batch_execute("UPDATE users SET name = name || '+' WHERE id % 50 = 1")
        .await
        .unwrap();
    wait_for_publication(&db).await;

    let mut laptop = Process::kausal(&["subscribe", "--bootstrap"], &cfg);
    let store = common::boot::sqlite_store(&sqlite).await;
    converge_masked(&db, &store).await;

    // The laptop sleeps before it saw any change of the stream; the queue keeps what is
    // published meanwhile, and the laptop joins the stream where its bootstrap left it.
    laptop.kill();
    prefill(&db, 2_001, 2_300).await;
    for sql in [
        "UPDATE users SET email = 'new' || email WHERE id % 40 = 0",
        "DELETE FROM users WHERE id % 50 = 1",
    ] {
        db.client.batch_execute(sql).await.unwrap();
    }
    let mut laptop = Process::kausal(&["subscribe", "--bootstrap"], &cfg);
    converge_masked(&db, &store).await;

    // Awake, it follows changes as they come.
    laptop.kill();
    prefill(&db, 2_301, 2_400).await;
    db.client
        .batch_execute("UPDATE users SET email = 'again' || email WHERE id % 30 = 0")
        .await
        .unwrap();
    let mut laptop = Process::kausal(&["subscribe"], &cfg);
    converge_masked(&db, &store).await;
    laptop.kill();

    let bytes = String::from_utf8_lossy(&store_file_bytes(&sqlite)).into_owned();
    assert!(
        !bytes.contains("@example.com") && !bytes.contains("user17"),
        "a raw email or name reached the laptop's store file"
    );

    delete_queues(&ns).await;
    publisher.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forgotten_laptops_queue_expires_and_the_subscriber_says_so() {
    logs();
    let ns = unique("laptopgone");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    prefill(&db, 1, 100).await;
    let publisher = start(config(&ns, &db.url, workload::PUBLISHED), &db).await;
    let sqlite = sqlite_url(&ns);
    let cfg = laptop_config(&ns, &ns, &sqlite, "3s");
    let mut laptop = Process::kausal(&["subscribe", "--bootstrap"], &cfg);
    let store = common::boot::sqlite_store(&sqlite).await;
    converge_masked(&db, &store).await;
    laptop.kill();

    // Unused for longer than its expiry, the broker deletes the queue. (Looking renews
    // the lease, so look less often than it expires.)
    let queue = format!("kausal.{ns}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if !kausal::bus::amqp::queue_exists(AMQP, &queue).await.unwrap() {
            break;
        }
        assert!(Instant::now() < deadline, "the queue never expired");
    }
    prefill(&db, 101, 120).await;
    let (status, err) = subscribe_until_it_exits(&cfg);
    assert!(!status.success());
    assert!(
        err.contains(&format!("queue {queue} is gone")) && err.contains("expires after 3s"),
        "unexpected error: {err}"
    );
    delete_queues(&ns).await;
    publisher.stop().await;
    db.drop().await;
}
