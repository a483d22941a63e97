//! Errors of the bus crate.

/// How a caller should react to an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry with backoff: the broker may come back (restart, network blip).
    Transient,
    /// Retrying the same thing will fail the same way: fix configuration or input.
    Definite,
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error(
        "cannot reach RabbitMQ at {endpoint}: is the broker running and the address right? \
         (set broker.url or KAUSAL_BROKER_URL)"
    )]
    Unreachable {
        endpoint: String,
        #[source]
        source: lapin::Error,
    },
    #[error(
        "queue {queue} exists with other settings than asked for ({asked}): RabbitMQ cannot \
         change a queue's arguments. Use the settings it was created with, or delete the \
         queue (`rabbitmqctl delete_queue {queue}`; what it holds is lost) and start again"
    )]
    QueueMismatch {
        queue: String,
        asked: String,
        #[source]
        source: lapin::Error,
    },
    #[error("RabbitMQ refused the login at {endpoint}: check the user and password in broker.url")]
    AccessRefused {
        endpoint: String,
        #[source]
        source: lapin::Error,
    },
    #[error("TLS to RabbitMQ at {endpoint} failed: {detail}")]
    Tls { endpoint: String, detail: String },
    #[error("RabbitMQ {operation} failed")]
    Amqp {
        operation: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error("RabbitMQ rejected (nacked) a published message; it will be published again")]
    Nacked,
    #[error("invalid broker URL: {reason}")]
    BadUrl { reason: String },
    #[error("queue {queue} does not exist on the broker: check the app name (its queues are kausal.<app> and kausal.<app>.dlq) and broker.url")]
    NoSuchQueue { queue: String },
    #[error("the broker could not route the message to queue {queue}: the queue is gone; start a worker of the app (it declares the queue) and try again")]
    Unroutable { queue: String },
}

impl BusError {
    pub fn class(&self) -> ErrorClass {
        match self {
            BusError::AccessRefused { .. }
            | BusError::BadUrl { .. }
            | BusError::Tls { .. }
            | BusError::QueueMismatch { .. }
            | BusError::NoSuchQueue { .. }
            | BusError::Unroutable { .. } => ErrorClass::Definite,
            _ => ErrorClass::Transient,
        }
    }
}
