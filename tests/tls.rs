//! TLS to every server: the test CA and the server certificate (valid for `localhost`
//! only) come from scripts/setup.sh (`/etc/kausal/tls`), which also opens the TLS
//! listeners: Postgres and MariaDB on their ports, RabbitMQ 5671, Redis 6380, and a TLS
//! terminator on 27018 in front of the MongoDB-wire server. 5671 and 6380 speak only
//! TLS, so a connection there that works is encrypted; for Postgres and MariaDB the tests
//! ask the server (pg_stat_ssl, a user that REQUIRE SSL).

mod common;

use common::cli::kausal;
use common::mysql::*;
use common::sub::*;
use common::*;
use kausal::bus::amqp::AmqpPublisher;
use kausal::bus::BusError;
use kausal::publisher::config::MysqlSource;
use kausal::publisher::source::{mysql, postgres};
use kausal::publisher::SourceError;
use kausal::subscriber::coord::redis::RedisCoord;
use kausal::subscriber::error::{CoordError, SinkError};
use kausal::subscriber::sink::SqlStore;
use mysql_async::prelude::Queryable;
use std::time::Duration;

fn tls_dir() -> String {
    std::env::var("KAUSAL_TEST_TLS_DIR").unwrap_or_else(|_| "/etc/kausal/tls".into())
}
fn ca() -> String {
    format!("{}/ca.pem", tls_dir())
}
fn other_ca() -> String {
    format!("{}/other-ca.pem", tls_dir())
}

fn amqps(host: &str, ca: &str) -> String {
    format!("amqps://guest:guest@{host}:5671/%2f?cacertfile={ca}")
}
fn rediss(host: &str, ca: &str) -> String {
    format!("rediss://{host}:6380?cacert={ca}")
}
fn pg_tls(host: &str, db: &str, ca: &str) -> String {
    format!("postgres://postgres@{host}:5432/{db}?sslmode=verify-full&sslrootcert={ca}")
}
fn my_tls(user: &str, host: &str, db: &str, ca: &str) -> String {
    format!("mysql://{user}:pw@{host}:3306/{db}?ssl-mode=VERIFY_IDENTITY&ssl-ca={ca}")
}

/// Whether every connection to `database` (but the checker's own) is encrypted, and how
/// many there are, by application name.
async fn pg_connections(database: &str) -> Vec<(String, bool)> {
    let admin = connect(&format!("{PG}/postgres")).await;
    admin
        .query(
            "SELECT coalesce(a.application_name, ''), s.ssl FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = $1 AND a.pid <> pg_backend_pid()",
            &[&database],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// A MariaDB user that may log in only over TLS: anything of ours that connects as it
/// and works was encrypted.
async fn tls_only_user(name: &str) {
    let mut admin = my_connect(MY).await;
    admin
        .query_drop(format!(
            "CREATE USER '{name}'@'%' IDENTIFIED BY 'pw' REQUIRE SSL; \
             GRANT ALL PRIVILEGES ON *.* TO '{name}'@'%'"
        ))
        .await
        .unwrap();
}

async fn drop_user(name: &str) {
    let mut admin = my_connect(MY).await;
    let _ = admin
        .query_drop(format!("DROP USER IF EXISTS '{name}'@'%'"))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_over_tls_everywhere_replicates_and_every_connection_is_encrypted() {
    logs();
    let ns = unique("tlspg");
    let db = TestDb::new(&ns, workload::SCHEMA).await;
    let store_name = format!("{ns}_store");
    workload::store_db(&store_name).await;
    declare_queue(&ns, &ns).await;
    let broker = amqps("localhost", &ca());
    let pub_text = format!(
        "namespace = \"{ns}\"\n\
         [source]\nkind = \"postgres\"\nurl = \"{}\"\n\
         [broker]\nurl = \"{broker}\"\n\
         [checkpoint]\npath = \"{}\"\ninterval_ms = 200\n{}",
        pg_tls("localhost", &ns, &ca()),
        checkpoint_path(&ns).display(),
        workload::PUBLISHED
    );
    let pub_path = write_config(&pub_text, &format!("{ns}.pub"));
    let publisher = start(toml::from_str(&pub_text).unwrap(), &db).await;
    // A Redis cache fed over rediss beside the store.
    let sub_text = format!(
        "app = \"{ns}\"\n[broker]\nurl = \"{broker}\"\nprefetch = 64\n\
         [store]\nurl = \"{}\"\nappliers = 2\n\
         [coordination]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{ns}\"\n{}\
         [[sink]]\nkind = \"redis\"\nurl = \"{}\"\nprefix = \"{ns}_cache\"\n",
        pg_tls("localhost", &store_name, &ca()),
        rediss("localhost", &ca()),
        workload::subscribed(&ns),
        rediss("localhost", &ca()),
    );
    let sub_path = write_config(&sub_text, &format!("{ns}.sub"));
    let mut worker = Process::subscriber(&sub_path);
    workload::run(&db.url, 300, 2, 41).await;
    sqlx::any::install_default_drivers();
    let store = sqlx::AnyPool::connect(&format!("{PG}/{store_name}?sslmode=disable"))
        .await
        .unwrap();
    workload::converge(&db.url, &store, Duration::from_secs(120)).await;
    // The cache (read here over the plaintext port of the same server) holds every user:
    // the sink wrote them through the TLS-only port.
    let users = workload::source_rows(&db.url).await.0.len();
    let cached = cached_keys(&format!("{ns}_cache:users:*"), users).await;
    assert_eq!(cached, users, "users in the Redis cache fed over rediss");

    // The publisher's catalog and replication connections, the worker's store pool: all
    // encrypted (the test's own plaintext connections are not kausal's).
    let source = pg_connections(&ns).await;
    let replication = format!("kausal-{ns}");
    assert!(
        source.iter().any(|(app, ssl)| *app == replication && *ssl),
        "the replication stream is not an encrypted connection: {source:?}"
    );
    let ours: Vec<_> = source
        .iter()
        .filter(|(app, _)| app.starts_with("kausal"))
        .collect();
    assert!(
        ours.iter().all(|(_, ssl)| *ssl),
        "plaintext kausal connection: {source:?}"
    );
    store.close().await;
    let stored = pg_connections(&store_name).await;
    assert!(!stored.is_empty(), "no worker connection to the store");
    assert!(
        stored.iter().all(|(_, ssl)| *ssl),
        "a store connection is not encrypted: {stored:?}"
    );

    // The operator's commands speak TLS with the same configuration.
    let (rc, out, err) = kausal(&[
        "doctor",
        "--config",
        pub_path.to_str().unwrap(),
        "--config",
        sub_path.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0, "doctor failed over TLS:\n{out}\n{err}");
    for check in [
        "source TLS",
        "broker TLS",
        "store TLS",
        "coordination TLS",
        "redis sink TLS",
    ] {
        let line = out.lines().find(|l| l.contains(check)).unwrap_or_default();
        assert!(
            line.contains("name checked"),
            "doctor on {check}: {line:?}\n{out}"
        );
    }
    // status reads the queue over amqps and the worker's live status from the store.
    let mut last = String::new();
    for _ in 0..60 {
        let (rc, out, err) = kausal(&["status", "--config", sub_path.to_str().unwrap()]);
        assert_eq!(rc, 0, "status failed over TLS:\n{out}\n{err}");
        last = out;
        if last.contains("running") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        last.contains("running"),
        "status never showed the running worker:\n{last}"
    );

    worker.kill();
    publisher.stop().await;
    db.drop().await;
    workload::drop_store_db(&store_name).await;
    delete_queues(&ns).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mariadb_source_and_store_reached_as_a_tls_only_user_replicate() {
    logs();
    let ns = unique("tlsmy");
    let user = format!("u_{}", &ns[ns.len() - 9..]);
    tls_only_user(&user).await;
    let db = MyDb::new(&ns, my_workload::SCHEMA).await;
    let store_name = format!("{ns}_store");
    {
        let mut admin = my_connect(MY).await;
        admin
            .query_drop(format!("CREATE DATABASE `{store_name}`"))
            .await
            .unwrap();
    }
    // The user cannot log in without TLS: the proof that what works below is encrypted.
    let plain = mysql_async::Conn::from_url(format!("mysql://{user}:pw@127.0.0.1:3306/{ns}")).await;
    assert!(plain.is_err(), "a REQUIRE SSL user logged in without TLS");

    declare_queue(&ns, &ns).await;
    let broker = amqps("localhost", &ca());
    let pub_text = my_config_text(
        &ns,
        &my_tls(&user, "localhost", &ns, &ca()),
        workload::PUBLISHED,
    )
    .replace(AMQP, &broker);
    let publisher = my_start(toml::from_str(&pub_text).unwrap()).await;
    let store_url = my_tls(&user, "localhost", &store_name, &ca());
    let sub_text =
        sub_config_text(&ns, &store_url, &workload::subscribed(&ns)).replace(AMQP, &broker);
    let worker = Worker::start(kausal::subscriber::Subscriber::new(
        toml::from_str(&sub_text).unwrap(),
    ));
    my_workload::run(&db.url, 200, 2, 43).await;
    sqlx::any::install_default_drivers();
    let store = sqlx::AnyPool::connect(&format!("{MY}/{store_name}"))
        .await
        .unwrap();
    workload::converge_to(
        my_workload::source_rows(&db.url).await,
        &store,
        Duration::from_secs(120),
    )
    .await;
    store.close().await;
    worker.stop().await;
    publisher.stop().await;
    db.drop().await;
    let mut admin = my_connect(MY).await;
    let _ = admin
        .query_drop(format!("DROP DATABASE IF EXISTS `{store_name}`"))
        .await;
    drop_user(&user).await;
    delete_queues(&ns).await;
}

/// How many keys match `pattern` once there are `expected` (or after 60 s).
async fn cached_keys(pattern: &str, expected: usize) -> usize {
    let client = redis::Client::open(REDIS).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut found = 0;
    for _ in 0..120 {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut conn)
            .await
            .unwrap();
        found = keys.len();
        if found == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    found
}

async fn pg_source(url: &str) -> Result<tokio_postgres::Client, SourceError> {
    postgres::catalog::ConnInfo::parse(url, None)?
        .connect()
        .await
}

async fn my_source(url: &str) -> Result<mysql_async::Conn, SourceError> {
    let src: MysqlSource = toml::from_str(&format!("url = \"{url}\"")).unwrap();
    mysql::catalog::ConnInfo::parse(&src)?.connect().await
}

/// A TLS error (not some other failure) that says what was wrong.
fn refused(what: &str, client: &str, is_tls: bool, error: &dyn std::fmt::Display, says: &str) {
    assert!(is_tls, "{what}: {client}: {error}");
    assert!(
        error.to_string().contains(says),
        "{what}: {client}: {error}"
    );
}

/// Whether a source connection is encrypted, as the server sees it.
async fn encrypted(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// What each client says when the server's certificate does not check out: a TLS
/// error naming the problem, and no connection.
#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_ca_or_host_name_is_refused_by_every_client_with_the_reason() {
    logs();
    let wrong_ca = other_ca();
    let user = format!("u_{}", std::process::id());
    tls_only_user(&user).await;
    // (what was wrong, host, CA file, words the error must hold)
    let cases = [
        (
            "wrong CA",
            "localhost",
            wrong_ca.as_str(),
            "not signed by the CA",
        ),
        (
            "wrong host name",
            "127.0.0.1",
            &ca() as &str,
            "not valid for the host name",
        ),
    ];
    for (what, host, ca_file, says) in cases {
        let pg = pg_source(&pg_tls(host, "postgres", ca_file))
            .await
            .unwrap_err();
        refused(
            what,
            "postgres source",
            matches!(pg, SourceError::Tls { .. }),
            &pg,
            says,
        );

        let my = my_source(&my_tls(&user, host, "mysql", ca_file))
            .await
            .unwrap_err();
        refused(
            what,
            "mysql source",
            matches!(my, SourceError::Tls { .. }),
            &my,
            says,
        );

        let amqp = AmqpPublisher::connect(&amqps(host, ca_file), "kausal")
            .await
            .err()
            .unwrap();
        refused(
            what,
            "broker",
            matches!(amqp, BusError::Tls { .. }),
            &amqp,
            says,
        );

        let redis = RedisCoord::connect(&rediss(host, ca_file), "tls", "t")
            .await
            .err()
            .unwrap();
        refused(
            what,
            "redis",
            matches!(redis, CoordError::Tls { .. }),
            &redis,
            says,
        );

        let store = SqlStore::connect(&pg_tls(host, "postgres", ca_file))
            .await
            .unwrap_err();
        refused(
            what,
            "postgres store",
            matches!(store, SinkError::Tls { .. }),
            &store,
            says,
        );

        let store = SqlStore::connect(&my_tls(&user, host, "mysql", ca_file))
            .await
            .unwrap_err();
        refused(
            what,
            "mysql store",
            matches!(store, SinkError::Tls { .. }),
            &store,
            says,
        );
        // A certificate problem does not go away by retrying: workers stop with it.
        assert_eq!(store.class(), kausal::subscriber::ErrorClass::Definite);
    }

    // verify-ca checks the chain but not the name: 127.0.0.1 is accepted, encrypted.
    let url = format!(
        "postgres://postgres@127.0.0.1:5432/postgres?sslmode=verify-ca&sslrootcert={}",
        ca()
    );
    let client = pg_source(&url).await.expect("verify-ca to 127.0.0.1");
    assert!(encrypted(&client).await);
    // verify-ca still checks the chain.
    let url = format!(
        "postgres://postgres@127.0.0.1:5432/postgres?sslmode=verify-ca&sslrootcert={}",
        other_ca()
    );
    let e = pg_source(&url).await.unwrap_err();
    assert!(e.to_string().contains("not signed by the CA"), "{e}");
    // require (libpq's meaning): encrypted, the certificate not checked.
    let client = pg_source(&format!("{PG}/postgres?sslmode=require"))
        .await
        .expect("require to 127.0.0.1");
    assert!(
        encrypted(&client).await,
        "sslmode=require connected without TLS"
    );
    drop_user(&user).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_settings_never_fall_back_to_plaintext() {
    logs();
    // Modes that may quietly connect unencrypted are refused before connecting.
    let e = pg_source(&format!("{PG}/postgres?sslmode=prefer"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("never falls back"), "{e}");
    let e = my_source(&format!("{MY}/mysql?ssl-mode=PREFERRED"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("never falls back"), "{e}");
    let e = SqlStore::connect(&format!("{PG}/postgres?sslmode=allow"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("never falls back"), "{e}");
    // A CA file on a plaintext URL is a mistake, not a request for plaintext.
    let e = AmqpPublisher::connect(&format!("{AMQP}?cacertfile={}", ca()), "kausal")
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("amqps://"), "{e}");
    let e = RedisCoord::connect(&format!("{REDIS}?cacert={}", ca()), "tls", "t")
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("rediss://"), "{e}");
    let e = pg_source(&format!("{PG}/postgres?sslrootcert={}", ca()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("sslmode=verify-full"), "{e}");
    // A TLS URL pointed at a plaintext port fails; it never talks plaintext instead.
    let e = AmqpPublisher::connect(
        &format!("amqps://guest:guest@localhost:5672/%2f?cacertfile={}", ca()),
        "kausal",
    )
    .await
    .err()
    .unwrap();
    assert!(!matches!(e, BusError::AccessRefused { .. }), "{e}");
    assert!(
        RedisCoord::connect(
            &format!("rediss://localhost:6379?cacert={}", ca()),
            "tls",
            "t"
        )
        .await
        .is_err(),
        "rediss:// to the plaintext port connected"
    );
    // A CA file that is not there is named as such.
    let e = pg_source(&pg_tls("localhost", "postgres", "/nonexistent/ca.pem"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
}

#[cfg(feature = "mongo")]
#[tokio::test(flavor = "multi_thread")]
async fn the_mongo_sink_connects_over_tls_and_refuses_a_wrong_ca_or_host_name() {
    use kausal::subscriber::sink::mongo::{MongoSink, MongoSinkConfig};
    logs();
    let cfg = |host: &str, ca: &str| -> MongoSinkConfig {
        let url = format!(
            "mongodb://{host}:27018/?tls=true&tlsCAFile={ca}&serverSelectionTimeoutMS=5000"
        );
        toml::from_str(&format!("url = \"{url}\"\ndatabase = \"tls_check\"")).unwrap()
    };
    MongoSink::connect(&cfg("localhost", &ca()))
        .await
        .expect("mongo over TLS");
    for (what, host, ca_file, says) in [
        ("wrong CA", "localhost", other_ca(), "not signed by the CA"),
        (
            "wrong host name",
            "127.0.0.1",
            ca(),
            "not valid for the host name",
        ),
    ] {
        let e = MongoSink::connect(&cfg(host, &ca_file))
            .await
            .err()
            .unwrap();
        assert_eq!(
            e.class(),
            kausal::subscriber::ErrorClass::Definite,
            "{what}: {e}"
        );
        assert!(e.to_string().contains(says), "{what}: {e}");
    }
}

/// `kausal doctor` names every connection that would cross a network unencrypted, with
/// the URL parameters that fix it (0.0.0.0 reaches this host's servers without being a
/// loopback name, so it stands for a server elsewhere).
#[tokio::test(flavor = "multi_thread")]
async fn doctor_warns_of_plaintext_connections_that_cross_a_network() {
    let app = unique("tlsdoc");
    let text = format!(
        "app = \"{app}\"\n[broker]\nurl = \"amqp://guest:guest@0.0.0.0:5672/%2f\"\n\
         [store]\nurl = \"postgres://postgres@0.0.0.0:5432/postgres\"\n\
         [coordination]\nkind = \"redis\"\nurl = \"redis://0.0.0.0:6379\"\nprefix = \"{app}\"\n\
         [[table]]\nnamespace = \"shop\"\nname = \"users\"\n"
    );
    let path = write_config(&text, &format!("{app}.sub"));
    let (_, out, err) = kausal(&["doctor", "--config", path.to_str().unwrap()]);
    for (check, fix) in [
        ("broker TLS", "amqps://"),
        ("store TLS", "sslmode=verify-full"),
        ("coordination TLS", "rediss://"),
    ] {
        let lines: Vec<&str> = out.lines().collect();
        let at = lines
            .iter()
            .position(|l| l.contains(check))
            .unwrap_or_else(|| panic!("no {check} finding:\n{out}\n{err}"));
        // The finding and its fix line.
        let finding = lines[at..(at + 2).min(lines.len())].join("\n");
        assert!(
            finding.contains("WARN") && finding.contains("not encrypted"),
            "{check}: {finding}"
        );
        assert!(finding.contains(fix), "{check}: {finding}");
    }
    delete_queues(&app).await;
}
