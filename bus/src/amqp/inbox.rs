//! What a subscriber worker consumes: its RabbitMQ queues, or an in-process queue.

use super::consumer::AmqpConsumer;
use super::delivery::Delivery;
use super::memory::MemoryQueue;
use crate::error::BusError;

/// What a subscriber worker consumes: its RabbitMQ queue, or an in-process one.
pub enum Inbox {
    Amqp(Box<AmqpConsumer>),
    Memory(MemoryQueue),
}

impl Inbox {
    /// The next delivery; `None` when the consumer was cancelled.
    pub async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        match self {
            Inbox::Amqp(c) => c.next().await,
            Inbox::Memory(q) => q.next().await.map(Ok),
        }
    }

    /// Puts `body` among the dead letters with `reason` (the caller acks the original).
    pub async fn send_to_dead_letters(&self, body: Vec<u8>, reason: &str) -> Result<(), BusError> {
        match self {
            Inbox::Amqp(c) => c.send_to_dead_letters(body, reason).await,
            Inbox::Memory(q) => {
                q.dead_letter(body, reason);
                Ok(())
            }
        }
    }

    /// A whole signed message among the dead letters, of which only the transactions
    /// `only` were dead-lettered (see [`AmqpConsumer::send_to_dead_letters_signed`]).
    pub async fn send_to_dead_letters_signed(
        &self,
        body: Vec<u8>,
        reason: &str,
        signature: Option<&(String, String)>,
        only: Option<&str>,
    ) -> Result<(), BusError> {
        match self {
            Inbox::Amqp(c) => {
                c.send_to_dead_letters_signed(body, reason, signature, only)
                    .await
            }
            Inbox::Memory(q) => {
                q.dead_letter(body, reason);
                Ok(())
            }
        }
    }

    /// Publishes a copy of `delivery` at the queue's tail, then acks the original.
    pub async fn move_to_tail(&self, delivery: &Delivery) -> Result<(), BusError> {
        match self {
            Inbox::Amqp(c) => c.move_to_tail(delivery).await,
            Inbox::Memory(q) => {
                q.publish(delivery.body.clone());
                delivery.ack().await
            }
        }
    }

    pub async fn close(self) {
        if let Inbox::Amqp(c) = self {
            (*c).close().await;
        }
    }
}
