//! A remote observer: "email" a user whenever a message is posted to them — in causal
//! order, so the user row is always in the read model before the message is handled.
//!
//! Prerequisites: `scripts/setup.sh`, and a publisher for namespace `demo` (`kausal demo`
//! runs one). Run: `cargo run --example observer -- examples/observer.toml`
//! (add `[coordination] kind = "redis"` to run several of these on one queue).

use kausal::subscriber::{CallbackError, Event, Subscriber, SubscriberConfig};
use serde::Deserialize;

#[derive(Deserialize)]
struct Message {
    id: i64,
    user_id: i64,
    text: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Warnings and errors (RUST_LOG) to stderr, as `kausal subscribe` writes them.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let path = std::env::args()
        .nth(1)
        .unwrap_or("examples/observer.toml".into());
    let cfg: SubscriberConfig = kausal::config::load(
        path.as_ref(),
        std::env::vars(),
        kausal::config::SUBSCRIBER_SECTIONS,
        kausal::config::SUBSCRIBER_KEYS,
    )?;
    // OBSERVER_RECORD=1: each callback also records its message in the store table
    // `notified` (which the caller created), through the store transaction: a test can
    // count there that each effect was committed once, whatever was retried.
    let record = std::env::var("OBSERVER_RECORD").is_ok();
    let mut subscriber = Subscriber::new(cfg);
    subscriber
        .callbacks()
        .on_insert("messages", move |e: Event<Message>| {
            async move {
                let m = e
                    .new
                    .ok_or(CallbackError::permanent("insert without a row"))?;
                // The read model, through the store transaction the callback runs in:
                // it holds the user however the transactions were grouped.
                let mut conn = e.store.conn().await?;
                let user: Option<(String,)> =
                    sqlx::query_as("SELECT email FROM users WHERE id = $1")
                        .bind(m.user_id)
                        .fetch_optional(&mut *conn)
                        .await?;
                if record {
                    sqlx::query("INSERT INTO notified (message_id) VALUES ($1)")
                        .bind(m.id)
                        .execute(&mut *conn)
                        .await?;
                }
                drop(conn);
                match user {
                    Some((email,)) => println!(
                        "email to {email} about message {}: {:?} [{}]",
                        m.id, m.text, e.idempotency_key
                    ),
                    None => println!(
                        "VIOLATION: message {} handled before user {}",
                        m.id, m.user_id
                    ),
                }
                Ok(())
            }
        });
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop.send(true);
    });
    subscriber.run(shutdown).await?;
    Ok(())
}
