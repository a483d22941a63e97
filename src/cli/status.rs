//! `kausal status`: where each publisher and subscriber stands, read from the servers
//! themselves (replication slot or binlog, queue, store) and from the processes' own
//! reports (a publisher's `/status` endpoint, each worker's row in its store).

use super::load::{either, Loaded};
use kausal::publisher::config::SourceConfig;
use kausal::publisher::PublisherConfig;
use kausal::subscriber::status::{now_ms, WorkerStatus, GONE_AFTER_MS};
use kausal::subscriber::SubscriberConfig;
use serde::Serialize;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct StatusArgs {
    /// A publisher or subscriber configuration (TOML); repeat for several.
    #[arg(long, short, required = true)]
    config: Vec<PathBuf>,
    /// Print JSON (for scripts) instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Default)]
pub struct PublisherView {
    pub namespace: String,
    pub source: String,
    /// Whether the publisher is streaming (slot in use / endpoint answering).
    pub running: Option<bool>,
    pub slot: Option<String>,
    pub source_position: Option<String>,
    pub confirmed_position: Option<String>,
    pub lag_bytes: Option<i64>,
    pub lag_s: Option<f64>,
    pub envelopes_per_s: Option<f64>,
    pub confirmed_seq: Option<u64>,
    /// Bootstrap requests the running publisher holds (answering or waiting).
    pub bootstrap_requests: Vec<kausal::publisher::ops::BootstrapRequestStatus>,
    /// Requests still in the control queue, not yet taken by the publisher.
    pub bootstrap_queued: Option<u32>,
    pub problems: Vec<String>,
}

#[derive(Serialize, Default)]
pub struct SubscriberView {
    pub app: String,
    pub queue: String,
    pub queue_depth: Option<u32>,
    pub consumers: Option<u32>,
    pub dead_letters: Option<u32>,
    pub streams: Vec<StreamView>,
    /// Each table's bootstrap: `done` 0 while chunks come, 1 once all are applied, 2
    /// once its bookkeeping is gone too (scripts wait for `done >= 1`).
    pub bootstraps: Vec<kausal::subscriber::sink::sql::BootstrapState>,
    pub workers: Vec<WorkerView>,
    pub problems: Vec<String>,
}

#[derive(Serialize)]
pub struct StreamView {
    pub namespace: String,
    pub generation: u64,
    pub applied_through: u64,
    /// The largest lag any running worker reports for this stream.
    pub lag_s: Option<f64>,
}

#[derive(Serialize)]
pub struct WorkerView {
    /// `running`, or `gone` (no report for a while: crashed or killed).
    pub state: &'static str,
    pub last_seen_s: f64,
    #[serde(flatten)]
    pub status: WorkerStatus,
}

#[derive(Serialize, Default)]
struct Report {
    publishers: Vec<PublisherView>,
    subscribers: Vec<SubscriberView>,
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let mut report = Report::default();
    for path in &args.config {
        match either(path)? {
            Loaded::Publisher(cfg) => report.publishers.push(publisher(&cfg).await),
            Loaded::Subscriber(cfg) => report.subscribers.push(subscriber(&cfg).await),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    let problems = report.publishers.iter().any(|p| !p.problems.is_empty())
        || report.subscribers.iter().any(|s| !s.problems.is_empty());
    if problems {
        std::process::exit(1);
    }
    Ok(())
}

pub use kausal_bus::error_chain as chain;

pub async fn publisher(cfg: &PublisherConfig) -> PublisherView {
    let mut v = PublisherView {
        namespace: cfg.namespace.clone(),
        ..PublisherView::default()
    };
    match &cfg.source {
        SourceConfig::Postgres(pg) => {
            if let Err(e) = postgres_position(cfg, pg, &mut v).await {
                v.problems.push(e);
            }
        }
        SourceConfig::Mysql(my) => {
            if let Err(e) = mysql_position(cfg, my, &mut v).await {
                v.problems.push(e);
            }
        }
    }
    let control = kausal::bus::bootstrap::control_queue(&cfg.namespace);
    if let Ok(Some((ready, _))) = kausal::bus::amqp::queue_depth(&cfg.broker.url, &control).await {
        v.bootstrap_queued = Some(ready);
    }
    if let Some(listen) = &cfg.metrics.listen {
        match live_publisher(listen, &cfg.namespace).await {
            Some(live) => {
                v.running = Some(true);
                v.envelopes_per_s = Some(live.envelopes_per_s);
                v.confirmed_seq = Some(live.confirmed_seq);
                v.bootstrap_requests = live.bootstrap_requests;
                v.lag_s = Some(v.lag_s.unwrap_or(0.0).max(live.lag_s));
                if v.confirmed_position.is_none() {
                    v.confirmed_position = Some(live.checkpointed_position);
                }
            }
            // Not running is a state, not a problem; the slot shows what it costs.
            None => {
                if v.running.is_none() {
                    v.running = Some(false);
                }
            }
        }
    }
    v
}

/// The live status of the namespace's publisher at `listen` (each port of a range
/// is asked: other processes of the host may hold some of them).
async fn live_publisher(
    listen: &str,
    namespace: &str,
) -> Option<kausal::publisher::ops::PublisherStatus> {
    for addr in kausal::ops::addresses(listen).ok()? {
        let Ok(body) = kausal::ops::get(&addr, "/status").await else {
            continue;
        };
        match serde_json::from_str::<kausal::publisher::ops::PublisherStatus>(&body) {
            Ok(live) if live.namespace == namespace => return Some(live),
            _ => continue,
        }
    }
    None
}

async fn postgres_position(
    cfg: &PublisherConfig,
    pg: &kausal::publisher::config::PostgresSource,
    v: &mut PublisherView,
) -> Result<(), String> {
    use kausal::publisher::source::postgres;
    let password = pg.password().map_err(|e| chain(&e))?;
    let conn = postgres::catalog::ConnInfo::parse(&pg.url, password).map_err(|e| chain(&e))?;
    v.source = format!("postgres {}", conn.endpoint());
    let client = conn.connect().await.map_err(|e| chain(&e))?;
    for table in postgres::catalog::missing_tables(&client, cfg)
        .await
        .map_err(|e| chain(&e))?
    {
        v.problems.push(format!(
            "published table {table} does not exist at the source (dropped or renamed): \
             remove it from [[table]] or publish the new name"
        ));
    }
    let slot = postgres::slot_name(cfg, pg);
    v.slot = Some(slot.clone());
    let current = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| format!("reading the WAL position: {e}"))?;
    v.source_position = Some(current.get(0));
    let row = client
        .query_opt(
            "SELECT s.active, s.confirmed_flush_lsn::text, \
               pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::int8, \
               (SELECT EXTRACT(epoch FROM GREATEST(r.write_lag, r.flush_lag))::float8 \
                  FROM pg_stat_replication r WHERE r.pid = s.active_pid) \
             FROM pg_replication_slots s WHERE s.slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(|e| format!("reading replication slot {slot}: {e}"))?;
    match row {
        Some(r) => {
            v.running = Some(r.get(0));
            v.confirmed_position = r.get(1);
            v.lag_bytes = r.get(2);
            v.lag_s = Some(r.get::<_, Option<f64>>(3).unwrap_or(0.0));
        }
        None => v.problems.push(format!(
            "replication slot {slot} does not exist: the publisher creates it when it \
             first starts (`kausal publish --config …`)"
        )),
    }
    Ok(())
}

async fn mysql_position(
    cfg: &PublisherConfig,
    my: &kausal::publisher::config::MysqlSource,
    v: &mut PublisherView,
) -> Result<(), String> {
    use kausal::publisher::source::mysql::catalog;
    let info = catalog::ConnInfo::parse(my).map_err(|e| chain(&e))?;
    v.source = format!("mysql {}", info.endpoint());
    let mut conn = info.connect().await.map_err(|e| chain(&e))?;
    let server = catalog::check_server(&mut conn, &info.user)
        .await
        .map_err(|e| chain(&e))?;
    let current = catalog::current_position(&mut conn, &server)
        .await
        .map_err(|e| chain(&e))?;
    let _ = conn.disconnect().await;
    // The confirmed position is in the publisher's checkpoint (when this host has it).
    if let Ok(Some(cp)) = kausal::publisher::checkpoint::load(&cfg.checkpoint_path()) {
        if !cp.resume.is_empty() {
            v.lag_bytes = binlog_distance(&current, &cp.resume);
            v.confirmed_position = Some(cp.resume);
        }
    }
    v.source_position = Some(current);
    Ok(())
}

/// Bytes between two `file:<name>:<offset>` positions of the same binlog file.
fn binlog_distance(current: &str, confirmed: &str) -> Option<i64> {
    let parse = |p: &str| {
        let rest = p.strip_prefix("file:")?;
        let (file, offset) = rest.rsplit_once(':')?;
        Some((file.to_string(), offset.parse::<i64>().ok()?))
    };
    let (f1, o1) = parse(current)?;
    let (f2, o2) = parse(confirmed)?;
    (f1 == f2).then_some((o1 - o2).max(0))
}

pub async fn subscriber(cfg: &SubscriberConfig) -> SubscriberView {
    let queue = cfg.queue();
    let mut v = SubscriberView {
        app: cfg.app.clone(),
        queue: queue.clone(),
        ..SubscriberView::default()
    };
    match kausal::bus::amqp::queue_depth(&cfg.broker.url, &queue).await {
        Ok(Some((ready, consumers))) => {
            v.queue_depth = Some(ready);
            v.consumers = Some(consumers);
        }
        Ok(None) => v.problems.push(format!(
            "queue {queue} does not exist: a worker declares it when it first starts \
             (`kausal subscribe --config …`)"
        )),
        Err(e) => v.problems.push(chain(&e)),
    }
    let dlq = format!("{queue}.dlq");
    if let Ok(Some((n, _))) = kausal::bus::amqp::queue_depth(&cfg.broker.url, &dlq).await {
        v.dead_letters = Some(n);
    }
    if let Err(e) = store_view(cfg, &mut v).await {
        v.problems.push(e);
    }
    v
}

async fn store_view(cfg: &SubscriberConfig, v: &mut SubscriberView) -> Result<(), String> {
    use kausal::subscriber::sink::sql;
    sqlx::any::install_default_drivers();
    let dialect = sql::Dialect::from_url(&cfg.store.url)
        .ok_or_else(|| "store.url: use sqlite://, postgres:// or mysql://".to_string())?;
    if super::sqlite_file(&cfg.store.url).is_some_and(|p| !p.exists()) {
        // No worker has started yet: nothing applied, nobody running.
        return Ok(());
    }
    let url = kausal::subscriber::tls::store_url(&cfg.store.url)
        .map_err(|e| format!("store.url: {e}"))?;
    kausal::bus::tls::install_crypto_provider();
    let pool = sqlx::AnyPool::connect(&url)
        .await
        .map_err(|e| format!("cannot open the store: {e}"))?;
    let progress = sql::read_progress(&pool, dialect)
        .await
        .map_err(|e| format!("reading the store's progress: {e}"))?;
    let workers = sql::read_statuses(&pool)
        .await
        .map_err(|e| format!("reading the workers' status: {e}"))?;
    v.bootstraps = sql::read_bootstraps(&pool)
        .await
        .map_err(|e| format!("reading the store's bootstraps: {e}"))?;
    pool.close().await;
    let now = now_ms();
    v.workers = workers
        .into_iter()
        .map(|status| {
            let age = now - status.updated_ms;
            WorkerView {
                state: if age > GONE_AFTER_MS {
                    "gone"
                } else {
                    "running"
                },
                last_seen_s: age.max(0) as f64 / 1000.0,
                status,
            }
        })
        .collect();
    let mut streams: Vec<StreamView> = progress
        .into_iter()
        .map(|(namespace, generation, applied_through)| StreamView {
            namespace,
            generation,
            applied_through,
            lag_s: None,
        })
        .collect();
    // Workers know more than the compacted watermark, and the lag.
    for w in v.workers.iter().filter(|w| w.state == "running") {
        for s in &w.status.streams {
            let view = match streams
                .iter_mut()
                .find(|x| x.namespace == s.namespace && x.generation == s.generation)
            {
                Some(x) => x,
                None => {
                    streams.push(StreamView {
                        namespace: s.namespace.clone(),
                        generation: s.generation,
                        applied_through: 0,
                        lag_s: None,
                    });
                    streams.last_mut().expect("just pushed")
                }
            };
            view.applied_through = view.applied_through.max(s.applied_through);
            view.lag_s = Some(view.lag_s.unwrap_or(0.0).max(s.lag_s));
        }
    }
    v.streams = streams;
    Ok(())
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or("-".into(), |x| x.to_string())
}

fn render(r: &Report) -> String {
    let mut out = String::new();
    for p in &r.publishers {
        let state = match p.running {
            Some(true) => "running",
            Some(false) => "not running",
            None => "unknown",
        };
        out += &format!("publisher {}  ({}, {state})\n", p.namespace, p.source);
        if let Some(slot) = &p.slot {
            out += &format!("  slot                {slot}\n");
        }
        out += &format!("  source position     {}\n", opt(&p.source_position));
        out += &format!("  confirmed position  {}\n", opt(&p.confirmed_position));
        out += &format!(
            "  lag                 {} bytes, {} s\n",
            opt(&p.lag_bytes),
            p.lag_s.map_or("-".into(), |s| format!("{s:.1}"))
        );
        out += &format!(
            "  envelopes/s         {}\n",
            p.envelopes_per_s
                .map_or("- (no [metrics] endpoint answering)".into(), |r| format!(
                    "{r:.1}"
                ))
        );
        if let Some(seq) = p.confirmed_seq {
            out += &format!("  confirmed seq       {seq}\n");
        }
        for b in &p.bootstrap_requests {
            out += &format!(
                "  bootstrap           {} for {} ({}): {}\n",
                b.request,
                b.queue,
                b.tables.join(", "),
                b.state
            );
        }
        if let Some(n) = p.bootstrap_queued.filter(|n| *n > 0) {
            out += &format!("  bootstrap queued    {n} request(s) waiting in the control queue\n");
        }
        for problem in &p.problems {
            out += &format!("  problem: {problem}\n");
        }
    }
    for s in &r.subscribers {
        out += &format!("subscriber {}  (queue {})\n", s.app, s.queue);
        out += &format!(
            "  queue depth         {} ready, {} consumers\n",
            opt(&s.queue_depth),
            opt(&s.consumers)
        );
        out += &format!("  dead letters        {}\n", opt(&s.dead_letters));
        for st in &s.streams {
            out += &format!(
                "  applied through     {}/{}/{}  lag {} s\n",
                st.namespace,
                st.generation,
                st.applied_through,
                st.lag_s.map_or("-".into(), |l| format!("{l:.1}"))
            );
        }
        for b in &s.bootstraps {
            let state = match b.done {
                0 => "chunks coming",
                1 => "every chunk applied",
                _ => "finished",
            };
            out += &format!(
                "  bootstrap           {}/{}: {} rows, {state}\n",
                b.namespace, b.table, b.rows_applied
            );
        }
        for w in &s.workers {
            let st = &w.status;
            out += &format!(
                "  worker {}  {} (seen {:.0} s ago): {} held, {} in flight, {} waiting, {} applied, {} dead-lettered\n",
                st.worker, w.state, w.last_seen_s, st.held_deliveries, st.in_flight,
                st.waiting_count, st.applied, st.dead_lettered
            );
            if let Some(endpoint) = &st.endpoint {
                out += &format!("    serves /metrics and /status at {endpoint}\n");
            }
            if !st.partitions.is_empty() {
                let list: Vec<String> = st.partitions.iter().map(u32::to_string).collect();
                out += &format!("    consumes partitions {}\n", list.join(", "));
            }
            for wait in &st.waiting {
                out += &format!(
                    "    {} waits for seq {} ({} s)\n",
                    wait.tx,
                    opt(&wait.waits_for_seq),
                    wait.waited_s
                );
            }
        }
        if s.workers.is_empty() {
            out += "  workers             none reported\n";
        }
        for problem in &s.problems {
            out += &format!("  problem: {problem}\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binlog_distance_is_known_within_one_file_only() {
        assert_eq!(
            binlog_distance("file:b.000002:900", "file:b.000002:400"),
            Some(500)
        );
        assert_eq!(
            binlog_distance("file:b.000003:900", "file:b.000002:400"),
            None
        );
        assert_eq!(binlog_distance("gtid:0-1-9", "gtid:0-1-5"), None);
    }
}
