//! Parts of split transactions, staged in the store until all are there.
//!
//! A publisher cuts a large transaction into parts (`docs/wire-format.md`, "Part
//! splitting") and the broker may hand them to different workers. Each worker stages the
//! parts it receives in `kausal_parts`; a worker that finds every part staged learns how
//! many there are, and reads them back one at a time: once to admit the transaction
//! (dependencies, tables) and once, inside the store transaction, to apply it part by
//! part. No process ever holds the whole transaction. Applying deletes the staged rows
//! in the same database transaction; compaction deletes any a late redelivery left
//! behind.

use super::dialect::Dialect;
use super::{int, SqlStore};
use crate::error::SinkError;
use crate::txn::TxId;
use kausal_bus::Envelope;
use sqlx::{AnyConnection, AssertSqlSafe, Row};

pub(super) const TABLE: &str = "kausal_parts";

impl SqlStore {
    /// Stages one part of a transaction and returns the number of its parts once every
    /// part is staged ([`SqlStore::staged_part`] reads them); `None` while parts are
    /// missing, and when the transaction is already applied (its staged parts are then
    /// deleted: it is done).
    ///
    /// A duplicate part is a no-op. Several workers may learn that the same set is
    /// complete; applying is idempotent, so that costs a skipped group at most.
    pub async fn stage_part(&self, envelope: &Envelope) -> Result<Option<u32>, SinkError> {
        let d = self.inner.dialect;
        let store = |source| SinkError::Store {
            operation: "stage part",
            source,
        };
        let (namespace, generation, seq) = (&envelope.namespace, envelope.generation, envelope.seq);
        let mut tx = self.begin().await?;
        if is_applied(&mut tx, d, namespace, generation, seq).await? {
            forget(&mut tx, d, namespace, generation, seq).await?;
            tx.commit().await.map_err(store)?;
            tracing::debug!(
                namespace,
                generation,
                seq,
                "part of an applied transaction, dropped"
            );
            return Ok(None);
        }
        // Serializing plain data structs cannot fail.
        let body = serde_json::to_string(envelope).expect("envelope serialization is infallible");
        sqlx::query(AssertSqlSafe(d.stage_part()))
            .bind(namespace.as_str())
            .bind(int(generation))
            .bind(int(seq))
            .bind(i64::from(envelope.part))
            .bind(envelope.parts.map(i64::from))
            .bind(body)
            .execute(&mut *tx)
            .await
            .map_err(store)?;
        tx.commit().await.map_err(store)?;
        // No lock needed: every worker reads after its own commit, so the worker whose
        // commit comes last sees every part, whichever order the commits came in.
        self.complete(namespace, generation, seq).await
    }

    /// Forgets the staged parts of one transaction (it was dead-lettered: the copy in the
    /// dead-letter queue is what an operator retries).
    pub async fn unstage(
        &self,
        namespace: &str,
        generation: u64,
        seq: u64,
    ) -> Result<(), SinkError> {
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(|source| SinkError::Store {
                operation: "delete staged parts",
                source,
            })?;
        delete(
            &mut conn,
            self.inner.dialect,
            namespace,
            generation,
            "=",
            seq,
        )
        .await
    }

    /// Every transaction whose parts are all staged but which is not applied yet, with
    /// its number of parts, by seq: what a crash between staging the last part and
    /// applying left behind.
    pub async fn staged_complete(&self) -> Result<Vec<(TxId, u32)>, SinkError> {
        let d = self.inner.dialect;
        let store = |source| SinkError::Store {
            operation: "read staged parts",
            source,
        };
        let sql = format!(
            "SELECT p.namespace, p.generation, p.seq, MAX(p.total) FROM {TABLE} p \
             WHERE NOT EXISTS (SELECT 1 FROM kausal_applied a WHERE a.namespace = p.namespace \
             AND a.generation = p.generation AND a.seq = p.seq) \
             AND NOT EXISTS (SELECT 1 FROM kausal_progress g WHERE g.namespace = p.namespace \
             AND g.generation = p.generation AND g.{} >= p.seq) \
             GROUP BY p.namespace, p.generation, p.seq HAVING COUNT(*) = MAX(p.total) \
             ORDER BY p.namespace, p.generation, p.seq",
            d.quote("through")
        );
        let candidates = sqlx::query(AssertSqlSafe(sql))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(store)?;
        let mut complete = Vec::with_capacity(candidates.len());
        for row in candidates {
            let namespace: String = row.try_get(0).map_err(store)?;
            let generation: i64 = row.try_get(1).map_err(store)?;
            let seq: i64 = row.try_get(2).map_err(store)?;
            let total: i64 = row.try_get(3).map_err(store)?;
            let id = TxId {
                namespace: namespace.into(),
                generation: generation as u64,
                seq: seq as u64,
            };
            complete.push((id, u32::try_from(total).unwrap_or(u32::MAX)));
        }
        Ok(complete)
    }

    /// The number of parts of a transaction, if every part is staged.
    pub async fn complete(
        &self,
        namespace: &str,
        generation: u64,
        seq: u64,
    ) -> Result<Option<u32>, SinkError> {
        let d = self.inner.dialect;
        let store = |source| SinkError::Store {
            operation: "read staged parts",
            source,
        };
        // Counts first: reading every body on every part would make a transaction of n
        // parts cost n² bodies.
        let sql = format!(
            "SELECT COUNT(*), MAX(total), MAX(part) FROM {TABLE} WHERE namespace = {} \
             AND generation = {} AND seq = {}",
            d.placeholder(1),
            d.placeholder(2),
            d.placeholder(3)
        );
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(namespace)
            .bind(int(generation))
            .bind(int(seq))
            .fetch_one(&self.inner.pool)
            .await
            .map_err(store)?;
        let count: i64 = row.try_get(0).map_err(store)?;
        let total: Option<i64> = row.try_get(1).map_err(store)?;
        let last: Option<i64> = row.try_get(2).map_err(store)?;
        // Parts are distinct (the primary key) and counted from 0: `total` of them, none
        // at or above `total`, is exactly 0..total.
        match total {
            Some(total) if count == total && last < Some(total) => {
                Ok(Some(u32::try_from(total).unwrap_or(u32::MAX)))
            }
            _ => Ok(None),
        }
    }

    /// One staged part of a transaction (`None` once the transaction is applied and
    /// its parts deleted, or dead-lettered).
    pub async fn staged_part(&self, id: &TxId, part: u32) -> Result<Option<Envelope>, SinkError> {
        let mut conn = self
            .inner
            .pool
            .acquire()
            .await
            .map_err(|source| SinkError::Store {
                operation: "read staged parts",
                source,
            })?;
        load_part(&mut conn, self.inner.dialect, id, part).await
    }
}

/// One staged part, read with `conn` (inside the caller's transaction, if any).
pub(super) async fn load_part(
    conn: &mut AnyConnection,
    d: Dialect,
    id: &TxId,
    part: u32,
) -> Result<Option<Envelope>, SinkError> {
    let store = |source| SinkError::Store {
        operation: "read staged parts",
        source,
    };
    let sql = format!(
        "SELECT body FROM {TABLE} WHERE namespace = {} AND generation = {} AND seq = {} \
         AND part = {}",
        d.placeholder(1),
        d.placeholder(2),
        d.placeholder(3),
        d.placeholder(4)
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(id.namespace.to_string())
        .bind(int(id.generation))
        .bind(int(id.seq))
        .bind(i64::from(part))
        .fetch_optional(conn)
        .await
        .map_err(store)?;
    let Some(row) = row else { return Ok(None) };
    let body: String = row.try_get(0).map_err(store)?;
    let envelope = serde_json::from_str(&body).map_err(|error| SinkError::Rejected {
        table: TABLE.to_string(),
        reason: format!(
            "staged part {part} of seq {} ({}, generation {}) is not a readable envelope \
             ({error}); delete the transaction's rows from {TABLE} and have the publisher \
             resend it",
            id.seq, id.namespace, id.generation
        ),
    })?;
    Ok(Some(envelope))
}

/// Whether the transaction is applied: covered by the compacted watermark or recorded
/// in `kausal_applied`.
async fn is_applied(
    conn: &mut AnyConnection,
    d: Dialect,
    namespace: &str,
    generation: u64,
    seq: u64,
) -> Result<bool, SinkError> {
    let p: Vec<String> = (1..=6).map(|n| d.placeholder(n)).collect();
    let sql = format!(
        "SELECT 1 FROM kausal_progress WHERE namespace = {} AND generation = {} AND {} >= {} \
         UNION ALL SELECT 1 FROM kausal_applied WHERE namespace = {} AND generation = {} \
         AND seq = {}",
        p[0],
        p[1],
        d.quote("through"),
        p[2],
        p[3],
        p[4],
        p[5]
    );
    let found = sqlx::query(AssertSqlSafe(sql))
        .bind(namespace)
        .bind(int(generation))
        .bind(int(seq))
        .bind(namespace)
        .bind(int(generation))
        .bind(int(seq))
        .fetch_optional(conn)
        .await
        .map_err(|source| SinkError::Store {
            operation: "read applied",
            source,
        })?;
    Ok(found.is_some())
}

/// Deletes the staged parts of one transaction, inside the caller's transaction.
pub(super) async fn forget(
    conn: &mut AnyConnection,
    d: Dialect,
    namespace: &str,
    generation: u64,
    seq: u64,
) -> Result<(), SinkError> {
    delete(conn, d, namespace, generation, "=", seq).await
}

/// Deletes the staged parts of every transaction up to `through`, inside the caller's
/// transaction.
pub(super) async fn forget_through(
    conn: &mut AnyConnection,
    d: Dialect,
    namespace: &str,
    generation: u64,
    through: u64,
) -> Result<(), SinkError> {
    delete(conn, d, namespace, generation, "<=", through).await
}

async fn delete(
    conn: &mut AnyConnection,
    d: Dialect,
    namespace: &str,
    generation: u64,
    op: &str,
    seq: u64,
) -> Result<(), SinkError> {
    let sql = format!(
        "DELETE FROM {TABLE} WHERE namespace = {} AND generation = {} AND seq {op} {}",
        d.placeholder(1),
        d.placeholder(2),
        d.placeholder(3)
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(namespace)
        .bind(int(generation))
        .bind(int(seq))
        .execute(conn)
        .await
        .map_err(|source| SinkError::Store {
            operation: "delete staged parts",
            source,
        })?;
    Ok(())
}
