//! Least privilege on the broker (issue 9): the `rabbitmqctl` commands `kausal doctor`
//! prints for a subscriber app create a user that runs the app's worker — consume,
//! apply, dead-letter — and cannot publish to the change exchange.

mod common;

use common::sub::*;
use common::*;
use kausal::subscriber::Subscriber;
use serde_json::json;
use std::time::Duration;

fn sh(command: &str) -> std::process::Output {
    std::process::Command::new("sh")
        .args(["-c", command])
        .output()
        .expect("run sh")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_printed_broker_user_runs_the_app_and_cannot_publish_changes() {
    logs();
    let app = unique("leastpriv");
    let mut feed = Feed::new(&app).await;
    let store = sqlite_url(&app);
    let tables = format!("[[table]]\nnamespace = \"{app}\"\nname = \"users\"\n");
    let guest = write_config(
        &sub_config_text(&app, &store, &tables),
        &format!("{app}.guest"),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
        .args(["doctor", "--config"])
        .arg(&guest)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("WARN  broker user"), "{text}");
    let commands: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("fix: "))
        .filter(|l| l.starts_with("rabbitmqctl "))
        .map(|l| l.replace("'<password>'", "'pw-least'"))
        .collect();
    assert_eq!(commands.len(), 2, "{text}");
    let user = format!("kausal_{app}");
    for c in &commands {
        let done = sh(c);
        assert!(
            done.status.success(),
            "{c}: {}",
            String::from_utf8_lossy(&done.stderr)
        );
    }

    // The app's worker, as that user: declares its queues, consumes, applies.
    let url = AMQP.replace("guest:guest@", &format!("{user}:pw-least@"));
    let cfg: kausal::subscriber::SubscriberConfig =
        toml::from_str(&sub_config_text(&app, &store, &tables).replace(AMQP, &url)).unwrap();
    let worker = Worker::start(Subscriber::new(cfg));
    eventually(
        Duration::from_secs(20),
        "the queue declared by the worker",
        || async {
            kausal::bus::amqp::queue_exists(AMQP, &format!("kausal.{app}"))
                .await
                .unwrap_or(false)
        },
    )
    .await;
    let ada = feed.txn(
        vec![insert("users", 1, json!({"name": "ada", "email": "a@x"}))],
        None,
    );
    feed.publish(&[ada]).await;
    let db = common::boot::sqlite_store(&store).await;
    eventually(Duration::from_secs(20), "the row applied", || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM users")
            .fetch_one(&db)
            .await
            .unwrap_or(0)
            == 1
    })
    .await;
    // Garbage is dead-lettered with this user's rights too.
    feed.publish_raw(b"garbage").await;
    let dlq = format!("kausal.{app}.dlq");
    eventually(Duration::from_secs(20), "the dead letter", || async {
        kausal::bus::amqp::peek_dead_letters(AMQP, &dlq, 5)
            .await
            .map(|l| l.len() == 1)
            .unwrap_or(false)
    })
    .await;

    // The same user cannot publish changes.
    let publisher = kausal::bus::amqp::AmqpPublisher::connect(&url, "kausal").await;
    let refused = match publisher {
        Err(e) => e.to_string(),
        Ok(p) => match p.publish(&format!("{app}.changes"), b"x").await {
            Err(e) => format!("{e}: {:?}", std::error::Error::source(&e)),
            Ok(confirm) => match confirm.wait().await {
                Err(e) => format!("{e}: {:?}", std::error::Error::source(&e)),
                Ok(()) => String::new(),
            },
        },
    };
    assert!(
        !refused.is_empty(),
        "the subscriber's user published to the exchange"
    );
    let cause = format!("{refused:?}");
    assert!(
        cause.contains("ACCESS_REFUSED") || cause.contains("access to exchange"),
        "{cause}"
    );
    worker.stop().await;
    db.close().await;
    let _ = sh(&format!("rabbitmqctl -q delete_user {user}"));
    delete_queues(&app).await;
}
