//! The publisher's checkpoint: source position, sequence state and dependency counters,
//! written together once RabbitMQ confirmed every envelope up to the position.
//!
//! A restart resumes from here and re-publishes the same envelopes byte for byte. Written
//! atomically (temp file, fsync, rename, fsync of the directory), so a crash leaves the
//! old or the new checkpoint, never a torn one. Binary little-endian with a checksum: the
//! counters can hold a million keys, and this is written every second.

use crate::tracker::{KeyState, TrackerState};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Version 1 had no resume token; version 2 appends it. Both are read.
const MAGIC_V1: &[u8; 8] = b"KSLCKPT1";
/// Version 2: version 1 with the resume token; keys sorted, FNV-1a checksum.
const MAGIC_V2: &[u8; 8] = b"KSLCKPT2";
/// Version 3, written: version 2 with the keys in any order and a CRC-32 checksum.
/// Sorting the key map and hashing it byte by byte were a quarter of the publisher's
/// CPU with a few 100k keys (BENCHMARKS.md); nothing needs a checkpoint's bytes to be
/// the same for the same state, only its content.
const MAGIC: &[u8; 8] = b"KSLCKPT3";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Source position up to which everything is published and confirmed (for
    /// Postgres: the end LSN of the last published transaction's commit).
    pub position: u64,
    /// Where the source resumes, for sources whose position is not a number (MySQL /
    /// MariaDB: `gtid:<domain-server-seq,...>` or `file:<binlog file>:<offset>`). Empty
    /// for Postgres.
    pub resume: String,
    pub state: TrackerState,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read checkpoint {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write checkpoint {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "checkpoint {path} is corrupt ({reason}); move it away to start a new generation \
         (subscribers then resynchronise)"
    )]
    Corrupt { path: PathBuf, reason: &'static str },
}

fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

pub fn encode(cp: &Checkpoint) -> Vec<u8> {
    let s = &cp.state;
    let mut out = Vec::with_capacity(48 + s.keys.len() * 36);
    out.extend_from_slice(MAGIC);
    for v in [
        cp.position,
        s.generation,
        u64::from(s.key_space),
        s.next_seq,
        s.keys.len() as u64,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for (k, st) in &s.keys {
        out.extend_from_slice(&k.to_le_bytes());
        for v in [st.rw, st.w, st.last_seq, st.last_write_seq] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mut schemas: Vec<_> = s.schemas.iter().collect();
    schemas.sort();
    out.extend_from_slice(&(schemas.len() as u64).to_le_bytes());
    for (table, fp) in schemas {
        out.extend_from_slice(&(table.len() as u32).to_le_bytes());
        out.extend_from_slice(table.as_bytes());
        out.extend_from_slice(&fp.to_le_bytes());
    }
    out.extend_from_slice(&(cp.resume.len() as u32).to_le_bytes());
    out.extend_from_slice(cp.resume.as_bytes());
    let sum = u64::from(crc32fast::hash(&out));
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

pub fn decode(bytes: &[u8]) -> Result<Checkpoint, &'static str> {
    if bytes.len() < MAGIC.len() + 8 {
        return Err("not a Kausal checkpoint");
    }
    let magic = &bytes[..8];
    if magic != MAGIC && magic != MAGIC_V2 && magic != MAGIC_V1 {
        return Err("not a Kausal checkpoint");
    }
    let v2 = magic != MAGIC_V1;
    let (body, sum) = bytes.split_at(bytes.len() - 8);
    let expected = if magic == MAGIC {
        u64::from(crc32fast::hash(body))
    } else {
        fnv64(body)
    };
    if expected != u64::from_le_bytes(sum.try_into().map_err(|_| "short")?) {
        return Err("checksum mismatch");
    }
    let mut p = &body[8..];
    let mut u64_ = || -> Result<u64, &'static str> {
        let (h, t) = p.split_at_checked(8).ok_or("truncated")?;
        p = t;
        Ok(u64::from_le_bytes(h.try_into().map_err(|_| "truncated")?))
    };
    let position = u64_()?;
    let generation = u64_()?;
    let key_space = u32::try_from(u64_()?).map_err(|_| "bad key space")?;
    let next_seq = u64_()?;
    let n = u64_()? as usize;
    let mut state = TrackerState::new(generation, key_space);
    state.next_seq = next_seq;
    state.keys.reserve(n.min(1 << 24));
    for _ in 0..n {
        let (k, t) = p.split_at_checked(4).ok_or("truncated")?;
        p = t;
        let k = u32::from_le_bytes(k.try_into().map_err(|_| "truncated")?);
        let mut next = || -> Result<u64, &'static str> {
            let (h, t) = p.split_at_checked(8).ok_or("truncated")?;
            p = t;
            Ok(u64::from_le_bytes(h.try_into().map_err(|_| "truncated")?))
        };
        let st = KeyState {
            rw: next()?,
            w: next()?,
            last_seq: next()?,
            last_write_seq: next()?,
        };
        state.keys.insert(k, st);
    }
    let (h, t) = p.split_at_checked(8).ok_or("truncated")?;
    p = t;
    let m = u64::from_le_bytes(h.try_into().map_err(|_| "truncated")?);
    for _ in 0..m {
        let (h, t) = p.split_at_checked(4).ok_or("truncated")?;
        let len = u32::from_le_bytes(h.try_into().map_err(|_| "truncated")?) as usize;
        let (name, t) = t.split_at_checked(len).ok_or("truncated")?;
        let (fp, t) = t.split_at_checked(8).ok_or("truncated")?;
        p = t;
        state.schemas.insert(
            String::from_utf8(name.to_vec()).map_err(|_| "bad table name")?,
            u64::from_le_bytes(fp.try_into().map_err(|_| "truncated")?),
        );
    }
    let mut resume = String::new();
    if v2 {
        let (h, t) = p.split_at_checked(4).ok_or("truncated")?;
        let len = u32::from_le_bytes(h.try_into().map_err(|_| "truncated")?) as usize;
        let (r, t) = t.split_at_checked(len).ok_or("truncated")?;
        p = t;
        resume = String::from_utf8(r.to_vec()).map_err(|_| "bad resume token")?;
    }
    if !p.is_empty() {
        return Err("trailing bytes");
    }
    Ok(Checkpoint {
        position,
        resume,
        state,
    })
}

/// Loads the checkpoint; `Ok(None)` if there is none.
pub fn load(path: &Path) -> Result<Option<Checkpoint>, CheckpointError> {
    match std::fs::read(path) {
        Ok(bytes) => decode(&bytes)
            .map(Some)
            .map_err(|reason| CheckpointError::Corrupt {
                path: path.to_path_buf(),
                reason,
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CheckpointError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes the checkpoint atomically and durably. Blocking: call from a blocking task.
pub fn save(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let err = |source| CheckpointError::Write {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(err)?;
    let tmp = path.with_extension("checkpoint.tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(bytes).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, path).map_err(err)?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(err)?;
    Ok(())
}

/// [`save`] of `cp` on a blocking thread, for async callers.
pub async fn persist(path: &Path, cp: Checkpoint) -> Result<(), CheckpointError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || save(&path, &encode(&cp)))
        .await
        .expect("checkpoint writer does not panic")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let mut state = TrackerState::new(77, 1 << 20);
        state.next_seq = 1234;
        for k in 0..100u32 {
            state.keys.insert(
                k * 7,
                KeyState {
                    rw: u64::from(k) + 3,
                    w: u64::from(k),
                    last_seq: 10,
                    last_write_seq: 9,
                },
            );
        }
        state.schemas.insert("users".into(), 42);
        Checkpoint {
            position: 0x16B3748,
            resume: "gtid:0-1-77".into(),
            state,
        }
    }

    #[test]
    fn round_trips() {
        let cp = sample();
        assert_eq!(&encode(&cp)[..8], MAGIC);
        assert_eq!(decode(&encode(&cp)).unwrap(), cp);
    }

    #[test]
    fn reads_version_two_checkpoints() {
        let cp = sample();
        // A version 2 file is a version 3 file with the FNV-1a checksum.
        let mut v2 = encode(&cp);
        v2.truncate(v2.len() - 8);
        v2[..8].copy_from_slice(MAGIC_V2);
        let sum = fnv64(&v2);
        v2.extend_from_slice(&sum.to_le_bytes());
        assert_eq!(decode(&v2).unwrap(), cp);
        // And its checksum is checked.
        let last = v2.len() - 9;
        v2[last] ^= 1;
        assert_eq!(decode(&v2), Err("checksum mismatch"));
    }

    #[test]
    fn reads_version_one_checkpoints() {
        let cp = Checkpoint {
            resume: String::new(),
            ..sample()
        };
        let mut v1 = encode(&cp);
        // A version 1 file is a version 2 file without the resume token.
        let body_end = v1.len() - 8 - 4;
        v1.truncate(body_end);
        v1[..8].copy_from_slice(MAGIC_V1);
        let sum = fnv64(&v1);
        v1.extend_from_slice(&sum.to_le_bytes());
        assert_eq!(decode(&v1).unwrap(), cp);
    }

    #[test]
    fn detects_corruption_and_truncation() {
        let bytes = encode(&sample());
        let mut flipped = bytes.clone();
        flipped[40] ^= 1;
        assert_eq!(decode(&flipped), Err("checksum mismatch"));
        for cut in [0, 7, 20, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn saves_and_loads_a_file() {
        let dir = std::env::temp_dir().join(format!("kausal-cp-{}", std::process::id()));
        let path = dir.join("x.checkpoint");
        assert_eq!(load(&path).unwrap(), None);
        save(&path, &encode(&sample())).unwrap();
        assert_eq!(load(&path).unwrap(), Some(sample()));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
