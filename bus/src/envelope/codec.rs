//! Envelopes to message bodies and back.
//!
//! Format 2, written by default: `KSL\x02{"envelopes":[…],"tables":[…]}`. Each table
//! schema the message's envelopes carry is written once, in `tables`, and an envelope's
//! `schemas` lists indices into it. Under load a message packs many envelopes that touch
//! the same tables; in format 1 each of them repeated every schema in full (about 40 %
//! of a pgbench message). A message stays self-contained: a subscriber that joins late,
//! or gets a message again after a redelivery or a publisher restart, decodes it alone,
//! with no state carried between messages.
//!
//! Format 1: `KSL\x01{"envelopes":[…]}`, every envelope with its schemas in full. Still
//! decoded, and written when a publisher is told to (`tuning.wire_format = 1`) while
//! subscribers older than format 2 still read its namespace.

use super::{Change, Context, DecodeError, Dep, Envelope, Snapshot, TableSchema};
use serde::{Deserialize, Serialize};

/// Magic prefix of every Kausal message body.
pub const MAGIC: &[u8; 3] = b"KSL";
/// Newest major version of the format this build reads, and the one it writes unless
/// told otherwise. A decoder refuses messages with a higher major version rather than
/// guess at their meaning.
pub const FORMAT_MAJOR: u8 = 2;

/// An envelope as format 2 writes it: the fields of [`Envelope`], borrowed, in the same
/// order, with the schemas as indices into the message's `tables`.
#[derive(Serialize)]
struct Out<'a> {
    namespace: &'a str,
    generation: u64,
    seq: u64,
    part: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    parts: Option<u32>,
    position: &'a str,
    commit_ts_us: i64,
    txid: &'a str,
    #[serde(skip_serializing_if = "no_context")]
    context: &'a Context,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    schemas: Vec<usize>,
    changes: &'a [Change],
    deps: &'a [Dep],
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<&'a Snapshot>,
}

fn no_context(c: &&Context) -> bool {
    c.is_empty()
}

/// An envelope as format 2 reads it.
#[derive(Deserialize)]
struct In {
    namespace: String,
    generation: u64,
    seq: u64,
    #[serde(default)]
    part: u32,
    #[serde(default)]
    parts: Option<u32>,
    position: String,
    commit_ts_us: i64,
    txid: String,
    #[serde(default)]
    context: Context,
    #[serde(default)]
    schemas: Vec<usize>,
    #[serde(default)]
    changes: Vec<Change>,
    #[serde(default)]
    deps: Vec<Dep>,
    #[serde(default)]
    snapshot: Option<Snapshot>,
}

#[derive(Deserialize)]
struct BatchV1 {
    envelopes: Vec<Envelope>,
}

#[derive(Deserialize)]
struct BatchV2 {
    envelopes: Vec<In>,
    #[serde(default)]
    tables: Vec<TableSchema>,
}

/// Builds one message body envelope by envelope, so a publisher knows the size of the
/// message it is filling.
pub struct BatchWriter {
    buf: Vec<u8>,
    count: usize,
    major: u8,
    /// Format 2: the schemas the message carries so far, each once.
    tables: Vec<TableSchema>,
    /// Their size as they will be written.
    tables_bytes: usize,
}

impl Default for BatchWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl BatchWriter {
    /// A message in the newest format ([`FORMAT_MAJOR`]).
    pub fn new() -> Self {
        Self::with_format(FORMAT_MAJOR)
    }

    /// A message in format `major`: 1, or anything else for the newest.
    pub fn with_format(major: u8) -> Self {
        let major = if major == 1 { 1 } else { FORMAT_MAJOR };
        let mut buf = Vec::with_capacity(4096);
        buf.extend_from_slice(MAGIC);
        buf.push(major);
        buf.extend_from_slice(b"{\"envelopes\":[");
        BatchWriter {
            buf,
            count: 0,
            major,
            tables: Vec::new(),
            tables_bytes: 0,
        }
    }

    pub fn push(&mut self, envelope: &Envelope) {
        if self.count > 0 {
            self.buf.push(b',');
        }
        // Serializing plain data structs into a Vec cannot fail.
        if self.major == 1 {
            serde_json::to_writer(&mut self.buf, envelope)
                .expect("envelope serialization is infallible");
        } else {
            let schemas = envelope.schemas.iter().map(|s| self.table(s)).collect();
            let out = Out {
                namespace: &envelope.namespace,
                generation: envelope.generation,
                seq: envelope.seq,
                part: envelope.part,
                parts: envelope.parts,
                position: &envelope.position,
                commit_ts_us: envelope.commit_ts_us,
                txid: &envelope.txid,
                context: &envelope.context,
                schemas,
                changes: &envelope.changes,
                deps: &envelope.deps,
                snapshot: envelope.snapshot.as_ref(),
            };
            serde_json::to_writer(&mut self.buf, &out)
                .expect("envelope serialization is infallible");
        }
        self.count += 1;
    }

    /// The index of `schema` in the message's tables, added if new.
    fn table(&mut self, schema: &TableSchema) -> usize {
        if let Some(i) = self.tables.iter().position(|t| t == schema) {
            return i;
        }
        self.tables_bytes += serde_json::to_vec(schema).map_or(0, |b| b.len()) + 1;
        self.tables.push(schema.clone());
        self.tables.len() - 1
    }

    pub fn count(&self) -> usize {
        self.count
    }

    /// The size of the message if it were finished now.
    pub fn bytes(&self) -> usize {
        match self.tables.len() {
            // `]}`
            0 => self.buf.len() + 2,
            // `],"tables":[` … `]}`; `tables_bytes` counts a separator per schema.
            _ => self.buf.len() + 13 + self.tables_bytes,
        }
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.push(b']');
        if !self.tables.is_empty() {
            self.buf.extend_from_slice(b",\"tables\":");
            serde_json::to_writer(&mut self.buf, &self.tables)
                .expect("schema serialization is infallible");
        }
        self.buf.push(b'}');
        self.buf
    }
}

/// Encodes one or more envelopes as one message body in the newest format.
pub fn encode(envelopes: &[Envelope]) -> Vec<u8> {
    encode_as(FORMAT_MAJOR, envelopes)
}

/// Encodes one or more envelopes as one message body in format `major` (1, or the
/// newest for anything else).
pub fn encode_as(major: u8, envelopes: &[Envelope]) -> Vec<u8> {
    let mut w = BatchWriter::with_format(major);
    for e in envelopes {
        w.push(e);
    }
    w.finish()
}

/// Decodes a message body of any format up to [`FORMAT_MAJOR`]. Never panics.
pub fn decode(bytes: &[u8]) -> Result<Vec<Envelope>, DecodeError> {
    if bytes.len() < 4 {
        if !bytes.is_empty() && !MAGIC.starts_with(&bytes[..bytes.len().min(3)]) {
            return Err(DecodeError::NotKausal);
        }
        return Err(DecodeError::Truncated { len: bytes.len() });
    }
    if &bytes[..3] != MAGIC {
        return Err(DecodeError::NotKausal);
    }
    let envelopes = match bytes[3] {
        0 | 1 => {
            serde_json::from_slice::<BatchV1>(&bytes[4..])
                .map_err(DecodeError::Malformed)?
                .envelopes
        }
        2 => {
            let batch: BatchV2 =
                serde_json::from_slice(&bytes[4..]).map_err(DecodeError::Malformed)?;
            let tables = batch.tables;
            batch
                .envelopes
                .into_iter()
                .map(|e| resolve(e, &tables))
                .collect::<Result<_, _>>()?
        }
        found => {
            return Err(DecodeError::NewerVersion {
                found,
                supported: FORMAT_MAJOR,
            })
        }
    };
    if envelopes.is_empty() {
        return Err(DecodeError::Empty);
    }
    Ok(envelopes)
}

/// A format-2 envelope with its schemas looked up in the message's tables.
fn resolve(e: In, tables: &[TableSchema]) -> Result<Envelope, DecodeError> {
    let schemas = e
        .schemas
        .iter()
        .map(|&index| {
            tables
                .get(index)
                .cloned()
                .ok_or(DecodeError::UnknownSchema {
                    seq: e.seq,
                    index,
                    tables: tables.len(),
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(Envelope {
        namespace: e.namespace,
        generation: e.generation,
        seq: e.seq,
        part: e.part,
        parts: e.parts,
        position: e.position,
        commit_ts_us: e.commit_ts_us,
        txid: e.txid,
        context: e.context,
        schemas,
        changes: e.changes,
        deps: e.deps,
        snapshot: e.snapshot,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Column, DepKind, Op};
    use serde_json::json;

    fn sample() -> Envelope {
        Envelope {
            namespace: "shop".into(),
            generation: 7,
            seq: 42,
            part: 0,
            parts: Some(1),
            position: "pg:0/16B3748".into(),
            commit_ts_us: 1_700_000_000_000_000,
            txid: "731".into(),
            context: Context {
                user: Some("alice".into()),
                sessions: vec!["user:1".into()],
                ..Context::default()
            },
            schemas: vec![],
            changes: vec![Change {
                op: Op::Insert,
                table: "users".into(),
                key: json!({"id": 1}).as_object().unwrap().clone(),
                old_key: None,
                new: Some(json!({"id": 1, "name": "Ann"}).as_object().unwrap().clone()),
                old: None,
                unchanged: vec![],
            }],
            deps: vec![Dep {
                k: 17,
                v: 3,
                kind: DepKind::Write,
                after: 40,
            }],
            snapshot: None,
        }
    }

    fn users(changed: bool) -> TableSchema {
        TableSchema {
            table: "users".into(),
            columns: vec![
                Column {
                    name: "id".into(),
                    type_name: "int4".into(),
                },
                Column {
                    name: "name".into(),
                    type_name: "text".into(),
                },
            ],
            key: vec!["id".into()],
            changed,
        }
    }

    fn with_schemas(seq: u64, schemas: Vec<TableSchema>) -> Envelope {
        Envelope {
            seq,
            schemas,
            ..sample()
        }
    }

    #[test]
    fn round_trips_a_batch_in_both_formats() {
        let batch = vec![
            with_schemas(42, vec![users(false)]),
            with_schemas(43, vec![]),
            with_schemas(44, vec![users(false)]),
        ];
        for major in [1, 2] {
            let bytes = encode_as(major, &batch);
            assert_eq!(bytes[3], major);
            assert_eq!(decode(&bytes).unwrap(), batch, "format {major}");
        }
        assert_eq!(encode(&batch)[3], FORMAT_MAJOR);
    }

    #[test]
    fn format_2_writes_each_schema_once_per_message() {
        let batch: Vec<Envelope> = (1..=20)
            .map(|s| with_schemas(s, vec![users(false)]))
            .collect();
        let (v1, v2) = (encode_as(1, &batch), encode_as(2, &batch));
        let text = String::from_utf8_lossy(&v2);
        assert_eq!(text.matches("\"columns\"").count(), 1, "{text}");
        assert_eq!(
            String::from_utf8_lossy(&v1).matches("\"columns\"").count(),
            20
        );
        assert!(v2.len() < v1.len());
        // A schema that changed within the message is a table entry of its own.
        let changed = vec![
            with_schemas(1, vec![users(false)]),
            with_schemas(2, vec![users(true)]),
        ];
        assert_eq!(decode(&encode(&changed)).unwrap(), changed);
    }

    #[test]
    fn a_writer_knows_the_size_of_its_message() {
        for major in [1, 2] {
            let mut w = BatchWriter::with_format(major);
            for seq in 1..=3 {
                w.push(&with_schemas(seq, vec![users(seq == 3)]));
                assert_eq!(w.bytes(), {
                    let mut copy = BatchWriter::with_format(major);
                    for s in 1..=seq {
                        copy.push(&with_schemas(s, vec![users(s == 3)]));
                    }
                    copy.finish().len()
                });
            }
            assert_eq!(w.count(), 3);
        }
    }

    /// Real message bodies, captured from `kausal tail` (format 1) and converted (format
    /// 2): every one decodes, and comes back the same through either encoder.
    #[test]
    fn captured_messages_of_both_formats_decode_and_round_trip() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../fuzz/seeds/decode_envelope");
        let mut seen = [0; 3];
        for entry in std::fs::read_dir(dir).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            let envelopes = decode(&bytes).unwrap();
            seen[usize::from(bytes[3])] += 1;
            for major in [1, 2] {
                assert_eq!(decode(&encode_as(major, &envelopes)).unwrap(), envelopes);
            }
        }
        assert!(
            seen[1] > 0 && seen[2] > 0,
            "seeds of both formats: {seen:?}"
        );
    }

    #[test]
    fn a_schema_reference_outside_the_message_is_refused() {
        let bytes = encode(&[with_schemas(42, vec![users(false)])]);
        let text = String::from_utf8(bytes[4..].to_vec()).unwrap();
        let broken = text.replace("\"schemas\":[0]", "\"schemas\":[1]");
        assert_ne!(broken, text);
        let mut bytes = b"KSL\x02".to_vec();
        bytes.extend(broken.into_bytes());
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::UnknownSchema {
                seq: 42,
                index: 1,
                tables: 1
            })
        ));
    }

    #[test]
    fn refuses_a_newer_major_version() {
        let mut bytes = encode(&[sample()]);
        bytes[3] = FORMAT_MAJOR + 1;
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::NewerVersion { found, .. }) if found == FORMAT_MAJOR + 1
        ));
    }

    #[test]
    fn refuses_truncated_and_foreign_bytes() {
        let bytes = encode(&[sample()]);
        for cut in [0, 2, 4, 10, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(decode(b"{\"a\":1}"), Err(DecodeError::NotKausal)));
        for major in [b'\x01', b'\x02'] {
            let mut bytes = b"KSL".to_vec();
            bytes.push(major);
            let mut malformed = bytes.clone();
            malformed.extend(b"[]");
            assert!(matches!(decode(&malformed), Err(DecodeError::Malformed(_))));
            bytes.extend(b"{\"envelopes\":[]}");
            assert!(matches!(decode(&bytes), Err(DecodeError::Empty)));
        }
    }

    #[test]
    fn floats_survive_the_round_trip_to_the_last_bit() {
        // Found by the fuzzer: without serde_json's float_roundtrip these came back 1 ulp off.
        for f in [1.13599760451127e77, 0.9529788629959415, f64::MAX, 5e-324] {
            let mut e = sample();
            e.changes[0]
                .new
                .as_mut()
                .unwrap()
                .insert("f".into(), json!(f));
            let back = decode(&encode(std::slice::from_ref(&e))).unwrap();
            assert_eq!(
                back[0].changes[0].new.as_ref().unwrap()["f"].as_f64(),
                Some(f)
            );
        }
    }

    #[test]
    fn ignores_unknown_fields_from_a_newer_minor_version() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["added_in_1_1"] = json!(true);
        let mut bytes = b"KSL\x01".to_vec();
        bytes.extend(serde_json::to_vec(&json!({"envelopes": [v], "more": 1})).unwrap());
        assert_eq!(decode(&bytes).unwrap(), vec![sample()]);
    }
}
