//! Helpers of the bootstrap tests: the store's bootstrap bookkeeping.

use std::time::Duration;

/// `(table, done, rows_applied)` of the store's bootstraps.
pub async fn bootstraps(store: &sqlx::AnyPool) -> Vec<(String, i32, i64)> {
    use sqlx::Row;
    sqlx::query("SELECT tbl, done, rows_applied FROM kausal_bootstrap ORDER BY tbl")
        .fetch_all(store)
        .await
        .map(|rows| {
            rows.iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect()
        })
        .unwrap_or_default()
}

/// The subscriber's SQLite store, once it has created its bookkeeping.
pub async fn sqlite_store(url: &str) -> sqlx::AnyPool {
    sqlx::any::install_default_drivers();
    for _ in 0..100 {
        if let Ok(pool) = sqlx::AnyPool::connect(url).await {
            if sqlx::query("SELECT 1 FROM kausal_bootstrap")
                .fetch_optional(&pool)
                .await
                .is_ok()
            {
                return pool;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the subscriber never created its store at {url}");
}
