//! Each misconfiguration of a MySQL / MariaDB source produces one message naming the
//! problem and the fix. Server settings are checked against a private, throwaway
//! MariaDB instance the test starts (the shared server is configured correctly, and
//! changing its global settings would disturb tests running beside this one).

mod common;

use common::mysql::*;
use common::*;
use mysql_async::prelude::Queryable;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

async fn check_error(cfg: kausal::publisher::PublisherConfig) -> String {
    kausal::publisher::check(&cfg)
        .await
        .expect_err("the check must fail")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_table_column_or_key_is_named_with_the_fix() {
    let ns = unique("mymisc");
    let db = MyDb::new(
        &ns,
        "CREATE TABLE t (id INT PRIMARY KEY, a TEXT); CREATE TABLE nokey (a TEXT)",
    )
    .await;
    let err = check_error(my_config(
        &ns,
        &db.url,
        "[[table]]\nname = \"nope\"\ncolumns = [\"*\"]\n",
    ))
    .await;
    assert!(
        err.contains(&format!("{ns}.nope does not exist"))
            && err.contains("remove it from the [[table]] list"),
        "{err}"
    );
    let err = check_error(my_config(
        &ns,
        &db.url,
        "[[table]]\nname = \"t\"\ncolumns = [\"id\", \"zz\"]\n",
    ))
    .await;
    assert!(err.contains("no column \"zz\""), "{err}");
    let err = check_error(my_config(
        &ns,
        &db.url,
        "[[table]]\nname = \"t\"\ncolumns = [\"a\"]\n",
    ))
    .await;
    assert!(
        err.contains("key column \"id\"") && err.contains("add it to `columns`"),
        "{err}"
    );
    let err = check_error(my_config(
        &ns,
        &db.url,
        "[[table]]\nname = \"nokey\"\ncolumns = [\"*\"]\n",
    ))
    .await;
    assert!(
        err.contains("has no primary key") && err.contains("ADD PRIMARY KEY"),
        "{err}"
    );
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_password_and_a_missing_replication_grant_are_named_with_the_fix() {
    let ns = unique("mygrant");
    let db = MyDb::new(&ns, "CREATE TABLE t (id INT PRIMARY KEY)").await;
    let tables = "[[table]]\nname = \"t\"\ncolumns = [\"*\"]\n";
    let err = check_error(my_config(
        &ns,
        &format!("mysql://kausal:wrong-pw@127.0.0.1:3306/{ns}"),
        tables,
    ))
    .await;
    assert!(
        err.contains("rejected the login for user \"kausal\"")
            && err.contains("check the password"),
        "{err}"
    );
    assert!(!err.contains("wrong-pw"), "password printed: {err}");

    // A user who may read the table but not the binlog.
    let user = format!("w{}", &ns[ns.len() - 8..]);
    let mut admin = my_connect(MY).await;
    admin
        .query_drop(format!(
            "CREATE USER '{user}'@'%' IDENTIFIED BY 'pw'; \
             GRANT SELECT ON `{ns}`.* TO '{user}'@'%'"
        ))
        .await
        .unwrap();
    let err = check_error(my_config(
        &ns,
        &format!("mysql://{user}:pw@127.0.0.1:3306/{ns}"),
        tables,
    ))
    .await;
    assert!(
        err.contains(&format!("user \"{user}\" may not read the binlog"))
            && err.contains("GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.*"),
        "{err}"
    );
    admin
        .query_drop(format!("DROP USER '{user}'@'%'"))
        .await
        .unwrap();
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_purged_binlog_position_stops_the_publisher_with_the_recovery_steps() {
    let ns = unique("mypurged");
    let mut db = MyDb::new(&ns, "CREATE TABLE t (id INT PRIMARY KEY)").await;
    let mut tap = Tap::new(&ns).await;
    let cfg = my_config(&ns, &db.url, "[[table]]\nname = \"t\"\ncolumns = [\"*\"]\n");
    let publisher = my_start(cfg.clone()).await;
    db.exec("INSERT INTO t VALUES (1)").await;
    tap.until(Duration::from_secs(60), |r| complete(r) >= 1)
        .await;
    publisher.stop().await;
    // The checkpoint now points at a transaction the server's binlog does not hold (as
    // after PURGE BINARY LOGS, or a server rebuilt from a backup).
    let path = checkpoint_path(&ns);
    let mut cp = kausal::publisher::checkpoint::load(&path).unwrap().unwrap();
    cp.resume = "gtid:0-4242-5".into();
    kausal::publisher::checkpoint::save(&path, &kausal::publisher::checkpoint::encode(&cp))
        .unwrap();
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let err = tokio::time::timeout(Duration::from_secs(60), kausal::publisher::run(cfg, rx))
        .await
        .expect("the publisher must stop, not retry forever")
        .expect_err("must stop")
        .to_string();
    assert!(
        err.contains("the binlog no longer holds position gtid:0-4242-5"),
        "{err}"
    );
    assert!(err.contains("re-bootstrap subscribers"), "{err}");
    tap.delete().await;
    db.drop().await;
}

/// A private MariaDB server on its own port and data directory.
struct Private {
    dir: PathBuf,
    port: u16,
    child: Option<std::process::Child>,
}

impl Private {
    fn new(port: u16) -> Private {
        let dir = std::env::temp_dir().join(format!("kausal-mariadb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mariadb-install-db")
            .args(["--no-defaults", "--auth-root-authentication-method=normal"])
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args(["--user=root", "--skip-test-db"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("mariadb-install-db (run scripts/setup.sh)");
        assert!(status.success(), "mariadb-install-db failed");
        Private {
            dir,
            port,
            child: None,
        }
    }

    async fn start(&mut self, args: &[&str]) {
        self.stop().await;
        let child = Command::new("/usr/sbin/mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.dir.join("data").display()))
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .arg(format!("--pid-file={}", self.dir.join("pid").display()))
            .arg(format!("--port={}", self.port))
            .args(["--bind-address=127.0.0.1", "--user=root"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mariadbd");
        self.child = Some(child);
        for _ in 0..300 {
            if mysql_async::Conn::from_url(self.url()).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the private MariaDB did not start within 30 s");
    }

    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/mysql", self.port)
    }

    async fn sql(&self, sql: &str) {
        let mut c = mysql_async::Conn::from_url(self.url()).await.unwrap();
        c.query_drop(sql).await.unwrap();
        let _ = c.disconnect().await;
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_wrong_binlog_setting_is_named_with_the_fix() {
    let mut server = Private::new(33_061);
    let tables = "[[table]]\nname = \"db\"\ncolumns = [\"*\"]\n";
    let cfg = |server: &Private| my_config("mysettings", &server.url(), tables);

    server.start(&["--skip-log-bin"]).await;
    let err = check_error(cfg(&server)).await;
    assert!(
        err.contains("log_bin = 0") && err.contains("needs log_bin = ON"),
        "{err}"
    );
    assert!(err.contains("restart the server"), "{err}");

    server
        .start(&[
            "--log-bin=private-bin",
            "--server-id=1",
            "--binlog-format=STATEMENT",
        ])
        .await;
    let err = check_error(cfg(&server)).await;
    assert!(
        err.contains("binlog_format = STATEMENT")
            && err.contains("SET GLOBAL binlog_format = 'ROW'"),
        "{err}"
    );
    server
        .sql("SET GLOBAL binlog_format = 'ROW', binlog_row_image = 'MINIMAL'")
        .await;
    let err = check_error(cfg(&server)).await;
    assert!(
        err.contains("binlog_row_image = MINIMAL")
            && err.contains("SET GLOBAL binlog_row_image = 'FULL'"),
        "{err}"
    );
    server
        .sql("SET GLOBAL binlog_row_image = 'FULL', binlog_row_metadata = 'MINIMAL'")
        .await;
    let err = check_error(cfg(&server)).await;
    assert!(
        err.contains("binlog_row_metadata = MINIMAL")
            && err.contains("SET GLOBAL binlog_row_metadata = 'FULL'"),
        "{err}"
    );
    // (`server_id = 0` is checked too, for MySQL: MariaDB clamps it to 1.)
    server.sql("SET GLOBAL binlog_row_metadata = 'FULL'").await;
    // Everything right: the check passes.
    kausal::publisher::check(&cfg(&server))
        .await
        .expect("a correctly configured server passes the check");
    server.stop().await;
}
