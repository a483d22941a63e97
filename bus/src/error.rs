//! Errors of the bus crate.

/// How a caller should react to an error; every crate of Kausal classifies its errors
/// with this one type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retry with backoff: a server restarted, a connection dropped, a deadlock.
    Transient,
    /// The same input will fail the same way: fix configuration or input (a subscriber
    /// dead-letters such a transaction with the reason, or stops naming the fix).
    Definite,
}

/// The texts of an error and its sources, outermost first, leaving out a source whose
/// text the ones before already contain (drivers often repeat their cause in their own
/// message).
pub fn causes(error: &dyn std::error::Error) -> Vec<String> {
    let mut out = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.iter().any(|t| t.contains(&text)) {
            out.push(text);
        }
        source = cause.source();
    }
    out
}

/// An error with its sources on one line, `outer: cause: root cause` (what logs and
/// dead-letter reasons carry).
pub fn chain(error: &dyn std::error::Error) -> String {
    causes(error).join(": ")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause_once() {
        let e = Outer(std::io::Error::other("disk full"));
        assert_eq!(chain(&e), "outer: disk full");
        #[derive(Debug, thiserror::Error)]
        #[error("write failed: disk full")]
        struct Repeats(#[source] std::io::Error);
        let e = Repeats(std::io::Error::other("disk full"));
        assert_eq!(chain(&e), "write failed: disk full");
    }
}
