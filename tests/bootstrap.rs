//! Bootstrap (initial sync): a subscriber started after its publisher gets the rows that
//! existed before, from the publisher over the broker, while a writer keeps changing
//! the same tables — and ends equal to the source, also when the subscriber and then the
//! publisher are killed in the middle.

mod common;

use common::boot::{bootstraps, sqlite_store};
use common::sub::*;
use common::*;
use std::time::{Duration, Instant};

/// Rows written before the publisher starts: only a bootstrap can bring them.
const USERS: i64 = 15_000;
const MESSAGES: i64 = 30_000;

async fn prefill(db: &TestDb) {
    // Ids far above the workload's, which numbers its rows from 0.
    db.client
        .batch_execute(&format!(
            "INSERT INTO users SELECT g, 'user' || g, 'u' || g || '@example.com' \
               FROM generate_series(10000000, 10000000 + {USERS} - 1) g;
             INSERT INTO messages (id, user_id, text) \
               SELECT g, 10000000 + g % {USERS}, 'old message ' || g \
               FROM generate_series(20000000, 20000000 + {MESSAGES} - 1) g;"
        ))
        .await
        .unwrap();
}

async fn row_versions_left(store: &sqlx::AnyPool) -> i64 {
    use sqlx::Row;
    sqlx::query("SELECT COUNT(*) FROM kausal_rowv")
        .fetch_one(store)
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1)
}

/// Waits until every bootstrap is finished (`done = 2`: the store applied everything up
/// to the last chunk) and its row versions are gone.
async fn finished(store: &sqlx::AnyPool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let b = bootstraps(store).await;
        let left = row_versions_left(store).await;
        if !b.is_empty() && b.iter().all(|x| x.1 == 2) && left == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "bootstraps not finished: {b:?}, {left} row versions left"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_subscriber_bootstraps_while_the_source_changes_and_ends_equal() {
    logs();
    let ns = unique("boot");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    prefill(&db).await;
    let publisher = start(config(&ns, &db.url, workload::PUBLISHED), &db).await;
    // Live traffic before the subscriber exists: it never reaches its queue.
    workload::run(&db.url, 300, 2, 41).await;

    let sqlite = sqlite_url(&ns);
    let text = sub_config_text(&ns, &sqlite, &workload::subscribed(&ns));
    let cfg = write_config(&text, &format!("{ns}.sub"));
    let mut worker = Process::kausal(&["subscribe", "--bootstrap"], &cfg);
    let store = sqlite_store(&sqlite).await;
    // The writer keeps inserting, updating and deleting (users of the bootstrapped
    // rows too) while the chunks come.
    workload::run(&db.url, 3_000, 4, 43).await;
    workload::converge(&db.url, &store, Duration::from_secs(300)).await;

    let done = bootstraps(&store).await;
    assert_eq!(done.len(), 2, "{done:?}");
    for (table, _, rows) in &done {
        assert!(*rows > 0, "table {table}: no rows applied");
    }
    finished(&store).await;
    worker.kill();
    publisher.stop().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bootstrap_survives_kill_9_of_the_subscriber_and_then_of_the_publisher() {
    logs();
    let ns = unique("bootkill");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    prefill(&db).await;
    let pub_cfg = write_config(
        &config_text(&ns, &db.url, workload::PUBLISHED),
        &format!("{ns}.pub"),
    );
    let slot = format!("kausal_{ns}");
    let mut publisher = Process::spawn(&pub_cfg);
    wait_for_slot(&db.client, &slot).await;

    let sqlite = sqlite_url(&ns);
    let text = sub_config_text(&ns, &sqlite, &workload::subscribed(&ns));
    let cfg = write_config(&text, &format!("{ns}.sub"));
    let url = db.url.clone();
    let writing = tokio::spawn(async move { workload::run(&url, 2_000, 2, 47).await });
    // Small chunks, so that there is a middle to kill in.
    let mut worker = Process::kausal(&["bootstrap", "--chunk-rows", "300"], &cfg);
    let store = sqlite_store(&sqlite).await;
    let applied_some = |b: &[(String, i32, i64)]| b.iter().map(|x| x.2).sum::<i64>() > 2_000;
    let deadline = Instant::now() + Duration::from_secs(120);
    while !applied_some(&bootstraps(&store).await) {
        assert!(Instant::now() < deadline, "the bootstrap made no progress");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.kill();
    let before = bootstraps(&store).await;
    assert!(
        before.iter().any(|b| b.1 == 0),
        "the bootstrap finished before the kill: {before:?}"
    );

    // A plain subscriber resumes the unfinished bootstrap from where the store says.
    let mut worker = Process::kausal(&["subscribe"], &cfg);
    let progressed = |b: &[(String, i32, i64)]| b.iter().map(|x| x.2).sum::<i64>();
    let at_restart = progressed(&before);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = bootstraps(&store).await;
        if progressed(&now) > at_restart + 2_000 || now.iter().all(|b| b.1 >= 1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resumed bootstrap made no progress"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    publisher.kill();
    wait_for_slot_released(&db.client, &slot).await;
    let mut publisher = Process::spawn(&pub_cfg);
    wait_for_slot(&db.client, &slot).await;

    writing.await.unwrap();
    workload::converge(&db.url, &store, Duration::from_secs(300)).await;
    finished(&store).await;
    worker.kill();
    publisher.kill();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_waiting_for_a_new_publisher_is_answered_once_its_slot_is_ready() {
    logs();
    let ns = unique("bootfirst");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    db.client
        .batch_execute(
            "INSERT INTO users SELECT g, 'user' || g, 'u' || g || '@example.com' \
             FROM generate_series(1, 2000) g;",
        )
        .await
        .unwrap();
    // The subscriber first: its request waits in the control queue for a publisher.
    let sqlite = sqlite_url(&ns);
    let text = sub_config_text(&ns, &sqlite, &workload::subscribed(&ns));
    let cfg = write_config(&text, &format!("{ns}.sub"));
    let mut bootstrap = Process::kausal(&["bootstrap", "--chunk-rows", "500"], &cfg);
    let store = sqlite_store(&sqlite).await;

    // A transaction left open makes the creation of the publisher's new slot wait (a
    // logical slot waits for every running transaction of the server, as it does on a
    // busy primary): a watermark written meanwhile would lie before the slot's start.
    let held = connect(&db.url).await;
    held.batch_execute("BEGIN; SELECT txid_current();")
        .await
        .unwrap();
    let warnings = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let pub_cfg = write_config(
        &config_text(&ns, &db.url, workload::PUBLISHED),
        &format!("{ns}.pub"),
    );
    let mut publisher = Process::publisher_logged(&pub_cfg, warnings.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    held.batch_execute("COMMIT").await.unwrap();

    // The first chunk must not wait for the publisher's chunk timeout (a minute) and be
    // read again: the publisher answers once its stream runs.
    let status = bootstrap
        .exit_within(Duration::from_secs(120), "kausal bootstrap")
        .await;
    assert!(status.success(), "kausal bootstrap failed: {status}");
    let rereads: Vec<String> = warnings
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("high watermark"))
        .cloned()
        .collect();
    assert!(rereads.is_empty(), "chunks were read again: {rereads:?}");
    let done = bootstraps(&store).await;
    assert!(
        done.iter().any(|b| b.0 == "users" && b.2 == 2000),
        "{done:?}"
    );
    publisher.kill();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bootstrap_of_a_quiet_source_finishes_and_the_next_change_applies() {
    logs();
    let ns = unique("bootquiet");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    prefill(&db).await;
    let publisher = start(config(&ns, &db.url, workload::PUBLISHED), &db).await;
    let sqlite = sqlite_url(&ns);
    let text = sub_config_text(&ns, &sqlite, &workload::subscribed(&ns));
    let cfg = write_config(&text, &format!("{ns}.sub"));
    // Nothing changes at the source: the chunks are the only messages.
    let mut bootstrap = Process::kausal(&["bootstrap", "--chunk-rows", "5000"], &cfg);
    let store = sqlite_store(&sqlite).await;
    let status = bootstrap
        .exit_within(Duration::from_secs(120), "kausal bootstrap")
        .await;
    assert!(status.success(), "kausal bootstrap failed: {status}");
    // A subscriber started after it ends the bootstrap (drops the row versions) without
    // waiting for a transaction, and then applies the first change of the stream.
    let mut worker = Process::kausal(&["subscribe"], &cfg);
    finished(&store).await;
    db.client
        .batch_execute(
            "UPDATE users SET name = 'renamed' WHERE id = 10000000; \
             INSERT INTO users VALUES (1, 'new', 'new@example.com');",
        )
        .await
        .unwrap();
    workload::converge(&db.url, &store, Duration::from_secs(60)).await;
    worker.kill();
    publisher.stop().await;
    db.drop().await;
}

/// `kausal bootstrap` run to its end with stderr on a terminal (through `script`, which
/// gives it a pseudo-terminal) or on a pipe; everything it printed.
fn bootstrap_output(cfg: &std::path::Path, terminal: bool) -> String {
    let kausal = env!("CARGO_BIN_EXE_kausal");
    let command = format!(
        "{kausal} bootstrap --chunk-rows 500 --config {}",
        cfg.display()
    );
    let mut run = if terminal {
        let mut c = std::process::Command::new("script");
        c.args(["-qefc", &command, "/dev/null"]);
        c
    } else {
        let mut c = std::process::Command::new("sh");
        c.args(["-c", &command]);
        c
    };
    let out = run
        .env("RUST_LOG", "info")
        .output()
        .expect("run kausal bootstrap");
    assert!(out.status.success(), "kausal bootstrap failed: {out:?}");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_terminal_shows_a_progress_bar_and_a_pipe_gets_log_lines() {
    logs();
    let ns = unique("bootbar");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    db.client
        .batch_execute(
            "INSERT INTO users SELECT g, 'user' || g, 'u' || g || '@example.com' \
             FROM generate_series(1, 3000) g; ANALYZE users;",
        )
        .await
        .unwrap();
    let publisher = start(config(&ns, &db.url, workload::PUBLISHED), &db).await;
    let mut outputs = Vec::new();
    for terminal in [true, false] {
        let app = format!("{ns}_{terminal}");
        let text = sub_config_text(&app, &sqlite_url(&app), &workload::subscribed(&ns));
        let cfg = write_config(&text, &format!("{app}.sub"));
        outputs.push(tokio::task::spawn_blocking(move || {
            bootstrap_output(&cfg, terminal)
        }));
    }
    let piped = outputs.pop().unwrap().await.unwrap();
    let terminal = outputs.pop().unwrap().await.unwrap();
    assert!(
        terminal.contains("3,000/3,000 rows") && terminal.contains("ETA"),
        "no progress bar on the terminal:\n{terminal}"
    );
    assert!(
        terminal.contains(&format!("{ns}.users done")),
        "the bar does not name the finished table:\n{terminal}"
    );
    assert!(
        !terminal.contains("bootstrap progress"),
        "log lines mixed into the bar:\n{terminal}"
    );
    assert!(
        piped.contains("bootstrap progress")
            && piped.contains("rows_per_s=")
            && piped.contains("eta_s="),
        "no progress log lines on a pipe:\n{piped}"
    );
    assert!(
        !piped.contains("ETA"),
        "a progress bar drawn into a pipe:\n{piped}"
    );
    publisher.stop().await;
    db.drop().await;
}

/// A new app started as three worker processes sharing Redis coordination, all with
/// `--bootstrap`, while the source changes: no operator step, and the store ends equal
/// to the source (the chunks reach whichever worker consumes the app's queue; the
/// others wait for the join the first chunk brings).
#[tokio::test(flavor = "multi_thread")]
async fn three_workers_bootstrap_a_new_app_together_and_end_equal() {
    logs();
    let ns = unique("bootmulti");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    prefill(&db).await;
    let publisher = start(config(&ns, &db.url, workload::PUBLISHED), &db).await;
    workload::run(&db.url, 300, 2, 47).await;
    let store_name = format!("{ns}_store");
    let store_url = workload::store_db(&store_name).await;
    let body = format!(
        "[coordination]\nkind = \"redis\"\nurl = \"{REDIS}\"\nprefix = \"{ns}\"\n{}",
        workload::subscribed(&ns)
    );
    let cfg = write_config(
        &sub_config_text(&ns, &store_url, &body),
        &format!("{ns}.sub"),
    );
    let mut workers: Vec<Process> = (0..3)
        .map(|_| Process::kausal(&["subscribe", "--bootstrap"], &cfg))
        .collect();
    sqlx::any::install_default_drivers();
    let store = sqlx::AnyPool::connect(&store_url).await.unwrap();
    workload::run(&db.url, 3_000, 4, 53).await;
    workload::converge(&db.url, &store, Duration::from_secs(300)).await;
    let done = bootstraps(&store).await;
    assert_eq!(done.len(), 2, "{done:?}");
    assert!(done.iter().all(|(_, _, rows)| *rows > 0), "{done:?}");
    finished(&store).await;
    for w in &mut workers {
        w.kill();
    }
    publisher.stop().await;
    db.drop().await;
    store.close().await;
    workload::drop_store_db(&store_name).await;
    delete_queues(&ns).await;
}
