//! The fault-injection suite's RabbitMQ outage (issue 8): the shared broker stopped for
//! 30 s and started again while the random workload flows from Postgres through the
//! publisher into observer worker processes. Alone in its test binary because it stops
//! the shared broker (cargo runs test binaries one after another). The checks and the
//! table row are those of tests/faults.rs.

mod common;

use common::faults::{Pipeline, Servers};
use std::process::Command;
use std::time::{Duration, Instant};

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rabbitmq_stopped_for_30_seconds_loses_nothing_and_keeps_causal_order() {
    let mut p = Pipeline::start("fbroker", Servers::shared(), 2, "").await;
    let writing = p.workload(4_000, 808);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Every connection drops; the application goes on writing (the rest of the
    // workload) while publisher and workers retry. Durable queues and persistent
    // messages survive.
    let up = tokio::task::spawn_blocking(|| {
        rabbitmqctl(&["stop_app"]);
        std::thread::sleep(Duration::from_secs(30));
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
        Instant::now()
    })
    .await
    .unwrap();
    let inserts = writing.await.unwrap();
    p.recovered(up).await;
    let tally = p.finish("RabbitMQ stopped for 30 s", 1, inserts).await;
    tally.report();
    assert_eq!(
        tally.duplicates + tally.reruns_after_crash,
        0,
        "duplicate callbacks"
    );
}
