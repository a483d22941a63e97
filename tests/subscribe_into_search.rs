//! Postgres → publisher → RabbitMQ → subscriber → tantivy index (feature `search`): the
//! parent/child workload ends with the index equal to the source's messages, and a word
//! inserted at the source is searchable (`kausal search`) as soon as the subscriber has
//! recorded its transaction as applied.
#![cfg(feature = "search")]

mod common;

use common::e2e::*;
use common::sub::*;
use common::*;
use std::time::{Duration, Instant};

/// `kausal search --index <dir> <query>`: the matching rows, one JSON object a line.
fn search(index: &std::path::Path, query: &str) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kausal"))
        .args(["search", "--limit", "100000", "--index"])
        .arg(index)
        .arg(query)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run kausal search");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_search_index_fed_in_causal_order_ends_equal_to_the_source() {
    let e = e2e("search").await;
    let index = std::env::temp_dir().join(format!("kausal-tests/{}.index", e.ns));
    let _ = std::fs::remove_dir_all(&index);
    let ledger = sqlite_url(&e.ns);
    let tables = format!(
        "[[table]]\nnamespace = \"{0}\"\nname = \"users\"\nmode = \"none\"\n\
         [[table]]\nnamespace = \"{0}\"\nname = \"messages\"\nmode = \"none\"\n\
         [[sink]]\nkind = \"search\"\npath = \"{1}\"\ntable = \"messages\"\n\
         text = [\"text\"]\nkeyword = [\"user_id\"]\n",
        e.ns,
        index.display()
    );
    let text = sub_config_text(&e.ns, &ledger, &tables);
    let mut worker = Process::subscriber(&write_config(&text, &format!("{}.sub", e.ns)));
    workload::run(&e.db.url, 3_000, 4, 29).await;

    // Every message of the source, and nothing else, is in the index.
    let source = workload::source_rows(&e.db.url).await.1;
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let mut got: Vec<String> = search(&index, "*")
            .iter()
            .map(|m| {
                format!(
                    "{}|{}|{}|{}",
                    m["id"],
                    m["user_id"],
                    m["text"].as_str().unwrap_or(""),
                    m["seen"]
                )
            })
            .collect();
        got.sort_by_key(|r| r.split('|').next().unwrap().parse::<i64>().unwrap());
        if got == source {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "index differs from the source: {} vs {} messages",
            got.len(),
            source.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A new word is searchable as soon as the store records its transaction as applied.
    let mut tap = Tap::new(&e.ns).await;
    let word = format!("zebra{}", std::process::id());
    let c = connect(&e.db.url).await;
    c.batch_execute(&format!(
        "INSERT INTO users VALUES (999999, 'z', 'z@example.com');
         INSERT INTO messages (id, user_id, text) VALUES (999999, 999999, 'a {word} here')"
    ))
    .await
    .unwrap();
    tap.until(Duration::from_secs(60), |r| {
        r.iter().any(|e| {
            e.changes
                .iter()
                .any(|c| c.key["id"] == 999999 && c.table == "messages")
        })
    })
    .await;
    let seq = tap
        .received
        .iter()
        .find(|e| {
            e.changes
                .iter()
                .any(|c| c.key["id"] == 999999 && c.table == "messages")
        })
        .unwrap()
        .seq;
    sqlx::any::install_default_drivers();
    let store = sqlx::AnyPool::connect(&ledger).await.unwrap();
    let applied = format!(
        "SELECT CASE WHEN COALESCE((SELECT MAX(through) FROM kausal_progress), 0) >= {seq} \
           OR EXISTS (SELECT 1 FROM kausal_applied WHERE seq = {seq}) THEN 1 ELSE 0 END"
    );
    let started = Instant::now();
    loop {
        let done: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(applied.clone()))
            .fetch_one(&store)
            .await
            .unwrap();
        if done == 1 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let found = search(&index, &word);
    assert_eq!(found.len(), 1, "applied but not searchable: {found:?}");
    assert_eq!(found[0]["id"], 999999);
    println!(
        "applied {} ms into polling the store; searchable at that moment",
        started.elapsed().as_millis()
    );
    worker.kill();
    tap.delete().await;
    let _ = std::fs::remove_dir_all(&index);
    e.finish().await;
}
