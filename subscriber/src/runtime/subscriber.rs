//! The Rust API's entry point: a subscriber app's configuration, callbacks and options,
//! run as a worker that restarts after transient errors.

use super::apply::error_chain;
use super::bootstrap::{BootstrapPlan, BootstrapProgress};
use super::Worker;
use crate::config::SubscriberConfig;
use crate::error::SubscriberError;
use crate::sink::Callbacks;
use kausal_bus::amqp::MemoryQueue;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A subscriber app's worker: configuration plus the callbacks of the Rust API.
pub struct Subscriber {
    cfg: SubscriberConfig,
    callbacks: Callbacks,
    bootstrap: Option<BootstrapPlan>,
    progress: Option<watch::Sender<BootstrapProgress>>,
    inbox: Option<MemoryQueue>,
}

impl Subscriber {
    pub fn new(cfg: SubscriberConfig) -> Self {
        Subscriber {
            cfg,
            callbacks: Callbacks::default(),
            bootstrap: None,
            progress: None,
            inbox: None,
        }
    }

    /// Consumes `queue`, an in-process queue, instead of RabbitMQ (the test kit feeds it
    /// envelopes; nothing else of the broker is used). Not with a bootstrap: that asks a
    /// publisher over the broker.
    pub fn consume_from(&mut self, queue: MemoryQueue) -> &mut Self {
        self.inbox = Some(queue);
        self
    }

    /// Bootstrap progress as it happens, for a display (a progress bar); while someone
    /// watches, the per-chunk log lines are left out.
    pub fn bootstrap_progress(&mut self) -> watch::Receiver<BootstrapProgress> {
        let (tx, rx) = watch::channel(BootstrapProgress::default());
        self.progress = Some(tx);
        rx
    }

    /// Bootstraps tables at start (see [`BootstrapPlan`]); an unfinished bootstrap in the
    /// store is resumed at every start anyway.
    pub fn bootstrap(&mut self, plan: BootstrapPlan) -> &mut Self {
        self.bootstrap = Some(plan);
        self
    }

    /// Register callbacks here (`on_insert`, `on_update`, `on_delete`, `on_change`).
    pub fn callbacks(&mut self) -> &mut Callbacks {
        &mut self.callbacks
    }

    /// Runs until `shutdown` turns true: then stops taking deliveries, lets the store
    /// transactions in flight finish, acks what they applied and hands the rest back.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> Result<(), SubscriberError> {
        self.cfg.validate()?;
        if self.inbox.is_some() && self.bootstrap.is_some() {
            return Err(crate::error::ConfigError::BootstrapInProcess.into());
        }
        let mut backoff = Duration::from_millis(250);
        // The plan is handed to workers until one has recorded it in the store; after
        // that a restarted worker resumes it from there.
        let plan_started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ops = super::Ops::new(&self.cfg.app);
        let _endpoint = match &self.cfg.metrics.listen {
            Some(addr) => {
                let live = ops.clone();
                let endpoint = kausal_ops::Endpoint {
                    metrics: ops.metrics.clone(),
                    status: Arc::new(move || {
                        serde_json::to_value(live.status()).unwrap_or_default()
                    }),
                };
                let (bound, task) = kausal_ops::serve(addr, endpoint)
                    .await
                    .map_err(crate::error::ConfigError::Metrics)?;
                ops.serving_at(bound);
                Some(AbortOnDrop(task))
            }
            None => None,
        };
        loop {
            let started = Instant::now();
            let started_worker = Worker::start(
                &self.cfg,
                self.callbacks.clone(),
                self.inbox.clone(),
                ops.clone(),
            )
            .await;
            match started_worker {
                Ok(mut worker) => {
                    if !plan_started.load(std::sync::atomic::Ordering::Relaxed) {
                        worker.boot.plan = self.bootstrap.clone();
                    }
                    worker.boot.progress = self.progress.clone();
                    match worker.run(shutdown.clone(), &plan_started).await {
                        Ok(()) => return Ok(()),
                        Err(e) if e.class() == crate::ErrorClass::Definite => return Err(e),
                        Err(e) => {
                            tracing::warn!(error = %error_chain(&e), "worker stopped; restarting")
                        }
                    }
                }
                Err(e) if e.class() == crate::ErrorClass::Definite => return Err(e),
                Err(e) => tracing::warn!(error = %error_chain(&e), "cannot start; retrying"),
            }
            if *shutdown.borrow() {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(250);
            }
            let mut s = shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stopped(&mut s) => return Ok(()),
            }
            // Capped low: the pause adds to the recovery after an outage.
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Stops the endpoint when the subscriber stops (also on an error return).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once `shutdown` is true. (The guard `wait_for` returns is not `Send`; it
/// must not live across the caller's awaits.)
pub(super) async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|v| *v).await.map(|_| ());
}

/// Runs a subscriber with no callbacks (the `kausal subscribe` command).
pub async fn run(
    cfg: SubscriberConfig,
    shutdown: watch::Receiver<bool>,
) -> Result<(), SubscriberError> {
    Subscriber::new(cfg).run(shutdown).await
}
