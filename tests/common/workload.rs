//! A seeded random workload on users and messages (foreign key), with sessions, updates
//! of the same rows and deletes, from several concurrent writers; and the row-by-row
//! comparison of source and subscriber store.
#![allow(dead_code)]

use super::connect;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const SCHEMA: &str = "
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL);
CREATE TABLE messages (id bigint PRIMARY KEY,
  user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
  text text NOT NULL, seen boolean NOT NULL DEFAULT false);
";

/// Publisher `[[table]]` entries for [`SCHEMA`].
pub const PUBLISHED: &str = "[[table]]\nname = \"users\"\ncolumns = [\"*\"]\n\
                             [[table]]\nname = \"messages\"\ncolumns = [\"*\"]\n";

/// Subscriber `[[table]]` entries for namespace `ns`.
pub fn subscribed(ns: &str) -> String {
    format!(
        "[[table]]\nnamespace = \"{ns}\"\nname = \"users\"\n\
         [[table]]\nnamespace = \"{ns}\"\nname = \"messages\"\n"
    )
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Runs `txns` committed transactions from `writers` concurrent connections. Returns
/// the number of committed message inserts (conflicts between writers roll back and are
/// retried as other random transactions).
pub async fn run(db_url: &str, txns: u64, writers: u64, seed: u64) -> u64 {
    let done = Arc::new(AtomicU64::new(0));
    let inserts = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = db_url.to_string();
        let done = done.clone();
        let inserts = inserts.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = connect(&url).await;
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (w + 1));
            // Ids are unique per writer: id * writers + w.
            let mut next_id = 1u64;
            while done.load(Ordering::Relaxed) < txns {
                let tx = match c.transaction().await {
                    Ok(t) => t,
                    Err(_) => continue,
                };
                let r = step(&tx, &mut rng, &mut next_id, writers, w).await;
                let ok = match r {
                    Ok(insert) => {
                        let ok = tx.commit().await.is_ok();
                        if ok && insert {
                            inserts.fetch_add(1, Ordering::Relaxed);
                        }
                        ok
                    }
                    Err(_) => {
                        let _ = tx.rollback().await;
                        false
                    }
                };
                if ok {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    inserts.load(Ordering::Relaxed)
}

async fn step(
    tx: &tokio_postgres::Transaction<'_>,
    rng: &mut Rng,
    next_id: &mut u64,
    writers: u64,
    w: u64,
) -> Result<bool, tokio_postgres::Error> {
    let new_id = |n: &mut u64| {
        let id = *n * writers + w;
        *n += 1;
        id as i64
    };
    // A random existing user: from all writers' users, so transactions of different
    // writers depend on each other.
    let some_user = "SELECT id FROM users ORDER BY random() LIMIT 1";
    if rng.below(4) == 0 {
        let session = format!(r#"{{"session": "s{}"}}"#, rng.below(16));
        tx.execute(
            "SELECT pg_logical_emit_message(true, 'kausal', $1::text)",
            &[&session],
        )
        .await?;
    }
    match rng.below(100) {
        0..=24 => {
            let id = new_id(next_id);
            tx.execute(
                "INSERT INTO users VALUES ($1, $2, $3)",
                &[&id, &format!("user{id}"), &format!("u{id}@example.com")],
            )
            .await?;
        }
        25..=54 => {
            // Often a user and their first message in one go, often a message of a user
            // created by another writer a moment ago.
            if let Some(row) = tx.query_opt(some_user, &[]).await? {
                let uid: i64 = row.get(0);
                let id = new_id(next_id);
                tx.execute(
                    "INSERT INTO messages (id, user_id, text) VALUES ($1, $2, $3)",
                    &[&id, &uid, &format!("hello {id}")],
                )
                .await?;
                return Ok(true);
            }
        }
        55..=69 => {
            tx.execute(
                "UPDATE users SET name = name || '+' WHERE id = (SELECT id FROM users ORDER BY random() LIMIT 1)",
                &[],
            )
            .await?;
        }
        70..=84 => {
            tx.execute(
                "UPDATE messages SET seen = NOT seen, text = text || '!' \
                 WHERE id = (SELECT id FROM messages ORDER BY random() LIMIT 1)",
                &[],
            )
            .await?;
        }
        85..=94 => {
            tx.execute(
                "DELETE FROM messages WHERE id = (SELECT id FROM messages ORDER BY random() LIMIT 1)",
                &[],
            )
            .await?;
        }
        _ => {
            tx.execute(
                "DELETE FROM users WHERE id = (SELECT id FROM users ORDER BY random() LIMIT 1)",
                &[],
            )
            .await?;
        }
    }
    Ok(false)
}

/// Rows of the source, as text, in key order.
pub async fn source_rows(db_url: &str) -> (Vec<String>, Vec<String>) {
    let c = connect(db_url).await;
    let users = c
        .query(
            "SELECT id::text || '|' || name || '|' || email FROM users ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let messages = c
        .query(
            "SELECT id::text || '|' || user_id::text || '|' || text || '|' || seen::text FROM messages ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    (users, messages)
}

/// The same rows from a subscriber's store (any SQL dialect).
pub async fn store_rows(store: &sqlx::AnyPool) -> (Vec<String>, Vec<String>) {
    use sqlx::Row;
    let users = sqlx::query("SELECT id, name, email FROM users ORDER BY id")
        .fetch_all(store)
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    format!(
                        "{}|{}|{}",
                        r.get::<i64, _>(0),
                        r.get::<String, _>(1),
                        r.get::<String, _>(2)
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    // Booleans read as text: SQLite stores them as integers.
    let messages = sqlx::query(
        "SELECT id, user_id, text, CASE WHEN seen THEN 'true' ELSE 'false' END FROM messages ORDER BY id",
    )
        .fetch_all(store)
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    format!(
                        "{}|{}|{}|{}",
                        r.get::<i64, _>(0),
                        r.get::<i64, _>(1),
                        r.get::<String, _>(2),
                        r.get::<String, _>(3)
                    )
                })
                .collect()
        })
        // The table appears with the first message; until then it reads as empty.
        .unwrap_or_default();
    (users, messages)
}

/// Waits until the store equals the source row by row; panics with the difference after
/// `timeout`.
pub async fn converge(db_url: &str, store: &sqlx::AnyPool, timeout: std::time::Duration) {
    converge_to(source_rows(db_url).await, store, timeout).await
}

/// Waits until the store holds `source` (users, messages as text rows).
pub async fn converge_to(
    source: (Vec<String>, Vec<String>),
    store: &sqlx::AnyPool,
    timeout: std::time::Duration,
) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let got = store_rows(store).await;
        if got == source {
            return;
        }
        if std::time::Instant::now() > deadline {
            let (missing_u, extra_u) = (not_in(&source.0, &got.0), not_in(&got.0, &source.0));
            let (missing_m, extra_m) = (not_in(&source.1, &got.1), not_in(&got.1, &source.1));
            panic!(
                "store differs from the source after {timeout:?}: users {} vs {} (missing {missing_u:?}, extra {extra_u:?}); \
                 messages {} vs {} (missing {missing_m:?}, extra {extra_m:?})",
                got.0.len(), source.0.len(), got.1.len(), source.1.len()
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Up to five rows of `a` that `b` lacks.
fn not_in<'a>(a: &'a [String], b: &[String]) -> Vec<&'a String> {
    a.iter().filter(|r| !b.contains(r)).take(5).collect()
}

/// A fresh Postgres database for a subscriber store.
pub async fn store_db(name: &str) -> String {
    let admin = connect(&format!("{}/postgres", super::PG)).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    format!("{}/{name}", super::PG)
}

pub async fn drop_store_db(name: &str) {
    let admin = connect(&format!("{}/postgres", super::PG)).await;
    let _ = admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await;
}
