//! A worker whose window fills with transactions that wait for ones behind them in the
//! queue (as after a stopped worker's messages were requeued behind what another worker
//! took) takes more of the queue: the store catches up without any message copied to
//! the tail of the queue.

mod common;

use common::e2e::*;
use common::*;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Takes every message out of `queue` and puts them back in reverse order: the newest
/// transactions first, every one of them waiting for the ones behind it.
async fn reverse(queue: &str) -> usize {
    let conn = lapin::Connection::connect(AMQP, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut taken = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        taken.push(m.delivery);
    }
    for m in taken.iter().rev() {
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &m.data,
                m.properties.clone(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
    }
    for m in &taken {
        m.ack(BasicAckOptions::default()).await.unwrap();
    }
    let _ = conn.close(200, "bye".into()).await;
    taken.len()
}

/// Waits until `queue` holds at least `min` messages and has stopped growing.
async fn settled_depth(queue: &str, min: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = (0, Instant::now());
    loop {
        let depth = kausal::bus::amqp::queue_depth(AMQP, queue)
            .await
            .unwrap()
            .map_or(0, |d| d.0);
        if depth != last.0 {
            last = (depth, Instant::now());
        } else if depth >= min && last.1.elapsed() > Duration::from_secs(2) {
            return depth;
        }
        assert!(Instant::now() < deadline, "{queue} never settled at {min}+");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_window_full_of_waiting_transactions_takes_more_of_the_queue_instead_of_moving_messages()
{
    let e = e2e("widen").await;
    let queue = format!("kausal.{}", e.ns);
    workload::run(&e.db.url, 20, 1, 71).await;
    settled_depth(&queue, 4).await;
    let messages = reverse(&queue).await;
    // Serial mode: every transaction waits for the one before it. A window of 4
    // messages; 4 windows of the queue may be held, so up to 16 messages need no
    // hand-back at all.
    assert!(
        (4..=16).contains(&messages),
        "{messages} messages: the workload's batching changed; adjust its size"
    );
    let text = format!(
        "app = \"{ns}\"\n[broker]\nurl = \"{AMQP}\"\nprefetch = 4\n\
         [store]\nurl = \"{store}\"\n[ordering]\nmode = \"serial\"\n{tables}",
        ns = e.ns,
        store = e.store_url,
        tables = workload::subscribed(&e.ns)
    );
    let config = write_config(&text, &format!("{}.sub", e.ns));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let mut worker = Process::subscriber_logged_at(&config, lines.clone(), "info");
    let store = e.store().await;
    workload::converge(&e.db.url, &store, Duration::from_secs(120)).await;
    worker.terminate();
    let log = lines.lock().unwrap().join("\n");
    assert!(
        log.contains("took more messages of its queue"),
        "the full window widened"
    );
    assert!(
        !log.contains("moved them to the tail"),
        "nothing was handed back: {log}"
    );
    store.close().await;
    e.finish().await;
}
