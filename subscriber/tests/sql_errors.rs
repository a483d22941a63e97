//! Store errors as the real servers raise them, through the drivers the store uses,
//! classified fail-safe: a write that cannot succeed as it is (a duplicate key) is
//! definite, one that fails for a reason that passes (disk full) is retried.

use anyhow::Result;
use kausal_subscriber::error::sqlx_class;
use kausal_subscriber::ErrorClass;

#[macro_use]
mod common;

use common::*;

async fn class_of(pool: &sqlx::AnyPool, sql: &str) -> ErrorClass {
    let error = sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
        .execute(pool)
        .await
        .expect_err(sql);
    sqlx_class(&error)
}

async fn errors_are_definite_only_when_the_write_cannot_succeed(server: Server) -> Result<()> {
    let db = TestDb::create(server).await?;
    let url = match server {
        // The file does not exist yet.
        Server::Sqlite => format!("{}?mode=rwc", db.url),
        _ => db.url.clone(),
    };
    let pool = sqlx::AnyPool::connect(&url).await?;
    sqlx::query("CREATE TABLE t (id INT PRIMARY KEY)")
        .execute(&pool)
        .await?;
    sqlx::query("INSERT INTO t VALUES (1)")
        .execute(&pool)
        .await?;
    let duplicate = class_of(&pool, "INSERT INTO t VALUES (1)").await;
    assert_eq!(duplicate, ErrorClass::Definite, "duplicate key");
    let missing = class_of(&pool, "INSERT INTO no_such_table VALUES (1)").await;
    assert_eq!(missing, ErrorClass::Definite, "no such table");
    let disk_full = match server {
        Server::Postgres => Some(
            "DO $$ BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full'; END $$",
        ),
        Server::MariaDb => {
            Some("SIGNAL SQLSTATE 'HY000' SET MYSQL_ERRNO = 1021, MESSAGE_TEXT = 'Disk full'")
        }
        // SQLite cannot be made to report SQLITE_FULL from SQL.
        Server::Sqlite => None,
    };
    if let Some(sql) = disk_full {
        assert_eq!(
            class_of(&pool, sql).await,
            ErrorClass::Transient,
            "disk full"
        );
    }
    if server == Server::MariaDb {
        // Lock wait timeout (1205) has SQLSTATE HY000: only its number tells it.
        let sql =
            "SIGNAL SQLSTATE 'HY000' SET MYSQL_ERRNO = 1205, MESSAGE_TEXT = 'Lock wait timeout'";
        assert_eq!(
            class_of(&pool, sql).await,
            ErrorClass::Transient,
            "lock wait"
        );
    }
    pool.close().await;
    Ok(())
}

scenario_tests!(errors_are_definite_only_when_the_write_cannot_succeed:
    store_errors_are_classified_fail_safe_on_postgres => Server::Postgres,
    store_errors_are_classified_fail_safe_on_mariadb => Server::MariaDb,
    store_errors_are_classified_fail_safe_on_sqlite => Server::Sqlite,
);
