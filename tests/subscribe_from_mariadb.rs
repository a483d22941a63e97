//! MariaDB → publisher (binlog) → RabbitMQ → four subscriber worker processes → Postgres
//! store: the parent/child workload of `subscribe_end_to_end.rs` with MariaDB as the
//! source. Callbacks must never see a message before its user, and the store must end
//! equal to the source row by row.

mod common;

use common::e2e::{observer_saw_every_message_after_its_user, redis_config};
use common::mysql::*;
use common::sub::*;
use common::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn four_workers_fed_from_mariadb_never_call_back_a_message_before_its_user() {
    logs();
    let ns = unique("myfan");
    let db = MyDb::new(&ns, my_workload::SCHEMA).await;
    let store_name = format!("{ns}_store");
    let store_url = workload::store_db(&store_name).await;
    declare_queue(&ns, &ns).await;
    let publisher = my_start(my_config(&ns, &db.url, workload::PUBLISHED)).await;
    let config = redis_config(&ns, &store_url, "");
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut workers: Vec<Process> = (0..4)
        .map(|_| Process::example("observer", &config, lines.clone()))
        .collect();
    let inserts = my_workload::run(&db.url, 4_000, 4, 7).await;
    sqlx::any::install_default_drivers();
    let store = sqlx::AnyPool::connect(&store_url).await.unwrap();
    workload::converge_to(
        my_workload::source_rows(&db.url).await,
        &store,
        Duration::from_secs(240),
    )
    .await;
    observer_saw_every_message_after_its_user(&lines, inserts).await;
    for w in &mut workers {
        w.kill();
    }
    store.close().await;
    publisher.stop().await;
    db.drop().await;
    workload::drop_store_db(&store_name).await;
    delete_queues(&ns).await;
}
