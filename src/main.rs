//! The `kausal` command line.

mod cli;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "kausal",
    version,
    about = "Causal-order replication out of your primary database"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tail the source log and publish committed transactions to RabbitMQ.
    Publish {
        /// Publisher configuration (TOML); `KAUSAL_*` variables override it.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Apply the publishers' transactions to this app's store, in causal order.
    Subscribe {
        /// Subscriber configuration (TOML); `KAUSAL_*` variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// Bootstrap every subscribed table first (their current rows, from the
        /// publisher), while following the stream.
        #[arg(long)]
        bootstrap: bool,
    },
    /// Fill this app's store with the current rows of its tables, asked from the
    /// publisher over the broker (never from the source database), then exit; the live
    /// stream continues with `kausal subscribe`. Resumes an interrupted bootstrap.
    Bootstrap {
        /// Subscriber configuration (TOML); `KAUSAL_*` variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// Only these tables, as `namespace.table` (published name); default: all
        /// subscribed tables. Re-bootstraps a table that was bootstrapped before.
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Rows per chunk.
        #[arg(long, default_value_t = kausal::bus::bootstrap::DEFAULT_CHUNK_ROWS)]
        chunk_rows: usize,
    },
    /// The publisher contract: export what a publisher publishes; check a subscriber
    /// configuration against it.
    #[command(subcommand)]
    Contract(cli::contract::ContractCommand),
    /// Follow a publisher's live changes in the terminal (temporary queue, leaves nothing behind).
    Tail(cli::tail::TailArgs),
    /// Where each publisher and subscriber stands: positions, lag, queue depth, applied
    /// through, workers and what their waiting transactions wait for.
    Status(cli::status::StatusArgs),
    /// Check a configuration against the real servers (settings, privileges, slot,
    /// broker, Redis, clocks); each finding with its fix.
    Doctor(cli::doctor::DoctorArgs),
    /// An app's dead letters: list, show, retry (through the causal gate), drop.
    #[command(subcommand)]
    Dlq(cli::dlq::DlqCommand),
    /// Operator commands to a running subscriber app.
    #[command(subcommand)]
    Subscriber(cli::dlq::SubscriberCommand),
    /// A new signing key: the secret for the publisher, the public key for subscribers.
    Keygen {
        /// The key's id (e.g. the month it starts being used: "2026-11").
        #[arg(long)]
        key_id: String,
    },
    /// The live demo: a workload writes to Postgres, the publisher publishes, a subscriber
    /// keeps a SQLite read model and runs a callback per message, in causal order.
    Demo(cli::demo::DemoArgs),
    /// Search a search sink's index (built with `--features search`): prints the best
    /// matching live rows as JSON lines.
    #[cfg(feature = "search")]
    Search {
        /// The index directory (the sink's `path`).
        #[arg(long)]
        index: PathBuf,
        /// Maximum rows printed.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// tantivy query syntax: words, "phrases", `field:value`, `+must -not`.
        query: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    use std::io::IsTerminal;
    kausal::bus::tls::install_crypto_provider();
    // lapin logs every channel the broker closes as an error, also the expected ones
    // (asking whether a queue exists closes the channel when it does not); our own
    // errors say what went wrong.
    let quiet = "lapin::channel=off".parse().expect("a valid directive");
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=warn,pgwire_replication=warn".into())
                .add_directive(quiet),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Publish { config } => {
            let cfg: kausal::publisher::PublisherConfig = kausal::config::load(
                &config,
                std::env::vars(),
                kausal::config::PUBLISHER_SECTIONS,
                kausal::config::PUBLISHER_KEYS,
            )
            .with_context(|| format!("loading {}", config.display()))?;
            let shutdown = cli::shutdown_signal();
            if let Err(error) = kausal::publisher::run(cfg, shutdown).await {
                report(&error);
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Subscribe { config, bootstrap } => {
            let plan = bootstrap.then(kausal::subscriber::BootstrapPlan::default);
            subscribe(&config, plan).await
        }
        Command::Bootstrap {
            config,
            tables,
            chunk_rows,
        } => {
            let mut plan = kausal::subscriber::BootstrapPlan {
                exit_when_done: true,
                chunk_rows,
                ..Default::default()
            };
            for t in tables {
                let Some((ns, table)) = t.split_once('.') else {
                    anyhow::bail!("--table {t:?}: write it as namespace.table");
                };
                plan.tables.push((ns.to_string(), table.to_string()));
            }
            subscribe(&config, Some(plan)).await
        }
        Command::Contract(command) => cli::contract::run(command).await,
        Command::Tail(args) => cli::tail::run(args, cli::shutdown_signal()).await,
        Command::Demo(args) => cli::demo::run(args).await,
        Command::Status(args) => cli::status::run(args).await,
        Command::Keygen { key_id } => {
            let (secret, public) = kausal::bus::signing::generate();
            println!("# The publisher's secret: keep it out of configuration files and logs,");
            println!("# e.g. in the environment of `kausal publish` only.");
            println!("KAUSAL_SIGN_KEY={secret}");
            println!("# The publisher's configuration:");
            println!("#   [signing]\n#   key_id = \"{key_id}\"");
            println!("# Every subscriber's configuration:");
            println!("#   [signing]\n#   keys = {{ \"{key_id}\" = \"{public}\" }}");
            Ok(())
        }
        Command::Doctor(args) => cli::doctor::run(args).await,
        Command::Dlq(command) => cli::dlq::run(command).await,
        Command::Subscriber(command) => cli::dlq::subscriber(command).await,
        #[cfg(feature = "search")]
        Command::Search {
            index,
            limit,
            query,
        } => {
            let rows = kausal::subscriber::sink::search::search_path(&index, &query, limit)
                .map_err(anyhow::Error::msg)?;
            for row in rows {
                println!("{}", serde_json::Value::Object(row));
            }
            Ok(())
        }
    }
}

/// `kausal subscribe` (and `kausal bootstrap`, which stops once its plan is done).
async fn subscribe(
    config: &std::path::Path,
    plan: Option<kausal::subscriber::BootstrapPlan>,
) -> anyhow::Result<()> {
    let cfg: kausal::subscriber::SubscriberConfig = kausal::config::load(
        config,
        std::env::vars(),
        kausal::config::SUBSCRIBER_SECTIONS,
        kausal::config::SUBSCRIBER_KEYS,
    )
    .with_context(|| format!("loading {}", config.display()))?;
    let shutdown = cli::shutdown_signal();
    let mut subscriber = kausal::subscriber::Subscriber::new(cfg);
    if let Some(plan) = plan {
        subscriber.bootstrap(plan);
        use std::io::IsTerminal;
        if std::io::stderr().is_terminal() {
            tokio::spawn(cli::progress::draw(subscriber.bootstrap_progress()));
        }
    }
    if let Err(error) = subscriber.run(shutdown).await {
        report(&error);
        std::process::exit(2);
    }
    Ok(())
}

pub(crate) fn report(error: &dyn std::error::Error) {
    let causes = kausal_bus::error::causes(error);
    eprintln!("error: {}", causes[0]);
    for cause in &causes[1..] {
        eprintln!("  caused by: {cause}");
    }
}
