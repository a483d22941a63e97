//! Decoder for the `pgoutput` logical replication messages that `pgwire-replication`
//! hands us raw (protocol version 1): Relation, Type, Origin, Insert, Update, Delete and
//! Truncate. Begin, Commit and Message are decoded by the crate itself. Row changes come
//! out in the shared vocabulary ([`crate::source::change`]); only Relation is ours.
//!
//! Format: PostgreSQL manual, "Logical Replication Message Formats". Every read is
//! bounds-checked; malformed input is a [`ProtocolError`], never a panic.

use crate::source::change::{Datum, OldKind, RowChange};

/// A malformed pgoutput message.
#[derive(Debug, thiserror::Error)]
#[error("malformed pgoutput {what}: {detail}")]
pub struct ProtocolError {
    pub what: &'static str,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

/// One decoded pgoutput message.
#[derive(Debug)]
pub enum Message<'a> {
    Relation(Relation),
    Row(RowChange<'a>),
    /// Type, Origin, and anything a later protocol adds: nothing we act on.
    Ignored(u8),
}

struct Reader<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn err(&self, detail: impl Into<String>) -> ProtocolError {
        ProtocolError {
            what: self.what,
            detail: detail.into(),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtocolError> {
        if self.buf.len() < n {
            return Err(self.err(format!("needs {n} more bytes, has {}", self.buf.len())));
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.take(1)?[0])
    }
    fn i16(&mut self) -> Result<i16, ProtocolError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }
    fn i32(&mut self) -> Result<i32, ProtocolError> {
        let b = self.take(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(self.i32()? as u32)
    }
    fn cstr(&mut self) -> Result<String, ProtocolError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.err("unterminated string"))?;
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }
    fn tuple(&mut self) -> Result<Vec<Datum<'a>>, ProtocolError> {
        let n = self.i16()?;
        if n < 0 {
            return Err(self.err("negative column count"));
        }
        let mut out = Vec::with_capacity(n as usize);
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' | b'b' => {
                    let len = self.i32()?;
                    if len < 0 {
                        return Err(self.err("negative value length"));
                    }
                    Datum::Text(self.take(len as usize)?)
                }
                other => return Err(self.err(format!("unknown tuple column kind {other:#x}"))),
            });
        }
        Ok(out)
    }
    fn old_tuple(&mut self, tag: u8) -> Result<(OldKind, Vec<Datum<'a>>), ProtocolError> {
        let kind = match tag {
            b'K' => OldKind::Key,
            b'O' => OldKind::Full,
            other => return Err(self.err(format!("unexpected tuple tag {other:#x}"))),
        };
        Ok((kind, self.tuple()?))
    }
}

/// Decodes one pgoutput message.
pub fn decode(data: &[u8]) -> Result<Message<'_>, ProtocolError> {
    let Some((&tag, rest)) = data.split_first() else {
        return Err(ProtocolError {
            what: "message",
            detail: "empty".into(),
        });
    };
    let what = match tag {
        b'R' => "relation",
        b'I' => "insert",
        b'U' => "update",
        b'D' => "delete",
        b'T' => "truncate",
        _ => return Ok(Message::Ignored(tag)),
    };
    let mut r = Reader { buf: rest, what };
    Ok(match tag {
        b'R' => {
            let oid = r.u32()?;
            let schema = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n.max(0) {
                let flags = r.u8()?;
                columns.push(RelationColumn {
                    key: flags & 1 == 1,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation(Relation {
                oid,
                schema,
                name,
                replica_identity,
                columns,
            })
        }
        b'I' => {
            let rel = r.u32()?;
            match r.u8()? {
                b'N' => Message::Row(RowChange::Insert {
                    rel,
                    new: r.tuple()?,
                }),
                other => return Err(r.err(format!("expected N, got {other:#x}"))),
            }
        }
        b'U' => {
            let rel = r.u32()?;
            let mut tag = r.u8()?;
            let mut old = None;
            if tag == b'K' || tag == b'O' {
                old = Some(r.old_tuple(tag)?);
                tag = r.u8()?;
            }
            if tag != b'N' {
                return Err(r.err(format!("expected N, got {tag:#x}")));
            }
            Message::Row(RowChange::Update {
                rel,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let rel = r.u32()?;
            let tag = r.u8()?;
            Message::Row(RowChange::Delete {
                rel,
                old: r.old_tuple(tag)?,
            })
        }
        b'T' => {
            let n = r.i32()?;
            let _options = r.u8()?;
            if n < 0 {
                return Err(r.err("negative relation count"));
            }
            let mut rels = Vec::with_capacity((n as usize).min(1024));
            for _ in 0..n {
                rels.push(r.u32()?);
            }
            Message::Row(RowChange::Truncate { rels })
        }
        _ => unreachable!("tags filtered above"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(cols: &[Option<&str>]) -> Vec<u8> {
        let mut out = (cols.len() as i16).to_be_bytes().to_vec();
        for c in cols {
            match c {
                None => out.push(b'n'),
                Some("\u{0}u") => out.push(b'u'),
                Some(v) => {
                    out.push(b't');
                    out.extend((v.len() as i32).to_be_bytes());
                    out.extend(v.as_bytes());
                }
            }
        }
        out
    }

    #[test]
    fn decodes_an_update_with_a_full_old_row_and_an_unchanged_toast() {
        let mut msg = vec![b'U'];
        msg.extend(16384u32.to_be_bytes());
        msg.push(b'O');
        msg.extend(tuple(&[Some("1"), Some("long")]));
        msg.push(b'N');
        msg.extend(tuple(&[Some("1"), Some("\u{0}u")]));
        let Message::Row(RowChange::Update { rel, old, new }) = decode(&msg).unwrap() else {
            panic!("not an update")
        };
        assert_eq!(rel, 16384);
        assert_eq!(old.unwrap().0, OldKind::Full);
        assert_eq!(new, vec![Datum::Text(b"1"), Datum::Unchanged]);
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let mut msg = vec![b'I'];
        msg.extend(1u32.to_be_bytes());
        msg.push(b'N');
        msg.extend(tuple(&[Some("hello")]));
        for cut in 0..msg.len() {
            assert!(decode(&msg[..cut]).is_err(), "cut {cut}");
        }
        assert!(decode(&msg).is_ok());
    }
}
