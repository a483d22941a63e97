//! The demo's subscriber: a SQLite read model of users and messages, and a callback that
//! "emails" the user about each new message, looking the user up in the read model.

use kausal::subscriber::{CallbackError, Event, Subscriber, SubscriberConfig};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Deserialize)]
struct Message {
    id: i64,
    user_id: i64,
    text: String,
}

pub async fn subscriber(broker: &str, read_model: &Path) -> anyhow::Result<Subscriber> {
    let store = format!("sqlite://{}", read_model.display());
    let config = format!(
        r#"
app = "demo-reader"
[broker]
url = "{broker}"
[store]
url = "{store}"
[callbacks]
chain = true
[[table]]
namespace = "demo"
name = "users"
[[table]]
namespace = "demo"
name = "messages"
"#
    );
    eprintln!("--- subscriber config ---{config}-------------------------");
    let cfg: SubscriberConfig = toml::from_str(&config)?;
    sqlx::any::install_default_drivers();
    let mut sub = Subscriber::new(cfg);
    sub.callbacks()
        .on_insert("users", |e: Event<serde_json::Value>| async move {
            let u = e.new.unwrap_or_default();
            println!(
                "read model: user {} ({}) signed up",
                u["id"],
                u["name"].as_str().unwrap_or("")
            );
            Ok(())
        })
        .on_insert("messages", move |e: Event<Message>| async move {
            let m = e
                .new
                .ok_or(CallbackError::permanent("insert without a row"))?;
            // Causal order: the user's row was applied before this message, in an
            // earlier commit or earlier in this store transaction (chained): reading
            // through the event's store transaction sees it either way.
            let mut conn = e.store.conn().await?;
            let email: Option<(String,)> = sqlx::query_as("SELECT email FROM users WHERE id = $1")
                .bind(m.user_id)
                .fetch_optional(&mut *conn)
                .await?;
            drop(conn);
            let lag_ms = (now_us() - e.commit_ts_us) as f64 / 1000.0;
            match email {
                Some((email,)) => println!(
                    "email to {email} about message {}: {:?} ({lag_ms:.0} ms after commit)",
                    m.id, m.text
                ),
                None => println!("BUG: message {} before its user {}", m.id, m.user_id),
            }
            Ok(())
        });
    Ok(sub)
}

fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Every 5 s: rows at the source and in the read model.
pub async fn summary(
    source: String,
    read_model: PathBuf,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (client, conn) = tokio_postgres::connect(&source, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let store = format!("sqlite://{}", read_model.display());
    loop {
        tokio::select! { _ = tokio::time::sleep(Duration::from_secs(5)) => {}, _ = stop.changed() => return Ok(()) }
        let row = client
            .query_one(
                "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM messages)",
                &[],
            )
            .await?;
        let (su, sm): (i64, i64) = (row.get(0), row.get(1));
        let (ru, rm) = match sqlx::AnyPool::connect(&store).await {
            Ok(pool) => {
                let count = |t: &'static str| {
                    let pool = pool.clone();
                    async move {
                        sqlx::query_as::<_, (i64,)>(sqlx::AssertSqlSafe(format!(
                            "SELECT count(*) FROM {t}"
                        )))
                        .fetch_one(&pool)
                        .await
                        .map(|r| r.0)
                        .unwrap_or(0)
                    }
                };
                (count("users").await, count("messages").await)
            }
            Err(_) => (0, 0),
        };
        eprintln!(
            "source: {su} users, {sm} messages | read model ({}): {ru} users, {rm} messages",
            read_model.display()
        );
    }
}
