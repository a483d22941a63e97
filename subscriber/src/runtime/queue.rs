//! The worker's queue: declared with its expiry, and refused when it vanished under a
//! store that followed it.

use crate::config::SubscriberConfig;
use crate::error::SubscriberError;
use crate::sink::sql::SqlStore;
use kausal_bus::amqp::{AmqpConsumer, Inbox, QueueSpec};

/// Declares (if new) and consumes the app's queue, bound to `namespaces`.
pub(super) async fn open(
    cfg: &SubscriberConfig,
    namespaces: &[&str],
    store: &SqlStore,
) -> Result<Inbox, SubscriberError> {
    let mut spec = QueueSpec::durable(&cfg.queue(), namespaces);
    spec.prefetch = cfg.broker.prefetch;
    spec.expires_ms = cfg
        .broker
        .queue_expires_ms()
        .map_err(SubscriberError::Config)?;
    // A queue that vanished (expired, deleted) under a store that followed it: the
    // changes published meanwhile are gone, and a new queue would hide that for good.
    if !kausal_bus::amqp::queue_exists(&cfg.broker.url, &spec.name).await?
        && store.has_followed().await?
    {
        let why = match &cfg.broker.queue_expires {
            Some(e) => format!("it expires after {e} without a consumer"),
            None => "deleted".to_string(),
        };
        return Err(SubscriberError::QueueLost {
            queue: spec.name.clone(),
            why,
        });
    }
    let consumer = AmqpConsumer::connect(&cfg.broker.url, &cfg.broker.exchange, &spec).await?;
    tracing::info!(queue = %spec.name, mode = ?cfg.ordering.mode, "subscriber consuming");
    if let Some(expires) = &cfg.broker.queue_expires {
        tracing::info!(queue = %spec.name, expires = %expires,
            "the broker deletes this queue, and what it holds, once it had no consumer for this long");
    }
    Ok(Inbox::Amqp(Box::new(consumer)))
}
