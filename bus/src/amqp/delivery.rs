//! A received message and how it is settled: by RabbitMQ, or by the in-process queue
//! it came from (which implements [`LocalAcker`], so this module needs no queue type).

use crate::error::BusError;
use lapin::options::{BasicAckOptions, BasicNackOptions};

/// One received message, to be acked after it was applied or rejected to dead letters.
pub struct Delivery {
    pub body: Vec<u8>,
    /// The queue it came from (where a hand-back puts it).
    pub queue: std::sync::Arc<str>,
    pub redelivered: bool,
    pub routing_key: String,
    /// An operator's command (header [`CONTROL_HEADER`]) instead of envelopes.
    pub control: Option<String>,
    /// Sent back from the dead-letter queue by an operator (header [`RETRY_HEADER`]):
    /// its transactions are admitted again even if this worker dead-lettered them.
    pub retried: bool,
    /// Key id and signature of a signed message (see [`crate::signing`]).
    pub signature: Option<(String, String)>,
    pub(super) acker: Acker,
}

/// Settles deliveries of an in-process queue. Contract: each call settles the delivery
/// it was made for exactly once; `dead_letter` and `requeue` also keep the body.
pub(super) trait LocalAcker: Send + Sync {
    fn ack(&self);
    fn dead_letter(&self, body: &[u8], reason: &str);
    fn requeue(&self, body: &[u8]);
}

/// Who settles a delivery: RabbitMQ, or the in-process queue it came from.
pub(super) enum Acker {
    Amqp(lapin::Acker),
    Memory(Box<dyn LocalAcker>),
}

/// How a delivery is settled.
enum Settle {
    Ack,
    DeadLetter,
    Requeue,
}

impl Delivery {
    pub async fn ack(&self) -> Result<(), BusError> {
        self.settle(Settle::Ack).await
    }

    /// Sends the message to the dead-letter queue (no requeue).
    pub async fn dead_letter(&self) -> Result<(), BusError> {
        self.settle(Settle::DeadLetter).await
    }

    /// Hands the message back to the queue so it is delivered again.
    pub async fn requeue(&self) -> Result<(), BusError> {
        self.settle(Settle::Requeue).await
    }

    async fn settle(&self, how: Settle) -> Result<(), BusError> {
        let acker = match &self.acker {
            Acker::Amqp(a) => a,
            Acker::Memory(m) => {
                match how {
                    Settle::Ack => m.ack(),
                    Settle::DeadLetter => {
                        m.dead_letter(&self.body, "dead-lettered by the subscriber")
                    }
                    Settle::Requeue => m.requeue(&self.body),
                }
                return Ok(());
            }
        };
        let (operation, sent) = match how {
            Settle::Ack => ("basic.ack", acker.ack(BasicAckOptions::default()).await),
            Settle::DeadLetter | Settle::Requeue => {
                let options = BasicNackOptions {
                    requeue: matches!(how, Settle::Requeue),
                    multiple: false,
                };
                ("basic.nack", acker.nack(options).await)
            }
        };
        sent.map(|_| ())
            .map_err(|source| BusError::Amqp { operation, source })
    }
}
