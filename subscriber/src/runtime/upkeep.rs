//! Upkeep of a worker, on a timer: reporting waits, joining a running stream, handing
//! back a stuck window, compacting the store's bookkeeping.

use super::{Worker, HAND_BACK_AFTER, JOIN_AFTER};
use crate::config::Coordination;
use crate::error::SubscriberError;
use crate::schedule::Wait;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Worker {
    pub(super) fn report_waits(&mut self) {
        let after = Duration::from_millis(self.cfg.ordering.report_wait_ms);
        let now = Instant::now();
        for (id, w) in self.gate.waiting.iter_mut() {
            let due = match w.reported {
                None => now.duration_since(w.since) >= after,
                Some(at) => now.duration_since(at) >= after,
            };
            if due {
                w.reported = Some(now);
                self.ops.wait_reports.inc();
                let (key, version) = match w.wait {
                    Some(Wait::Dep { k, v, .. }) => (Some(k), Some(v)),
                    _ => (None, None),
                };
                tracing::warn!(
                    tx = %id,
                    waits_for_seq = w.wait.map(|x| x.seq()),
                    key,
                    version,
                    waited_s = now.duration_since(w.since).as_secs(),
                    "transaction still waits for a dependency"
                );
            }
        }
    }

    /// A subscriber whose queue was created after its publisher's generation began never
    /// receives the first transactions; everything after them waits for them. When the
    /// store has applied nothing of a namespace/generation and its transactions have
    /// waited [`JOIN_AFTER`], the app joins the stream at the lowest transaction it has
    /// received (a fresh queue delivers in publish order, so that is the first one the
    /// queue got; a fresh stream is never handed back): the store records
    /// everything before it as behind its watermark, so dependencies on those are met.
    /// (A fresh app that received sequence 1 has applied it by then: it waits for
    /// nothing.) The existing rows need a bootstrap.
    pub(super) async fn join_if_stuck(&mut self) -> Result<(), SubscriberError> {
        // Only a single worker process sees the queue's order: with several, the first
        // transactions may sit in another worker's window while this one waits, and
        // joining would mark them applied unapplied (seen under load at start-up).
        if !matches!(self.cfg.coordination, Coordination::Memory) {
            return Ok(());
        }
        let stuck: Vec<((Arc<str>, u64), Instant)> = self
            .streams
            .stuck_since
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for ((ns, generation), since) in stuck {
            let seq = self
                .streams
                .min_seen
                .get(&(ns.clone(), generation))
                .copied()
                .unwrap_or(1);
            // A dead-lettered transaction is not a missing one: its dependents wait.
            let dead_here = self
                .dead
                .iter()
                .any(|d| d.namespace == ns && d.generation == generation);
            if seq <= 1 || since.elapsed() < JOIN_AFTER || dead_here {
                continue;
            }
            if self.coord.watermark(&ns, generation).await? != Some(0) {
                continue;
            }
            if self.store.has_followed_generation(&ns, generation).await? {
                continue;
            }
            self.store.compact(&ns, generation, seq - 1).await?;
            self.coord.join(&ns, generation, seq - 1).await?;
            // What we hold can run now: no hand-back before it had its chance.
            self.last_progress = Instant::now();
            tracing::warn!(
                namespace = %ns,
                generation,
                first_seq = seq,
                "joined a running stream: earlier transactions never reached this app's queue \
                 (bootstrap to fill the rows that existed before)"
            );
        }
        Ok(())
    }

    /// With every prefetch slot taken and nothing applied for a while, the transactions
    /// we hold may be waiting for ones the broker cannot deliver to us (they are behind
    /// them in the queue, e.g. redelivered after another worker crashed): move the higher
    /// half of what we hold to the tail of the queue, so the missing ones arrive.
    pub(super) async fn hand_back(&mut self) -> Result<(), SubscriberError> {
        // Per queue: each partition queue has a window of its own. A broker's queue
        // widens its window first (`widen_stuck_windows`): only one holding the most it
        // may is handed back.
        let mut window = usize::from(super::queue::window(&self.cfg));
        if matches!(self.consumer, kausal_bus::amqp::Inbox::Amqp(_)) {
            window *= super::WIDEN_MAX;
        }
        let per_queue = self.deliveries.per_queue();
        let full: HashSet<Arc<str>> = self
            .deliveries
            .held
            .values()
            .filter(|h| per_queue[&*h.delivery.queue] >= window)
            .map(|h| h.delivery.queue.clone())
            .collect();
        // With partition queues shared by several workers, a full window usually waits
        // for another partition's transactions, which a hand-back does not bring (and
        // moving messages to the tail disorders the queue): wait longer before it.
        let after = if self.queues.len() > 1 && self.owned.len() < self.queues.len() {
            HAND_BACK_AFTER * 4
        } else {
            HAND_BACK_AFTER
        };
        if full.is_empty() || !self.gate.applying.is_empty() || self.last_progress.elapsed() < after
        {
            return Ok(());
        }
        // A stream this store has applied nothing of is joining (see `join_if_stuck`):
        // moving its first messages away would lose the join point.
        for (ns, generation) in self.streams.stuck_since.keys().cloned().collect::<Vec<_>>() {
            let (through, applied) = self.store.progress(&ns, generation).await?;
            if through == 0 && applied.is_empty() {
                return Ok(());
            }
        }
        let mut candidates: Vec<(u64, u64)> = self
            .deliveries
            .held
            .iter()
            .filter(|(_, h)| h.received.elapsed() >= after && full.contains(&h.delivery.queue))
            .map(|(d, h)| (h.max_seq, *d))
            .collect();
        // The higher half: the lower ones are likelier to be next.
        candidates.sort_unstable();
        let keep = candidates.len() / 2;
        candidates.drain(..keep);
        let given = candidates.len();
        for (_, d) in candidates {
            // Forget what this delivery contributed; it comes back whole.
            let Some((h, gone)) = self.deliveries.give_back(d) else {
                continue;
            };
            for id in gone {
                self.gate.waiting.remove(&id);
            }
            self.consumer.move_to_tail(&h.delivery).await?;
        }
        self.ops.hand_backs.inc_by(given as u64);
        tracing::info!(
            handed_back = given,
            "window full of waiting transactions: moved them to the tail of the queue"
        );
        self.last_progress = Instant::now();
        Ok(())
    }

    /// Compacts the store's bookkeeping up to the coordinator's watermark, and heals a
    /// stalled stream: when its watermark has not moved since the last round while this
    /// worker holds transactions of it waiting, the coordinator may have missed applies
    /// (state lost and seeded from an older read, or a Redis failover that lost recent
    /// writes) and waits for deliveries that were acked long ago: the store's record is
    /// merged in. Sound at any time (the store only grows), so no race to guard.
    pub(super) async fn compact(&mut self) {
        let mut keys: HashSet<(Arc<str>, u64)> = self.streams.seeded.iter().cloned().collect();
        let waiting: HashSet<(Arc<str>, u64)> = self
            .gate
            .waiting
            .keys()
            .map(|id| (id.namespace.clone(), id.generation))
            .collect();
        keys.extend(waiting.iter().cloned());
        for (ns, generation) in keys {
            match self.coord.watermark(&ns, generation).await {
                Ok(Some(w)) => {
                    let key = (ns.clone(), generation);
                    let stalled = self.streams.last_watermark.insert(key.clone(), w) == Some(w);
                    if stalled && waiting.contains(&key) {
                        self.heal(&ns, generation).await;
                    }
                    if w > 0 {
                        if let Err(error) = self.store.compact(&ns, generation, w).await {
                            tracing::warn!(error = %error, "cannot compact bookkeeping");
                        }
                    }
                    // At 0 too: chunks answered before the stream published anything.
                    if let Err(error) = self.store.finish_bootstraps(&ns, generation, w).await {
                        tracing::warn!(error = %error, "cannot finish bootstraps");
                    }
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(error = %error, "cannot read the watermark"),
            }
        }
    }

    async fn heal(&self, ns: &str, generation: u64) {
        let merged = match self.store.progress(ns, generation).await {
            Ok((through, applied)) => self.coord.merge(ns, generation, through, &applied).await,
            Err(error) => {
                tracing::warn!(error = %error, "cannot read the store's progress");
                return;
            }
        };
        if let Err(error) = merged {
            tracing::warn!(error = %error, "cannot merge the store's progress");
        }
    }
}
