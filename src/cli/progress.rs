//! The bootstrap's progress bar: rows applied of the publisher's estimate, rows/s and
//! ETA, drawn on stderr when it is a terminal (log lines otherwise, by the runtime).

use indicatif::{ProgressBar, ProgressStyle};
use kausal::subscriber::BootstrapProgress;
use tokio::sync::watch;

/// Draws `progress` until the bootstrap is complete or the sender is gone.
pub async fn draw(mut progress: watch::Receiver<BootstrapProgress>) {
    let bar = ProgressBar::new(0);
    let style = ProgressStyle::with_template(
        "bootstrap {wide_bar} {human_pos}/{human_len} rows · {per_sec} · ETA {eta} · {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.enable_steady_tick(std::time::Duration::from_millis(500));
    loop {
        let (complete, rows, total, msg) = {
            let p = progress.borrow_and_update();
            let (rows, total) = p.totals();
            let msg: Vec<String> = p
                .tables
                .iter()
                .map(|(name, t)| {
                    let state = if t.done { "done" } else { "…" };
                    format!("{name} {state}")
                })
                .collect();
            (p.complete, rows, total, msg.join(", "))
        };
        bar.set_length(total.max(rows));
        bar.set_position(rows);
        bar.set_message(msg);
        if complete {
            bar.finish();
            return;
        }
        if progress.changed().await.is_err() {
            bar.abandon();
            return;
        }
    }
}
