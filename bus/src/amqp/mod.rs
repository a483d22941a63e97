//! The RabbitMQ side: topology, confirmed publishing and consuming.
//!
//! Topology: one durable topic exchange (default `kausal`) that publishers send to with
//! routing keys `<namespace>.<kind>`; one durable queue per subscriber app bound with
//! `<namespace>.#` for each namespace it follows; a dead-letter exchange `<exchange>.dlx`
//! (direct) into which a subscriber's rejected messages go, routed by queue name into the
//! queue `<queue>.dlq`.

mod consumer;
mod dlq;
mod memory;
mod publisher;

pub use consumer::{
    declare_queue, exchange_exists, peek_dead_letters, queue_depth, queue_exists,
    signature_headers, AmqpConsumer, DeadLetter, Delivery, QueueSpec, CONTROL_HEADER, ONLY_HEADER,
    REASON_HEADER, RETRY_HEADER,
};
pub use dlq::{send_command, DeadLetterQueue, Letter};
pub use memory::{Inbox, MemoryQueue};
pub use publisher::{AmqpPublisher, PendingConfirm};

use crate::error::BusError;
use lapin::{Connection, ConnectionProperties};

/// Default exchange name.
pub const DEFAULT_EXCHANGE: &str = "kausal";

/// Routing key of live change messages of a namespace.
pub fn changes_routing_key(namespace: &str) -> String {
    format!("{namespace}.changes")
}

/// The broker URL with any password replaced, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{}:***@{}", &url[..scheme + 3], user, &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

/// Connects and opens the one channel each publisher or consumer uses.
pub(crate) async fn open_channel(url: &str) -> Result<(Connection, lapin::Channel), BusError> {
    let conn = connect(url).await?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|source| BusError::Amqp {
            operation: "open channel",
            source,
        })?;
    Ok((conn, channel))
}

async fn connect(url: &str) -> Result<Connection, BusError> {
    let endpoint = redact_url(url);
    let props = ConnectionProperties::default().with_connection_name("kausal".into());
    Connection::connect(url, props).await.map_err(|source| {
        let refused = matches!(
            source.kind(),
            lapin::ErrorKind::ProtocolError(e)
                if e.get_id() == 403
        ) || source.to_string().contains("ACCESS_REFUSED");
        if refused {
            BusError::AccessRefused { endpoint, source }
        } else {
            BusError::Unreachable { endpoint, source }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:secret@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(redact_url("amqp://127.0.0.1"), "amqp://127.0.0.1");
    }
}
