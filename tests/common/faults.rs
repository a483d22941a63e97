//! The fault-injection harness: one pipeline (source database with the random workload,
//! a `kausal publish` process, `observer` example worker processes sharing the queue
//! through Redis, a Postgres store), a tap that sees every envelope the publisher sent,
//! recovery measured with marker transactions, and one table row of numbers per fault.
#![allow(dead_code)]

use super::sub::{declare_queue, delete_queues, sub_config_text, REDIS};
use super::{config_text, connect, unique, workload, write_config, Process, AMQP, PG};
use kausal::bus::amqp::{AmqpConsumer, QueueSpec};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Marker transactions: one row per measured recovery, published and subscribed like
/// the workload's tables but never touched by it.
const MARKS: &str = "CREATE TABLE fault_marks (id bigint PRIMARY KEY, at text NOT NULL);";

/// Where the pipeline's servers are: Postgres server URLs without a database, and Redis.
#[derive(Clone)]
pub struct Servers {
    pub source: String,
    pub store: String,
    pub redis: String,
}

impl Servers {
    pub fn shared() -> Servers {
        Servers {
            source: PG.into(),
            store: PG.into(),
            redis: REDIS.into(),
        }
    }
}

/// What the tap saw: every decodable envelope's `(generation, seq)`, and the sequence
/// number of each marker row.
#[derive(Default)]
struct TapState {
    seqs: BTreeMap<u64, BTreeSet<u64>>,
    marks: HashMap<i64, (u64, u64)>,
    undecodable: usize,
}

/// Output lines of the observer workers, each with the number of the process that
/// printed it; and the numbers of the processes killed with `kill -9`.
#[derive(Default)]
pub struct Callbacks {
    pub lines: Vec<(usize, String)>,
    pub killed: BTreeSet<usize>,
}

pub struct Pipeline {
    pub ns: String,
    pub servers: Servers,
    pub source_url: String,
    pub store_url: String,
    pub publisher_config: PathBuf,
    pub publisher: Process,
    pub worker_config: PathBuf,
    pub workers: Vec<Process>,
    /// Process number of each entry of `workers`.
    slots: Vec<usize>,
    next_worker: usize,
    pub callbacks: Arc<Mutex<Callbacks>>,
    tap: Arc<Mutex<TapState>>,
    tap_stop: Arc<AtomicBool>,
    tap_task: tokio::task::JoinHandle<()>,
    marks: i64,
    pub recoveries: Vec<Duration>,
}

async fn create_db(server: &str, name: &str, schema: &str) -> String {
    let admin = connect(&format!("{server}/postgres")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = format!("{server}/{name}");
    connect(&url).await.batch_execute(schema).await.unwrap();
    url
}

async fn drop_db(server: &str, name: &str) {
    let Ok((admin, conn)) =
        tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls).await
    else {
        return;
    };
    tokio::spawn(conn);
    for _ in 0..50 {
        let r = admin
            .batch_execute(&format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE database = '{name}' AND NOT active; DROP DATABASE IF EXISTS {name} WITH (FORCE)"
            ))
            .await;
        if r.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Pipeline {
    /// Source and store databases, the app's queue, the tap, a running publisher (its
    /// slot active) and `workers` observer processes. `sections`: extra subscriber TOML
    /// sections (e.g. `[callbacks]`).
    pub async fn start(label: &str, servers: Servers, workers: usize, sections: &str) -> Pipeline {
        super::logs();
        sqlx::any::install_default_drivers();
        let ns = unique(label);
        let source_url = create_db(
            &servers.source,
            &ns,
            &format!("{}{MARKS}", workload::SCHEMA),
        )
        .await;
        let store_url = create_db(&servers.store, &format!("{ns}_store"), "").await;
        declare_queue(&ns, &ns).await;
        let tap = Arc::new(Mutex::new(TapState::default()));
        let tap_stop = Arc::new(AtomicBool::new(false));
        let tap_task = tokio::spawn(run_tap(ns.clone(), tap.clone(), tap_stop.clone()));
        let published = format!(
            "{}[[table]]\nname = \"fault_marks\"\ncolumns = [\"*\"]\n",
            workload::PUBLISHED
        );
        let publisher_config = write_config(&config_text(&ns, &source_url, &published), &ns);
        let subscribed = format!(
            "{}[[table]]\nnamespace = \"{ns}\"\nname = \"fault_marks\"\n",
            workload::subscribed(&ns)
        );
        let worker_config = write_config(
            &sub_config_text(
                &ns,
                &store_url,
                &format!(
                    "appliers = 2\n[coordination]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{ns}\"\n{sections}\n{subscribed}",
                    servers.redis
                ),
            ),
            &format!("{ns}.sub"),
        );
        let publisher = Process::spawn(&publisher_config);
        let mut p = Pipeline {
            ns,
            servers,
            source_url,
            store_url,
            publisher_config,
            publisher,
            worker_config,
            workers: Vec::new(),
            slots: Vec::new(),
            next_worker: 0,
            callbacks: Arc::new(Mutex::new(Callbacks::default())),
            tap,
            tap_stop,
            tap_task,
            marks: 0,
            recoveries: Vec::new(),
        };
        p.wait_slot(true).await;
        for _ in 0..workers {
            let (w, id) = p.spawn_worker(&[]);
            p.workers.push(w);
            p.slots.push(id);
        }
        p
    }

    /// An observer worker process, with extra environment variables; its stdout lines
    /// go to `callbacks`, tagged with a process number of its own.
    pub fn spawn_worker(&mut self, env: &[(&str, &str)]) -> (Process, usize) {
        let id = self.next_worker;
        self.next_worker += 1;
        let exe = std::path::Path::new(env!("CARGO_BIN_EXE_kausal"))
            .parent()
            .unwrap()
            .join("examples/observer");
        let mut child = std::process::Command::new(&exe)
            .arg(&self.worker_config)
            .env("RUST_LOG", super::child_log())
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start {} ({e}): run `cargo build --examples`",
                    exe.display()
                )
            });
        let out = child.stdout.take().unwrap();
        let callbacks = self.callbacks.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                callbacks.lock().unwrap().lines.push((id, line));
            }
        });
        (
            Process {
                child,
                config: self.worker_config.clone(),
            },
            id,
        )
    }

    /// `kill -9` of worker `i`, recorded so that its callbacks' re-runs are explained.
    pub fn kill_worker(&mut self, i: usize) {
        self.workers[i].kill();
        self.callbacks.lock().unwrap().killed.insert(self.slots[i]);
    }

    /// Starts a new worker in slot `i` (after `kill_worker(i)`).
    pub fn restart_worker(&mut self, i: usize, env: &[(&str, &str)]) {
        let (w, id) = self.spawn_worker(env);
        self.workers[i] = w;
        self.slots[i] = id;
    }

    /// Records the process number of a worker pushed to `workers` by hand.
    pub fn add_slot(&mut self, id: usize) {
        self.slots.push(id);
    }

    /// Whether worker `i` has exited (crashed, or aborted by a fault hook).
    pub fn worker_exited(&mut self, i: usize) -> bool {
        self.workers[i].exited().is_some()
    }

    /// Records that worker `i` died on its own (a fault hook aborted it).
    pub fn worker_died(&mut self, i: usize) {
        self.callbacks.lock().unwrap().killed.insert(self.slots[i]);
    }

    pub async fn wait_slot(&self, active: bool) {
        let slot = format!("kausal_{}", self.ns);
        let c = connect_retrying(&self.source_url).await;
        if active {
            super::wait_for_slot(&c, &slot).await;
        } else {
            super::wait_for_slot_released(&c, &slot).await;
        }
    }

    /// `kill -9` of the publisher, then a new one once the server released its slot.
    pub async fn kill_and_restart_publisher(&mut self) {
        self.publisher.kill();
        self.wait_slot(false).await;
        self.publisher = Process::spawn(&self.publisher_config);
    }

    /// The random workload in the background: `txns` transactions from 4 writers.
    pub fn workload(&self, txns: u64, seed: u64) -> tokio::task::JoinHandle<u64> {
        let url = self.source_url.clone();
        tokio::spawn(async move { workload::run(&url, txns, 4, seed).await })
    }

    /// Commits a marker transaction and waits until the store applied everything up to
    /// it: every transaction committed at the source before this call. Returns the time
    /// since `since` (the end of a fault) and records it as a recovery.
    pub async fn recovered(&mut self, since: Instant) -> Duration {
        self.marks += 1;
        let id = self.marks;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok((c, conn)) =
                tokio_postgres::connect(&self.source_url, tokio_postgres::NoTls).await
            {
                tokio::spawn(conn);
                if c.execute("INSERT INTO fault_marks VALUES ($1, now()::text)", &[&id])
                    .await
                    .is_ok()
                {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "cannot write marker {id} to the source"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(180);
        let (generation, seq) = loop {
            if let Some(m) = self.tap.lock().unwrap().marks.get(&id) {
                break *m;
            }
            assert!(
                Instant::now() < deadline,
                "marker {id} was never published (the publisher lost it)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let deadline = Instant::now() + Duration::from_secs(240);
        let mut store = None;
        loop {
            if store.is_none() {
                store = sqlx::AnyPool::connect(&self.store_url).await.ok();
            }
            if let Some(s) = &store {
                if let Ok((through, _)) = applied(s, &self.ns, generation).await {
                    if through >= seq {
                        break;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "the store never applied through seq {seq} (marker {id}); applied: {:?}",
                match &store {
                    Some(s) => applied(s, &self.ns, generation).await.ok(),
                    None => None,
                }
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if let Some(s) = store {
            s.close().await;
        }
        let took = since.elapsed();
        self.recoveries.push(took);
        took
    }

    /// After the workload: waits until the store caught up, compares it with the source
    /// row by row, counts lost envelopes and the callbacks' duplicates and causal
    /// violations, stops everything and deletes what the test created.
    pub async fn finish(mut self, fault: &str, injected: u32, inserts: u64) -> Tally {
        self.recovered(Instant::now()).await;
        // `recovered` pushed the final marker's catch-up; it is no fault's recovery.
        self.recoveries.pop();
        sqlx::any::install_default_drivers();
        let store = sqlx::AnyPool::connect(&self.store_url).await.unwrap();
        workload::converge(&self.source_url, &store, Duration::from_secs(60)).await;
        let mut lost = 0;
        let seqs = std::mem::take(&mut self.tap.lock().unwrap().seqs);
        for (generation, published) in &seqs {
            let max = *published.iter().next_back().unwrap();
            // Gaps in what the publisher sent, and what the store never applied.
            lost += max - published.len() as u64;
            let (through, above) = applied(&store, &self.ns, *generation).await.unwrap();
            lost += (1..=max)
                .filter(|s| *s > through && !above.contains(s))
                .count() as u64;
        }
        store.close().await;
        let (duplicates, after_crash, violations, keys) = self.count_callbacks(inserts).await;
        let tally = Tally {
            fault: fault.to_string(),
            injected,
            transactions: seqs.values().map(|s| s.len() as u64).sum(),
            lost,
            duplicates,
            reruns_after_crash: after_crash,
            violations,
            recoveries: std::mem::take(&mut self.recoveries),
        };
        assert_eq!(keys, inserts, "one callback key per inserted message");
        self.cleanup().await;
        tally
    }

    /// Waits (up to 60 s) for one callback per inserted message, then counts:
    /// duplicates (a key seen twice, the first time in a process that was not killed
    /// afterwards), re-runs after a crash (the first time in a process then killed with
    /// `kill -9`: the side effect ran, the store transaction never committed), causal
    /// violations, and distinct keys.
    async fn count_callbacks(&self, inserts: u64) -> (u64, u64, u64, u64) {
        let key = |l: &str| l.rsplit_once('[').map(|(_, k)| k.to_string());
        for _ in 0..600 {
            let distinct: BTreeSet<String> = self
                .callbacks
                .lock()
                .unwrap()
                .lines
                .iter()
                .filter_map(|(_, l)| key(l))
                .collect();
            if distinct.len() as u64 >= inserts {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let cb = self.callbacks.lock().unwrap();
        let mut first: HashMap<String, usize> = HashMap::new();
        let (mut duplicates, mut after_crash, mut violations) = (0, 0, 0);
        let mut shown = Vec::new();
        for (process, line) in &cb.lines {
            if line.starts_with("VIOLATION") {
                violations += 1;
                continue;
            }
            let Some(k) = key(line) else { continue };
            match first.get(&k) {
                Some(p) if cb.killed.contains(p) => after_crash += 1,
                Some(p) => {
                    duplicates += 1;
                    if shown.len() < 5 {
                        shown.push(format!("{k} in processes {p} and {process}"));
                    }
                }
                None => {
                    first.insert(k, *process);
                }
            }
        }
        if duplicates > 0 {
            eprintln!(
                "{}: duplicate callbacks (key, worker processes): {shown:?}",
                self.ns
            );
        }
        if violations > 0 {
            let shown: Vec<&String> = cb
                .lines
                .iter()
                .map(|(_, l)| l)
                .filter(|l| l.starts_with("VIOLATION"))
                .take(5)
                .collect();
            eprintln!("{}: causal violations {violations}: {shown:?}", self.ns);
        }
        (duplicates, after_crash, violations, first.len() as u64)
    }

    async fn cleanup(mut self) {
        for w in &mut self.workers {
            w.kill();
        }
        self.publisher.kill();
        self.tap_stop.store(true, Ordering::Relaxed);
        let _ = (&mut self.tap_task).await;
        drop_db(&self.servers.source, &self.ns).await;
        drop_db(&self.servers.store, &format!("{}_store", self.ns)).await;
        delete_queues(&self.ns).await;
        delete_queues(&format!("test.{}", self.ns)).await;
        let _ = std::fs::remove_file(&self.publisher_config);
        let _ = std::fs::remove_file(&self.worker_config);
        let _ = std::fs::remove_file(super::checkpoint_path(&self.ns));
        if let Ok(client) = redis::Client::open(self.servers.redis.as_str()) {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{}:*", self.ns))
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                if !keys.is_empty() {
                    let _: Result<(), _> =
                        redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
                }
            }
        }
    }
}

async fn connect_retrying(url: &str) -> tokio_postgres::Client {
    for _ in 0..600 {
        if let Ok((c, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
            tokio::spawn(conn);
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("cannot connect to {url} for 60 s");
}

/// The store's applied-through watermark of a namespace's generation (contiguous), and
/// the applied sequence numbers above its compacted watermark.
async fn applied(
    store: &sqlx::AnyPool,
    ns: &str,
    generation: u64,
) -> Result<(u64, BTreeSet<u64>), sqlx::Error> {
    let compacted: Option<i64> = sqlx::query_scalar(
        "SELECT \"through\" FROM kausal_progress WHERE namespace = $1 AND generation = $2",
    )
    .bind(ns)
    .bind(generation as i64)
    .fetch_optional(store)
    .await?;
    let above: Vec<i64> = sqlx::query_scalar(
        "SELECT seq FROM kausal_applied WHERE namespace = $1 AND generation = $2",
    )
    .bind(ns)
    .bind(generation as i64)
    .fetch_all(store)
    .await?;
    let above: BTreeSet<u64> = above.into_iter().map(|s| s as u64).collect();
    let mut through = compacted.unwrap_or(0) as u64;
    while above.contains(&(through + 1)) {
        through += 1;
    }
    Ok((through, above))
}

/// Consumes a queue of its own bound to the namespace, until `stop`; reconnects after
/// broker restarts.
async fn run_tap(ns: String, state: Arc<Mutex<TapState>>, stop: Arc<AtomicBool>) {
    let mut spec = QueueSpec::durable(&format!("test.{ns}"), &[&ns]);
    spec.prefetch = 1000;
    let mut consumer: Option<AmqpConsumer> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(c) = consumer.as_mut() else {
            match AmqpConsumer::connect(AMQP, "kausal", &spec).await {
                Ok(c) => consumer = Some(c),
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
            continue;
        };
        match tokio::time::timeout(Duration::from_millis(500), c.next()).await {
            Err(_) => {}
            Ok(Some(Ok(d))) => {
                {
                    let mut s = state.lock().unwrap();
                    match kausal::bus::decode(&d.body) {
                        Ok(envelopes) => {
                            for e in envelopes.iter().filter(|e| e.is_last_part()) {
                                s.seqs.entry(e.generation).or_default().insert(e.seq);
                                for ch in e.changes.iter().filter(|c| c.table == "fault_marks") {
                                    if let Some(id) = ch.key.get("id").and_then(|v| v.as_i64()) {
                                        s.marks.insert(id, (e.generation, e.seq));
                                    }
                                }
                            }
                        }
                        Err(_) => s.undecodable += 1,
                    }
                }
                if d.ack().await.is_err() {
                    consumer = None;
                }
            }
            Ok(_) => consumer = None,
        }
    }
    if let Some(c) = consumer {
        c.close().await;
    }
}

/// One fault's numbers.
pub struct Tally {
    pub fault: String,
    pub injected: u32,
    /// Distinct transactions published (sequence numbers).
    pub transactions: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reruns_after_crash: u64,
    pub violations: u64,
    pub recoveries: Vec<Duration>,
}

pub const HEADER: &str = "| fault | injected | transactions | lost | duplicate callbacks | re-runs after kill -9 | causal violations | recovery median / max |\n|---|---|---|---|---|---|---|---|";

impl Tally {
    /// Prints the row (visible with `--nocapture`) and asserts the guarantees.
    pub fn report(&self) {
        let mut r = self.recoveries.clone();
        r.sort();
        let rec = match (r.get(r.len() / 2), r.last()) {
            (Some(m), Some(x)) => format!("{:.1} s / {:.1} s", m.as_secs_f64(), x.as_secs_f64()),
            _ => "–".into(),
        };
        println!(
            "{HEADER}\n| {} | {} | {} | {} | {} | {} | {} | {rec} |",
            self.fault,
            self.injected,
            self.transactions,
            self.lost,
            self.duplicates,
            self.reruns_after_crash,
            self.violations
        );
        assert_eq!(self.lost, 0, "{}: envelopes lost", self.fault);
        assert_eq!(self.violations, 0, "{}: causal violations", self.fault);
    }
}

/// A xorshift generator for the moments and victims of faults (seeded: a failing run
/// can be repeated).
pub struct Dice(pub u64);

impl Dice {
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    /// A random pause of `from..from+spread` milliseconds.
    pub async fn pause(&mut self, from: u64, spread: u64) {
        tokio::time::sleep(Duration::from_millis(from + self.below(spread))).await;
    }
}
