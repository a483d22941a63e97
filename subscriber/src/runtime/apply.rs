//! Appliers: take groups of ready transactions, apply them in one store transaction,
//! record them with the coordinator, report back to the worker loop.

use crate::coord::{Coordinator, Seeded};
use crate::error::{ErrorClass, SinkError};
use crate::sink::Callbacks;
use crate::store::Store;
use crate::txn::{Transaction, TxId};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};

/// What happened to one transaction.
pub enum Outcome {
    /// Applied now, or found already applied: ack its deliveries.
    Done(TxId),
    /// Will never apply (the store or a callback rejects it for good): dead-letter it.
    Rejected(TxId, String),
    /// Not tried: it was chained after a transaction whose group failed. Back to the
    /// gate.
    Retry(Arc<Transaction>),
}

pub struct Applier {
    pub store: Arc<dyn Store>,
    pub coord: Arc<Coordinator>,
    pub callbacks: Callbacks,
    pub attempts: u32,
    pub max_group: usize,
    pub backoff: Duration,
    /// Store commits, and round trips to a Redis coordinator.
    pub commits: kausal_ops::metrics::Counter,
    pub coord_calls: Option<kausal_ops::metrics::Counter>,
}

impl Applier {
    /// Runs until `ready` closes. Several appliers share the receiver.
    pub async fn run(
        self: Arc<Self>,
        ready: Arc<Mutex<mpsc::UnboundedReceiver<Vec<Arc<Transaction>>>>>,
        outcomes: mpsc::UnboundedSender<Outcome>,
    ) {
        loop {
            // Units are independent of each other; inside one, each transaction may
            // depend on those before it.
            let units = {
                let mut ready = ready.lock().await;
                let Some(first) = ready.recv().await else {
                    return;
                };
                let mut total = first.len();
                let mut units = vec![first];
                while total < self.max_group {
                    match ready.try_recv() {
                        Ok(unit) => {
                            total += unit.len();
                            units.push(unit);
                        }
                        Err(_) => break,
                    }
                }
                units
            };
            for o in self.apply(units).await {
                if outcomes.send(o).is_err() {
                    return;
                }
            }
        }
    }

    async fn apply(&self, units: Vec<Vec<Arc<Transaction>>>) -> Vec<Outcome> {
        let group: Vec<Arc<Transaction>> = units.iter().flatten().cloned().collect();
        match self.try_group(&group).await {
            Ok(()) => group.iter().map(|t| Outcome::Done(t.id.clone())).collect(),
            Err(_) if group.len() > 1 => {
                // Isolate the failing transaction: the head of each unit is ready on its
                // own and is tried alone (retried, or dead-lettered); the rest of a unit
                // may depend on its head, so it goes back to the gate.
                let mut out = Vec::with_capacity(group.len());
                for unit in units {
                    let mut unit = unit.into_iter();
                    if let Some(head) = unit.next() {
                        out.push(self.apply_one(head).await);
                    }
                    out.extend(unit.map(Outcome::Retry));
                }
                out
            }
            Err(_) => vec![self.apply_one(group[0].clone()).await],
        }
    }

    async fn apply_one(&self, tx: Arc<Transaction>) -> Outcome {
        let mut delay = self.backoff;
        let mut attempt = 1;
        loop {
            let group = [tx.clone()];
            match self.try_group(&group).await {
                Ok(()) => return Outcome::Done(tx.id.clone()),
                Err(error) => {
                    let definite = error.class() == ErrorClass::Definite;
                    let callback = matches!(error, SinkError::Callback { .. });
                    if definite || (callback && attempt >= self.attempts) {
                        tracing::error!(
                            tx = %tx.id, error = %error, attempts = attempt,
                            "transaction cannot be applied; sending it to the dead-letter queue"
                        );
                        return Outcome::Rejected(tx.id.clone(), error_chain(&error));
                    }
                    tracing::warn!(tx = %tx.id, error = %error, attempt, "apply failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                    attempt += 1;
                }
            }
        }
    }

    /// One store transaction for the group, then the coordinator learns the result.
    async fn try_group(&self, group: &[Arc<Transaction>]) -> Result<(), SinkError> {
        let started = std::time::Instant::now();
        let flags = self.store.apply_group(group, &self.callbacks).await?;
        #[cfg(feature = "failpoints")]
        crate::sink::fault::after_commit(); // test-only crash point: docs/faults.md
        self.commits.inc();
        tracing::debug!(
            transactions = group.len(),
            store_ms = started.elapsed().as_secs_f64() * 1000.0,
            "group applied"
        );
        let done: Vec<(&TxId, Option<&[kausal_bus::Dep]>)> = group
            .iter()
            .zip(&flags)
            .map(|(t, applied)| (&t.id, applied.then_some(t.deps.as_slice())))
            .collect();
        // The store has committed: from here on only the coordinator can fail, and a
        // retry finds the transactions already applied (None: counters left alone).
        let mut delay = self.backoff;
        loop {
            if let Some(c) = &self.coord_calls {
                c.inc();
            }
            match self.coord.applied(&done).await {
                Ok(missing) if missing.is_empty() => return Ok(()),
                Ok(missing) => {
                    for id in &missing {
                        if let Err(error) =
                            seed(&*self.store, &self.coord, &id.namespace, id.generation).await
                        {
                            tracing::warn!(error = %error, "cannot seed coordination state; retrying");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, "coordination unavailable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

/// Seeds the coordinator's state of a namespace/generation from the store.
pub async fn seed(
    store: &dyn Store,
    coord: &Coordinator,
    namespace: &str,
    generation: u64,
) -> Result<(), crate::error::SubscriberError> {
    // A few rounds: the state may be lost again between a read and its seeding (a
    // Redis restarting in a loop); then the next check finds it unknown and seeds.
    for _ in 0..5 {
        let epoch = coord.epoch().await?;
        let (through, applied) = store.progress(namespace, generation).await?;
        if coord
            .init(&epoch, namespace, generation, through, &applied)
            .await?
            == Seeded::Done
        {
            tracing::info!(
                namespace,
                generation,
                through,
                above = applied.len(),
                "gate state seeded from the store"
            );
            return Ok(());
        }
        tracing::info!(
            namespace,
            generation,
            "coordination state was lost while reading the store; reading again"
        );
    }
    Ok(())
}

pub use kausal_bus::error_chain;
