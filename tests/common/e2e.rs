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

impl E2e {
    /// A config file for worker processes sharing the queue through Redis.
    pub fn redis_config(&self, extra: &str) -> std::path::PathBuf {
        let text = sub_config_text(
            &self.ns,
            &self.store_url,
            &format!(
                "appliers = 2\n{extra}\n[coordination]\nkind = \"redis\"\nurl = \"{REDIS}\"\nprefix = \"{}\"\n{}",
                self.ns,
                workload::subscribed(&self.ns)
            ),
        );
        write_config(&text, &format!("{}.sub", self.ns))
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
