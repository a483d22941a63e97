use super::open_channel;
use super::topology::declare_exchange;
use crate::error::BusError;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};

use lapin::{BasicProperties, Channel, Connection};

/// Publishes persistent messages to the topic exchange with publisher confirms.
///
/// `publish` returns as soon as the message is handed to the connection; the returned
/// [`PendingConfirm`] resolves when the broker has taken responsibility for it. Callers
/// keep many in flight and await them in order: RabbitMQ confirms on one channel arrive
/// in publish order.
pub struct AmqpPublisher {
    conn: Connection,
    channel: Channel,
    exchange: String,
    signer: Option<std::sync::Arc<crate::signing::Signer>>,
}

/// A published message the broker has not confirmed yet.
pub struct PendingConfirm(lapin::PublisherConfirm);

impl PendingConfirm {
    /// Resolves once the broker confirmed the message; a nack is an error.
    pub async fn wait(self) -> Result<(), BusError> {
        let confirm = self.0.await.map_err(|source| BusError::Amqp {
            operation: "publisher confirm",
            source,
        })?;
        if confirm.is_nack() {
            return Err(BusError::Nacked);
        }
        Ok(())
    }
}

impl AmqpPublisher {
    /// Connects, declares the durable topic exchange and turns on confirms.
    pub async fn connect(url: &str, exchange: &str) -> Result<Self, BusError> {
        let (conn, channel) = open_channel(url).await?;
        declare_exchange(&channel, exchange).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|source| BusError::Amqp {
                operation: "confirm.select",
                source,
            })?;
        Ok(AmqpPublisher {
            conn,
            channel,
            exchange: exchange.to_string(),
            signer: None,
        })
    }

    /// Signs every message published from now on (see [`crate::signing`]).
    pub fn with_signer(mut self, signer: Option<std::sync::Arc<crate::signing::Signer>>) -> Self {
        self.signer = signer;
        self
    }

    /// Publishes one persistent message.
    pub async fn publish(
        &self,
        routing_key: &str,
        body: &[u8],
    ) -> Result<PendingConfirm, BusError> {
        self.publish_via(&self.exchange, routing_key, body).await
    }

    /// Publishes one persistent message straight to queue `queue` (through the default
    /// exchange, so no other queue gets it): bootstrap chunks for one subscriber,
    /// bootstrap requests to a publisher.
    pub async fn publish_to_queue(
        &self,
        queue: &str,
        body: &[u8],
    ) -> Result<PendingConfirm, BusError> {
        self.publish_via("", queue, body).await
    }

    async fn publish_via(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
    ) -> Result<PendingConfirm, BusError> {
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/vnd.kausal".into());
        if let Some(signer) = &self.signer {
            props = props.with_headers(super::headers::signature_headers(
                signer.key_id(),
                &signer.sign(body),
            ));
        }
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .map_err(|source| BusError::Amqp {
                operation: "basic.publish",
                source,
            })?;
        Ok(PendingConfirm(confirm))
    }

    pub async fn close(self) {
        let _ = self.channel.close(200, "bye".into()).await;
        let _ = self.conn.close(200, "bye".into()).await;
    }
}
