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
    },
    /// Follow a publisher's live changes in the terminal (temporary queue, leaves nothing behind).
    Tail(cli::tail::TailArgs),
    /// The live demo: a workload writes to Postgres, the publisher publishes, a subscriber
    /// keeps a SQLite read model and runs a callback per message, in causal order.
    Demo(cli::demo::DemoArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=warn,pgwire_replication=warn".into()),
        )
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
        Command::Subscribe { config } => {
            let cfg: kausal::subscriber::SubscriberConfig = kausal::config::load(
                &config,
                std::env::vars(),
                kausal::config::SUBSCRIBER_SECTIONS,
                kausal::config::SUBSCRIBER_KEYS,
            )
            .with_context(|| format!("loading {}", config.display()))?;
            let shutdown = cli::shutdown_signal();
            if let Err(error) = kausal::subscriber::run(cfg, shutdown).await {
                report(&error);
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Tail(args) => cli::tail::run(args, cli::shutdown_signal()).await,
        Command::Demo(args) => cli::demo::run(args).await,
    }
}

fn report(error: &dyn std::error::Error) {
    eprintln!("error: {error}");
    let mut source = error.source();
    while let Some(cause) = source {
        eprintln!("  caused by: {cause}");
        source = cause.source();
    }
}
