//! TLS of the subscriber's own connections: Redis (coordination, the Redis sink) and the
//! SQL store. The broker's is in `kausal_bus::amqp`, the shared rules (no plaintext
//! fallback, CA files, hints) in `kausal_bus::tls`.
//!
//! - Redis: `rediss://host:port` is TLS; `?cacert=<PEM file>` names the CA (the name of
//!   `redis-cli --cacert`), otherwise the Mozilla roots are trusted.
//! - SQL store: libpq's `sslmode`/`sslrootcert` for Postgres, `ssl-mode`/`ssl-ca` for
//!   MySQL/MariaDB; the mode is always written out for sqlx, whose own default
//!   (`prefer`) could connect unencrypted without telling.

use kausal_bus::tls::{read_ca_file, take_params, TlsSettingsError, UrlTls};

/// Why a Redis client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RedisClientError {
    #[error(transparent)]
    Settings(#[from] TlsSettingsError),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// A Redis client for `url`, with TLS when the URL is `rediss://`.
pub fn redis_client(url: &str) -> Result<redis::Client, RedisClientError> {
    let (url, taken) = take_params(url, &["cacert"]);
    let ca = taken.into_iter().next().flatten();
    if !url.starts_with("rediss://") {
        if ca.is_some() {
            return Err(TlsSettingsError::CaWithoutTls {
                param: "cacert",
                fix: "use a rediss:// URL (Redis's TLS port)",
            }
            .into());
        }
        return Ok(redis::Client::open(url.as_str())?);
    }
    kausal_bus::tls::install_crypto_provider();
    let root_cert = match ca {
        Some(path) => Some(read_ca_file("cacert", std::path::Path::new(&path))?.into_bytes()),
        None => None,
    };
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert,
    };
    Ok(redis::Client::build_with_tls(url.as_str(), certs)?)
}

/// The store URL as sqlx gets it: TLS mode explicit, CA file checked. SQLite URLs pass.
pub fn store_url(url: &str) -> Result<String, TlsSettingsError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (rest, tls) = UrlTls::take_postgres(url)?;
        Ok(tls.postgres_url(&rest))
    } else if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        let (rest, tls) = UrlTls::take_mysql(url)?;
        Ok(tls.mysql_url(&rest))
    } else {
        Ok(url.to_string())
    }
}

/// Checks the CA file a MongoDB URL names (`tlsCAFile`), so a wrong path is reported as
/// such and not as an unreachable server.
pub fn check_mongo_url(url: &str) -> Result<(), TlsSettingsError> {
    let (_, taken) = take_params(url, &["tlsCAFile"]);
    if let Some(path) = taken.into_iter().next().flatten() {
        read_ca_file("tlsCAFile", std::path::Path::new(&path))?;
    }
    kausal_bus::tls::install_crypto_provider();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_always_name_their_tls_mode() {
        assert_eq!(
            store_url("postgres://u@h/db").unwrap(),
            "postgres://u@h/db?sslmode=disable"
        );
        assert_eq!(
            store_url("mysql://u@h/db?x=1").unwrap(),
            "mysql://u@h/db?x=1&ssl-mode=DISABLED"
        );
        assert!(store_url("postgres://u@h/db?sslmode=prefer").is_err());
        assert_eq!(store_url("sqlite://x.db").unwrap(), "sqlite://x.db");
    }

    #[test]
    fn a_ca_file_on_a_plain_redis_url_is_refused() {
        let e = redis_client("redis://h:6379?cacert=/x.pem").unwrap_err();
        assert!(e.to_string().contains("rediss://"), "{e}");
    }
}
