//! `kausal doctor`: a configuration checked against the real servers, each finding
//! printed with its fix. Changes nothing (no slot, publication, queue or table is
//! created); exits 1 when something would stop Kausal.

mod source;
mod tls;
use super::load::{either, Loaded};
use super::status::chain;
use kausal::subscriber::SubscriberConfig;
use serde::Serialize;
use source::publisher;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tls::encryption;

/// Clocks further apart than this skew lag figures (they compare commit times with
/// the local clock): a warning.
const MAX_SKEW: Duration = Duration::from_secs(2);

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// A publisher or subscriber configuration (TOML); repeat for several.
    #[arg(long, short, required = true)]
    config: Vec<PathBuf>,
    /// Print JSON lines instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Serialize)]
pub struct Finding {
    pub level: Level,
    pub check: String,
    pub detail: String,
    pub fix: Option<String>,
}

#[derive(Default)]
pub(super) struct Findings(Vec<Finding>);

impl Findings {
    pub(super) fn ok(&mut self, check: &str, detail: impl Into<String>) {
        self.push(Level::Ok, check, detail.into(), None);
    }
    pub(super) fn warn(&mut self, check: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Warn, check, detail.into(), Some(fix.into()));
    }
    pub(super) fn fail(&mut self, check: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(Level::Fail, check, detail.into(), Some(fix.into()));
    }
    pub(super) fn push(&mut self, level: Level, check: &str, detail: String, fix: Option<String>) {
        self.0.push(Finding {
            level,
            check: check.to_string(),
            detail,
            fix,
        });
    }
    /// A skew measurement: `server_s` read between `before` and `after` (local).
    pub(super) fn clock(
        &mut self,
        check: &str,
        server: &str,
        server_s: f64,
        before: f64,
        after: f64,
    ) {
        let skew = server_s - (before + after) / 2.0;
        let detail = format!("{server} clock is {skew:+.3} s from this host's");
        if skew.abs() > MAX_SKEW.as_secs_f64() {
            self.warn(
                check,
                detail,
                "run NTP (chrony, systemd-timesyncd) on both hosts: lag figures compare \
                 commit times with local clocks",
            );
        } else {
            self.ok(check, detail);
        }
    }
}

pub fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub async fn run(args: DoctorArgs) -> anyhow::Result<()> {
    let mut failed = false;
    for path in &args.config {
        let mut f = Findings::default();
        match either(path)? {
            Loaded::Publisher(cfg) => publisher(&cfg, &mut f).await,
            Loaded::Subscriber(cfg) => subscriber(&cfg, path, &mut f).await,
        }
        if !args.json {
            println!("{}", path.display());
        }
        for finding in &f.0 {
            failed |= finding.level == Level::Fail;
            if args.json {
                println!("{}", serde_json::to_string(finding)?);
                continue;
            }
            let tag = match finding.level {
                Level::Ok => "ok  ",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            println!("  {tag}  {:<13} {}", finding.check, finding.detail);
            if let Some(fix) = &finding.fix {
                for line in fix.lines() {
                    println!("        fix: {line}");
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

async fn broker(url: &str, exchange: &str, f: &mut Findings) {
    match kausal::bus::amqp::exchange_exists(url, exchange).await {
        Ok(true) => f.ok("broker", format!("reachable; exchange {exchange} exists")),
        Ok(false) => f.ok(
            "broker",
            format!("reachable; exchange {exchange} does not exist yet (declared at first start)"),
        ),
        Err(e) => f.fail(
            "broker",
            chain(&e),
            "check broker.url and that RabbitMQ runs",
        ),
    }
}

async fn subscriber(cfg: &SubscriberConfig, path: &std::path::Path, f: &mut Findings) {
    if let Err(e) = cfg.validate() {
        f.fail("config", e.to_string(), "edit the configuration file");
        return;
    }
    f.ok(
        "config",
        format!("app {}, {} tables subscribed", cfg.app, cfg.tables.len()),
    );
    store(cfg, f).await;
    broker(&cfg.broker.url, &cfg.broker.exchange, f).await;
    let queue = cfg.queue();
    broker_user(cfg, f);
    match kausal::bus::amqp::queue_depth(&cfg.broker.url, &queue).await {
        Ok(Some((ready, consumers))) => {
            f.ok("queue", format!("{queue}: {ready} ready, {consumers} consumers"))
        }
        Ok(None) => f.ok(
            "queue",
            format!("{queue} does not exist yet: the first worker declares it (changes published before are not in it: bootstrap)"),
        ),
        Err(_) => {}
    }
    if let Ok(Some((n, _))) =
        kausal::bus::amqp::queue_depth(&cfg.broker.url, &format!("{queue}.dlq")).await
    {
        if n > 0 {
            f.warn(
                "dead letters",
                format!("{n} in {queue}.dlq"),
                format!(
                    "see why: kausal dlq list --config {}; then retry or drop them",
                    path.display()
                ),
            );
        } else {
            f.ok("dead letters", "none");
        }
    }
    encryption("broker", &cfg.broker.url, f);
    encryption("store", &cfg.store.url, f);
    use kausal::subscriber::config::{Coordination, SinkConfig};
    if let Coordination::Redis { url, .. } = &cfg.coordination {
        redis_check("coordination", url, f).await;
        encryption("coordination", url, f);
    }
    for sink in &cfg.sinks {
        #[allow(irrefutable_let_patterns)]
        if let SinkConfig::Redis(r) = sink {
            redis_check("redis sink", &r.url, f).await;
            encryption("redis sink", &r.url, f);
        }
        #[cfg(feature = "mongo")]
        if let SinkConfig::Mongo(m) = sink {
            encryption("mongo sink", &m.url, f);
        }
    }
    let view = super::status::subscriber(cfg).await;
    let waits: Vec<String> = view
        .workers
        .iter()
        .filter(|w| w.state == "running")
        .flat_map(|w| w.status.waiting.iter())
        .filter(|w| w.waited_s * 1000 >= cfg.ordering.report_wait_ms)
        .map(|w| format!("{} waits for seq {}", w.tx, w.waits_for_seq.unwrap_or(0)))
        .collect();
    if !waits.is_empty() {
        f.warn(
            "waits",
            format!(
                "{} transaction(s) wait long: {}",
                waits.len(),
                waits.join("; ")
            ),
            format!(
                "if that sequence number never comes (dead-lettered: kausal dlq list; lost): \
                 kausal subscriber release --config {} --seq N",
                path.display()
            ),
        );
    }
}

/// The broker user's rights cannot be read over AMQP: `guest` (all rights on its
/// vhost) is named, with the commands for a user of this app only.
fn broker_user(cfg: &SubscriberConfig, f: &mut Findings) {
    let (user, vhost) = amqp_user_and_vhost(&cfg.broker.url);
    let commands = least_privilege_commands(cfg, &vhost);
    if user == "guest" {
        f.warn(
            "broker user",
            format!("guest may configure, write and read everything on vhost {vhost}"),
            format!(
                "a user that reads only this app's queues and cannot publish changes:\n{commands}"
            ),
        );
    } else {
        f.ok(
            "broker user",
            format!("{user} (its rights are not visible over AMQP; the least-privilege commands are in docs/security.md)"),
        );
    }
}

/// `rabbitmqctl` commands creating a user for one subscriber app: it may declare and
/// read its own queues, dead-letter into `<exchange>.dlx`, and publish through the
/// default exchange (moving a message to its queue's tail, bootstrap requests) — but
/// not publish to the change exchange.
pub fn least_privilege_commands(cfg: &SubscriberConfig, vhost: &str) -> String {
    let esc = |s: &str| s.replace('.', "\\.");
    let (q, x) = (esc(&cfg.queue()), esc(&cfg.broker.exchange));
    let user = format!("kausal_{}", cfg.app);
    format!(
        "rabbitmqctl add_user {user} '<password>'\n\
         rabbitmqctl set_permissions -p '{vhost}' {user} '^({x}|{x}\\.dlx|{q}|{q}\\.dlq)$' \
         '^({x}\\.dlx|{q}|{q}\\.dlq|amq\\.default)$' '^({x}|{x}\\.dlx|{q}|{q}\\.dlq)$'"
    )
}

/// The user and vhost of an `amqp://user:password@host:port/vhost` URL.
fn amqp_user_and_vhost(url: &str) -> (String, String) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (creds, host) = rest.rsplit_once('@').unwrap_or(("guest", rest));
    let user = creds.split(':').next().unwrap_or("guest").to_string();
    let vhost = match host.split_once('/') {
        Some((_, v)) if !v.is_empty() => v
            .split('?')
            .next()
            .unwrap_or(v)
            .replace("%2f", "/")
            .replace("%2F", "/"),
        _ => "/".to_string(),
    };
    (user, vhost)
}

async fn store(cfg: &SubscriberConfig, f: &mut Findings) {
    use kausal::subscriber::sink::sql::Dialect;
    sqlx::any::install_default_drivers();
    let Some(dialect) = Dialect::from_url(&cfg.store.url) else {
        f.fail(
            "store",
            "store.url is no sqlite://, postgres:// or mysql:// URL",
            "fix store.url",
        );
        return;
    };
    if let Some(path) = super::sqlite_file(&cfg.store.url) {
        if !path.exists() {
            let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
            if dir.is_none_or(|d| d.is_dir()) {
                f.ok(
                    "store",
                    format!(
                        "{} does not exist yet: the first worker creates it",
                        path.display()
                    ),
                );
            } else {
                f.fail(
                    "store",
                    format!("the directory of {} does not exist", path.display()),
                    "create it, or point store.url elsewhere",
                );
            }
            return;
        }
    }
    let shown = kausal::bus::amqp::redact_url(&cfg.store.url);
    let url = match kausal::subscriber::tls::store_url(&cfg.store.url) {
        Ok(url) => url,
        Err(e) => {
            f.fail(
                "store",
                format!("{shown}: {e}"),
                "fix the TLS parameters of store.url",
            );
            return;
        }
    };
    kausal::bus::tls::install_crypto_provider();
    let pool = match sqlx::AnyPool::connect(&url).await {
        Ok(p) => p,
        Err(e) => {
            f.fail(
                "store",
                format!("cannot open {shown}: {}", kausal::bus::tls::describe(&e)),
                "check store.url, that the database exists and the user may create tables in it",
            );
            return;
        }
    };
    f.ok(
        "store",
        format!("{:?} store reachable", dialect).to_lowercase(),
    );
    let sql = match dialect {
        Dialect::Postgres => Some("SELECT EXTRACT(epoch FROM clock_timestamp())::float8"),
        Dialect::MySql => Some("SELECT CAST(UNIX_TIMESTAMP(NOW(6)) AS DOUBLE)"),
        Dialect::Sqlite => None,
    };
    if let Some(sql) = sql {
        let before = now_s();
        if let Ok(t) = sqlx::query_scalar::<_, f64>(sql).fetch_one(&pool).await {
            f.clock("store clock", "the store's", t, before, now_s());
        }
    }
    pool.close().await;
}

async fn redis_check(check: &str, url: &str, f: &mut Findings) {
    let shown = kausal::bus::amqp::redact_url(url);
    let client = match kausal::subscriber::tls::redis_client(url) {
        Ok(c) => c,
        Err(e) => {
            f.fail(
                check,
                format!("{shown}: {e}"),
                "fix the Redis URL (redis://host:6379/0, or rediss://host:6380?cacert=<CA file>)",
            );
            return;
        }
    };
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await;
    let mut conn = match conn {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            f.fail(
                check,
                format!("{shown}: {}", kausal::bus::tls::describe(&e)),
                "check the URL and that Redis runs",
            );
            return;
        }
        Err(_) => {
            f.fail(
                check,
                format!("{shown}: no answer within 5 s"),
                "check the URL and that Redis runs",
            );
            return;
        }
    };
    let before = now_s();
    match redis::cmd("TIME")
        .query_async::<(u64, u64)>(&mut conn)
        .await
    {
        Ok((s, us)) => {
            f.ok(check, format!("{shown} reachable"));
            f.clock(
                &format!("{check} clock"),
                "Redis's",
                s as f64 + us as f64 / 1e6,
                before,
                now_s(),
            );
        }
        Err(e) => f.fail(
            check,
            format!("{shown}: {e}"),
            "check the URL, the password and ACLs (TIME, EVALSHA)",
        ),
    }
}

fn human_bytes(n: i64) -> String {
    let n = n.max(0) as f64;
    match n {
        n if n >= 1024.0 * 1024.0 * 1024.0 => format!("{:.1} GiB", n / 1024.0 / 1024.0 / 1024.0),
        n if n >= 1024.0 * 1024.0 => format!("{:.1} MiB", n / 1024.0 / 1024.0),
        n if n >= 1024.0 => format!("{:.1} KiB", n / 1024.0),
        n => format!("{n} bytes"),
    }
}
