//! Bootstrap requests: a subscriber asks a publisher for the current rows of tables.
//!
//! The request goes straight to the publisher's control queue
//! (`kausal.control.<namespace>`); the rows come back as [`crate::Snapshot`] envelopes
//! straight to the subscriber's queue. See `docs/bootstrap.md`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The queue a publisher of `namespace` takes bootstrap requests from.
pub fn control_queue(namespace: &str) -> String {
    format!("kausal.control.{namespace}")
}

/// A control queue unused this long (no publisher consuming it, no request declaring
/// it) is deleted by the broker: namespaces that are gone leave nothing behind. A
/// subscriber waiting for chunks asks again every minute, which declares it again.
pub const CONTROL_QUEUE_EXPIRES_MS: u32 = 24 * 3600 * 1000;

/// The control queue of `namespace`, as publishers and subscribers declare it.
pub fn control_queue_spec(namespace: &str) -> crate::amqp::QueueSpec {
    crate::amqp::QueueSpec {
        name: control_queue(namespace),
        namespaces: Vec::new(),
        prefetch: 1,
        temporary: false,
        message_ttl_ms: None,
        expires_ms: Some(CONTROL_QUEUE_EXPIRES_MS),
        partition: None,
        quorum: false,
    }
}

/// Rows per chunk unless the request says otherwise.
pub const DEFAULT_CHUNK_ROWS: usize = 2_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootstrapRequest {
    /// Names the request in chunks and logs; a retried request may reuse it.
    pub request: String,
    /// The subscriber's queue: chunks are published straight to it.
    pub queue: String,
    /// Published table names, in the order to send them (parents first), each from
    /// where an earlier attempt stopped.
    pub tables: Vec<TableRequest>,
    #[serde(default = "default_chunk_rows")]
    pub chunk_rows: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRequest {
    pub table: String,
    /// Start after this key (the `last_key` of the last chunk applied); none: from the
    /// start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Map<String, Value>>,
}

fn default_chunk_rows() -> usize {
    DEFAULT_CHUNK_ROWS
}

/// Sends `request` to the control queue of `namespace` (declaring it as a `queue_type`
/// queue if it does not exist, so a request sent while the publisher is down waits for
/// it; an existing one is used as it is, whatever its type), with a publisher confirm.
pub async fn send_request(
    url: &str,
    exchange: &str,
    namespace: &str,
    request: &BootstrapRequest,
    queue_type: crate::amqp::QueueType,
) -> Result<(), crate::BusError> {
    let queue = control_queue(namespace);
    if !crate::amqp::queue_exists(url, &queue).await? {
        let mut spec = control_queue_spec(namespace);
        spec.quorum = queue_type == crate::amqp::QueueType::Quorum;
        let (conn, channel) = crate::amqp::open_channel(url).await?;
        let declared = crate::amqp::declare_queue(&channel, exchange, &spec).await;
        let _ = channel.close(200, "bye".into()).await;
        let _ = conn.close(200, "bye".into()).await;
        declared?;
    }
    let publisher = crate::amqp::AmqpPublisher::connect(url, exchange).await?;
    let body = serde_json::to_vec(request).unwrap_or_default();
    let sent = async {
        publisher
            .publish_to_queue(&queue, &body)
            .await?
            .wait()
            .await
    }
    .await;
    publisher.close().await;
    sent
}
