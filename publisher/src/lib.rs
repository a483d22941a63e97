//! `kausal-publisher`: committed source transactions become envelopes on RabbitMQ.
//!
//! Layout:
//! - [`config`]: what is published (tables, column allowlist, renames, references).
//! - [`source::change`]: the row-change vocabulary both sources decode into.
//! - [`source::postgres`]: logical replication (`pgoutput`) and catalog checks.
//! - [`source::mysql`]: the MySQL / MariaDB binlog and `information_schema` checks.
//! - `source::driver`: the stream loop both sources share (start or resume a
//!   generation, checkpoint markers, confirms, shutdown).
//! - [`source::assemble`]: row changes of either source into envelopes.
//! - [`tracker`]: dependency counters, in memory, in commit order.
//! - [`checkpoint`]: position + counters, saved once RabbitMQ confirmed everything
//!   before them.
//! - [`publish`]: batching and confirms in flight.
//! - [`bootstrap`]: current rows in chunks to one subscriber, between watermarks.
//! - [`contract`]: the contract file describing what is published.
//!
//! [`run`] supervises it all: transient failures (database or broker restarts, network)
//! restart the stream from the checkpoint with backoff; definite ones stop with a
//! message naming the fix.

pub mod bootstrap;
pub mod checkpoint;
pub mod config;
pub mod contract;
pub mod error;
pub mod ops;
pub mod publish;
pub mod route;
pub mod source;
pub mod tracker;

pub use config::PublisherConfig;
pub use error::{ErrorClass, PublisherError, SourceError};

use config::SourceConfig;
use kausal_bus::amqp::{slot_routing_key, AmqpPublisher, SLOTS};
use publish::{PublishLoop, Stats};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Items buffered between the source and the publish loop: enough to keep batches full,
/// small enough to bound memory (at most this many envelope parts).
const CHANNEL_CAPACITY: usize = 256;
/// Longest pause between two attempts to restart the stream. Short: an attempt costs a
/// connection, while a long pause adds up to itself to the recovery after an outage
/// (the fault suite measured 29 s after a 30 s broker outage with 30 s here).
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs the publisher until `shutdown` turns true (then flushes in-flight confirms and
/// writes a final checkpoint) or a definite error.
pub async fn run(
    cfg: PublisherConfig,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), PublisherError> {
    cfg.validate()?;
    if let Some(signer) = cfg.signing.signer()? {
        tracing::info!(key_id = signer.key_id(), "signing every message");
    }
    let stats = Arc::new(Stats::default());
    let postgres = matches!(cfg.source, SourceConfig::Postgres(_));
    let (metrics, status, tracking) = ops::track(&cfg.namespace, postgres, stats.clone());
    let _tracking = AbortOnDrop(tracking);
    let _endpoint = match &cfg.metrics.listen {
        Some(addr) => {
            let endpoint = kausal_ops::Endpoint {
                metrics,
                status: Arc::new(move || {
                    let s = status.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    serde_json::to_value(s).unwrap_or_default()
                }),
            };
            let (_, task) = kausal_ops::serve(addr, endpoint).await?;
            Some(AbortOnDrop(task))
        }
        None => None,
    };
    let mut backoff = Duration::from_millis(250);
    loop {
        let started = Instant::now();
        match run_once(&cfg, shutdown.clone(), stats.clone()).await {
            Ok(()) => return Ok(()),
            Err(error) if error.class() == ErrorClass::Transient => {
                if *shutdown.borrow() {
                    return Ok(());
                }
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_millis(250);
                }
                tracing::warn!(error = %error, cause = ?std::error::Error::source(&error).map(|s| s.to_string()),
                    retry_in_ms = backoff.as_millis() as u64,
                    "publisher stream failed, restarting from the checkpoint");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return Ok(()),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(error) => return Err(error),
        }
    }
}

/// Stops a background task when the publisher stops (also on an error return).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Checks a configuration against the real servers once — source settings, tables,
/// privileges, broker — and returns the first problem found.
pub async fn check(cfg: &PublisherConfig) -> Result<(), PublisherError> {
    cfg.validate()?;
    match &cfg.source {
        SourceConfig::Postgres(pg) => source::postgres::check(cfg, pg).await?,
        SourceConfig::Mysql(my) => source::mysql::check(cfg, my).await?,
    }
    let bus = AmqpPublisher::connect(&cfg.broker.url, &cfg.broker.exchange).await?;
    bus.close().await;
    Ok(())
}

async fn run_once(
    cfg: &PublisherConfig,
    shutdown: watch::Receiver<bool>,
    stats: Arc<Stats>,
) -> Result<(), PublisherError> {
    let path = cfg.checkpoint_path();
    let checkpoint = checkpoint::load(&path)?;
    let signer = cfg.signing.signer()?.map(Arc::new);
    let bus = AmqpPublisher::connect(&cfg.broker.url, &cfg.broker.exchange)
        .await?
        .with_signer(signer);
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (durable_tx, durable) = watch::channel(0u64);
    let bootstrap_stats = stats.clone();
    let publisher = PublishLoop {
        bus,
        routing_keys: (0..SLOTS)
            .map(|slot| slot_routing_key(&cfg.namespace, slot))
            .collect(),
        router: route::Router::default(),
        tuning: cfg.tuning.clone(),
        checkpoint_path: path.clone(),
        durable: durable_tx,
        stats,
    };
    let publishing = tokio::spawn(publisher.run(rx));
    let wiring = source::driver::Wiring {
        checkpoint_path: path,
        tx,
        durable,
        shutdown,
    };
    let streamed = match &cfg.source {
        SourceConfig::Postgres(pg) => {
            // Bootstrap requests are answered while the stream runs: chunks go out when
            // the stream reaches their high watermarks.
            let windows = Arc::new(bootstrap::Windows::default());
            let conn = source::postgres::catalog::ConnInfo::parse(&pg.url, pg.password()?)?;
            let mut serving = tokio::spawn(bootstrap::serve_while_streaming(
                Arc::new(cfg.clone()),
                conn,
                windows.clone(),
                bootstrap_stats,
            ));
            let streamed = tokio::select! {
                s = source::postgres::stream(cfg, pg, checkpoint, wiring, &windows) => s,
                served = &mut serving => match served {
                    Ok(Err(e)) => Err(e),
                    _ => Err(SourceError::PublisherGone.into()),
                },
            };
            serving.abort();
            streamed
        }
        SourceConfig::Mysql(my) => source::mysql::stream(cfg, my, checkpoint, wiring).await,
    };
    let published = publishing.await.expect("publish loop does not panic");
    match (streamed, published) {
        (_, Err(e)) => Err(e),
        (Err(e), Ok(())) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
    }
}
