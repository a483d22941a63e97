//! An app on quorum queues (`[broker] queue_type = "quorum"`): its queue and dead-letter
//! queue are declared as quorum queues, a worker killed mid-stream loses nothing, and a
//! worker configured for the other type is refused with the fix. On this machine's
//! single RabbitMQ node a quorum queue has one member: the replication itself (a node
//! lost) is not exercised here.

mod common;

use common::sub::*;
use common::*;
use std::time::Duration;

/// The type RabbitMQ reports for queue `name` (`rabbitmqctl list_queues`).
fn queue_type(name: &str) -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "name",
            "type",
            "--quiet",
            "--no-table-headers",
        ])
        .output()
        .expect("run rabbitmqctl");
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let (queue, kind) = l.split_once('\t')?;
        (queue == name).then(|| kind.trim().to_string())
    })
}

fn config_text(app: &str, store_url: &str, queue_type: &str) -> String {
    format!(
        "app = \"{app}\"\n[broker]\nurl = \"{AMQP}\"\nprefetch = 64\nqueue_type = \"{queue_type}\"\n\
         [store]\nurl = \"{store_url}\"\n{}",
        workload::subscribed(app)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_on_quorum_queues_loses_nothing_when_its_worker_is_killed() {
    logs();
    let ns = unique("quorum");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    let store_name = format!("{ns}_store");
    let store_url = workload::store_db(&store_name).await;
    let cfg = write_config(
        &config_text(&ns, &store_url, "quorum"),
        &format!("{ns}.sub"),
    );
    let mut worker = Process::subscriber(&cfg);
    let queue = format!("kausal.{ns}");
    eventually(Duration::from_secs(30), "the app's queue", || async {
        queue_type(&queue).is_some()
    })
    .await;
    assert_eq!(queue_type(&queue).as_deref(), Some("quorum"));
    assert_eq!(
        queue_type(&format!("{queue}.dlq")).as_deref(),
        Some("quorum")
    );
    let publisher = start(config(&ns, &db.url, workload::PUBLISHED), &db).await;
    let url = db.url.clone();
    let writing = tokio::spawn(async move { workload::run(&url, 1_500, 2, 31).await });
    tokio::time::sleep(Duration::from_secs(2)).await;
    worker.kill();
    let mut worker = Process::subscriber(&cfg);
    writing.await.unwrap();
    sqlx::any::install_default_drivers();
    let store = sqlx::AnyPool::connect(&store_url).await.unwrap();
    workload::converge(&db.url, &store, Duration::from_secs(120)).await;
    let dead = kausal::bus::amqp::queue_depth(AMQP, &format!("{queue}.dlq"))
        .await
        .unwrap();
    assert_eq!(dead.map(|d| d.0), Some(0));

    // The same app configured for classic queues: refused, naming the queue and why.
    worker.terminate();
    let classic = write_config(
        &config_text(&ns, &store_url, "classic"),
        &format!("{ns}.classic.sub"),
    );
    let (code, _, err) = common::cli::kausal(&["subscribe", "--config", classic.to_str().unwrap()]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains(&queue) && err.contains("classic queue") && err.contains("delete the queue"),
        "{err}"
    );
    store.close().await;
    publisher.stop().await;
    db.drop().await;
    workload::drop_store_db(&store_name).await;
    delete_queues(&ns).await;
}
