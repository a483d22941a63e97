//! Deliveries in: a message is verified and decoded, its envelopes become complete
//! transactions (or staged parts of split ones) and enter the gate; a message that
//! cannot be read goes to the dead letters with the reason.

use super::apply::error_chain;
use super::{Worker, BURST};
use crate::error::SubscriberError;
use crate::mapping::StagedFold;
use crate::txn::{Transaction, TxId};
use kausal_bus::amqp::Delivery;
use kausal_bus::Envelope;
use std::sync::Arc;
use std::time::Instant;

impl Worker {
    /// Takes up to [`BURST`] deliveries that are there already, without waiting.
    pub(super) async fn receive_burst(&mut self) -> Result<(), SubscriberError> {
        use futures_util::FutureExt;
        for _ in 0..BURST {
            match self.consumer.next().now_or_never() {
                Some(Some(Ok(d))) => self.receive(d).await?,
                Some(Some(Err(e))) => return Err(e.into()),
                Some(None) => return Err(SubscriberError::ConsumerCancelled),
                None => break,
            }
            if self.boot.finished {
                break;
            }
        }
        Ok(())
    }

    pub(super) async fn receive(&mut self, delivery: Delivery) -> Result<(), SubscriberError> {
        let id = self.deliveries.number();
        self.ops.messages.inc();
        if let Some(verifier) = &self.verifier {
            // Before anything of it is read: an unsigned, forged or altered message.
            if let Err(reason) = verifier.verify(&delivery.body, delivery.signature.as_ref()) {
                tracing::error!(reason = %reason, "dead-lettering a message that fails its signature check");
                self.consumer
                    .send_to_dead_letters(delivery.body.clone(), &reason)
                    .await?;
                self.ops.dead_lettered.inc();
                delivery.ack().await?;
                return Ok(());
            }
        }
        if let Some(kind) = delivery.control.clone() {
            return self.receive_control(id, &kind, delivery).await;
        }
        let envelopes = match kausal_bus::decode(&delivery.body) {
            Ok(e) => e,
            Err(error) => {
                let reason = format!("cannot decode the message: {}", error_chain(&error));
                tracing::error!(reason = %reason, "dead-lettering an undecodable message");
                let body = delivery.body.clone();
                self.consumer.send_to_dead_letters(body, &reason).await?;
                self.ops.dead_lettered.inc();
                delivery.ack().await?;
                return Ok(());
            }
        };
        let retried = delivery.retried;
        if envelopes.len() == 1 && envelopes[0].snapshot.is_some() {
            // A bootstrap chunk: no transaction of the stream, not gated. Applied once
            // the transactions before it are, and when no store transaction is in
            // flight (its row versions are read once: a group committing meanwhile
            // could be overwritten).
            self.boot.last_chunk = Some(Instant::now());
            let env = envelopes.into_iter().next().expect("one envelope");
            self.boot.stash.push((env, delivery));
            return self.take_stashed_chunks().await;
        }
        let max_seq = envelopes.iter().map(|e| e.seq).max().unwrap_or(0);
        self.deliveries.hold(id, delivery, envelopes.len(), max_seq);
        for env in envelopes {
            self.join_for_bootstrap(&env.namespace, env.generation, env.seq)
                .await?;
            let tx_id = TxId {
                namespace: env.namespace.as_str().into(),
                generation: env.generation,
                seq: env.seq,
            };
            if retried && self.dead.remove(&tx_id) {
                tracing::info!(tx = %tx_id, "an operator sent a dead-lettered transaction back");
            }
            if let Some(reason) = self.implausible(&tx_id).await? {
                tracing::error!(tx = %tx_id, reason = %reason, "dead-lettering an implausible envelope");
                let body = kausal_bus::encode(std::slice::from_ref(&env));
                self.consumer.send_to_dead_letters(body, &reason).await?;
                self.ops.dead_lettered.inc();
                self.deliveries.settle_one(id);
                continue;
            }
            if !(env.part == 0 && env.parts == Some(1)) {
                // A part of a split transaction: staged in the store, where whichever
                // worker stages the last part completes it. Once staged, this message's
                // share is done.
                let complete = self.store.stage_part(&env).await?;
                self.deliveries.settle_one(id);
                if let Some(total) = complete {
                    self.admit_staged(tx_id, total).await?;
                }
                continue;
            }
            self.deliveries.own(tx_id.clone(), id);
            self.admit(tx_id, env).await?;
        }
        self.ack_finished().await
    }

    /// Whether a complete transaction is new to the gate: not waiting, applying or
    /// dead-lettered in this run (a duplicate is settled with the one held).
    pub(super) fn arrives(&mut self, tx_id: &TxId) -> bool {
        let stream = (tx_id.namespace.clone(), tx_id.generation);
        let seen = self
            .streams
            .min_seen
            .entry(stream.clone())
            .or_insert(tx_id.seq);
        *seen = (*seen).min(tx_id.seq);
        self.streams
            .stuck_since
            .entry(stream)
            .or_insert_with(Instant::now);
        if self.gate.holds(tx_id) {
            return false;
        }
        if self.dead.contains(tx_id) {
            self.release(tx_id);
            return false;
        }
        true
    }

    /// A transaction of one envelope enters the gate (unless it is already in it).
    pub(super) async fn admit(
        &mut self,
        tx_id: TxId,
        envelope: Envelope,
    ) -> Result<(), SubscriberError> {
        if !self.arrives(&tx_id) {
            return Ok(());
        }
        match self.mapping.assemble(std::slice::from_ref(&envelope)) {
            Ok(tx) => self.enter(tx_id, tx),
            Err(error) => {
                let reason = error.to_string();
                tracing::error!(tx = %tx_id, reason = %reason, "transaction does not fit the subscription");
                self.dead_letter(&tx_id, &[envelope], &reason).await?;
            }
        }
        Ok(())
    }

    /// A split transaction whose `total` parts are all staged enters the gate. Its
    /// parts are read from the store one at a time, for its dependencies and tables;
    /// its changes stay staged until it is applied (part by part, too).
    pub(super) async fn admit_staged(
        &mut self,
        tx_id: TxId,
        total: u32,
    ) -> Result<(), SubscriberError> {
        if !self.arrives(&tx_id) {
            return Ok(());
        }
        let mut fold = StagedFold::default();
        for part in 0..total {
            let Some(envelope) = self.store.staged_part(&tx_id, part).await? else {
                // Applied or dead-lettered by another worker since it was complete.
                tracing::debug!(tx = %tx_id, part, "staged part gone, not admitted");
                return Ok(());
            };
            if let Err(error) = self.mapping.stage(&mut fold, &envelope) {
                let reason = error.to_string();
                tracing::error!(tx = %tx_id, reason = %reason, "transaction does not fit the subscription");
                return self.dead_letter_staged(&tx_id, total, &reason).await;
            }
        }
        self.split.insert(tx_id.clone(), total);
        let tx = self.mapping.finish_staged(fold);
        self.enter(tx_id, tx);
        Ok(())
    }

    pub(super) fn enter(&mut self, tx_id: TxId, tx: Transaction) {
        debug_assert_eq!(tx_id, tx.id);
        self.gate.enter(Arc::new(tx));
    }

    /// Split transactions whose parts are all staged but which are not applied: a worker
    /// staged the last part and stopped before applying it.
    pub(super) async fn recover_staged(&mut self) -> Result<(), SubscriberError> {
        for (tx_id, total) in self.store.staged_complete().await? {
            self.admit_staged(tx_id, total).await?;
        }
        Ok(())
    }
}
