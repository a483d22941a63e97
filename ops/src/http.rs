//! The operations endpoint: `GET /metrics` (Prometheus text format) and `GET /status`
//! (JSON), and a client for `/status`.
//!
//! Written on tokio directly, not with an HTTP framework: two read-only routes on a
//! loopback or cluster-internal port need request-line parsing and a response header,
//! while hyper + a router would add a dozen crates to every build of both binaries.
//! Requests are bounded (8 KiB of head, 5 s to send it), so a stuck or hostile client
//! costs one short-lived task.

use crate::Metrics;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "cannot listen on {addr} for the metrics endpoint: is another process using it? \
         Set another `[metrics] listen` address"
    )]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "`[metrics] listen = \"{addr}\"` is not an address: write host:port \
         (\"127.0.0.1:9464\"), host:0 for any free port, or a range host:first-last \
         (\"127.0.0.1:9464-9471\") for several processes on one host"
    )]
    Address { addr: String },
    #[error(
        "every port of {addr} is in use for the metrics endpoint: widen the range of \
         `[metrics] listen` (one port per process on this host)"
    )]
    RangeFull { addr: String },
    #[error("cannot reach the status endpoint at {addr}: is the process running with `[metrics] listen = \"{addr}\"`?")]
    Unreachable {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the endpoint at {addr} answered {status:?}, not 200")]
    Status { addr: String, status: String },
    #[error("the endpoint at {addr} did not answer within {seconds} s")]
    Timeout { addr: String, seconds: u64 },
}

/// What the endpoint serves: the process's metrics and its live status.
#[derive(Clone)]
pub struct Endpoint {
    pub metrics: Metrics,
    pub status: Arc<dyn Fn() -> serde_json::Value + Send + Sync>,
}

/// Ports a range may span: more processes than this on one host is a configuration
/// mistake (and a client scanning the range for a publisher stays quick).
const MAX_RANGE: u16 = 256;

/// The addresses `listen` stands for: itself, or each port of `host:first-last`, in
/// order. Several processes given the same configuration on one host each take the
/// first free port of a range.
pub fn addresses(listen: &str) -> Result<Vec<String>, HttpError> {
    let bad = || HttpError::Address {
        addr: listen.to_string(),
    };
    let (host, ports) = listen.rsplit_once(':').ok_or_else(bad)?;
    let Some((first, last)) = ports.split_once('-') else {
        ports.parse::<u16>().map_err(|_| bad())?;
        return Ok(vec![listen.to_string()]);
    };
    let first: u16 = first.trim().parse().map_err(|_| bad())?;
    let last: u16 = last.trim().parse().map_err(|_| bad())?;
    if host.is_empty() || first == 0 || last < first || last - first >= MAX_RANGE {
        return Err(bad());
    }
    Ok((first..=last)
        .map(|port| format!("{host}:{port}"))
        .collect())
}

/// Binds `addr` (or the first free port of a range, see [`addresses`]) and serves the
/// endpoint until the returned task is aborted. Binding happens before this returns,
/// so a taken port is an error at start, not a log line. The bound address is logged
/// and returned (the status shows it: with a range or port 0 only the process knows).
pub async fn serve(
    addr: &str,
    endpoint: Endpoint,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HttpError> {
    let candidates = addresses(addr)?;
    let ranged = candidates.len() > 1;
    let mut bound = None;
    for candidate in &candidates {
        match TcpListener::bind(candidate).await {
            Ok(listener) => {
                bound = Some(listener);
                break;
            }
            Err(e) if ranged && e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(source) => {
                return Err(HttpError::Bind {
                    addr: candidate.clone(),
                    source,
                })
            }
        }
    }
    let listener = bound.ok_or_else(|| HttpError::RangeFull {
        addr: addr.to_string(),
    })?;
    let local = listener.local_addr().map_err(|source| HttpError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    tracing::info!(listen = %local, "serving /metrics and /status");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                // Out of file descriptors and the like: try again shortly.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let endpoint = endpoint.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(READ_TIMEOUT, answer(stream, &endpoint)).await;
            });
        }
    });
    Ok((local, task))
}

async fn answer(mut stream: TcpStream, endpoint: &Endpoint) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            endpoint.metrics.encode(),
        ),
        ("GET", "/status") => (
            "200 OK",
            "application/json",
            (endpoint.status)().to_string(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /status\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// `GET http://addr/path`: the body of a 200 answer.
pub async fn get(addr: &str, path: &str) -> Result<String, HttpError> {
    let seconds = 3;
    let work = async {
        let mut stream =
            TcpStream::connect(addr)
                .await
                .map_err(|source| HttpError::Unreachable {
                    addr: addr.to_string(),
                    source,
                })?;
        let request = format!("GET {path} HTTP/1.0\r\nhost: {addr}\r\n\r\n");
        let io = |source| HttpError::Unreachable {
            addr: addr.to_string(),
            source,
        };
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.map_err(io)?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status_line = head.lines().next().unwrap_or("").to_string();
        if status_line.split_whitespace().nth(1) != Some("200") {
            return Err(HttpError::Status {
                addr: addr.to_string(),
                status: status_line,
            });
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(seconds), work)
        .await
        .unwrap_or(Err(HttpError::Timeout {
            addr: addr.to_string(),
            seconds,
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_metrics_and_status_and_refuses_other_paths() {
        let metrics = Metrics::default();
        metrics.counter("test_things", "Things.").inc();
        let endpoint = Endpoint {
            metrics,
            status: Arc::new(|| serde_json::json!({"ok": true})),
        };
        let (addr, task) = serve("127.0.0.1:0", endpoint).await.unwrap();
        let addr = addr.to_string();
        let text = get(&addr, "/metrics").await.unwrap();
        assert!(text.contains("kausal_test_things_total 1"), "{text}");
        assert_eq!(get(&addr, "/status").await.unwrap(), r#"{"ok":true}"#);
        let err = get(&addr, "/nope").await.unwrap_err();
        assert!(err.to_string().contains("404"), "{err}");
        task.abort();
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_naming_the_setting() {
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = held.local_addr().unwrap().to_string();
        let endpoint = Endpoint {
            metrics: Metrics::default(),
            status: Arc::new(|| serde_json::Value::Null),
        };
        let err = serve(&addr, endpoint).await.unwrap_err();
        assert!(err.to_string().contains("[metrics] listen"), "{err}");
    }

    fn endpoint() -> Endpoint {
        Endpoint {
            metrics: Metrics::default(),
            status: Arc::new(|| serde_json::Value::Null),
        }
    }

    #[tokio::test]
    async fn processes_sharing_a_range_each_take_the_next_free_port() {
        // Two ports next to each other, the lower one taken by someone else.
        let (held, port) = loop {
            let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = held.local_addr().unwrap().port();
            if port < u16::MAX - 2
                && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok()
                && std::net::TcpListener::bind(("127.0.0.1", port + 2)).is_ok()
            {
                break (held, port);
            }
        };
        let range = format!("127.0.0.1:{port}-{}", port + 2);
        let (first, a) = serve(&range, endpoint()).await.unwrap();
        let (second, b) = serve(&range, endpoint()).await.unwrap();
        assert_eq!(first.port(), port + 1);
        assert_eq!(second.port(), port + 2);
        let err = serve(&range, endpoint()).await.unwrap_err();
        assert!(err.to_string().contains("widen the range"), "{err}");
        drop(held);
        a.abort();
        b.abort();
    }

    #[test]
    fn a_listen_address_that_is_not_one_is_refused_with_the_forms_it_takes() {
        assert_eq!(addresses("127.0.0.1:9464").unwrap(), ["127.0.0.1:9464"]);
        assert_eq!(
            addresses("[::1]:9464-9465").unwrap(),
            ["[::1]:9464", "[::1]:9465"]
        );
        for bad in [
            "9464",
            "127.0.0.1:94a",
            "127.0.0.1:9465-9464",
            "127.0.0.1:1-9999",
            ":1-2",
        ] {
            let err = addresses(bad).unwrap_err().to_string();
            assert!(err.contains("host:first-last"), "{bad}: {err}");
        }
    }
}
