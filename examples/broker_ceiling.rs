//! The broker's ceiling on this machine: how many persistent messages of a given size
//! RabbitMQ takes per second with publisher confirms (many in flight, as the publisher
//! does), and hands out per second with one ack per message (as the subscriber does).
//! Kausal's throughput is bounded by these; the benchmark prints them beside its own.
//!
//! Needs scripts/setup.sh. Run:
//! `cargo run --release --example broker_ceiling -- <messages> <bytes per message>`

use kausal::bus::amqp::{AmqpConsumer, AmqpPublisher, QueueSpec};
use std::collections::VecDeque;
use std::time::Instant;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Confirms in flight, as `tuning.max_in_flight` of the publisher.
const IN_FLIGHT: usize = 256;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let messages: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let size: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1024);
    let namespace = format!("ceiling{}", std::process::id());
    let mut spec = QueueSpec::durable(&format!("kausal.{namespace}"), &[namespace.as_str()]);
    spec.prefetch = 256;
    // Declare the queue first so every message is routed and stored.
    AmqpConsumer::connect(AMQP, "kausal", &spec)
        .await?
        .close()
        .await;

    let publisher = AmqpPublisher::connect(AMQP, "kausal").await?;
    let body = vec![b'x'; size];
    let key = format!("{namespace}.changes");
    let started = Instant::now();
    let mut pending = VecDeque::new();
    for _ in 0..messages {
        if pending.len() >= IN_FLIGHT {
            let confirm: kausal::bus::amqp::PendingConfirm = pending.pop_front().unwrap();
            confirm.wait().await?;
        }
        pending.push_back(publisher.publish(&key, &body).await?);
    }
    for confirm in pending {
        confirm.wait().await?;
    }
    let publish_s = started.elapsed().as_secs_f64();
    publisher.close().await;

    let mut consumer = AmqpConsumer::connect(AMQP, "kausal", &spec).await?;
    let started = Instant::now();
    for _ in 0..messages {
        let d = consumer
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("consumer cancelled"))??;
        d.ack().await?;
    }
    let consume_s = started.elapsed().as_secs_f64();
    consumer.delete_queue(&spec.name).await?;
    consumer.delete_queue(&spec.dead_letter_queue()).await?;
    consumer.close().await;
    println!(
        "BENCH broker-ceiling publish_confirmed_{size}b {:.0} msg/s",
        messages as f64 / publish_s
    );
    println!(
        "BENCH broker-ceiling consume_ack_{size}b {:.0} msg/s",
        messages as f64 / consume_s
    );
    Ok(())
}
