//! `kausal contract export|check`: the publisher contract file.

use anyhow::Context as _;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum ContractCommand {
    /// Write what a publisher publishes (namespace, tables, columns with types, keys,
    /// references) as a versioned JSON file, read from its configuration and the source.
    Export {
        /// Publisher configuration (TOML); `KAUSAL_*` variables override it.
        #[arg(long, short)]
        config: PathBuf,
        /// Output file; default: standard output.
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// Check a subscriber configuration against a contract: names every subscribed
    /// table, column or rename the publisher does not publish. Exits 1 if any.
    Check {
        /// The contract file (from `kausal contract export`).
        #[arg(long)]
        contract: PathBuf,
        /// Subscriber configuration (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
}

pub async fn run(command: ContractCommand) -> anyhow::Result<()> {
    match command {
        ContractCommand::Export { config, out } => {
            let cfg: kausal::publisher::PublisherConfig = kausal::config::load(
                &config,
                std::env::vars(),
                kausal::config::PUBLISHER_SECTIONS,
                kausal::config::PUBLISHER_KEYS,
            )
            .with_context(|| format!("loading {}", config.display()))?;
            let contract = match kausal::publisher::contract::export(&cfg).await {
                Ok(c) => c,
                Err(error) => {
                    super::super::report(&error);
                    std::process::exit(2);
                }
            };
            let text = contract.to_json();
            match out {
                Some(path) => {
                    std::fs::write(&path, text)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!(
                        "wrote the contract of namespace {:?} ({} tables) to {}",
                        contract.namespace,
                        contract.tables.len(),
                        path.display()
                    );
                }
                None => print!("{text}"),
            }
            Ok(())
        }
        ContractCommand::Check { contract, config } => {
            let text = std::fs::read_to_string(&contract)
                .with_context(|| format!("reading {}", contract.display()))?;
            let parsed = kausal::bus::contract::Contract::parse(&text)
                .with_context(|| format!("reading {}", contract.display()))?;
            let cfg: kausal::subscriber::SubscriberConfig = kausal::config::load(
                &config,
                std::env::vars(),
                kausal::config::SUBSCRIBER_SECTIONS,
                kausal::config::SUBSCRIBER_KEYS,
            )
            .with_context(|| format!("loading {}", config.display()))?;
            let findings = kausal::subscriber::contract::check(&cfg, &parsed);
            let problems = findings.iter().filter(|f| f.problem).count();
            for f in &findings {
                let tag = if f.problem { "error" } else { "note" };
                println!("{tag}: {}", f.message);
            }
            if problems > 0 {
                println!(
                    "{} does not match the contract of namespace {:?}: {problems} problem(s)",
                    config.display(),
                    parsed.namespace
                );
                std::process::exit(1);
            }
            println!(
                "{} matches the contract of namespace {:?}",
                config.display(),
                parsed.namespace
            );
            Ok(())
        }
    }
}
