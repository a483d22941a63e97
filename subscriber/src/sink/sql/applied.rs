//! The store's record of applied transactions: which seqs of a (namespace, generation)
//! are applied (`kausal_applied` above the compacted watermark in `kausal_progress`),
//! read for a group before it applies, written in the group's transaction.

use super::{int, staging, value, Dialect, SqlStore};
use crate::error::SinkError;
use crate::txn::Transaction;
use sqlx::AnyConnection;
use sqlx::{AssertSqlSafe, Row};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

impl SqlStore {
    /// The compacted watermark of (namespace, generation) (0 if none) and the seqs
    /// applied above it, ascending.
    ///
    /// Two reads that a compaction may run between: the watermark is read again after
    /// the seqs, and that second value is answered. Read once, a compaction in between
    /// would lose the seqs it folded (above the first watermark, deleted before the
    /// second read), and a coordinator seeded from the answer would wait for them for
    /// ever. Compaction only raises the watermark and deletes seqs at or below it, so
    /// every seq above the second watermark applied before the seqs were read is in
    /// them.
    pub async fn progress(
        &self,
        namespace: &str,
        generation: u64,
    ) -> Result<(u64, Vec<u64>), SinkError> {
        let d = self.inner.dialect;
        let store = |source| SinkError::Store {
            operation: "read progress",
            source,
        };
        let first = self.watermark(namespace, generation).await?;
        let sql = format!(
            "SELECT seq FROM kausal_applied WHERE namespace = {} AND generation = {} \
             AND seq > {} ORDER BY seq",
            d.placeholder(1),
            d.placeholder(2),
            d.placeholder(3)
        );
        let rows = sqlx::query(AssertSqlSafe(sql))
            .bind(namespace)
            .bind(int(generation))
            .bind(int(first))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(store)?;
        let through = self.watermark(namespace, generation).await?;
        let mut applied = Vec::with_capacity(rows.len());
        for row in &rows {
            let seq = row.try_get::<i64, _>(0).map_err(store)? as u64;
            if seq > through {
                applied.push(seq);
            }
        }
        Ok((through, applied))
    }

    /// The compacted watermark of (namespace, generation), 0 if none.
    async fn watermark(&self, namespace: &str, generation: u64) -> Result<u64, SinkError> {
        let d = self.inner.dialect;
        let sql = format!(
            "SELECT {} FROM kausal_progress WHERE namespace = {} AND generation = {}",
            d.quote("through"),
            d.placeholder(1),
            d.placeholder(2)
        );
        let through: Option<i64> = sqlx::query(AssertSqlSafe(sql))
            .bind(namespace)
            .bind(int(generation))
            .fetch_optional(&self.inner.pool)
            .await
            .and_then(|row| row.map(|r| r.try_get(0)).transpose())
            .map_err(|source| SinkError::Store {
                operation: "read progress",
                source,
            })?;
        Ok(through.unwrap_or(0) as u64)
    }

    /// Raises the compacted watermark of (namespace, generation) to `through` (never
    /// lowers it) and forgets the applied seqs and staged parts it covers. The caller
    /// knows every seq up to `through` is applied.
    pub async fn compact(
        &self,
        namespace: &str,
        generation: u64,
        through: u64,
    ) -> Result<(), SinkError> {
        let d = self.inner.dialect;
        let store = |source| SinkError::Store {
            operation: "compact progress",
            source,
        };
        let mut tx = self.begin().await?;
        sqlx::query(AssertSqlSafe(d.raise_progress()))
            .bind(namespace)
            .bind(int(generation))
            .bind(int(through))
            .execute(&mut *tx)
            .await
            .map_err(store)?;
        let sql = format!(
            "DELETE FROM kausal_applied WHERE namespace = {} AND generation = {} AND seq <= {}",
            d.placeholder(1),
            d.placeholder(2),
            d.placeholder(3)
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(namespace)
            .bind(int(generation))
            .bind(int(through))
            .execute(&mut *tx)
            .await
            .map_err(store)?;
        staging::forget_through(&mut tx, d, namespace, generation, through).await?;
        tx.commit().await.map_err(store)
    }
}

pub(super) type Stream = (Arc<str>, u64);

/// What the bookkeeping says about the transactions of a group.
pub(super) struct Applied {
    pub(super) through: HashMap<Stream, u64>,
    pub(super) seqs: HashSet<(Stream, u64)>,
}

/// Reads the watermarks and applied rows of the group's transactions: one query per
/// group whatever its size.
pub(super) async fn already_applied(
    conn: &mut AnyConnection,
    dialect: Dialect,
    group: &[Arc<Transaction>],
) -> Result<Applied, SinkError> {
    let mut streams: Vec<(Stream, Vec<u64>)> = Vec::new();
    for tx in group {
        let stream = (tx.id.namespace.clone(), tx.id.generation);
        match streams.iter_mut().find(|(s, _)| *s == stream) {
            Some((_, seqs)) => seqs.push(tx.id.seq),
            None => streams.push((stream, vec![tx.id.seq])),
        }
    }
    let through = dialect.quote("through");
    let mut parts = Vec::new();
    let mut n = 0;
    let mut next = || {
        n += 1;
        dialect.placeholder(n)
    };
    for (i, (_, seqs)) in streams.iter().enumerate() {
        parts.push(format!(
            "SELECT {i} AS s, {through} AS seq, 1 AS w FROM kausal_progress \
             WHERE namespace = {} AND generation = {}",
            next(),
            next()
        ));
        let (ns, generation) = (next(), next());
        let list: Vec<String> = seqs.iter().map(|_| next()).collect();
        parts.push(format!(
            "SELECT {i}, seq, 0 FROM kausal_applied WHERE namespace = {ns} \
             AND generation = {generation} AND seq IN ({})",
            list.join(", ")
        ));
    }
    // Its text changes with the size of the group: not worth a slot in the per-connection
    // statement cache, where it would push out the row statements.
    let mut query = sqlx::query(AssertSqlSafe(parts.join(" UNION ALL "))).persistent(false);
    for ((namespace, generation), seqs) in &streams {
        query = query
            .bind(namespace.to_string())
            .bind(int(*generation))
            .bind(namespace.to_string())
            .bind(int(*generation));
        for seq in seqs {
            query = query.bind(int(*seq));
        }
    }
    let store = |source| SinkError::Store {
        operation: "read applied",
        source,
    };
    let rows = query.fetch_all(&mut *conn).await.map_err(store)?;
    let mut applied = Applied {
        through: HashMap::new(),
        seqs: HashSet::new(),
    };
    for row in rows {
        let stream: i64 = row.try_get(0).map_err(store)?;
        let seq: i64 = row.try_get(1).map_err(store)?;
        let watermark: i64 = row.try_get(2).map_err(store)?;
        let stream = streams[stream as usize].0.clone();
        if watermark == 1 {
            applied.through.insert(stream, seq as u64);
        } else {
            applied.seqs.insert((stream, seq as u64));
        }
    }
    Ok(applied)
}

/// Rows per bookkeeping insert: SQLite allows 500 terms in a compound SELECT.
pub(super) const RECORD_CHUNK: usize = 200;

/// Records transactions as applied, unless a compaction that covers one of them
/// committed since the group read the watermark (then another worker applied it, and
/// the group must be retried: it finds them applied).
pub(super) async fn record_applied(
    conn: &mut AnyConnection,
    dialect: Dialect,
    txs: &[&Transaction],
) -> Result<(), SinkError> {
    let query = if dialect == Dialect::Postgres {
        // Three array parameters: one statement text whatever the group's size, so it
        // stays prepared (a text per size churned the statement cache).
        let (mut namespaces, mut generations, mut seqs) =
            (String::from("{"), String::from("{"), String::from("{"));
        for (i, tx) in txs.iter().enumerate() {
            if i > 0 {
                namespaces.push(',');
                generations.push(',');
                seqs.push(',');
            }
            value::Bound::Text(tx.id.namespace.to_string()).push_pg_element(&mut namespaces);
            generations.push_str(&int(tx.id.generation).to_string());
            seqs.push_str(&int(tx.id.seq).to_string());
        }
        sqlx::query(AssertSqlSafe(dialect.record_applied_arrays()))
            .bind(namespaces + "}")
            .bind(generations + "}")
            .bind(seqs + "}")
    } else {
        let mut query =
            sqlx::query(AssertSqlSafe(dialect.record_applied(txs.len()))).persistent(false);
        for tx in txs {
            let id = &tx.id;
            query = query
                .bind(id.namespace.to_string())
                .bind(int(id.generation))
                .bind(int(id.seq));
        }
        query
    };
    let done = query.execute(conn).await.map_err(|source| {
        if matches!(&source, sqlx::Error::Database(db) if db.is_unique_violation()) {
            SinkError::ConcurrentApply { source }
        } else {
            SinkError::Store {
                operation: "record applied",
                source,
            }
        }
    })?;
    if done.rows_affected() != txs.len() as u64 {
        return Err(SinkError::ConcurrentApply {
            source: sqlx::Error::RowNotFound,
        });
    }
    Ok(())
}
