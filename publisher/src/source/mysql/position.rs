//! Where the binlog stream resumes: a MariaDB GTID state (the last transaction of each
//! replication domain) or, where transactions carry no usable GTID, a binlog file and
//! offset at a transaction boundary. Stored in the checkpoint as a text token.

use std::collections::BTreeMap;
use std::fmt;

/// A resume position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// MariaDB: domain → (server id, sequence number) of the last transaction read.
    Gtid(BTreeMap<u32, (u32, u64)>),
    /// Binlog file and the offset of the next event to read.
    File { file: String, pos: u64 },
}

impl Resume {
    /// Parses a checkpoint token: `gtid:0-1-42,1-2-7` or `file:mariadb-bin.000003:1234`.
    pub fn parse(token: &str) -> Option<Resume> {
        if let Some(list) = token.strip_prefix("gtid:") {
            let mut state = BTreeMap::new();
            for gtid in list.split(',').filter(|g| !g.trim().is_empty()) {
                let (domain, server, seq) = parse_gtid(gtid.trim())?;
                state.insert(domain, (server, seq));
            }
            return Some(Resume::Gtid(state));
        }
        let rest = token.strip_prefix("file:")?;
        let (file, pos) = rest.rsplit_once(':')?;
        Some(Resume::File {
            file: file.to_string(),
            pos: pos.parse().ok()?,
        })
    }

    /// MariaDB's `@slave_connect_state` for a GTID position.
    pub fn connect_state(&self) -> Option<String> {
        match self {
            Resume::Gtid(state) => Some(
                state
                    .iter()
                    .map(|(d, (s, n))| format!("{d}-{s}-{n}"))
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            Resume::File { .. } => None,
        }
    }
}

impl fmt::Display for Resume {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resume::Gtid(_) => write!(f, "gtid:{}", self.connect_state().unwrap_or_default()),
            Resume::File { file, pos } => write!(f, "file:{file}:{pos}"),
        }
    }
}

/// `domain-server-seq`.
pub fn parse_gtid(s: &str) -> Option<(u32, u32, u64)> {
    let mut it = s.split('-');
    let d = it.next()?.parse().ok()?;
    let sv = it.next()?.parse().ok()?;
    let n = it.next()?.parse().ok()?;
    it.next().is_none().then_some((d, sv, n))
}

/// A MariaDB GTID event (type 162), which `mysql_common` does not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MariadbGtid {
    pub seq: u64,
    pub domain: u32,
    /// The group is one statement without BEGIN/COMMIT (DDL, non-transactional engines).
    pub standalone: bool,
}

/// MariaDB GTID event type code.
pub const MARIADB_GTID_EVENT: u8 = 162;

/// Parses the body of a MariaDB GTID event: `seq_no` (8 bytes LE), `domain_id`
/// (4 bytes LE), flags (1 byte; bit 0 = standalone). Source: MariaDB Knowledge Base,
/// "GTID_EVENT".
pub fn parse_mariadb_gtid(body: &[u8]) -> Option<MariadbGtid> {
    let seq = u64::from_le_bytes(body.get(0..8)?.try_into().ok()?);
    let domain = u32::from_le_bytes(body.get(8..12)?.try_into().ok()?);
    let flags = *body.get(12)?;
    Some(MariadbGtid {
        seq,
        domain,
        standalone: flags & 1 != 0,
    })
}

/// The first (fake) rotate event of a stream can carry the 4 checksum bytes after the
/// file name (CRATES.md). File names are `[A-Za-z0-9._-]`: a tail with anything else is
/// the checksum. (Four checksum bytes that all look like name characters would slip
/// through: about 1 in 10^5.)
pub fn clean_binlog_name(raw: &[u8]) -> String {
    let name_byte = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    let raw = match raw.len().checked_sub(4) {
        Some(cut) if !raw[cut..].iter().all(name_byte) => &raw[..cut],
        _ => raw,
    };
    String::from_utf8_lossy(raw).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_tokens_round_trip() {
        for token in [
            "gtid:0-1-42",
            "gtid:0-1-42,3-2-7",
            "file:mariadb-bin.000003:1234",
        ] {
            assert_eq!(Resume::parse(token).unwrap().to_string(), token);
        }
        assert_eq!(
            Resume::parse("gtid:").unwrap(),
            Resume::Gtid(BTreeMap::new())
        );
        for bad in [
            "",
            "gtid:1-2",
            "gtid:a-b-c",
            "file:x",
            "file:x:y",
            "lsn:0/1",
        ] {
            assert_eq!(Resume::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn mariadb_gtid_events_parse() {
        let mut body = 77u64.to_le_bytes().to_vec();
        body.extend_from_slice(&3u32.to_le_bytes());
        body.push(1);
        body.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(
            parse_mariadb_gtid(&body),
            Some(MariadbGtid {
                seq: 77,
                domain: 3,
                standalone: true
            })
        );
        assert_eq!(parse_mariadb_gtid(&body[..12]), None);
    }

    #[test]
    fn binlog_names_lose_trailing_checksum_bytes() {
        assert_eq!(
            clean_binlog_name(b"mariadb-bin.000012\x8a\x01\xff\x00"),
            "mariadb-bin.000012"
        );
        assert_eq!(clean_binlog_name(b"binlog.000001"), "binlog.000001");
    }
}
