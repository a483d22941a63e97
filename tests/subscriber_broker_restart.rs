//! RabbitMQ restarted twice while a 20,000-transaction random workload flows through
//! publisher and subscriber workers: the store ends equal to the source. Alone in its
//! test binary because it stops the shared broker (cargo runs test binaries one after
//! another).

mod common;

use common::e2e::*;
use common::*;
use std::process::Command;
use std::time::Duration;

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn random_workload_ends_equal_to_the_source_with_rabbitmq_restarted() {
    let e = e2e("subbroker").await;
    let config = e.redis_config("");
    let mut workers: Vec<Process> = (0..2).map(|_| Process::subscriber(&config)).collect();
    let url = e.db.url.clone();
    let writing = tokio::spawn(async move { workload::run(&url, 20_000, 4, 23).await });
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        // All connections drop; durable queues and persistent messages survive.
        tokio::task::spawn_blocking(|| {
            rabbitmqctl(&["stop_app"]);
            std::thread::sleep(Duration::from_secs(3));
            rabbitmqctl(&["start_app"]);
            rabbitmqctl(&["await_startup"]);
        })
        .await
        .unwrap();
    }
    writing.await.unwrap();
    let store = e.store().await;
    workload::converge(&e.db.url, &store, Duration::from_secs(300)).await;
    for w in &mut workers {
        w.kill();
    }
    e.finish().await;
}
