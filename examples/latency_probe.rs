//! Latency probe: how long after the source commit a change reaches a subscriber's
//! callback. Subscribes per the given config, records `now - commit time` for every
//! change it sees, and on Ctrl-C (or SIGTERM) prints count, p50, p95, p99 and max.
//!
//! Used by `scripts/bench-subscribe.sh`; needs scripts/setup.sh and a running publisher.
//! Run: `cargo run --release --example latency_probe -- <subscriber.toml> <table>`

use kausal::subscriber::{Event, Subscriber, SubscriberConfig};
use std::sync::{Arc, Mutex};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: latency_probe <config> <table>"))?;
    let table = args
        .next()
        .ok_or_else(|| anyhow::anyhow!("usage: latency_probe <config> <table>"))?;
    let cfg: SubscriberConfig = kausal::config::load(
        path.as_ref(),
        std::env::vars(),
        kausal::config::SUBSCRIBER_SECTIONS,
        kausal::config::SUBSCRIBER_KEYS,
    )?;
    let samples = Arc::new(Mutex::new(Vec::<i64>::new()));
    let mut subscriber = Subscriber::new(cfg);
    let s = samples.clone();
    subscriber
        .callbacks()
        .on_change(&table, move |e: Event<serde_json::Value>| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros() as i64)
                .unwrap_or(0);
            s.lock().unwrap().push(now - e.commit_ts_us);
            async { Ok(()) }
        });
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
        let _ = stop.send(true);
    });
    subscriber.run(shutdown).await?;
    let mut v = samples.lock().unwrap().clone();
    v.sort_unstable();
    let pct = |p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "count {} p50_ms {:.2} p95_ms {:.2} p99_ms {:.2} max_ms {:.2}",
        v.len(),
        pct(0.50),
        pct(0.95),
        pct(0.99),
        v.last().copied().unwrap_or(0) as f64 / 1000.0
    );
    Ok(())
}
