//! A RabbitMQ cluster of three nodes started for the test, the app on quorum queues: the
//! node leading the app's queue is stopped mid-stream (publisher and two worker
//! processes running, 20,000 transactions), and the processes reconnect to the
//! surviving nodes by themselves (the config lists every node's URL). Nothing is lost,
//! nothing is dead-lettered, the store ends equal to the source.

mod common;

use common::rabbit_cluster::RabbitCluster;
use common::sub::*;
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn stopping_the_node_that_leads_the_apps_queue_loses_nothing() {
    logs();
    let t0 = std::time::Instant::now();
    let cluster = RabbitCluster::start("lead");
    eprintln!("cluster up after {:?}", t0.elapsed());
    let urls = cluster.urls();
    let ns = unique("cluster");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    let store_name = format!("{ns}_store");
    let store_url = workload::store_db(&store_name).await;
    let sub_text = format!(
        "app = \"{ns}\"\n[broker]\nurl = \"{urls}\"\nprefetch = 64\nqueue_type = \"quorum\"\n\
         [store]\nurl = \"{store_url}\"\nappliers = 2\n\
         [coordination]\nkind = \"redis\"\nurl = \"{REDIS}\"\nprefix = \"{ns}\"\n{}",
        workload::subscribed(&ns)
    );
    let sub_cfg = write_config(&sub_text, &format!("{ns}.sub"));
    let mut workers = [Process::subscriber(&sub_cfg), Process::subscriber(&sub_cfg)];
    let queue = format!("kausal.{ns}");
    let first = &cluster.nodes[0];
    eventually(
        Duration::from_secs(60),
        "the app's quorum queue",
        || async { cluster.leader(first, &queue).is_some() },
    )
    .await;
    let pub_text = config_text(&ns, &db.url, workload::PUBLISHED).replace(
        &format!("url = \"{AMQP}\""),
        &format!("url = \"{urls}\"\nqueue_type = \"quorum\""),
    );
    let pub_cfg = write_config(&pub_text, &format!("{ns}.pub"));
    let mut publisher = Process::spawn(&pub_cfg);
    wait_for_slot(&db.client, &format!("kausal_{ns}")).await;

    let url = db.url.clone();
    let writing = tokio::spawn(async move { workload::run(&url, 20_000, 2, 77).await });
    sqlx::any::install_default_drivers();
    let store = sqlx::AnyPool::connect(&store_url).await.unwrap();
    // Mid-stream: once the store has some of it.
    eventually(
        Duration::from_secs(120),
        "the first rows applied",
        || async {
            use sqlx::Row;
            sqlx::query("SELECT COUNT(*) FROM users")
                .fetch_one(&store)
                .await
                .map(|r| r.get::<i64, _>(0) > 200)
                .unwrap_or(false)
        },
    )
    .await;
    let leader = cluster
        .leader(first, &queue)
        .expect("the queue has a leader");
    eprintln!("stopping node {leader} after {:?}", t0.elapsed());
    cluster.stop(leader);
    eprintln!("stopped after {:?}", t0.elapsed());
    writing.await.unwrap();
    eprintln!("writes done after {:?}", t0.elapsed());
    workload::converge(&db.url, &store, Duration::from_secs(240)).await;

    eprintln!("converged after {:?}", t0.elapsed());
    // Still running (reconnected, not stopped), and nothing dead-lettered.
    assert!(publisher.exited().is_none(), "the publisher stopped");
    for w in &mut workers {
        assert!(w.exited().is_none(), "a worker stopped");
    }
    let alive = cluster
        .nodes
        .iter()
        .position(|_| true)
        .filter(|i| *i != leader);
    let alive = alive.unwrap_or((leader + 1) % 3);
    let dlq = cluster.ctl(
        &cluster.nodes[alive],
        &[
            "list_queues",
            "name",
            "messages",
            "--quiet",
            "--no-table-headers",
        ],
    );
    let dead: Vec<&str> = dlq
        .lines()
        .filter(|l| l.starts_with(&format!("{queue}.dlq\t")) && !l.ends_with("\t0"))
        .collect();
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    for w in &mut workers {
        w.terminate();
    }
    publisher.terminate();
    store.close().await;
    db.drop().await;
    workload::drop_store_db(&store_name).await;
}
