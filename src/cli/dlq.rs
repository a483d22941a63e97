//! `kausal dlq list|show|retry|drop` (an app's dead letters, with the reason each was
//! dead-lettered) and `kausal subscriber release` (an operator's release of a
//! transaction that never arrives).

use super::load;
use super::status::chain;
use anyhow::Context as _;
use kausal::bus::amqp::{DeadLetterQueue, Letter};
use kausal::subscriber::SubscriberConfig;
use serde::Serialize;
use std::path::PathBuf;

/// The most messages one command reads from a dead-letter queue (all are held
/// unacknowledged meanwhile).
const MAX_LETTERS: usize = 100_000;

#[derive(clap::Subcommand)]
pub enum DlqCommand {
    /// List the dead letters: which transactions, which tables, and why.
    List {
        #[command(flatten)]
        app: AppArg,
        /// Print JSON lines instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Print dead letters whole (envelopes as JSON, with their row values).
    Show {
        #[command(flatten)]
        app: AppArg,
        #[command(flatten)]
        pick: Pick,
    },
    /// Send dead letters back to the app's queue: they go through the causal gate like
    /// any other message (after fixing what made them fail).
    Retry {
        #[command(flatten)]
        app: AppArg,
        #[command(flatten)]
        pick: Pick,
    },
    /// Remove dead letters for good (logged with what was removed).
    Drop {
        #[command(flatten)]
        app: AppArg,
        #[command(flatten)]
        pick: Pick,
    },
}

#[derive(clap::Args)]
pub struct AppArg {
    /// Subscriber configuration (TOML).
    #[arg(long, short)]
    config: PathBuf,
}

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
pub struct Pick {
    /// The dead letters holding this transaction (sequence number).
    #[arg(long)]
    seq: Option<u64>,
    /// The dead letter at this position of `kausal dlq list` (1 = oldest).
    #[arg(long)]
    index: Option<usize>,
    /// Every dead letter.
    #[arg(long)]
    all: bool,
}

impl Pick {
    fn matches(&self, index: usize, summary: &Summary) -> bool {
        if self.all {
            return true;
        }
        if let Some(i) = self.index {
            return i == index;
        }
        self.seq.is_some_and(|seq| {
            summary
                .transactions
                .iter()
                .any(|t| t.ends_with(&format!("/{seq}")))
        })
    }
}

#[derive(Serialize)]
struct Summary {
    index: usize,
    /// `<namespace>/<generation>/<seq>` of each envelope (parts of one transaction
    /// appear once).
    transactions: Vec<String>,
    tables: Vec<String>,
    changes: usize,
    bytes: usize,
    reason: Option<String>,
    /// Why the body could not be read, if it could not.
    undecodable: Option<String>,
}

fn summarize(index: usize, letter: &Letter) -> Summary {
    let mut s = Summary {
        index,
        transactions: Vec::new(),
        tables: Vec::new(),
        changes: 0,
        bytes: letter.body.len(),
        reason: letter.reason.clone(),
        undecodable: None,
    };
    match kausal::bus::decode(&letter.body) {
        Ok(envelopes) => {
            for e in envelopes {
                let id = format!("{}/{}/{}", e.namespace, e.generation, e.seq);
                // A whole signed message: only these of its transactions failed.
                if letter.only.as_ref().is_some_and(|only| !only.contains(&id)) {
                    continue;
                }
                if !s.transactions.contains(&id) {
                    s.transactions.push(id);
                }
                for c in &e.changes {
                    if !s.tables.contains(&c.table) {
                        s.tables.push(c.table.clone());
                    }
                }
                s.changes += e.changes.len();
            }
        }
        Err(e) => s.undecodable = Some(chain(&e)),
    }
    s
}

async fn open(config: &std::path::Path) -> anyhow::Result<(SubscriberConfig, DeadLetterQueue)> {
    let cfg = load::subscriber(config)?;
    let dlq = format!("{}.dlq", cfg.queue());
    let queue = DeadLetterQueue::open(&cfg.broker.url, &dlq)
        .await
        .with_context(|| format!("opening the dead-letter queue of app {}", cfg.app))?;
    Ok((cfg, queue))
}

pub async fn run(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { app, json } => {
            let (cfg, dlq) = open(&app.config).await?;
            let letters = dlq.take(MAX_LETTERS).await?;
            for (i, letter) in letters.iter().enumerate() {
                let s = summarize(i + 1, letter);
                if json {
                    println!("{}", serde_json::to_string(&s)?);
                } else {
                    println!(
                        "#{:<4} {}  tables: {}  changes: {}  ({} bytes)\n      reason: {}",
                        s.index,
                        if s.transactions.is_empty() {
                            format!("undecodable: {}", s.undecodable.as_deref().unwrap_or("?"))
                        } else {
                            s.transactions.join(", ")
                        },
                        if s.tables.is_empty() {
                            "-".into()
                        } else {
                            s.tables.join(", ")
                        },
                        s.changes,
                        s.bytes,
                        s.reason
                            .as_deref()
                            .unwrap_or("(none recorded: dead-lettered by the broker)"),
                    );
                }
            }
            if !json {
                eprintln!("{} dead letters in {}.dlq", letters.len(), cfg.queue());
            }
            // Listing removes nothing: closing hands every message back.
            dlq.close().await;
        }
        DlqCommand::Show { app, pick } => {
            let (_, dlq) = open(&app.config).await?;
            let letters = dlq.take(MAX_LETTERS).await?;
            let mut shown = 0;
            for (i, letter) in letters.iter().enumerate() {
                let s = summarize(i + 1, letter);
                if !pick.matches(i + 1, &s) {
                    continue;
                }
                shown += 1;
                println!(
                    "# dead letter #{}: {}",
                    s.index,
                    s.reason.as_deref().unwrap_or("(no reason recorded)")
                );
                match kausal::bus::decode(&letter.body) {
                    Ok(envelopes) => {
                        for e in envelopes {
                            println!("{}", serde_json::to_string_pretty(&e)?);
                        }
                    }
                    Err(e) => println!(
                        "undecodable ({}); first bytes: {:?}",
                        chain(&e),
                        String::from_utf8_lossy(&letter.body[..letter.body.len().min(200)])
                    ),
                }
            }
            dlq.close().await;
            if shown == 0 {
                anyhow::bail!("no dead letter matches (see `kausal dlq list`)");
            }
        }
        DlqCommand::Retry { app, pick } => settle(&app.config, &pick, true).await?,
        DlqCommand::Drop { app, pick } => settle(&app.config, &pick, false).await?,
    }
    Ok(())
}

/// Retries (`retry`) or drops the picked letters; the others go back untouched.
async fn settle(config: &std::path::Path, pick: &Pick, retry: bool) -> anyhow::Result<()> {
    let (cfg, dlq) = open(config).await?;
    let queue = cfg.queue();
    let letters = dlq.take(MAX_LETTERS).await?;
    let mut done = 0;
    let mut result = Ok(());
    for (i, letter) in letters.iter().enumerate() {
        let s = summarize(i + 1, letter);
        if !pick.matches(i + 1, &s) {
            continue;
        }
        let outcome = if retry {
            dlq.retry(letter, &queue).await
        } else {
            dlq.remove(letter).await
        };
        if let Err(e) = outcome {
            result = Err(anyhow::anyhow!("{}", chain(&e)));
            break;
        }
        done += 1;
        tracing::warn!(
            app = %cfg.app,
            transactions = %s.transactions.join(","),
            reason = s.reason.as_deref().unwrap_or(""),
            action = if retry { "retry" } else { "drop" },
            "operator settled a dead letter"
        );
    }
    dlq.close().await;
    result?;
    if done == 0 {
        anyhow::bail!("no dead letter matches (see `kausal dlq list`)");
    }
    eprintln!(
        "{} {done} dead letter(s){}",
        if retry { "sent back" } else { "dropped" },
        if retry {
            format!(" to {queue}: a worker applies them in causal order")
        } else {
            String::new()
        }
    );
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum SubscriberCommand {
    /// Count a transaction that never arrives as applied (without its changes), so the
    /// transactions waiting for it proceed. `kausal status` shows what waits for which
    /// sequence number. A worker of the app acts on it and logs it.
    Release {
        #[command(flatten)]
        app: AppArg,
        /// The sequence number the waiting transactions wait for.
        #[arg(long)]
        seq: u64,
        /// The publisher namespace; default: the one a waiting transaction names.
        #[arg(long)]
        namespace: Option<String>,
        /// The generation; default: the one a waiting transaction names.
        #[arg(long)]
        generation: Option<u64>,
        /// With `[signing] keys` in the app's configuration, the command is signed with
        /// this key (one of those ids); its secret comes from `KAUSAL_SIGN_KEY` or
        /// `--key-file`. Default: the only key listed.
        #[arg(long)]
        key_id: Option<String>,
        /// File holding the signing key's secret.
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
}

pub async fn subscriber(command: SubscriberCommand) -> anyhow::Result<()> {
    let SubscriberCommand::Release {
        app,
        seq,
        namespace,
        generation,
        key_id,
        key_file,
    } = command;
    let cfg = load::subscriber(&app.config)?;
    let signer = command_signer(&cfg, key_id, key_file)?;
    let (namespace, generation) = match (namespace, generation) {
        (Some(ns), Some(g)) => (ns, g),
        (ns, g) => {
            let view = super::status::subscriber(&cfg).await;
            let waiting = view
                .workers
                .iter()
                .filter(|w| w.state == "running")
                .flat_map(|w| w.status.waiting.iter())
                .filter(|w| w.waits_for_seq == Some(seq))
                .filter_map(|w| {
                    let mut parts = w.tx.rsplitn(3, '/');
                    let _seq = parts.next()?;
                    let generation: u64 = parts.next()?.parse().ok()?;
                    Some((parts.next()?.to_string(), generation))
                })
                .find(|(n, gen)| ns.as_ref().is_none_or(|x| x == n) && g.is_none_or(|x| x == *gen));
            match waiting {
                Some(found) => found,
                None => anyhow::bail!(
                    "no running worker of app {} has a transaction waiting for seq {seq} \
                     (`kausal status --config {}` shows what waits for what); to release \
                     it anyway, give --namespace and --generation",
                    cfg.app,
                    app.config.display()
                ),
            }
        }
    };
    let by = format!(
        "{}@{}",
        std::env::var("USER").unwrap_or_else(|_| "operator".into()),
        std::fs::read_to_string("/etc/hostname")
            .unwrap_or_default()
            .trim()
    );
    let release = kausal::subscriber::runtime::Release {
        namespace: namespace.clone(),
        generation,
        seq,
        by,
    };
    let body = serde_json::to_vec(&release)?;
    kausal::bus::amqp::send_command(
        &cfg.broker.url,
        &cfg.queue(),
        "release",
        &body,
        signer.as_ref(),
    )
    .await
    .with_context(|| format!("sending the release to queue {}", cfg.queue()))?;
    tracing::warn!(app = %cfg.app, tx = %format!("{namespace}/{generation}/{seq}"), "operator release sent");
    eprintln!(
        "sent: a worker of app {} marks {namespace}/{generation}/{seq} applied (without its \
         changes) and logs it; transactions waiting for it proceed",
        cfg.app
    );
    Ok(())
}

/// The signer of an operator's command to an app that accepts signed messages only.
fn command_signer(
    cfg: &SubscriberConfig,
    key_id: Option<String>,
    key_file: Option<PathBuf>,
) -> anyhow::Result<Option<kausal::bus::signing::Signer>> {
    if cfg.signing.keys.is_empty() {
        return Ok(None);
    }
    let key_id = match key_id {
        Some(k) => k,
        None if cfg.signing.keys.len() == 1 => {
            cfg.signing.keys.keys().next().cloned().unwrap_or_default()
        }
        None => anyhow::bail!(
            "app {} accepts signed messages only: pass --key-id (one of its signing.keys)",
            cfg.app
        ),
    };
    let secret = match key_file {
        Some(path) => std::fs::read_to_string(&path)
            .with_context(|| format!("reading the signing key from {}", path.display()))?,
        None => std::env::var("KAUSAL_SIGN_KEY").map_err(|_| {
            anyhow::anyhow!(
                "app {} accepts signed messages only: set KAUSAL_SIGN_KEY to the secret of \
                 key {key_id:?} (or pass --key-file)",
                cfg.app
            )
        })?,
    };
    Ok(Some(kausal::bus::signing::Signer::from_secret(
        &key_id, &secret,
    )?))
}
