//! `kausal doctor` for a publisher: its configuration, and the source database it
//! reads (Postgres or MySQL/MariaDB) checked for what replication needs.

use super::tls::encryption;
use super::{broker, human_bytes, now_s, Findings};
use crate::cli::status::chain;
use kausal::publisher::config::SourceConfig;
use kausal::publisher::PublisherConfig;

pub(super) async fn publisher(cfg: &PublisherConfig, f: &mut Findings) {
    if let Err(e) = cfg.validate() {
        f.fail("config", chain(&e), "edit the configuration file");
        return;
    }
    f.ok(
        "config",
        format!(
            "namespace {}, {} tables published",
            cfg.namespace,
            cfg.tables.len()
        ),
    );
    match &cfg.source {
        SourceConfig::Postgres(pg) => postgres(cfg, pg, f).await,
        SourceConfig::Mysql(my) => mysql(cfg, my, f).await,
    }
    match kausal::publisher::checkpoint::load(&cfg.checkpoint_path()) {
        Ok(Some(cp)) => f.ok(
            "checkpoint",
            format!(
                "{}: generation {}, next sequence number {}",
                cfg.checkpoint_path().display(),
                cp.state.generation,
                cp.state.next_seq
            ),
        ),
        Ok(None) => f.ok(
            "checkpoint",
            format!(
                "{} does not exist yet: the first start begins a new generation",
                cfg.checkpoint_path().display()
            ),
        ),
        Err(e) => f.fail(
            "checkpoint",
            chain(&e),
            "move the file away: the publisher starts a new generation and subscribers \
             resynchronise",
        ),
    }
    broker(&cfg.broker.url, &cfg.broker.exchange, f).await;
    let source_url = match &cfg.source {
        SourceConfig::Postgres(pg) => &pg.url,
        SourceConfig::Mysql(my) => &my.url,
    };
    encryption("source", source_url, f);
    encryption("broker", &cfg.broker.url, f);
}

async fn postgres(
    cfg: &PublisherConfig,
    pg: &kausal::publisher::config::PostgresSource,
    f: &mut Findings,
) {
    use kausal::publisher::source::postgres;
    match postgres::check(cfg, pg).await {
        Ok(()) => f.ok(
            "source",
            "reachable; wal_level, tables, columns, keys and privileges as needed",
        ),
        // The preflight's errors name the setting and the fix.
        Err(e) => f.fail("source", chain(&e), "see above"),
    }
    let Ok(password) = pg.password() else { return };
    let Ok(conn) = postgres::catalog::ConnInfo::parse(&pg.url, password) else {
        return;
    };
    let Ok(client) = conn.connect().await else {
        return;
    };
    let tables: Vec<String> = cfg.tables.iter().map(|t| t.name.clone()).collect();
    if let Ok(row) = client
        .query_one(
            "SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
    {
        let (superuser, replication): (bool, bool) = (row.get(0), row.get(1));
        let least = format!(
            "CREATE ROLE kausal_{ns} LOGIN REPLICATION PASSWORD '…';\n\
             GRANT SELECT ON {t} TO kausal_{ns};\n\
             CREATE PUBLICATION {p} FOR TABLE {t};  -- as the tables' owner",
            ns = cfg.namespace.replace('-', "_"),
            t = tables.join(", "),
            p = postgres::publication_name(cfg, pg),
        );
        if superuser {
            f.warn(
                "privileges",
                format!("{} is a superuser: it works, but it can read and change everything", conn.user),
                format!("least privilege: a role with REPLICATION and SELECT on the published tables only:\n{least}"),
            );
        } else if !replication {
            f.fail(
                "privileges",
                format!(
                    "{} has no REPLICATION attribute: it cannot stream the WAL",
                    conn.user
                ),
                format!(
                    "ALTER ROLE {} REPLICATION;  -- or create a role:\n{least}",
                    conn.user
                ),
            );
        } else {
            f.ok(
                "privileges",
                format!("{} may replicate and is no superuser", conn.user),
            );
        }
    }
    let slot = postgres::slot_name(cfg, pg);
    match client
        .query_opt(
            "SELECT active, wal_status, \
               pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::int8 \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
    {
        Ok(Some(row)) => {
            let (active, wal_status, lag): (bool, Option<String>, Option<i64>) =
                (row.get(0), row.get(1), row.get(2));
            let lag = lag.unwrap_or(0);
            let detail = format!(
                "{slot}: {}, holds {} of WAL",
                if active {
                    "in use"
                } else {
                    "idle (no publisher streaming)"
                },
                human_bytes(lag)
            );
            if wal_status.as_deref() == Some("lost") {
                f.fail(
                    "slot",
                    format!("{slot} lost WAL it needed (max_slot_wal_keep_size)"),
                    "changes are gone for this slot: drop it (SELECT pg_drop_replication_slot(…)), \
                     move the checkpoint away, restart the publisher and bootstrap the subscribers",
                );
            } else if !active && lag > 1 << 30 {
                f.warn(
                    "slot",
                    detail,
                    "start the publisher: an idle slot keeps WAL on the database's disk",
                );
            } else {
                f.ok("slot", detail);
            }
        }
        Ok(None) => f.ok(
            "slot",
            format!("{slot} does not exist yet: the publisher creates it at its first start"),
        ),
        Err(e) => f.warn(
            "slot",
            format!("cannot read pg_replication_slots: {e}"),
            "grant pg_read_all_stats or run as the slot's owner",
        ),
    }
    let before = now_s();
    if let Ok(row) = client
        .query_one("SELECT EXTRACT(epoch FROM clock_timestamp())::float8", &[])
        .await
    {
        f.clock("clock", "the database's", row.get(0), before, now_s());
    }
}

async fn mysql(
    cfg: &PublisherConfig,
    my: &kausal::publisher::config::MysqlSource,
    f: &mut Findings,
) {
    use kausal::publisher::source::mysql;
    use mysql_async::prelude::Queryable;
    match mysql::check(cfg, my).await {
        Ok(()) => f.ok(
            "source",
            "reachable; binlog ROW/FULL with metadata, tables, keys and privileges as needed",
        ),
        Err(e) => f.fail("source", chain(&e), "see above"),
    }
    let Ok(info) = mysql::catalog::ConnInfo::parse(my) else {
        return;
    };
    let Ok(mut conn) = info.connect().await else {
        return;
    };
    let before = now_s();
    if let Ok(Some(t)) = conn
        .query_first::<f64, _>("SELECT CAST(UNIX_TIMESTAMP(NOW(6)) AS DOUBLE)")
        .await
    {
        f.clock("clock", "the database's", t, before, now_s());
    }
    let _ = conn.disconnect().await;
}
