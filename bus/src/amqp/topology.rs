//! The broker topology a subscriber app uses: its queue (or partition queues), their
//! bindings, the dead-letter path, and passive checks of what exists.

use crate::error::BusError;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

/// The queue a subscriber consumes from.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    /// Queue name; one durable queue per subscriber app.
    pub name: String,
    /// Publisher namespaces to follow (bound as `<namespace>.#`).
    pub namespaces: Vec<String>,
    /// Unacknowledged messages the broker may hand us at once.
    pub prefetch: u16,
    /// A temporary queue (`kausal tail`): exclusive, auto-deleted, no dead letters.
    pub temporary: bool,
    /// Messages older than this are dropped by the broker (a laptop subscriber's queue).
    pub message_ttl_ms: Option<u32>,
    /// The broker deletes the queue (and its dead-letter queue) after it was unused this
    /// long: no consumer, not declared again.
    pub expires_ms: Option<u32>,
    /// One of several partition queues of an app (see [`Partition`]); `None`: the app's
    /// only queue, bound to everything of its namespaces.
    pub partition: Option<Partition>,
    /// A quorum queue (replicated over the cluster's nodes; its dead-letter queue too)
    /// instead of a classic one. Not for temporary queues.
    pub quorum: bool,
}

/// The RabbitMQ queue type of an app's queues (`[broker] queue_type`), and of a
/// publisher's control queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Not replicated. The default: an existing app's queues keep working after an
    /// upgrade (a queue's type cannot change), and a single-node broker gains nothing.
    #[default]
    Classic,
    Quorum,
}

/// A partition queue: bound to the slots `j` with `j % of == index` (routing keys
/// `<namespace>.changes.<j>`, see [`super::SLOTS`]); partition 0 is the app's queue
/// itself and also takes the unslotted `<namespace>.changes` of older publishers, and
/// direct messages (bootstrap chunks, operator commands). Dead letters of every
/// partition go to the app queue's dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    pub index: u32,
    pub of: u32,
    /// The app's queue (partition 0's name).
    pub base: String,
}

impl Partition {
    /// The queue name of partition `index` of the app queue `base`.
    pub fn queue_name(base: &str, index: u32) -> String {
        if index == 0 {
            base.to_string()
        } else {
            format!("{base}.p{index}")
        }
    }
}

impl QueueSpec {
    pub fn durable(name: &str, namespaces: &[&str]) -> Self {
        QueueSpec {
            name: name.to_string(),
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
            prefetch: 256,
            temporary: false,
            message_ttl_ms: None,
            expires_ms: None,
            partition: None,
            quorum: false,
        }
    }

    /// Partition `index` of `of` of the app queue `base`.
    pub fn partition(base: &str, namespaces: &[&str], index: u32, of: u32) -> Self {
        let mut spec = QueueSpec::durable(&Partition::queue_name(base, index), namespaces);
        spec.partition = Some(Partition {
            index,
            of,
            base: base.to_string(),
        });
        spec
    }

    /// The queue whose dead-letter queue takes this one's dead letters.
    pub fn dead_letter_key(&self) -> &str {
        match &self.partition {
            Some(p) => &p.base,
            None => &self.name,
        }
    }

    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.dead_letter_key())
    }

    /// The routing keys this queue is bound with.
    pub fn bindings(&self) -> Vec<String> {
        let mut keys = Vec::new();
        for ns in &self.namespaces {
            match &self.partition {
                None => keys.push(format!("{ns}.#")),
                Some(p) => {
                    if p.index == 0 {
                        keys.push(super::changes_routing_key(ns));
                    }
                    keys.extend(
                        (0..super::SLOTS)
                            .filter(|j| j % p.of.max(1) == p.index)
                            .map(|j| super::slot_routing_key(ns, j)),
                    );
                }
            }
        }
        keys
    }
}

/// Declares the durable topic exchange publishers send to (idempotent).
pub(super) async fn declare_exchange(channel: &Channel, exchange: &str) -> Result<(), BusError> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|source| BusError::Amqp {
            operation: "exchange.declare",
            source,
        })
}

/// Whether the broker answered with the channel-level error `code` (404 not found, 406
/// precondition failed).
fn is_soft_error(error: &lapin::Error, code: u16) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == code)
}

/// Whether queue `name` exists on the broker at `url` (a passive declare, which creates
/// nothing).
pub async fn queue_exists(url: &str, name: &str) -> Result<bool, BusError> {
    Ok(queue_depth(url, name).await?.is_some())
}

/// Whether exchange `name` exists (a passive declare, which creates nothing).
pub async fn exchange_exists(url: &str, name: &str) -> Result<bool, BusError> {
    let (conn, channel) = super::open_channel(url).await?;
    let options = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let result = channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        )
        .await;
    let _ = conn.close(200, "bye".into()).await;
    passive(result.map(|_| ()), "exchange.declare (passive)").map(|found| found.is_some())
}

/// Messages ready in queue `name` and its consumers; `None` when it does not exist.
pub async fn queue_depth(url: &str, name: &str) -> Result<Option<(u32, u32)>, BusError> {
    let (conn, channel) = super::open_channel(url).await?;
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let result = channel
        .queue_declare(name.into(), options, FieldTable::default())
        .await;
    let _ = conn.close(200, "bye".into()).await;
    passive(
        result.map(|q| (q.message_count(), q.consumer_count())),
        "queue.declare (passive)",
    )
}

/// A passive declare's answer: `None` for "not found" (404), the broker's error else.
// The crate's error type, as the async callers return it; called once per command.
#[allow(clippy::result_large_err)]
fn passive<T>(
    result: Result<T, lapin::Error>,
    operation: &'static str,
) -> Result<Option<T>, BusError> {
    match result {
        Ok(found) => Ok(Some(found)),
        Err(source) if is_soft_error(&source, 404) => Ok(None),
        Err(source) => Err(BusError::Amqp { operation, source }),
    }
}

/// A refused declaration of `queue` (of `spec`): 406 means it exists with other
/// arguments (expiry, queue type), which RabbitMQ cannot change.
fn mismatch(spec: &QueueSpec, queue: &str, source: lapin::Error) -> BusError {
    if is_soft_error(&source, 406) {
        let expires = spec
            .expires_ms
            .map_or("no expiry".to_string(), |ms| format!("x-expires {ms} ms"));
        let kind = if spec.quorum { "quorum" } else { "classic" };
        BusError::QueueMismatch {
            queue: queue.to_string(),
            asked: format!("{kind} queue, {expires}"),
            source,
        }
    } else {
        BusError::Amqp {
            operation: "queue.declare",
            source,
        }
    }
}

/// Declares the exchange, the queue with its bindings, and the dead-letter path.
/// Idempotent; safe to call from every worker.
pub async fn declare_queue(
    channel: &Channel,
    exchange: &str,
    spec: &QueueSpec,
) -> Result<(), BusError> {
    declare_exchange(channel, exchange).await?;
    let amqp = |operation| move |source| BusError::Amqp { operation, source };
    let mut args = FieldTable::default();
    if !spec.temporary {
        let dlx = format!("{exchange}.dlx");
        channel
            .exchange_declare(
                dlx.as_str().into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(amqp("exchange.declare"))?;
        let dlq = spec.dead_letter_queue();
        let mut dlq_args = FieldTable::default();
        if spec.quorum {
            dlq_args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString("quorum".into()),
            );
        }
        if let Some(ms) = spec.expires_ms {
            dlq_args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
        }
        channel
            .queue_declare(
                dlq.as_str().into(),
                QueueDeclareOptions::durable(),
                dlq_args,
            )
            .await
            .map_err(|source| mismatch(spec, &dlq, source))?;
        channel
            .queue_bind(
                dlq.as_str().into(),
                dlx.as_str().into(),
                spec.dead_letter_key().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp("queue.bind"))?;
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(dlx.as_str().into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(spec.dead_letter_key().into()),
        );
    }
    if spec.quorum && !spec.temporary {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
    }
    if let Some(ttl) = spec.message_ttl_ms {
        args.insert("x-message-ttl".into(), AMQPValue::LongUInt(ttl));
    }
    if let Some(ms) = spec.expires_ms {
        args.insert("x-expires".into(), AMQPValue::LongUInt(ms));
    }
    let options = if spec.temporary {
        QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        }
    } else {
        QueueDeclareOptions::durable()
    };
    channel
        .queue_declare(spec.name.as_str().into(), options, args)
        .await
        .map_err(|source| mismatch(spec, &spec.name, source))?;
    for key in spec.bindings() {
        channel
            .queue_bind(
                spec.name.as_str().into(),
                exchange.into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp("queue.bind"))?;
    }
    if spec.partition.is_some() {
        // The app's queue of an earlier, unpartitioned run took everything: it would
        // keep receiving a copy of every other partition's messages.
        for ns in &spec.namespaces {
            channel
                .queue_unbind(
                    spec.name.as_str().into(),
                    exchange.into(),
                    format!("{ns}.#").as_str().into(),
                    FieldTable::default(),
                )
                .await
                .map_err(amqp("queue.unbind"))?;
        }
    }
    Ok(())
}
