//! `kausal demo`: the live demo. Creates a fresh `kausal_demo` database with users and
//! messages, runs a workload against it, the publisher, and a subscriber that keeps a
//! SQLite read model current and runs a callback per message ("email to <user> about
//! <message>") — in causal order: the user is always in the read model first.

use anyhow::Context as _;
use std::time::Duration;
use tokio_postgres::NoTls;

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Postgres server (the demo creates database `kausal_demo` there).
    #[arg(
        long,
        env = "KAUSAL_DEMO_POSTGRES",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    pub postgres: String,
    #[arg(
        long,
        env = "KAUSAL_BROKER_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    pub broker: String,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub seconds: Option<u64>,
    /// Transactions per second the workload writes.
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// Also print every envelope as it arrives on the bus.
    #[arg(long)]
    pub tail: bool,
    /// The subscriber's read model (SQLite file, recreated at start).
    #[arg(long, default_value = "target/kausal-demo-reader.db")]
    pub read_model: std::path::PathBuf,
}

const CHECKPOINT: &str = "target/kausal-demo.checkpoint";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
  id serial PRIMARY KEY, name text NOT NULL, email text NOT NULL,
  password_hash text NOT NULL DEFAULT 'secret');
CREATE TABLE IF NOT EXISTS messages (
  id serial PRIMARY KEY, user_id int NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  body text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
";

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    // Every run starts from scratch: a new database, no checkpoint, an empty read model
    // and queue (joining an existing history needs a bootstrap, which the demo skips).
    let admin = connect(&format!("{}/postgres", args.postgres)).await?;
    // One statement per call: DROP DATABASE refuses to run inside the implicit
    // transaction of a multi-statement string.
    for sql in [
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
         WHERE slot_name = 'kausal_demo' AND NOT active",
        "DROP DATABASE IF EXISTS kausal_demo WITH (FORCE)",
        "CREATE DATABASE kausal_demo",
    ] {
        admin
            .batch_execute(sql)
            .await
            .context("resetting the kausal_demo database (is another demo running?)")?;
    }
    let _ = std::fs::remove_file(CHECKPOINT);
    let _ = std::fs::remove_file(&args.read_model);
    for suffix in ["-wal", "-shm"] {
        let mut p = args.read_model.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
    if let Some(dir) = args.read_model.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let db_url = format!("{}/kausal_demo", args.postgres);
    let db = connect(&db_url).await?;
    db.batch_execute(SCHEMA).await?;

    let config = format!(
        r#"
namespace = "demo"
[source]
kind = "postgres"
url = "{db_url}"
[broker]
url = "{broker}"
[checkpoint]
path = "{CHECKPOINT}"
[[table]]
name = "public.users"
columns = ["id", "name", "email"]   # password_hash never leaves the database
[[table]]
name = "public.messages"
columns = ["*"]
rename = {{ body = "text" }}
"#,
        broker = args.broker
    );
    let cfg: kausal::publisher::PublisherConfig = toml::from_str(&config)?;
    eprintln!("--- publisher config ---{config}------------------------");

    let shutdown = super::shutdown_signal();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut sd = shutdown.clone();
    let seconds = args.seconds;
    tokio::spawn(async move {
        match seconds {
            Some(s) => {
                tokio::select! { _ = tokio::time::sleep(Duration::from_secs(s)) => {}, _ = sd.changed() => {} }
            }
            None => {
                let _ = sd.changed().await;
            }
        }
        let _ = stop_tx.send(true);
    });

    let tailing = args.tail.then(|| {
        let tail = super::tail::TailArgs {
            broker: args.broker.clone(),
            exchange: kausal::bus::amqp::DEFAULT_EXCHANGE.into(),
            namespace: "demo".into(),
            table: None,
            filters: Vec::new(),
            json: false,
            count: false,
        };
        tokio::spawn(super::tail::run(tail, stop_rx.clone()))
    });
    let subscriber = super::demo_reader::subscriber(&args.broker, &args.read_model).await?;
    // The subscriber's queue exists, empty, before anything is published.
    let queue = kausal::bus::amqp::QueueSpec::durable("kausal.demo-reader", &["demo"]);
    let exchange = kausal::bus::amqp::DEFAULT_EXCHANGE;
    let c = kausal::bus::amqp::AmqpConsumer::connect(&args.broker, exchange, &queue).await?;
    c.delete_queue(&queue.name).await?;
    c.close().await;
    kausal::bus::amqp::AmqpConsumer::connect(&args.broker, exchange, &queue)
        .await?
        .close()
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let subscribing = tokio::spawn(subscriber.run(stop_rx.clone()));
    let publishing = tokio::spawn(kausal::publisher::run(cfg, stop_rx.clone()));
    let summary = tokio::spawn(super::demo_reader::summary(
        db_url.clone(),
        args.read_model.clone(),
        stop_rx.clone(),
    ));
    let writing = tokio::spawn(workload(db, args.rate, stop_rx));
    writing.await??;
    publishing.await??;
    subscribing.await??;
    summary.await??;
    if let Some(t) = tailing {
        t.await??;
    }
    Ok(())
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url} (did you run scripts/setup.sh?)"))?;
    tokio::spawn(conn);
    Ok(client)
}

/// Signs users up and has them post; each transaction tags its session so the publisher
/// orders a user's transactions.
async fn workload(
    mut db: tokio_postgres::Client,
    rate: f64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let names = ["ada", "grace", "alan", "edsger", "barbara", "ken"];
    let pause = Duration::from_secs_f64(1.0 / rate.max(0.1));
    let mut i: usize = 0;
    loop {
        tokio::select! { _ = tokio::time::sleep(pause) => {}, _ = stop.changed() => return Ok(()) }
        let tx = db.transaction().await?;
        let name = names[(i / 3) % names.len()];
        if i.is_multiple_of(3) {
            let ctx =
                format!(r#"{{"session": "signup", "user": "{name}", "request_id": "req-{i}"}}"#);
            tx.execute(
                "SELECT pg_logical_emit_message(true, 'kausal', $1::text)",
                &[&ctx],
            )
            .await?;
            tx.execute(
                "INSERT INTO users (name, email) VALUES ($1, $1 || '@example.com')",
                &[&name],
            )
            .await?;
        } else {
            let row = tx
                .query_opt("SELECT id, name FROM users ORDER BY random() LIMIT 1", &[])
                .await?;
            if let Some(row) = row {
                let id: i32 = row.get(0);
                let who: String = row.get(1);
                let ctx = format!(r#"{{"session": "user:{id}", "user": "{who}"}}"#);
                tx.execute(
                    "SELECT pg_logical_emit_message(true, 'kausal', $1::text)",
                    &[&ctx],
                )
                .await?;
                tx.execute(
                    "INSERT INTO messages (user_id, body) VALUES ($1, $2)",
                    &[&id, &format!("hello #{i} from {who}")],
                )
                .await?;
            }
        }
        tx.commit().await?;
        i += 1;
    }
}
