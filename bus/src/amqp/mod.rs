//! The RabbitMQ side: topology, confirmed publishing and consuming.
//!
//! Topology: one durable topic exchange (default `kausal`) that publishers send change
//! messages to with routing keys `<namespace>.changes.<slot>` ([`SLOTS`] slots); per
//! subscriber app one durable queue bound with `<namespace>.#`, or several partition
//! queues each bound to its share of the slots ([`Partition`]); a dead-letter exchange
//! `<exchange>.dlx` (direct) into which a subscriber's rejected messages go, routed by
//! the app's queue name into the queue `<queue>.dlq`.
//!
//! Modules: `topology` (queues, bindings, passive checks), `publisher` (confirmed
//! publishing), `consumer` (consuming an app's queues), `delivery` (a received message
//! and its settling), `headers`, `dlq` (dead letters and operator commands), `memory`
//! (an in-process queue) and `inbox` (either of the two, for a worker).

mod consumer;
mod delivery;
mod dlq;
mod headers;
mod inbox;
mod memory;
mod publisher;
mod topology;

pub use consumer::AmqpConsumer;
pub use delivery::Delivery;
pub use dlq::{peek_dead_letters, send_command, DeadLetter, DeadLetterQueue, Letter};
pub use headers::{signature_headers, CONTROL_HEADER, ONLY_HEADER, REASON_HEADER, RETRY_HEADER};
pub use inbox::Inbox;
pub use memory::MemoryQueue;
pub use publisher::{AmqpPublisher, PendingConfirm};
pub use topology::{
    declare_queue, exchange_exists, queue_depth, queue_exists, Partition, QueueSpec, QueueType,
};

use crate::error::BusError;
use lapin::{Connection, ConnectionProperties};

/// Default exchange name.
pub const DEFAULT_EXCHANGE: &str = "kausal";

/// Routing key of live change messages of a namespace, as publishers before slots
/// sent them (a partitioned app's first queue still takes these).
pub fn changes_routing_key(namespace: &str) -> String {
    format!("{namespace}.changes")
}

/// Slots a publisher spreads a namespace's messages over (routing key
/// `<namespace>.changes.<slot>`): the most partition queues an app can bind.
pub const SLOTS: u32 = 64;

/// Routing key of a change message in `slot`.
pub fn slot_routing_key(namespace: &str, slot: u32) -> String {
    format!("{namespace}.changes.{slot}")
}

/// The broker URL (or each of a comma-separated list) with any password replaced, for
/// logs and errors.
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(redact_url).collect::<Vec<_>>().join(",");
    }
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

/// Which URL of a list connected last: the next connection tries it first (a node that
/// is down costs its connect timeout once, not at every reconnect).
static LAST_GOOD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Connects to the broker at `url`, or to the first node of a cluster that answers when
/// `url` lists several, comma-separated (`amqp://h1:5672/%2f,amqp://h2:5672/%2f`): a
/// node that is down or unreachable is skipped; a refused login, a TLS or URL problem
/// is an answer (every node has the same users) and ends the attempt.
async fn connect(urls: &str) -> Result<Connection, BusError> {
    let list: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if list.len() <= 1 {
        return connect_one(list.first().copied().unwrap_or(urls)).await;
    }
    let start = LAST_GOOD.load(std::sync::atomic::Ordering::Relaxed) % list.len();
    let mut last = None;
    for i in (0..list.len()).map(|k| (start + k) % list.len()) {
        match connect_one(list[i]).await {
            Ok(conn) => {
                LAST_GOOD.store(i, std::sync::atomic::Ordering::Relaxed);
                return Ok(conn);
            }
            Err(e @ BusError::Unreachable { .. }) => {
                tracing::warn!(error = %e, "broker node unreachable; trying the next one");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.expect("a list of two or more URLs was tried"))
}

async fn connect_one(url: &str) -> Result<Connection, BusError> {
    crate::tls::install_crypto_provider();
    // `cacertfile` is RabbitMQ's own URI query parameter for the CA file (its URI spec);
    // lapin does not read it, so it comes off the URL here.
    let (url, taken) = crate::tls::take_params(url, &["cacertfile"]);
    let endpoint = redact_url(&url);
    let tls = url.starts_with("amqps://");
    let ca = match taken.into_iter().next().flatten() {
        Some(_) if !tls => {
            return Err(BusError::BadUrl {
                reason: crate::tls::TlsSettingsError::CaWithoutTls {
                    param: "cacertfile",
                    fix: "use an amqps:// URL (RabbitMQ's TLS port, usually 5671)",
                }
                .to_string(),
            });
        }
        Some(path) => Some(
            crate::tls::read_ca_file("cacertfile", std::path::Path::new(&path)).map_err(|e| {
                BusError::BadUrl {
                    reason: e.to_string(),
                }
            })?,
        ),
        None => None,
    };
    let props = ConnectionProperties::default().with_connection_name("kausal".into());
    let runtime = lapin::runtime::default_runtime().map_err(|source| BusError::Unreachable {
        endpoint: endpoint.clone(),
        source,
    })?;
    let config = lapin::tcp::OwnedTLSConfig {
        identity: None,
        cert_chain: ca,
    };
    Connection::connect_with_config(&url, props, config, runtime)
        .await
        .map_err(|source| {
            // RabbitMQ refuses a login with the connection-level ACCESS_REFUSED (403).
            let refused = matches!(
                source.kind(),
                lapin::ErrorKind::ProtocolError(e) if e.get_id() == 403
            );
            if refused {
                return BusError::AccessRefused { endpoint, source };
            }
            if tls {
                let detail = crate::tls::describe(&source);
                if crate::tls::hint(&detail).is_some() {
                    return BusError::Tls { endpoint, detail };
                }
            }
            BusError::Unreachable { endpoint, source }
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
        assert_eq!(
            redact_url("amqp://u:a@h1:5672/%2f,amqp://u:b@h2:5672/%2f"),
            "amqp://u:***@h1:5672/%2f,amqp://u:***@h2:5672/%2f"
        );
    }
}
