//! Several processes on one host and several apps at once, as a user runs them: worker
//! processes given the same configuration start together quietly and each serve an
//! endpoint of their own; apps asking for a bootstrap at the same time are answered at
//! the same time, and `kausal status` shows who holds what.

mod common;

use common::cli::{kausal, status, status_until};
use common::e2e::e2e;
use common::sub::*;
use common::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A range of ports for this test binary, below the ephemeral range the other tests'
/// free ports come from (a process of the range must not take one of theirs).
fn port_range(len: u16) -> (u16, u16) {
    let first = 20_000 + (std::process::id() % 1_000) as u16 * 10;
    (first, first + len - 1)
}

#[tokio::test(flavor = "multi_thread")]
async fn workers_given_one_config_on_one_host_start_quietly_and_each_serve_their_own_endpoint() {
    let e = e2e("samehost").await;
    let (first, last) = port_range(8);
    let cfg = e.redis_config(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{first}-{last}\"\n"
    ));
    // At the level a user sees by default, from the first line on.
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut workers: Vec<Process> = (0..3)
        .map(|_| Process::subscriber_logged_at(&cfg, lines.clone(), "info"))
        .collect();
    workload::run(&e.db.url, 400, 2, 23).await;
    let store = e.store().await;
    workload::converge(&e.db.url, &store, Duration::from_secs(120)).await;

    let report = status_until(&[cfg.as_path()], 30, |s| {
        s["subscribers"][0]["workers"]
            .as_array()
            .is_some_and(|w| w.iter().filter(|w| w["state"] == "running").count() == 3)
    })
    .await;
    let mut endpoints: Vec<String> = report["subscribers"][0]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            w["endpoint"]
                .as_str()
                .unwrap_or_else(|| panic!("a worker without its endpoint: {w:#}"))
                .to_string()
        })
        .collect();
    endpoints.sort();
    endpoints.dedup();
    assert_eq!(endpoints.len(), 3, "{endpoints:?}");
    for endpoint in &endpoints {
        let port: u16 = endpoint.rsplit(':').next().unwrap().parse().unwrap();
        assert!(
            (first..=last).contains(&port),
            "{endpoint} not in the range"
        );
        let text = kausal::ops::get(endpoint, "/metrics").await.unwrap();
        assert!(
            text.contains("kausal_subscriber_transactions_applied_total"),
            "{endpoint}: {text}"
        );
    }
    let (_, human, _) = kausal(&["status", "--config", cfg.to_str().unwrap()]);
    assert!(
        human.contains(&format!("serves /metrics and /status at {}", endpoints[0])),
        "{human}"
    );

    // Nothing a user would take for a problem: no failed start on the bookkeeping
    // tables, no notice per existing table.
    let logged = lines.lock().unwrap().clone();
    let alarming: Vec<&String> = logged
        .iter()
        .filter(|l| {
            l.contains("cannot start")
                || l.contains("already exists")
                || l.contains("duplicate key")
                || l.contains("WARN")
                || l.contains("ERROR")
        })
        .collect();
    assert!(alarming.is_empty(), "{alarming:#?}");
    assert!(
        logged
            .iter()
            .any(|l| l.contains("serving /metrics and /status")),
        "the workers logged at info level: {logged:#?}"
    );
    for w in &mut workers {
        w.terminate();
    }
    store.close().await;
    e.finish().await;
}

/// Rows only a bootstrap brings: written before the publisher starts.
const USERS: i64 = 30_000;

/// A source with [`USERS`] users, its publisher (`tuning`: extra config) running as
/// `kausal publish` with an endpoint, and a `kausal bootstrap` config per app.
struct Setup {
    ns: String,
    db: TestDb,
    publisher: Process,
    pub_cfg: std::path::PathBuf,
}

async fn setup(label: &str, tuning: &str) -> Setup {
    logs();
    let ns = unique(label);
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    db.client
        .batch_execute(&format!(
            "INSERT INTO users SELECT g, 'user' || g, 'u' || g || '@example.com' \
               FROM generate_series(1, {USERS}) g"
        ))
        .await
        .unwrap();
    let port = common::cli::free_port();
    let pub_cfg = write_config(
        &format!(
            "{}\n{tuning}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            config_text(&ns, &db.url, workload::PUBLISHED)
        ),
        &format!("{ns}.pub"),
    );
    let publisher = Process::spawn(&pub_cfg);
    wait_for_slot(&db.client, &format!("kausal_{ns}")).await;
    Setup {
        ns,
        db,
        publisher,
        pub_cfg,
    }
}

impl Setup {
    /// `kausal bootstrap` of the users table for app `<ns>_<app>` in chunks of
    /// `chunk_rows` (the process has its config), and its store.
    fn bootstrap(&self, app: &str, chunk_rows: usize) -> (Process, String) {
        let app = format!("{}_{app}", self.ns);
        let store = sqlite_url(&app);
        let text = sub_config_text(
            &app,
            &store,
            &format!("[[table]]\nnamespace = \"{}\"\nname = \"users\"\n", self.ns),
        );
        let cfg = write_config(&text, &format!("{app}.sub"));
        let chunk_rows = chunk_rows.to_string();
        let process = Process::kausal(&["bootstrap", "--chunk-rows", &chunk_rows], &cfg);
        (process, store)
    }

    /// The publisher's bootstrap requests once `ok` holds for them.
    async fn requests_until(&self, ok: impl Fn(&[serde_json::Value]) -> bool) -> serde_json::Value {
        status_until(&[self.pub_cfg.as_path()], 60, |s| {
            s["publishers"][0]["bootstrap_requests"]
                .as_array()
                .is_some_and(|r| ok(r))
        })
        .await["publishers"][0]
            .clone()
    }

    async fn finish(mut self, apps: &[&str]) {
        self.publisher.kill();
        self.db.drop().await;
        for app in apps {
            delete_queues(&format!("{}_{app}", self.ns)).await;
        }
    }
}

async fn users_in(store: &str) -> i64 {
    use sqlx::Row;
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(store).await.unwrap();
    let n = sqlx::query("SELECT COUNT(*) FROM users")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    pool.close().await;
    n
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_asking_for_a_bootstrap_while_another_is_served_is_answered_at_once() {
    let s = setup("bootboth", "").await;
    // A long bootstrap: hundreds of chunks, each waiting for its watermarks.
    let (mut slow, slow_store) = s.bootstrap("slow", 20);
    let p = s
        .requests_until(|r| r.len() == 1 && r[0]["state"] == "answering")
        .await;
    assert_eq!(p["bootstrap_requests"][0]["tables"][0], "users", "{p:#}");
    let (mut quick, quick_store) = s.bootstrap("quick", 50_000);
    // The second app is not queued behind the first: it ends while the first still
    // reads its chunks.
    let exit = quick
        .exit_within(Duration::from_secs(120), "the quick bootstrap")
        .await;
    assert!(exit.success(), "{exit}");
    assert!(
        slow.exited().is_none(),
        "the long bootstrap ended before the one asked for after it"
    );
    assert_eq!(users_in(&quick_store).await, USERS);
    // What a script waiting for the bootstrap reads.
    let report = status(&[quick.config.as_path()]);
    let b = &report["subscribers"][0]["bootstraps"][0];
    assert_eq!(b["table"], "users", "{report:#}");
    assert!(b["done"].as_i64().is_some_and(|d| d >= 1), "{report:#}");
    assert_eq!(b["rows_applied"], USERS, "{report:#}");
    let exit = slow
        .exit_within(Duration::from_secs(300), "the slow bootstrap")
        .await;
    assert!(exit.success(), "{exit}");
    assert_eq!(users_in(&slow_store).await, USERS);
    s.requests_until(|r| r.is_empty()).await;
    s.finish(&["slow", "quick"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_beyond_the_bound_wait_in_order_and_status_shows_them_queued() {
    let s = setup("bootbound", "[tuning]\nbootstrap_requests = 1").await;
    let (mut first, first_store) = s.bootstrap("first", 20);
    s.requests_until(|r| r.len() == 1).await;
    let (mut second, second_store) = s.bootstrap("second", 50_000);
    // The second request stays in the control queue while the first is answered.
    let report = status_until(&[s.pub_cfg.as_path()], 60, |r| {
        r["publishers"][0]["bootstrap_queued"] == 1
    })
    .await;
    let p = &report["publishers"][0];
    assert_eq!(
        p["bootstrap_requests"].as_array().unwrap().len(),
        1,
        "{p:#}"
    );
    assert_eq!(
        p["bootstrap_requests"][0]["queue"],
        format!("kausal.{}_first", s.ns),
        "{p:#}"
    );
    let (_, human, _) = kausal(&["status", "--config", s.pub_cfg.to_str().unwrap()]);
    assert!(human.contains("bootstrap queued    1 request"), "{human}");
    let exit = first
        .exit_within(Duration::from_secs(300), "the first bootstrap")
        .await;
    assert!(exit.success(), "{exit}");
    let exit = second
        .exit_within(Duration::from_secs(120), "the second bootstrap")
        .await;
    assert!(exit.success(), "{exit}");
    assert_eq!(users_in(&first_store).await, USERS);
    assert_eq!(users_in(&second_store).await, USERS);
    let report = status(&[s.pub_cfg.as_path()]);
    assert_eq!(report["publishers"][0]["bootstrap_queued"], 0, "{report:#}");
    s.finish(&["first", "second"]).await;
}
