//! Consuming an app's queues from RabbitMQ: one consumer per queue on one channel,
//! manual acks, dead letters and moves to the tail of a queue.

use super::delivery::{Acker, Delivery};
use super::headers::{add_signature, header_text, kausal_headers, read_signature};
use super::headers::{CONTROL_HEADER, ONLY_HEADER, REASON_HEADER, RETRY_HEADER};
use super::open_channel;
use super::topology::{declare_queue, QueueSpec};
use crate::error::BusError;
use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};

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
