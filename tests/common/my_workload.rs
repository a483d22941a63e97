//! The random users/messages workload of [`super::workload`], written to MariaDB: the
//! same mix of inserts, updates of the same rows, deletes and sessions, with context
//! attached through the context table. A user's messages are deleted with the user by
//! the application, in the same transaction: InnoDB's `ON DELETE CASCADE` is invisible
//! in the binlog.
#![allow(dead_code)]

use super::mysql::my_connect;
use mysql_async::prelude::Queryable;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const SCHEMA: &str = "
CREATE TABLE users (id BIGINT PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL)
  ENGINE=InnoDB;
CREATE TABLE messages (id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL, text TEXT NOT NULL,
  seen BOOLEAN NOT NULL DEFAULT FALSE,
  FOREIGN KEY (user_id) REFERENCES users(id)) ENGINE=InnoDB;
CREATE TABLE kausal_context (id BIGINT AUTO_INCREMENT PRIMARY KEY, data JSON NOT NULL)
  ENGINE=InnoDB
";

/// Runs `txns` committed transactions from `writers` connections; returns the number of
/// committed message inserts.
pub async fn run(db_url: &str, txns: u64, writers: u64, seed: u64) -> u64 {
    let done = Arc::new(AtomicU64::new(0));
    let inserts = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let url = db_url.to_string();
        let (done, inserts) = (done.clone(), inserts.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = my_connect(&url).await;
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (w + 1);
            let mut below = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n.max(1)
            };
            let mut next_id = 1u64;
            while done.load(Ordering::Relaxed) < txns {
                let id = (next_id * writers + w) as i64;
                let session = (below(4) == 0).then(|| format!("s{}", below(16)));
                let choice = below(100);
                match step(&mut c, id, session, choice).await {
                    Ok(inserted) => {
                        next_id += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                        if inserted {
                            inserts.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    // Deadlocks and lock waits between writers: rolled back, try another.
                    Err(_) => {
                        let _ = c.query_drop("ROLLBACK").await;
                    }
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
    c: &mut mysql_async::Conn,
    id: i64,
    session: Option<String>,
    choice: u64,
) -> Result<bool, mysql_async::Error> {
    c.query_drop("BEGIN").await?;
    if let Some(s) = session {
        c.exec_drop(
            "INSERT INTO kausal_context (data) VALUES (?)",
            (format!(r#"{{"session": "{s}"}}"#),),
        )
        .await?;
        c.query_drop("DELETE FROM kausal_context WHERE id = LAST_INSERT_ID()")
            .await?;
    }
    let mut inserted = false;
    match choice {
        0..=24 => {
            c.exec_drop(
                "INSERT INTO users VALUES (?, ?, ?)",
                (id, format!("user{id}"), format!("u{id}@example.com")),
            )
            .await?
        }
        25..=54 => {
            let user: Option<i64> = c
                .query_first("SELECT id FROM users ORDER BY RAND() LIMIT 1")
                .await?;
            if let Some(uid) = user {
                c.exec_drop(
                    "INSERT INTO messages (id, user_id, text) VALUES (?, ?, ?)",
                    (id, uid, format!("hello {id}")),
                )
                .await?;
                inserted = true;
            }
        }
        55..=69 => {
            c.query_drop(
                "UPDATE users SET name = CONCAT(name, '+') WHERE id = \
                 (SELECT id FROM (SELECT id FROM users ORDER BY RAND() LIMIT 1) x)",
            )
            .await?
        }
        70..=84 => {
            c.query_drop(
                "UPDATE messages SET seen = NOT seen, text = CONCAT(text, '!') WHERE id = \
                 (SELECT id FROM (SELECT id FROM messages ORDER BY RAND() LIMIT 1) x)",
            )
            .await?
        }
        85..=94 => {
            c.query_drop(
                "DELETE FROM messages WHERE id = \
                 (SELECT id FROM (SELECT id FROM messages ORDER BY RAND() LIMIT 1) x)",
            )
            .await?
        }
        _ => {
            // InnoDB's cascades never reach the binlog (docs/publisher.md): the
            // application deletes the children itself, in the same transaction.
            let user: Option<i64> = c
                .query_first("SELECT id FROM users ORDER BY RAND() LIMIT 1 FOR UPDATE")
                .await?;
            if let Some(uid) = user {
                c.exec_drop("DELETE FROM messages WHERE user_id = ?", (uid,))
                    .await?;
                c.exec_drop("DELETE FROM users WHERE id = ?", (uid,))
                    .await?;
            }
        }
    }
    c.query_drop("COMMIT").await?;
    Ok(inserted)
}

/// Rows of the source as text, in key order, formatted like
/// [`super::workload::store_rows`].
pub async fn source_rows(db_url: &str) -> (Vec<String>, Vec<String>) {
    let mut c = my_connect(db_url).await;
    let users = c
        .query("SELECT CONCAT(id, '|', name, '|', email) FROM users ORDER BY id")
        .await
        .unwrap();
    let messages = c
        .query(
            "SELECT CONCAT(id, '|', user_id, '|', text, '|', IF(seen, 'true', 'false')) \
             FROM messages ORDER BY id",
        )
        .await
        .unwrap();
    (users, messages)
}
