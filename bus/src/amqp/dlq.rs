//! An app's dead-letter queue, for `kausal dlq`: read every message with its reason
//! without removing any, then remove (drop) or send back (retry) chosen ones.
//!
//! Messages are taken with `basic.get` and held unacknowledged; whatever is not acked
//! returns to the queue, at its old position, when the channel closes — so listing
//! changes nothing, and a crash halfway through a retry loses nothing (a message is
//! acked only after its copy is confirmed in the app's queue).

use super::headers::RETRY_HEADER;
use crate::error::BusError;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

/// One held message of a dead-letter queue.
#[derive(Debug)]
pub struct Letter {
    /// Why Kausal dead-lettered it; `None` for messages the broker itself
    /// dead-lettered (rejected by an older worker, expired).
    pub reason: Option<String>,
    pub body: Vec<u8>,
    /// Key id and signature, kept from the original message (a retry still verifies).
    pub signature: Option<(String, String)>,
    /// For a whole signed message: the transactions (`ns/gen/seq`) that were
    /// dead-lettered; the others in it were applied.
    pub only: Option<Vec<String>>,
    acker: lapin::Acker,
}

pub struct DeadLetterQueue {
    conn: Connection,
    channel: Channel,
    queue: String,
}

fn amqp(operation: &'static str) -> impl Fn(lapin::Error) -> BusError {
    move |source| BusError::Amqp { operation, source }
}

impl DeadLetterQueue {
    /// Opens `queue` (an app's `<queue>.dlq`); refuses a queue that does not exist
    /// rather than creating one.
    pub async fn open(url: &str, queue: &str) -> Result<Self, BusError> {
        if !super::queue_exists(url, queue).await? {
            return Err(BusError::NoSuchQueue {
                queue: queue.to_string(),
            });
        }
        let (conn, channel) = super::open_channel(url).await?;
        Ok(DeadLetterQueue {
            conn,
            channel,
            queue: queue.to_string(),
        })
    }

    /// Takes up to `max` messages, in queue order, holding them unacknowledged.
    pub async fn take(&self, max: usize) -> Result<Vec<Letter>, BusError> {
        let mut out = Vec::new();
        while out.len() < max {
            let got = self
                .channel
                .basic_get(
                    self.queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await
                .map_err(amqp("basic.get"))?;
            let Some(message) = got else { break };
            let delivery = message.delivery;
            let headers = delivery.properties.headers().as_ref();
            let reason = super::headers::dead_letter_reason(headers);
            let signature = super::headers::read_signature(headers);
            let only = super::headers::header_text(headers, super::headers::ONLY_HEADER)
                .map(|o| o.split(',').map(str::to_string).collect());
            out.push(Letter {
                reason,
                signature,
                only,
                body: delivery.data,
                acker: delivery.acker,
            });
        }
        Ok(out)
    }

    /// Removes a held message for good.
    pub async fn remove(&self, letter: &Letter) -> Result<(), BusError> {
        letter
            .acker
            .ack(BasicAckOptions::default())
            .await
            .map(|_| ())
            .map_err(amqp("basic.ack"))
    }

    /// Sends a held message back to the app's queue `to` (marked as retried, so a
    /// worker admits its transactions again) and removes it here once the broker
    /// confirmed the copy.
    pub async fn retry(&self, letter: &Letter, to: &str) -> Result<(), BusError> {
        let channel = self
            .conn
            .create_channel()
            .await
            .map_err(amqp("channel.open"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("confirm.select"))?;
        let mut headers = FieldTable::default();
        headers.insert(RETRY_HEADER.into(), AMQPValue::LongString("1".into()));
        super::headers::add_signature(&mut headers, letter.signature.as_ref());
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/vnd.kausal".into())
            .with_headers(headers);
        let confirm = channel
            .basic_publish(
                "".into(),
                to.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &letter.body,
                props,
            )
            .await
            .map_err(amqp("basic.publish (retry)"))?
            .await
            .map_err(amqp("publisher confirm"))?;
        let _ = channel.close(200, "bye".into()).await;
        if confirm.is_nack() {
            return Err(BusError::Nacked);
        }
        if confirm.take_message().is_some() {
            // Returned as unroutable: the app's queue is gone. The letter stays.
            return Err(BusError::Unroutable { queue: to.into() });
        }
        self.remove(letter).await
    }

    /// Closes the channel: every message taken and not removed goes back to the queue.
    pub async fn close(self) {
        let _ = self.channel.close(200, "bye".into()).await;
        let _ = self.conn.close(200, "bye".into()).await;
    }
}

/// Sends an operator's command (`kind`, JSON `body`) to an app's queue, where one of
/// its workers acts on it; confirmed by the broker before this returns.
pub async fn send_command(
    url: &str,
    queue: &str,
    kind: &str,
    body: &[u8],
    signer: Option<&crate::signing::Signer>,
) -> Result<(), BusError> {
    let (conn, channel) = super::open_channel(url).await?;
    let result = async {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp("confirm.select"))?;
        let mut headers = FieldTable::default();
        headers.insert(
            super::headers::CONTROL_HEADER.into(),
            AMQPValue::LongString(kind.into()),
        );
        if let Some(signer) = signer {
            let signature = (signer.key_id().to_string(), signer.sign(body));
            super::headers::add_signature(&mut headers, Some(&signature));
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_headers(headers);
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                props,
            )
            .await
            .map_err(amqp("basic.publish (command)"))?
            .await
            .map_err(amqp("publisher confirm"))?;
        if confirm.is_nack() {
            return Err(BusError::Nacked);
        }
        if confirm.take_message().is_some() {
            return Err(BusError::Unroutable {
                queue: queue.into(),
            });
        }
        Ok(())
    }
    .await;
    let _ = conn.close(200, "bye".into()).await;
    result
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
    let (conn, channel) = super::open_channel(url).await?;
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
        let reason =
            super::headers::dead_letter_reason(message.delivery.properties.headers().as_ref());
        out.push(DeadLetter {
            reason,
            body: message.delivery.data.clone(),
        });
    }
    let _ = channel.close(200, "bye".into()).await;
    let _ = conn.close(200, "bye".into()).await;
    Ok(out)
}
