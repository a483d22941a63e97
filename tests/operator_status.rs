//! `kausal status`, the metrics endpoints and `kausal doctor` against a running
//! publisher and subscriber (the `kausal` binary, as deployed), and against
//! configurations that are wrong in the ways operators get them wrong.

mod common;

use common::cli::{free_port, kausal, status, status_until};
use common::sub::*;
use common::*;
use serde_json::Value;
use std::time::Duration;

/// The value of an unlabelled metric in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn status_and_metrics_follow_a_running_pipeline_and_show_killed_processes() {
    logs();
    let ns = unique("status");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    declare_queue(&ns, &ns).await;
    let (pub_port, sub_port) = (free_port(), free_port());
    let pub_cfg = write_config(
        &format!(
            "{}\n[metrics]\nlisten = \"127.0.0.1:{pub_port}\"\n",
            config_text(&ns, &db.url, workload::PUBLISHED)
        ),
        &format!("{ns}.pub"),
    );
    let mut publisher = Process::spawn(&pub_cfg);
    wait_for_slot(&db.client, &format!("kausal_{ns}")).await;
    let store_url = sqlite_url(&ns);
    let sub_cfg = write_config(
        &sub_config_text(
            &ns,
            &store_url,
            &format!(
                "[metrics]\nlisten = \"127.0.0.1:{sub_port}\"\n{}",
                workload::subscribed(&ns)
            ),
        ),
        &format!("{ns}.sub"),
    );
    let mut subscriber = Process::subscriber(&sub_cfg);
    let configs = [pub_cfg.as_path(), sub_cfg.as_path()];
    let url = db.url.clone();
    let writing = tokio::spawn(async move { workload::run(&url, 600, 2, 7).await });
    // While it publishes, the publisher reports its rate.
    let report = status_until(&configs[..1], 30, |s| {
        s["publishers"][0]["envelopes_per_s"]
            .as_f64()
            .is_some_and(|r| r > 0.0)
    })
    .await;
    assert_eq!(report["publishers"][0]["running"], true, "{report:#}");
    writing.await.unwrap();
    sqlx::any::install_default_drivers();
    // The worker creates the store file when it starts, which may be after the writes.
    let file = store_url.trim_start_matches("sqlite://").to_string();
    eventually(Duration::from_secs(30), "the store file", || async {
        std::path::Path::new(&file).exists()
    })
    .await;
    let store = sqlx::AnyPool::connect(&store_url).await.unwrap();
    workload::converge(&db.url, &store, Duration::from_secs(90)).await;

    // Everything published is confirmed, applied through, and reported as such.
    let report = status_until(&configs, 30, |s| {
        let p = &s["publishers"][0];
        let sub = &s["subscribers"][0];
        p["confirmed_seq"].as_u64().is_some_and(|c| c > 0)
            && p["lag_bytes"].as_i64().is_some()
            && sub["streams"][0]["applied_through"] == p["confirmed_seq"]
            && sub["workers"][0]["state"] == "running"
    })
    .await;
    let p = &report["publishers"][0];
    assert_eq!(p["running"], true, "{p}");
    assert_eq!(p["slot"], format!("kausal_{ns}"), "{p}");
    assert!(p["lag_bytes"].as_i64().is_some_and(|b| b >= 0), "{p}");
    assert!(
        p["source_position"]
            .as_str()
            .is_some_and(|x| x.contains('/')),
        "{p}"
    );
    assert!(p["envelopes_per_s"].as_f64().is_some(), "{p}");
    assert!(p["problems"].as_array().unwrap().is_empty(), "{p}");
    let s = &report["subscribers"][0];
    assert_eq!(s["consumers"], 1, "{s}");
    assert_eq!(s["dead_letters"], 0, "{s}");
    assert_eq!(s["workers"][0]["waiting_count"], 0, "{s}");
    let seq = p["confirmed_seq"].as_u64().unwrap();
    let (code, human, _) = kausal(&[
        "status",
        "--config",
        configs[0].to_str().unwrap(),
        "--config",
        configs[1].to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{human}");
    assert!(
        human.contains(&format!("publisher {ns}")) && human.contains("running"),
        "{human}"
    );
    assert!(
        human.contains(&format!("applied through     {ns}/")),
        "{human}"
    );

    // The endpoints, with the documented names.
    let text = kausal::ops::get(&format!("127.0.0.1:{pub_port}"), "/metrics")
        .await
        .unwrap();
    assert_eq!(
        metric(&text, "kausal_publisher_confirmed_seq"),
        seq as f64,
        "{text}"
    );
    assert!(metric(&text, "kausal_publisher_envelopes_published_total") >= seq as f64);
    let text = kausal::ops::get(&format!("127.0.0.1:{sub_port}"), "/metrics")
        .await
        .unwrap();
    assert!(
        metric(&text, "kausal_subscriber_transactions_applied_total") >= seq as f64,
        "{text}"
    );
    assert_eq!(
        metric(&text, "kausal_subscriber_applied_through"),
        seq as f64,
        "{text}"
    );
    assert_eq!(
        metric(&text, "kausal_subscriber_dead_letters_total"),
        0.0,
        "{text}"
    );
    let live: Value = serde_json::from_str(
        &kausal::ops::get(&format!("127.0.0.1:{sub_port}"), "/status")
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(live["app"], ns.as_str(), "{live}");

    // A worker killed with -9 leaves its row: shown as gone once it is stale.
    subscriber.kill();
    let report = status_until(&configs, 30, |s| {
        s["subscribers"][0]["workers"][0]["state"] == "gone"
    })
    .await;
    assert_eq!(report["subscribers"][0]["consumers"], 0);
    // A killed publisher: its slot is idle, its endpoint silent.
    publisher.kill();
    let report = status_until(&configs, 30, |s| s["publishers"][0]["running"] == false).await;
    assert!(
        report["publishers"][0]["envelopes_per_s"].is_null(),
        "{report:#}"
    );
    let (_, human, _) = kausal(&["status", "--config", configs[0].to_str().unwrap()]);
    assert!(human.contains("not running"), "{human}");

    store.close().await;
    db.drop().await;
    delete_queues(&ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_passes_a_working_setup_and_names_each_problem_with_its_fix() {
    logs();
    let ns = unique("doctor");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    let good = write_config(
        &config_text(&ns, &db.url, workload::PUBLISHED),
        &format!("{ns}.pub"),
    );
    let (code, out, err) = kausal(&["doctor", "--config", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok    source"), "{out}");
    assert!(
        out.contains(&format!("kausal_{ns} does not exist yet")),
        "{out}"
    );
    assert!(out.contains("ok    broker"), "{out}");
    assert!(out.contains("the database's clock is"), "{out}");
    // The tests' role is a superuser: allowed, with the least-privilege SQL as the fix.
    assert!(out.contains("WARN  privileges"), "{out}");
    assert!(
        out.contains(&format!("CREATE ROLE kausal_{ns} LOGIN REPLICATION")),
        "{out}"
    );
    assert!(out.contains("GRANT SELECT ON users, messages"), "{out}");

    // A role that may not replicate, a table that does not exist, a broker not there.
    let role = format!("{ns}_norepl");
    db.client
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT SELECT ON users, messages TO {role}"
        ))
        .await
        .unwrap();
    let url = format!("postgres://{role}@127.0.0.1:5432/{ns}");
    let bad = write_config(
        &config_text(
            &ns,
            &url,
            &format!(
                "{}[[table]]\nname = \"nope\"\ncolumns = [\"*\"]\n",
                workload::PUBLISHED
            ),
        )
        .replace("127.0.0.1:5672", "127.0.0.1:1"),
        &format!("{ns}.bad"),
    );
    let (code, out, _) = kausal(&["doctor", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL  source"), "{out}");
    assert!(
        out.contains("FAIL  privileges") && out.contains(&format!("ALTER ROLE {role} REPLICATION")),
        "{out}"
    );
    assert!(
        out.contains("FAIL  broker") && out.contains("127.0.0.1:1"),
        "{out}"
    );

    // A subscriber: a working one, then one whose Redis and store are not there.
    let store_url = sqlite_url(&ns);
    let sub = write_config(
        &sub_config_text(&ns, &store_url, &workload::subscribed(&ns)),
        &format!("{ns}.sub"),
    );
    let (code, out, _) = kausal(&["doctor", "--config", sub.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok    store"), "{out}");
    assert!(
        out.contains(&format!("kausal.{ns} does not exist yet")),
        "{out}"
    );
    let broken = write_config(
        &sub_config_text(
            &ns,
            &format!("{PG}/{ns}_no_such_db"),
            &format!(
                "[coordination]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:1\"\n{}",
                workload::subscribed(&ns)
            ),
        ),
        &format!("{ns}.broken"),
    );
    let (code, out, _) = kausal(&["doctor", "--config", broken.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL  store") && out.contains(&format!("{ns}_no_such_db")),
        "{out}"
    );
    assert!(
        out.contains("FAIL  coordination") && out.contains("redis://127.0.0.1:1"),
        "{out}"
    );
    db.client
        .batch_execute(&format!("DROP OWNED BY {role}"))
        .await
        .unwrap();
    db.drop().await;
    let admin = connect(&format!("{PG}/postgres")).await;
    admin
        .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_checks_a_mariadb_source_and_status_reads_its_binlog_position() {
    logs();
    let ns = unique("doctor_my");
    let db = mysql::MyDb::new(
        &ns,
        "CREATE TABLE users (id BIGINT PRIMARY KEY, name TEXT NOT NULL)",
    )
    .await;
    let cfg = write_config(
        &mysql::my_config_text(
            &ns,
            &db.url,
            "[[table]]\nname = \"users\"\ncolumns = [\"*\"]\n",
        ),
        &format!("{ns}.pub"),
    );
    let (code, out, err) = kausal(&["doctor", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ok    source") && out.contains("the database's clock is"),
        "{out}"
    );
    let report = status(&[cfg.as_path()]);
    let p = &report["publishers"][0];
    assert!(p["source"].as_str().unwrap().starts_with("mysql "), "{p}");
    assert!(
        p["source_position"]
            .as_str()
            .is_some_and(|x| x.starts_with("gtid:") || x.starts_with("file:")),
        "{p}"
    );
    db.drop().await;
}
