//! Each misconfiguration produces one message naming the problem and the fix. The
//! wal_level and password cases run against a real, throwaway Postgres cluster started
//! by the test (wal_level=replica, password authentication), since the shared server is
//! configured correctly.

mod common;

use common::cluster::Cluster;
use common::*;

async fn check_error(cfg: kausal::publisher::PublisherConfig) -> String {
    kausal::publisher::check(&cfg)
        .await
        .expect_err("the check must fail")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_table_column_or_unpublished_key_is_named_with_the_fix() {
    let ns = unique("misc");
    let db = TestDb::new(
        &ns,
        "CREATE TABLE t (id int PRIMARY KEY, a text); CREATE TABLE nokey (a text);",
    )
    .await;
    let err = check_error(config(
        &ns,
        &db.url,
        "[[table]]\nname = \"nope\"\ncolumns = [\"*\"]\n",
    ))
    .await;
    assert!(
        err.contains("public.nope does not exist")
            && err.contains("remove it from the [[table]] list"),
        "{err}"
    );
    let err = check_error(config(
        &ns,
        &db.url,
        "[[table]]\nname = \"t\"\ncolumns = [\"id\", \"zz\"]\n",
    ))
    .await;
    assert!(err.contains("no column \"zz\""), "{err}");
    let err = check_error(config(
        &ns,
        &db.url,
        "[[table]]\nname = \"t\"\ncolumns = [\"a\"]\n",
    ))
    .await;
    assert!(
        err.contains("key column \"id\"") && err.contains("add it to `columns`"),
        "{err}"
    );
    let err = check_error(config(
        &ns,
        &db.url,
        "[[table]]\nname = \"nokey\"\ncolumns = [\"*\"]\n",
    ))
    .await;
    assert!(
        err.contains("has no primary key") && err.contains("REPLICA IDENTITY USING INDEX"),
        "{err}"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_broker_is_named_with_the_fix() {
    let ns = unique("nobroker");
    let db = TestDb::new(&ns, "CREATE TABLE t (id int PRIMARY KEY);").await;
    let mut cfg = config(&ns, &db.url, "[[table]]\nname = \"t\"\ncolumns = [\"*\"]\n");
    cfg.broker.url = "amqp://guest:secret-pw@127.0.0.1:1/%2f".into();
    let err = check_error(cfg).await;
    assert!(
        err.contains("cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("secret-pw"), "password printed: {err}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_password_and_wal_level_are_named_with_the_fix() {
    let cluster = Cluster::start(Some("right-pw"), &["wal_level=replica"]);
    let url = |pw: &str| {
        format!(
            "postgres://postgres:{pw}@127.0.0.1:{}/postgres",
            cluster.port
        )
    };
    let tables = "[[table]]\nname = \"t\"\ncolumns = [\"*\"]\n";

    let err = check_error(config("badpw", &url("wrong-pw"), tables)).await;
    assert!(
        err.contains("Postgres rejected the login for user \"postgres\""),
        "{err}"
    );
    assert!(err.contains("check the password"), "{err}");
    assert!(!err.contains("wrong-pw"), "password printed: {err}");

    let err = check_error(config("wal", &url("right-pw"), tables)).await;
    assert!(err.contains("wal_level = replica"), "{err}");
    assert!(
        err.contains("needs wal_level = logical") && err.contains("restart Postgres"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_slot_stops_the_publisher_with_the_recovery_steps() {
    let ns = unique("dropslot");
    let db = TestDb::new(&ns, "CREATE TABLE t (id int PRIMARY KEY);").await;
    let mut tap = Tap::new(&ns).await;
    let cfg = config(&ns, &db.url, "[[table]]\nname = \"t\"\ncolumns = [\"*\"]\n");
    let publisher = start(cfg.clone(), &db).await;
    db.client
        .batch_execute("INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    tap.until(std::time::Duration::from_secs(60), |r| complete(r) >= 1)
        .await;
    publisher.stop().await;
    // The server ends the walsender a moment after the publisher hangs up.
    wait_for_slot_released(&db.client, &format!("kausal_{ns}")).await;
    db.client
        .batch_execute(&format!("SELECT pg_drop_replication_slot('kausal_{ns}')"))
        .await
        .unwrap();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let err = kausal::publisher::run(cfg, rx)
        .await
        .expect_err("must stop")
        .to_string();
    assert!(
        err.contains(&format!("replication slot \"kausal_{ns}\" is gone")),
        "{err}"
    );
    assert!(
        err.contains("start a new generation and re-bootstrap"),
        "{err}"
    );
    tap.delete().await;
    db.drop().await;
}

/// A publisher refused at its checks declares nothing on the broker: no control queue
/// for bootstrap requests, no dead-letter queue of it.
#[tokio::test(flavor = "multi_thread")]
async fn a_publisher_refused_at_preflight_leaves_no_queue_behind() {
    let ns = unique("refused");
    let db = TestDb::new(&ns, "CREATE TABLE nokey (a text);").await;
    let cfg = config(
        &ns,
        &db.url,
        "[[table]]\nname = \"nokey\"\ncolumns = [\"*\"]\n",
    );
    let (_stop, shutdown) = tokio::sync::watch::channel(false);
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        kausal::publisher::run(cfg, shutdown),
    )
    .await
    .expect("the publisher stops by itself")
    .expect_err("the publisher must refuse a table without a key")
    .to_string();
    assert!(err.contains("has no primary key"), "{err}");
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_queues", "name"])
        .output()
        .expect("rabbitmqctl");
    let queues = String::from_utf8_lossy(&out.stdout);
    let control = kausal::bus::bootstrap::control_queue(&ns);
    let left: Vec<&str> = queues
        .lines()
        .map(str::trim)
        .filter(|q| q.starts_with(&control))
        .collect();
    assert!(left.is_empty(), "declared although refused: {left:?}");
    db.drop().await;
}
