//! A whole pipeline for end-to-end tests: source database with the random workload's
//! schema, a running publisher, an empty Postgres store and the app's queue.
#![allow(dead_code)]

use super::sub::*;
use super::*;

pub struct E2e {
    pub ns: String,
    pub db: TestDb,
    pub publisher: Running,
    pub store_name: String,
    pub store_url: String,
}

/// Source database, running publisher, empty Postgres store, declared queue.
pub async fn e2e(label: &str) -> E2e {
    e2e_with(label, "").await
}

/// The same with extra publisher config (e.g. a `[tuning]` section).
pub async fn e2e_with(label: &str, publisher_extra: &str) -> E2e {
    logs();
    let ns = unique(label);
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    let store_name = format!("{ns}_store");
    let store_url = workload::store_db(&store_name).await;
    declare_queue(&ns, &ns).await;
    let publisher = start(
        config(
            &ns,
            &db.url,
            &format!("{publisher_extra}\n{}", workload::PUBLISHED),
        ),
        &db,
    )
    .await;
    E2e {
        ns,
        db,
        publisher,
        store_name,
        store_url,
    }
}

/// A config file for worker processes of namespace `ns` sharing its queue through Redis,
/// subscribed to the workload's tables.
pub fn redis_config(ns: &str, store_url: &str, extra: &str) -> std::path::PathBuf {
    let text = sub_config_text(
        ns,
        store_url,
        &format!(
            "appliers = 2\n{extra}\n[coordination]\nkind = \"redis\"\nurl = \"{REDIS}\"\nprefix = \"{ns}\"\n{}",
            workload::subscribed(ns)
        ),
    );
    write_config(&text, &format!("{ns}.sub"))
}

/// The workload's tables as the application's own (`map` mode), with the foreign key
/// the source has: deferred, so it is checked at each store commit. A message
/// committed before its user, or a user's delete committed before a message that
/// referenced it, fails the commit and would be dead-lettered.
pub const FK_STORE_SCHEMA: &str = "
CREATE TABLE users (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL);
CREATE TABLE messages (id bigint PRIMARY KEY,
  user_id bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE DEFERRABLE INITIALLY DEFERRED,
  text text NOT NULL, seen boolean NOT NULL DEFAULT false);
";

impl E2e {
    /// Creates `schema` (statements separated by `;`) in the store, and answers the
    /// subscriber's `[[table]]` entries mapping the workload's tables onto it.
    pub async fn map_store(&self, store: &sqlx::AnyPool, schema: &str) -> String {
        for statement in schema.split(';').filter(|s| !s.trim().is_empty()) {
            sqlx::query(sqlx::AssertSqlSafe(statement.to_string()))
                .execute(store)
                .await
                .unwrap();
        }
        format!(
            "[[table]]\nnamespace = \"{ns}\"\nname = \"users\"\nmode = \"map\"\ncolumns = [\"id\", \"name\", \"email\"]\n\
             [[table]]\nnamespace = \"{ns}\"\nname = \"messages\"\nmode = \"map\"\ncolumns = [\"id\", \"user_id\", \"text\", \"seen\"]\n",
            ns = self.ns
        )
    }

    /// A config file for worker processes sharing the queue through Redis.
    pub fn redis_config(&self, extra: &str) -> std::path::PathBuf {
        redis_config(&self.ns, &self.store_url, extra)
    }

    pub async fn store(&self) -> sqlx::AnyPool {
        sqlx::any::install_default_drivers();
        sqlx::AnyPool::connect(&self.store_url).await.unwrap()
    }

    pub async fn finish(self) {
        self.publisher.stop().await;
        self.db.drop().await;
        workload::drop_store_db(&self.store_name).await;
        delete_queues(&self.ns).await;
    }
}

/// Waits (up to 30 s) for one line per inserted message from the `observer` example
/// workers, then checks them: no callback ran before its user was in the read model, none
/// fired twice, one per inserted message.
pub async fn observer_saw_every_message_after_its_user(
    lines: &std::sync::Mutex<Vec<String>>,
    inserts: u64,
) {
    observer_saw(lines, inserts, false).await
}

/// The same when a worker was killed: a callback runs inside its store transaction, so
/// one whose worker died before the commit runs again elsewhere and prints again (its
/// committed effect is still once: the caller checks that in the store). Every message
/// must still be seen, after its user.
pub async fn observer_saw_every_message_after_its_user_despite_a_kill(
    lines: &std::sync::Mutex<Vec<String>>,
    inserts: u64,
) {
    observer_saw(lines, inserts, true).await
}

async fn observer_saw(lines: &std::sync::Mutex<Vec<String>>, inserts: u64, killed: bool) {
    for _ in 0..300 {
        let distinct = |l: &Vec<String>| {
            l.iter()
                .filter_map(|l| l.rsplit_once('[').map(|(_, k)| k))
                .collect::<std::collections::BTreeSet<&str>>()
                .len() as u64
        };
        if distinct(&lines.lock().unwrap()) >= inserts {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let lines = lines.lock().unwrap().clone();
    let violations: Vec<&String> = lines
        .iter()
        .filter(|l| l.starts_with("VIOLATION"))
        .collect();
    assert!(
        violations.is_empty(),
        "{} callbacks ran before their user: {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    let keys: std::collections::BTreeSet<&str> = lines
        .iter()
        .filter_map(|l| l.rsplit_once('[').map(|(_, k)| k))
        .collect();
    if !killed {
        assert_eq!(keys.len(), lines.len(), "a callback fired twice");
    }
    assert_eq!(
        keys.len() as u64,
        inserts,
        "one callback per inserted message"
    );
}
