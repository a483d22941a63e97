//! The publisher's source under test, Postgres or MariaDB, so one scenario runs against
//! both: the MariaDB publisher must behave exactly like the Postgres one.
#![allow(dead_code)]

use super::mysql::{my_config_text, my_connect, wait_for_replica, MyDb};
use super::{config_text, connect, wait_for_slot, wait_for_slot_released, TestDb};
use mysql_async::prelude::Queryable;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Postgres,
    Mariadb,
}

pub enum Source {
    Postgres(TestDb),
    Mariadb(MyDb),
}

/// A connection that writes `events (id, v)` rows, one transaction per row.
pub enum Writer {
    Postgres(tokio_postgres::Client, tokio_postgres::Statement),
    Mariadb(mysql_async::Conn),
}

impl Writer {
    pub async fn insert(&mut self, id: i64, v: i32) {
        match self {
            Writer::Postgres(c, stmt) => {
                c.execute(&*stmt, &[&id, &v]).await.unwrap();
            }
            Writer::Mariadb(c) => c
                .exec_drop("INSERT INTO events VALUES (?, ?)", (id, v))
                .await
                .unwrap(),
        }
    }
}

impl Source {
    /// A fresh database named `name` with `events (id bigint PRIMARY KEY, v int)` plus
    /// `extra` (SQL both servers accept, statements separated by `;`).
    pub async fn new(kind: Kind, name: &str, extra: &str) -> Source {
        let events = "CREATE TABLE events (id bigint PRIMARY KEY, v int NOT NULL);";
        match kind {
            Kind::Postgres => {
                Source::Postgres(TestDb::new(name, &format!("{events}{extra}")).await)
            }
            Kind::Mariadb => Source::Mariadb(MyDb::new(name, &format!("{events}{extra}")).await),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Source::Postgres(_) => Kind::Postgres,
            Source::Mariadb(_) => Kind::Mariadb,
        }
    }

    pub fn url(&self) -> &str {
        match self {
            Source::Postgres(db) => &db.url,
            Source::Mariadb(db) => &db.url,
        }
    }

    /// Publisher configuration TOML for this source.
    pub fn config_text(&self, namespace: &str, tables: &str) -> String {
        match self {
            Source::Postgres(db) => config_text(namespace, &db.url, tables),
            Source::Mariadb(db) => my_config_text(namespace, &db.url, tables),
        }
    }

    pub fn config(&self, namespace: &str, tables: &str) -> kausal::publisher::PublisherConfig {
        let text = self.config_text(namespace, tables);
        toml::from_str(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
    }

    /// Waits until the publisher of `namespace` reads the source's log.
    pub async fn wait_streaming(&self, namespace: &str) {
        match self {
            Source::Postgres(db) => wait_for_slot(&db.client, &format!("kausal_{namespace}")).await,
            Source::Mariadb(_) => {
                wait_for_replica(
                    kausal::publisher::source::mysql::derived_server_id(namespace),
                    true,
                )
                .await
            }
        }
    }

    /// Waits until no publisher of `namespace` reads the log any more (after a kill).
    pub async fn wait_released(&self, namespace: &str) {
        match self {
            Source::Postgres(db) => {
                wait_for_slot_released(&db.client, &format!("kausal_{namespace}")).await
            }
            Source::Mariadb(_) => {
                wait_for_replica(
                    kausal::publisher::source::mysql::derived_server_id(namespace),
                    false,
                )
                .await
            }
        }
    }

    pub async fn writer(&self) -> Writer {
        match self {
            Source::Postgres(db) => {
                let c = connect(&db.url).await;
                let stmt = c
                    .prepare("INSERT INTO events VALUES ($1, $2)")
                    .await
                    .unwrap();
                Writer::Postgres(c, stmt)
            }
            Source::Mariadb(db) => Writer::Mariadb(my_connect(&db.url).await),
        }
    }

    /// Runs SQL both servers accept (statements separated by `;`).
    pub async fn exec(&mut self, sql: &str) {
        match self {
            Source::Postgres(db) => db.client.batch_execute(sql).await.unwrap(),
            Source::Mariadb(db) => db.exec(sql).await,
        }
    }

    pub async fn drop(self) {
        match self {
            Source::Postgres(db) => db.drop().await,
            Source::Mariadb(db) => db.drop().await,
        }
    }
}
