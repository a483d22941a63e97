//! Shared helpers of the end-to-end tests. Every test gets its own database, namespace
//! (hence slot, publication, queue) and checkpoint file, so tests run in parallel.
#![allow(dead_code)]

use kausal::bus::amqp::{AmqpConsumer, QueueSpec};
use kausal::bus::{decode, Envelope};
use kausal::publisher::PublisherConfig;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

pub const PG: &str = "postgres://postgres@127.0.0.1:5432";
pub mod boot;
pub mod cli;
pub mod cluster;
pub mod e2e;
pub mod faults;
pub mod my_workload;
pub mod mysql;
pub mod order;
pub mod rabbit_cluster;
pub mod redis_sentinel;
pub mod source;
pub mod sub;
pub mod workload;

pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A name unique to this test run: `t_<label>_<pid>_<nanos>`.
pub fn unique(label: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("t_{label}_{}_{nanos}", std::process::id())
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e} (run scripts/setup.sh)"));
    tokio::spawn(conn);
    client
}

/// A fresh database with `schema` applied.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: Client,
}

impl TestDb {
    pub async fn new(name: &str, schema: &str) -> TestDb {
        let admin = connect(&format!("{PG}/postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let url = format!("{PG}/{name}");
        let client = connect(&url).await;
        client.batch_execute(schema).await.unwrap();
        TestDb {
            name: name.to_string(),
            url,
            client,
        }
    }

    /// Drops the slot and the database (call after the publisher stopped).
    pub async fn drop(self) {
        drop(self.client);
        let admin = connect(&format!("{PG}/postgres")).await;
        for _ in 0..50 {
            let r = admin
                .batch_execute(&format!(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE database = '{0}' AND NOT active; DROP DATABASE IF EXISTS {0} WITH (FORCE)",
                    self.name
                ))
                .await;
            if r.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Publisher configuration for a test: `tables` is TOML for the `[[table]]` entries.
pub fn config(namespace: &str, db_url: &str, tables: &str) -> PublisherConfig {
    let text = format!(
        "namespace = \"{namespace}\"\n\
         [source]\nkind = \"postgres\"\nurl = \"{db_url}\"\n\
         [broker]\nurl = \"{AMQP}\"\n\
         [checkpoint]\npath = \"{}\"\ninterval_ms = 200\n{tables}",
        checkpoint_path(namespace).display()
    );
    toml::from_str(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

pub fn checkpoint_path(namespace: &str) -> PathBuf {
    std::env::temp_dir().join(format!("kausal-tests/{namespace}.checkpoint"))
}

/// A publisher running in this process.
pub struct Running {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), kausal::publisher::PublisherError>>,
}

/// Starts a publisher and waits until it streams (its slot is active), so that every
/// transaction committed afterwards is published.
pub async fn start(cfg: PublisherConfig, db: &TestDb) -> Running {
    let slot = format!("kausal_{}", cfg.namespace);
    let (stop, rx) = watch::channel(false);
    let mut task = tokio::spawn(kausal::publisher::run(cfg, rx));
    tokio::select! {
        _ = wait_for_slot(&db.client, &slot) => Running { stop, task },
        ended = &mut task => panic!("the publisher stopped before streaming: {ended:?}"),
    }
}

pub async fn wait_for_slot(client: &Client, slot: &str) {
    wait_for_slot_activity(client, slot, true).await
}

/// Waits until no process holds the slot (after a kill).
pub async fn wait_for_slot_released(client: &Client, slot: &str) {
    wait_for_slot_activity(client, slot, false).await
}

async fn wait_for_slot_activity(client: &Client, slot: &str, active: bool) {
    for _ in 0..600 {
        // Held by a walsender: the stream runs. (A slot being created is active too,
        // held by the creating backend, and may wait long for the server's running
        // transactions: what is written meanwhile is never decoded.)
        let held = client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots s JOIN pg_stat_replication r \
                   ON r.pid = s.active_pid WHERE s.slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .is_some();
        if held == active {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("slot {slot} did not become active={active} within 60 s");
}

/// Logs of the code under test, shown for failing tests.
pub fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info,lapin=warn,pgwire_replication=warn")
        .with_test_writer()
        .try_init();
}

impl Running {
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        self.task
            .await
            .unwrap()
            .expect("publisher ended with an error");
    }
}

/// A durable test queue bound to a namespace; reconnects after broker restarts.
pub struct Tap {
    pub spec: QueueSpec,
    consumer: Option<AmqpConsumer>,
    /// Envelopes received, in arrival order, duplicates included.
    pub received: Vec<Envelope>,
    /// The wire format versions of the messages received.
    pub formats: BTreeSet<u8>,
}

impl Tap {
    pub async fn new(namespace: &str) -> Tap {
        let mut spec = QueueSpec::durable(&format!("test.{namespace}"), &[namespace]);
        spec.prefetch = 1000;
        let consumer = AmqpConsumer::connect(AMQP, "kausal", &spec)
            .await
            .expect("connect to RabbitMQ (run scripts/setup.sh)");
        Tap {
            spec,
            consumer: Some(consumer),
            received: Vec::new(),
            formats: BTreeSet::new(),
        }
    }

    /// Receives until `done(received)` holds; panics after `timeout` with what it has.
    pub async fn until(&mut self, timeout: Duration, done: impl Fn(&[Envelope]) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(&self.received) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "timed out after {timeout:?} with {} envelopes (last seq {:?})",
                    self.received.len(),
                    self.received.last().map(|e| e.seq)
                );
            }
            if self.consumer.is_none() {
                match AmqpConsumer::connect(AMQP, "kausal", &self.spec).await {
                    Ok(c) => self.consumer = Some(c),
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            let consumer = self.consumer.as_mut().unwrap();
            match tokio::time::timeout(left.min(Duration::from_secs(1)), consumer.next()).await {
                Err(_) => continue,
                Ok(Some(Ok(d))) => {
                    let envelopes = decode(&d.body).expect("publisher sent an undecodable message");
                    self.received.extend(envelopes);
                    self.formats.insert(d.body[3]);
                    if d.ack().await.is_err() {
                        self.consumer = None;
                    }
                }
                Ok(_) => self.consumer = None,
            }
        }
    }

    /// Last part of each distinct sequence number seen so far.
    pub fn by_seq(&self) -> BTreeMap<u64, &Envelope> {
        self.received
            .iter()
            .filter(|e| e.is_last_part())
            .map(|e| (e.seq, e))
            .collect()
    }

    pub async fn delete(mut self) {
        if let Some(c) = self.consumer.take() {
            let _ = c.delete_queue(&self.spec.name).await;
            let _ = c.delete_queue(&self.spec.dead_letter_queue()).await;
            c.close().await;
        }
    }
}

/// Number of distinct sequence numbers whose last part arrived.
pub fn complete(envelopes: &[Envelope]) -> usize {
    envelopes
        .iter()
        .filter(|e| e.is_last_part())
        .map(|e| e.seq)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// A `kausal publish` process (the real binary), for crash and memory tests.
pub struct Process {
    pub child: std::process::Child,
    pub config: PathBuf,
}

pub fn write_config(cfg_text: &str, namespace: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("kausal-tests/{namespace}.toml"));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, cfg_text).unwrap();
    path
}

/// The TOML of [`config`], for the binary.
pub fn config_text(namespace: &str, db_url: &str, tables: &str) -> String {
    format!(
        "namespace = \"{namespace}\"\n\
         [source]\nkind = \"postgres\"\nurl = \"{db_url}\"\n\
         [broker]\nurl = \"{AMQP}\"\n\
         [checkpoint]\npath = \"{}\"\ninterval_ms = 200\n{tables}",
        checkpoint_path(namespace).display()
    )
}

/// What the `kausal` processes a test starts log: warnings, unless
/// `KAUSAL_TEST_CHILD_LOG` says otherwise (`info` to follow a failing test).
pub fn child_log() -> String {
    std::env::var("KAUSAL_TEST_CHILD_LOG").unwrap_or_else(|_| "warn".into())
}

impl Process {
    /// `kausal subscribe --config <config>`.
    pub fn subscriber(config: &std::path::Path) -> Process {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
            .args(["subscribe", "--config"])
            .arg(config)
            .env("RUST_LOG", child_log())
            .spawn()
            .expect("start kausal subscribe");
        Process {
            child,
            config: config.to_path_buf(),
        }
    }

    /// `kausal subscribe` with its stderr (warnings and errors) collected into `lines`.
    pub fn subscriber_logged(
        config: &std::path::Path,
        lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) -> Process {
        Process::logged("subscribe", config, lines)
    }

    /// `kausal subscribe` logging at `level` (`info`: what a user sees by default),
    /// its stderr collected into `lines`.
    pub fn subscriber_logged_at(
        config: &std::path::Path,
        lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        level: &str,
    ) -> Process {
        Process::logged_at("subscribe", config, lines, level)
    }

    /// `kausal <command> --config <config>`, its stderr collected into `lines`.
    fn logged(
        command: &str,
        config: &std::path::Path,
        lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) -> Process {
        Process::logged_at(command, config, lines, &child_log())
    }

    fn logged_at(
        command: &str,
        config: &std::path::Path,
        lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        level: &str,
    ) -> Process {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
            .args([command, "--config"])
            .arg(config)
            .env("RUST_LOG", level)
            .env("NO_COLOR", "1")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("start kausal {command}: {e}"));
        collect_lines(child.stderr.take().unwrap(), lines);
        Process {
            child,
            config: config.to_path_buf(),
        }
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().expect("wait for the process")
    }

    /// An example program (built by `cargo test --all-targets`), its stdout lines
    /// collected into `lines`.
    pub fn example(
        name: &str,
        config: &std::path::Path,
        lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) -> Process {
        let exe = std::path::Path::new(env!("CARGO_BIN_EXE_kausal"))
            .parent()
            .unwrap()
            .join("examples")
            .join(name);
        let mut child = std::process::Command::new(&exe)
            .arg(config)
            .env("RUST_LOG", child_log())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start {} ({e}): build it with `cargo build --examples`",
                    exe.display()
                )
            });
        collect_lines(child.stdout.take().unwrap(), lines);
        Process {
            child,
            config: config.to_path_buf(),
        }
    }

    /// `kausal <args> --config <config>` (warnings and errors to the test's stderr).
    pub fn kausal(args: &[&str], config: &std::path::Path) -> Process {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
            .args(args)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", child_log())
            .spawn()
            .expect("start kausal");
        Process {
            child,
            config: config.to_path_buf(),
        }
    }

    /// Waits for the process to exit by itself; panics after `timeout`, naming `what`.
    pub async fn exit_within(&mut self, timeout: Duration, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether the process has exited, with its status.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn spawn(config: &std::path::Path) -> Process {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
            .args(["publish", "--config"])
            .arg(config)
            .env("RUST_LOG", child_log())
            .spawn()
            .expect("start kausal publish");
        Process {
            child,
            config: config.to_path_buf(),
        }
    }

    /// `kausal publish` with its stderr (warnings and errors) collected into `lines`.
    pub fn publisher_logged(
        config: &std::path::Path,
        lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) -> Process {
        Process::logged("publish", config, lines)
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Peak resident memory so far, in KiB (`VmHWM`).
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Reads a child's output line by line into `lines`, on a thread of its own.
fn collect_lines(
    output: impl std::io::Read + Send + 'static,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(output)
            .lines()
            .map_while(Result::ok)
        {
            lines.lock().unwrap().push(line);
        }
    });
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
