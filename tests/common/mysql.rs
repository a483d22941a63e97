//! MariaDB as the source: a fresh database per test and a publisher reading its binlog.
#![allow(dead_code)]

use super::{checkpoint_path, Running, AMQP};
use kausal::publisher::PublisherConfig;
use mysql_async::prelude::Queryable;
use mysql_async::Conn;
use std::time::Duration;
use tokio::sync::watch;

/// The TCP user scripts/setup.sh creates (root only connects through the socket).
pub const MY: &str = "mysql://kausal:kausal@127.0.0.1:3306";

pub async fn my_connect(url: &str) -> Conn {
    Conn::from_url(url)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e} (run scripts/setup.sh)"))
}

/// A fresh MariaDB database with `schema` applied (statements separated by `;`).
pub struct MyDb {
    pub name: String,
    pub url: String,
    pub conn: Conn,
}

impl MyDb {
    pub async fn new(name: &str, schema: &str) -> MyDb {
        let mut admin = my_connect(MY).await;
        admin
            .query_drop(format!("CREATE DATABASE `{name}`"))
            .await
            .unwrap();
        let url = format!("{MY}/{name}");
        let mut conn = my_connect(&url).await;
        for stmt in schema.split(';').filter(|s| !s.trim().is_empty()) {
            conn.query_drop(stmt)
                .await
                .unwrap_or_else(|e| panic!("{stmt}: {e}"));
        }
        MyDb {
            name: name.to_string(),
            url,
            conn,
        }
    }

    /// Runs statements separated by `;` (one at a time: no multi-statement protocol).
    pub async fn exec(&mut self, sql: &str) {
        for stmt in sql.split(';').filter(|s| !s.trim().is_empty()) {
            self.conn
                .query_drop(stmt)
                .await
                .unwrap_or_else(|e| panic!("{stmt}: {e}"));
        }
    }

    pub async fn drop(self) {
        let _ = self.conn.disconnect().await;
        let mut admin = my_connect(MY).await;
        let _ = admin
            .query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name))
            .await;
    }
}

/// The TOML of a MariaDB-sourced publisher configuration.
pub fn my_config_text(namespace: &str, db_url: &str, tables: &str) -> String {
    format!(
        "namespace = \"{namespace}\"\n\
         [source]\nkind = \"mysql\"\nurl = \"{db_url}\"\n\
         [broker]\nurl = \"{AMQP}\"\n\
         [checkpoint]\npath = \"{}\"\ninterval_ms = 200\n{tables}",
        checkpoint_path(namespace).display()
    )
}

pub fn my_config(namespace: &str, db_url: &str, tables: &str) -> PublisherConfig {
    let text = my_config_text(namespace, db_url, tables);
    toml::from_str(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"))
}

/// The replica server id of a configuration (as the publisher derives it).
pub fn replica_id(cfg: &PublisherConfig) -> u32 {
    match &cfg.source {
        kausal::publisher::config::SourceConfig::Mysql(my) => {
            kausal::publisher::source::mysql::server_id(cfg, my)
        }
        _ => panic!("not a MySQL source"),
    }
}

/// Waits until a replica with `server_id` is (`true`) or is no longer (`false`)
/// registered with the server: the publisher streams the binlog.
pub async fn wait_for_replica(server_id: u32, present: bool) {
    let mut admin = my_connect(MY).await;
    for _ in 0..600 {
        let ids: Vec<u32> = admin
            .query_map("SHOW SLAVE HOSTS", |row: mysql_async::Row| {
                row.get::<u32, _>(0).unwrap_or(0)
            })
            .await
            .unwrap();
        if ids.contains(&server_id) == present {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("replica {server_id} did not become present={present} within 60 s");
}

/// Starts a publisher in this process and waits until it reads the binlog, so every
/// transaction committed afterwards is published.
pub async fn my_start(cfg: PublisherConfig) -> Running {
    let id = replica_id(&cfg);
    let (stop, rx) = watch::channel(false);
    let mut task = tokio::spawn(kausal::publisher::run(cfg, rx));
    tokio::select! {
        _ = wait_for_replica(id, true) => Running { stop, task },
        ended = &mut task => panic!("the publisher stopped before streaming: {ended:?}"),
    }
}
