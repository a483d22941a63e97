//! Helpers of the gate tests that publish envelopes by hand (`tests/subscribe_order.rs`,
//! `tests/subscribe_failures.rs`): a SQLite store, the users/messages tables, a
//! subscriber in a given ordering mode, and what it dead-lettered.

use super::sub::*;
use super::unique;
use kausal::subscriber::{Event, Subscriber};
use serde_json::Value;
use sqlx::Row as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const TABLES: &str = r#"
[[table]]
namespace = "NS"
name = "users"
[[table]]
namespace = "NS"
name = "messages"
"#;

pub fn tables(ns: &str) -> String {
    TABLES.replace("NS", ns)
}

pub async fn count(store: &sqlx::AnyPool, table: &str) -> i64 {
    sqlx::query(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(store)
        .await
        .map(|r| r.get::<i64, _>(0))
        .unwrap_or(0)
}

/// Waits until the app's dead-letter queue holds `n` messages and returns them.
pub async fn dead_letters(app: &str, n: usize) -> Vec<kausal::bus::amqp::DeadLetter> {
    let dlq = format!("kausal.{app}.dlq");
    for _ in 0..300 {
        let letters = kausal::bus::amqp::peek_dead_letters(super::AMQP, &dlq, 10)
            .await
            .unwrap();
        if letters.len() >= n {
            return letters;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fewer than {n} dead letters in {dlq} after 30 s");
}

pub async fn store(url: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    sqlx::AnyPool::connect(url).await.unwrap()
}

/// Records `<table>:<op>:<id>` for every callback, in order.
pub fn recorder(sub: &mut Subscriber) -> Arc<Mutex<Vec<String>>> {
    let log = Arc::new(Mutex::new(Vec::new()));
    for table in ["users", "messages"] {
        let log = log.clone();
        sub.callbacks().on_change(table, move |e: Event<Value>| {
            let log = log.clone();
            async move {
                log.lock()
                    .unwrap()
                    .push(format!("{}:{:?}:{}", e.table, e.op, e.key["id"]));
                Ok(())
            }
        });
    }
    log
}

pub struct Setup {
    pub app: String,
    pub url: String,
    pub feed: Feed,
}

pub async fn setup(label: &str) -> Setup {
    super::logs();
    let app = unique(label);
    let feed = Feed::new(&app).await;
    let url = sqlite_url(&app);
    declare_queue(&app, &app).await;
    Setup { app, url, feed }
}

pub fn subscriber(s: &Setup, mode: &str) -> Subscriber {
    Subscriber::new(sub_config(
        &s.app,
        &s.url,
        &format!(
            "[ordering]\nmode = \"{mode}\"\n{}",
            tables(&s.feed.namespace)
        ),
    ))
}
