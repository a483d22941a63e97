//! Redis behind Sentinel: `coordination.url = "redis+sentinel://host:26379,host:26380,
//! host:26381/<master name>"`. The master is asked of the sentinels at connect, and again
//! after a command failed in a way a failover explains (the connection refused or
//! dropped, or the node answering READONLY because it was demoted to a replica).
//! The redis crate's `Sentinel` does the asking; this keeps the URL form and the rule
//! of when to ask again.

/// The sentinels of one master.
pub(super) struct Sentinels {
    /// `redis://host:port` of each sentinel.
    addrs: Vec<String>,
    master: String,
}

/// The URL scheme naming sentinels instead of a Redis server.
const SCHEME: &str = "redis+sentinel://";

impl Sentinels {
    /// `None` when `url` is not a sentinel URL; an error naming the form when it is
    /// one but malformed.
    pub(super) fn parse(url: &str) -> Option<Result<Sentinels, String>> {
        let rest = url.strip_prefix(SCHEME)?;
        let bad = || {
            format!(
                "coordination.url {url:?}: write {SCHEME}host:port[,host:port…]/<master name> \
                 (the sentinels and the name they monitor the master under)"
            )
        };
        let Some((hosts, master)) = rest.split_once('/') else {
            return Some(Err(bad()));
        };
        let master = master.trim_end_matches('/');
        let addrs: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("redis://{h}"))
            .collect();
        if addrs.is_empty() || master.is_empty() || master.contains('/') {
            return Some(Err(bad()));
        }
        Some(Ok(Sentinels {
            addrs,
            master: master.to_string(),
        }))
    }

    /// A client for the current master, as the sentinels report it (the crate checks
    /// that the node considers itself master).
    pub(super) async fn master(&self) -> redis::RedisResult<redis::Client> {
        let mut sentinel = redis::sentinel::Sentinel::build(self.addrs.clone())?;
        sentinel.async_master_for(&self.master, None).await
    }
}

/// Whether `error` may mean the master moved: ask the sentinels again.
pub(super) fn master_may_have_moved(error: &redis::RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_refusal()
        || error.is_connection_dropped()
        || error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sentinel_url_names_the_sentinels_and_the_master() {
        let s = Sentinels::parse("redis+sentinel://a:26379, b:26380/kausal")
            .expect("a sentinel URL")
            .expect("valid");
        assert_eq!(s.addrs, ["redis://a:26379", "redis://b:26380"]);
        assert_eq!(s.master, "kausal");
        assert!(Sentinels::parse("redis://127.0.0.1:6379").is_none());
        for bad in [
            "redis+sentinel://a:1",
            "redis+sentinel:///m",
            "redis+sentinel://a:1/",
        ] {
            let err = Sentinels::parse(bad).expect("a sentinel URL").err();
            assert!(err.is_some_and(|e| e.contains("<master name>")), "{bad}");
        }
    }
}
