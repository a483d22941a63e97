use super::open_channel;
use super::publisher::declare_exchange;
use crate::error::BusError;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};

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

/// The headers of a signed message.
pub fn signature_headers(key_id: &str, signature: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    add_signature(
        &mut headers,
        Some(&(key_id.to_string(), signature.to_string())),
    );
    headers
}

pub(super) fn add_signature(headers: &mut FieldTable, signature: Option<&(String, String)>) {
    if let Some((key, sig)) = signature {
        headers.insert(
            crate::signing::KEY_HEADER.into(),
            AMQPValue::LongString(key.as_str().into()),
        );
        headers.insert(
            crate::signing::SIG_HEADER.into(),
            AMQPValue::LongString(sig.as_str().into()),
        );
    }
}

/// The signature headers of a message, if it has both.
pub(super) fn read_signature(headers: Option<&FieldTable>) -> Option<(String, String)> {
    Some((
        header_text(headers, crate::signing::KEY_HEADER)?,
        header_text(headers, crate::signing::SIG_HEADER)?,
    ))
}

/// Header naming an operator's command (`release`); the body is the command's JSON.
pub const CONTROL_HEADER: &str = "x-kausal-control";
/// Header of a message an operator sent back from the dead-letter queue.
pub const RETRY_HEADER: &str = "x-kausal-retry";
/// Header holding why Kausal dead-lettered a message.
pub const REASON_HEADER: &str = "x-kausal-reason";
/// Header of a dead letter that is a whole signed message of which only these
/// transactions (`ns/gen/seq`, comma-separated) were dead-lettered.
pub const ONLY_HEADER: &str = "x-kausal-only";

pub(super) fn header_text(headers: Option<&FieldTable>, name: &str) -> Option<String> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// The headers that travel with a delivery when it is moved or retried.
fn kausal_headers(
    control: Option<&str>,
    retried: bool,
    signature: Option<&(String, String)>,
) -> FieldTable {
    let mut headers = FieldTable::default();
    add_signature(&mut headers, signature);
    if let Some(c) = control {
        headers.insert(CONTROL_HEADER.into(), AMQPValue::LongString(c.into()));
    }
    if retried {
        headers.insert(RETRY_HEADER.into(), AMQPValue::LongString("1".into()));
    }
    headers
}

/// Who settles a delivery: RabbitMQ, or the in-process queue it came from.
pub(super) enum Acker {
    Amqp(lapin::Acker),
    Memory(super::memory::MemoryAcker),
}

impl Delivery {
    pub async fn ack(&self) -> Result<(), BusError> {
        let acker = match &self.acker {
            Acker::Amqp(a) => a,
            Acker::Memory(m) => {
                m.ack();
                return Ok(());
            }
        };
        acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(|source| BusError::Amqp {
                operation: "basic.ack",
                source,
            })
    }

    /// Sends the message to the dead-letter queue (no requeue).
    pub async fn dead_letter(&self) -> Result<(), BusError> {
        let acker = match &self.acker {
            Acker::Amqp(a) => a,
            Acker::Memory(m) => {
                m.dead_letter(&self.body, "dead-lettered by the subscriber");
                return Ok(());
            }
        };
        acker
            .nack(BasicNackOptions {
                requeue: false,
                multiple: false,
            })
            .await
            .map(|_| ())
            .map_err(|source| BusError::Amqp {
                operation: "basic.nack",
                source,
            })
    }

    /// Hands the message back to the queue so it is delivered again.
    pub async fn requeue(&self) -> Result<(), BusError> {
        let acker = match &self.acker {
            Acker::Amqp(a) => a,
            Acker::Memory(m) => {
                m.requeue(&self.body);
                return Ok(());
            }
        };
        acker
            .nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .map(|_| ())
            .map_err(|source| BusError::Amqp {
                operation: "basic.nack",
                source,
            })
    }
}

/// Consumes one subscriber queue, or several partition queues of one app, with manual
/// acks and a prefetch window per queue (QoS per consumer). Not one window shared by
/// the queues: it could fill with messages of some queues that wait for a transaction
/// at the head of another, which would then never be delivered.
pub struct AmqpConsumer {
    conn: Connection,
    channel: Channel,
    /// Deliveries of every consumed queue; a queue's stream ends with `(queue, None)`.
    streams: futures_util::stream::SelectAll<QueueStream>,
    /// Queue name → consumer tag, of the queues consumed now.
    active: std::collections::BTreeMap<String, String>,
    exchange: String,
    /// Where dead letters are routed: the app's queue name.
    queue: String,
}

type QueueStream = std::pin::Pin<
    Box<
        dyn futures_util::Stream<
                Item = (
                    std::sync::Arc<str>,
                    Option<lapin::Result<lapin::message::Delivery>>,
                    std::sync::Arc<str>,
                ),
            > + Send
            + Sync,
    >,
>;

impl AmqpConsumer {
    /// Connects, declares the exchange, the queue, its bindings and its dead-letter
    /// queue, and starts consuming.
    pub async fn connect(url: &str, exchange: &str, spec: &QueueSpec) -> Result<Self, BusError> {
        let mut consumer =
            AmqpConsumer::open(url, exchange, spec.prefetch, spec.dead_letter_key()).await?;
        consumer.declare(spec).await?;
        consumer.consume(spec).await?;
        Ok(consumer)
    }

    /// Connects without consuming anything yet: a window of `prefetch` unacked messages
    /// for each queue consumed later, dead letters routed as `dead_letter_key`.
    pub async fn open(
        url: &str,
        exchange: &str,
        prefetch: u16,
        dead_letter_key: &str,
    ) -> Result<Self, BusError> {
        let (conn, channel) = open_channel(url).await?;
        channel
            .basic_qos(prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|source| BusError::Amqp {
                operation: "basic.qos",
                source,
            })?;
        Ok(AmqpConsumer {
            conn,
            channel,
            streams: futures_util::stream::SelectAll::new(),
            active: std::collections::BTreeMap::new(),
            exchange: exchange.to_string(),
            queue: dead_letter_key.to_string(),
        })
    }

    /// Declares the exchange, a queue, its bindings and its dead-letter queue
    /// (idempotent).
    pub async fn declare(&self, spec: &QueueSpec) -> Result<(), BusError> {
        declare_queue(&self.channel, &self.exchange, spec).await
    }

    /// Starts consuming one more (declared) queue on this channel, in the same
    /// prefetch window. A no-op for a queue consumed already.
    pub async fn consume(&mut self, spec: &QueueSpec) -> Result<(), BusError> {
        if self.active.contains_key(&spec.name) {
            return Ok(());
        }
        let consumer = self
            .channel
            .basic_consume(
                spec.name.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    exclusive: spec.temporary,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|source| BusError::Amqp {
                operation: "basic.consume",
                source,
            })?;
        let name: std::sync::Arc<str> = spec.name.as_str().into();
        let tag: std::sync::Arc<str> = consumer.tag().as_str().into();
        self.active.insert(spec.name.clone(), tag.to_string());
        let (tagged, ended) = (name.clone(), tag.clone());
        let stream = consumer
            .map(move |d| (tagged.clone(), Some(d), tag.clone()))
            .chain(futures_util::stream::once(
                async move { (name, None, ended) },
            ));
        self.streams.push(Box::pin(stream));
        Ok(())
    }

    /// Stops consuming `queue`. Deliveries already received stay this consumer's to ack.
    pub async fn cancel(&mut self, queue: &str) -> Result<(), BusError> {
        let Some(tag) = self.active.remove(queue) else {
            return Ok(());
        };
        self.channel
            .basic_cancel(
                tag.as_str().into(),
                lapin::options::BasicCancelOptions::default(),
            )
            .await
            .map_err(|source| BusError::Amqp {
                operation: "basic.cancel",
                source,
            })
    }

    /// The queues consumed now.
    pub fn consuming(&self) -> Vec<String> {
        self.active.keys().cloned().collect()
    }

    /// The next delivery of any consumed queue; `None` when the broker cancelled a
    /// consumer this side did not cancel. Waits for ever while no queue is consumed.
    pub async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        loop {
            if self.streams.is_empty() {
                futures_util::future::pending::<()>().await;
            }
            let (queue, item, tag) = self.streams.next().await?;
            let Some(item) = item else {
                // The end of a consumer this side cancelled is expected, also when the
                // queue is consumed again by now (under a new tag).
                if self.active.get(&*queue).is_some_and(|t| **t == *tag) {
                    return None;
                }
                continue;
            };
            return Some(
                item.map(|d| {
                    let headers = d.properties.headers().as_ref();
                    Delivery {
                        control: header_text(headers, CONTROL_HEADER),
                        retried: header_text(headers, RETRY_HEADER).is_some(),
                        signature: read_signature(headers),
                        body: d.data,
                        queue,
                        redelivered: d.redelivered,
                        routing_key: d.routing_key.to_string(),
                        acker: Acker::Amqp(d.acker),
                    }
                })
                .map_err(|source| BusError::Amqp {
                    operation: "consume",
                    source,
                }),
            );
        }
    }

    /// Puts `body` into this queue's dead-letter queue with the reason in the header
    /// `x-kausal-reason`, so an operator sees why. Used for one envelope of a message
    /// whose other envelopes were fine; the caller acks the original afterwards (on the
    /// same channel, so the broker has the copy before the ack).
    pub async fn send_to_dead_letters(&self, body: Vec<u8>, reason: &str) -> Result<(), BusError> {
        self.send_to_dead_letters_signed(body, reason, None, None)
            .await
    }

    /// The same for a signed message kept whole (with its signature, so that a retry
    /// still verifies), of which only the transactions named in `only` were
    /// dead-lettered (header [`ONLY_HEADER`]; the others in it are applied).
    pub async fn send_to_dead_letters_signed(
        &self,
        body: Vec<u8>,
        reason: &str,
        signature: Option<&(String, String)>,
        only: Option<&str>,
    ) -> Result<(), BusError> {
        let mut headers = FieldTable::default();
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        add_signature(&mut headers, signature);
        if let Some(only) = only {
            headers.insert(ONLY_HEADER.into(), AMQPValue::LongString(only.into()));
        }
        let props = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/vnd.kausal".into())
            .with_headers(headers);
        let dlx = format!("{}.dlx", self.exchange);
        self.channel
            .basic_publish(
                dlx.as_str().into(),
                self.queue.as_str().into(),
                lapin::options::BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .map(|_| ())
            .map_err(|source| BusError::Amqp {
                operation: "basic.publish (dead letter)",
                source,
            })
    }

    /// Moves a delivery to the tail of this queue: publishes a copy (confirmed by the
    /// broker) and only then acks the original. Unlike a requeue, which puts a message
    /// back at its old position, this lets the messages behind it come first — what a
    /// worker whose window is full of transactions waiting for later messages needs.
    pub async fn move_to_tail(&self, delivery: &Delivery) -> Result<(), BusError> {
        let amqp = |operation| move |source| BusError::Amqp { operation, source };
        let channel = self
            .conn
            .create_channel()
            .await
            .map_err(amqp("channel.open"))?;
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .map_err(amqp("confirm.select"))?;
        let props = lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/vnd.kausal".into())
            .with_headers(kausal_headers(
                delivery.control.as_deref(),
                delivery.retried,
                delivery.signature.as_ref(),
            ));
        let confirm = channel
            .basic_publish(
                "".into(),
                (*delivery.queue).into(),
                lapin::options::BasicPublishOptions::default(),
                &delivery.body,
                props,
            )
            .await
            .map_err(amqp("basic.publish (to the tail)"))?
            .await
            .map_err(amqp("publisher confirm"))?;
        let _ = channel.close(200, "bye".into()).await;
        if confirm.is_nack() {
            return Err(BusError::Nacked);
        }
        delivery.ack().await
    }

    /// Deletes a queue (and nothing else); for tests and `kausal tail` cleanup.
    pub async fn delete_queue(&self, name: &str) -> Result<(), BusError> {
        self.channel
            .queue_delete(name.into(), lapin::options::QueueDeleteOptions::default())
            .await
            .map(|_| ())
            .map_err(|source| BusError::Amqp {
                operation: "queue.delete",
                source,
            })
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, "bye".into()).await;
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

/// Declares the exchange, the queue with its bindings, and the dead-letter path.
/// Idempotent; safe to call from every worker.
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
            .map_err(amqp("queue.declare"))?;
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
        .map_err(|source| {
            if is_soft_error(&source, 406) {
                let expires = spec
                    .expires_ms
                    .map_or("no expiry".to_string(), |ms| format!("x-expires {ms} ms"));
                BusError::QueueMismatch {
                    queue: spec.name.clone(),
                    asked: expires,
                    source,
                }
            } else {
                BusError::Amqp {
                    operation: "queue.declare",
                    source,
                }
            }
        })?;
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

/// A message in a dead-letter queue, with the reason Kausal recorded (when it recorded
/// one: messages rejected by the broker's own dead-lettering carry only `x-death`).
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub reason: Option<String>,
    pub body: Vec<u8>,
}

/// Reads up to `max` messages of a dead-letter queue without removing them (they are
/// handed back when the channel closes).
pub async fn peek_dead_letters(
    url: &str,
    queue: &str,
    max: usize,
) -> Result<Vec<DeadLetter>, BusError> {
    let (conn, channel) = open_channel(url).await?;
    let mut out = Vec::new();
    while out.len() < max {
        let got = channel
            .basic_get(
                queue.into(),
                lapin::options::BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(|source| BusError::Amqp {
                operation: "basic.get",
                source,
            })?;
        let Some(message) = got else { break };
        let reason = message
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-kausal-reason").cloned())
            .and_then(|v| match v {
                AMQPValue::LongString(s) => Some(s.to_string()),
                _ => None,
            });
        out.push(DeadLetter {
            reason,
            body: message.delivery.data.clone(),
        });
    }
    let _ = channel.close(200, "bye".into()).await;
    let _ = conn.close(200, "bye".into()).await;
    Ok(out)
}
