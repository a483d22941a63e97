//! Settling what a worker holds: dead letters (kept whole and signed where they can
//! be), operator commands, the live status row, and acks once every envelope of a
//! delivery is done.

use super::Worker;
use crate::error::SubscriberError;
use crate::txn::TxId;
use kausal_bus::amqp::Delivery;
use kausal_bus::Envelope;

impl Worker {
    pub(super) fn envelopes_of(&self, id: &TxId) -> Vec<Envelope> {
        self.deliveries.envelopes_of(id)
    }

    /// Sends a transaction's envelopes to the dead-letter queue with the reason; its
    /// deliveries are then acked as far as it is concerned.
    pub(super) async fn dead_letter(
        &mut self,
        id: &TxId,
        envelopes: &[Envelope],
        reason: &str,
    ) -> Result<(), SubscriberError> {
        // A transaction of one signed message: the message goes whole, with its
        // signature, so a retry still verifies (its other transactions are duplicates
        // by then).
        let signed = self.deliveries.signed_alone(id);
        if let Some((body, signature)) = signed {
            self.consumer
                .send_to_dead_letters_signed(body, reason, Some(&signature), Some(&id.to_string()))
                .await?;
            self.ops.dead_lettered.inc();
        } else if !envelopes.is_empty() {
            let body = kausal_bus::encode(envelopes);
            self.consumer.send_to_dead_letters(body, reason).await?;
            self.ops.dead_lettered.inc();
        }
        self.gate.waiting.remove(id);
        self.dead.insert(id.clone());
        self.release(id);
        Ok(())
    }

    /// Sends a staged split transaction to the dead-letter queue part by part (one
    /// message per part, read one at a time: a retry stages them again) and forgets
    /// its staged parts.
    pub(super) async fn dead_letter_staged(
        &mut self,
        id: &TxId,
        total: u32,
        reason: &str,
    ) -> Result<(), SubscriberError> {
        for part in 0..total {
            // Gone: another worker applied or dead-lettered it meanwhile.
            let Some(envelope) = self.store.staged_part(id, part).await? else {
                break;
            };
            let body = kausal_bus::encode(std::slice::from_ref(&envelope));
            self.consumer.send_to_dead_letters(body, reason).await?;
        }
        self.ops.dead_lettered.inc();
        self.store
            .unstage(&id.namespace, id.generation, id.seq)
            .await?;
        // Not through `dead_letter`: the delivery of the last part would go again.
        self.gate.waiting.remove(id);
        self.dead.insert(id.clone());
        self.release(id);
        Ok(())
    }

    /// The transaction is settled: its envelopes no longer keep deliveries unacked.
    pub(super) fn release(&mut self, id: &TxId) {
        self.deliveries.release(id);
    }

    /// An operator's command: acted on, and its delivery held until what it asked is
    /// settled (a bad command is dead-lettered with the reason).
    pub(super) async fn receive_control(
        &mut self,
        id: u64,
        kind: &str,
        delivery: Delivery,
    ) -> Result<(), SubscriberError> {
        match self.control(kind, &delivery.body) {
            Ok(tx_id) => {
                self.deliveries.own(tx_id, id);
                self.deliveries.hold(id, delivery, 1, 0);
                Ok(())
            }
            Err(reason) => {
                tracing::error!(reason = %reason, "dead-lettering an operator command");
                let body = delivery.body.clone();
                self.consumer.send_to_dead_letters(body, &reason).await?;
                self.ops.dead_lettered.inc();
                delivery.ack().await?;
                Ok(())
            }
        }
    }

    /// The live status into the store (a failure only delays it: status is advisory).
    pub(super) async fn write_status(&mut self) {
        let status = match self.refresh_status().await {
            Ok(s) => s,
            Err(error) => {
                tracing::debug!(error = %error, "cannot read the worker's status");
                return;
            }
        };
        if let Err(error) = self.store.write_status(&status).await {
            tracing::debug!(error = %error, "cannot write the worker's status");
        }
    }

    pub(super) async fn ack_finished(&mut self) -> Result<(), SubscriberError> {
        for h in self.deliveries.take_finished() {
            h.delivery.ack().await?;
        }
        Ok(())
    }
}
