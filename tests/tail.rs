//! `kausal tail`: a publisher's live changes in the terminal, filtered by table and
//! column value, from a temporary queue that is gone when tail stops.

mod common;

use common::*;
use std::io::BufRead;
use std::time::{Duration, Instant};

fn queues() -> Vec<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

/// `kausal tail <args>` for `ns`, once its queue exists; its stdout lines arrive on the
/// receiver. Also answers the queue's name.
async fn start_tail(
    ns: &str,
    args: &[&str],
) -> (
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
        .args(["tail", "--namespace", ns])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start kausal tail");
    let queue = format!("kausal.tail.{ns}.{}", child.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !queues().contains(&queue) {
        assert!(Instant::now() < deadline, "tail never declared {queue}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stdout = child.stdout.take().unwrap();
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, queue, line_rx)
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_prints_only_the_matching_changes_and_leaves_no_queue_behind() {
    logs();
    let ns = unique("tail");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    let publisher = start(config(&ns, &db.url, workload::PUBLISHED), &db).await;
    let (mut child, queue, line_rx) = start_tail(
        &ns,
        &[
            "--json",
            "--table",
            "messages",
            "--where",
            "user_id=2",
            "--where",
            "seen=false",
        ],
    )
    .await;
    db.client
        .batch_execute(
            "INSERT INTO users VALUES (1, 'ann', 'a@x'), (2, 'bob', 'b@x');
             INSERT INTO messages (id, user_id, text) VALUES (10, 1, 'from ann'), (11, 2, 'from bob');
             INSERT INTO messages (id, user_id, text, seen) VALUES (12, 2, 'seen', true);
             UPDATE messages SET text = 'edited' WHERE id = 11;",
        )
        .await
        .unwrap();
    // One transaction (a multi-statement query runs as one): one line, with only the
    // matching changes in it.
    let line = match line_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => line,
        Err(_) => {
            let _ = child.kill();
            panic!("tail printed nothing");
        }
    };
    let e: kausal::bus::Envelope = serde_json::from_str(&line).unwrap();
    let shown: Vec<(String, i64, String)> = e
        .changes
        .into_iter()
        .map(|c| {
            let new = c.new.unwrap();
            (
                c.table,
                new["id"].as_i64().unwrap(),
                new["text"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        vec![
            ("messages".to_string(), 11, "from bob".to_string()),
            ("messages".to_string(), 11, "edited".to_string()),
        ]
    );
    // A transaction with no matching change prints nothing.
    db.client
        .batch_execute("INSERT INTO messages (id, user_id, text) VALUES (13, 1, 'ann again')")
        .await
        .unwrap();
    assert!(
        line_rx.recv_timeout(Duration::from_secs(2)).is_err(),
        "tail printed a transaction with no matching change"
    );
    // SIGTERM: the temporary queue goes with the process.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(30);
    while queues().contains(&queue) {
        assert!(Instant::now() < deadline, "{queue} left behind");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    publisher.stop().await;
    db.drop().await;
}

#[test]
fn a_malformed_filter_is_refused_with_the_form_to_use() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
        .args(["tail", "--namespace", "x", "--where", "user_id"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("COLUMN=VALUE"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tail_count_reports_the_messages_and_bytes_it_received() {
    logs();
    let ns = unique("tailcount");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    let publisher = start(config(&ns, &db.url, workload::PUBLISHED), &db).await;
    let (mut child, _queue, line_rx) = start_tail(&ns, &["--count"]).await;
    for id in 1..=3 {
        db.client
            .batch_execute(&format!("INSERT INTO users VALUES ({id}, 'u', 'u@x')"))
            .await
            .unwrap();
    }
    // "… (M messages, B bytes in all)", once a second: the same nonzero totals twice
    // in a row mean everything published has arrived.
    let totals = |line: &str| -> (u64, u64) {
        let numbers: Vec<u64> = line
            .rsplit_once('(')
            .map_or("", |(_, t)| t)
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect();
        (numbers[0], numbers[1])
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = (0, 0);
    let (messages, bytes) = loop {
        let line = line_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("tail --count prints a line a second");
        let now = totals(&line);
        if now.0 > 0 && now == last {
            break now;
        }
        assert!(Instant::now() < deadline, "tail counted nothing: {line}");
        last = now;
    };
    // Three transactions, in one to three messages, each more than its 4-byte header.
    assert!((1..=3).contains(&messages), "{messages} messages");
    assert!(bytes > messages * 4, "{bytes} bytes in {messages} messages");
    let _ = child.kill();
    let _ = child.wait();
    publisher.stop().await;
    db.drop().await;
}
