//! The collection's log: the source of truth for documents, chunks and vectors.
//!
//! Every write is one record, appended and `fdatasync`ed before it is acknowledged. A record
//! is `[u32 length][u32 crc32][payload]`; the payload is `[u64 seq][u8 kind][u32 json
//! length][json][f32 vectors, little-endian]`. A batch of documents is one record, so it is
//! present after a crash either whole or not at all. Replay stops at the first torn or
//! corrupt record (a write the crash interrupted, never acknowledged) and cuts it off.
//!
//! The HNSW graph and the tantivy index are derived from this log (see `collection.rs`).

use crate::error::{IndexError, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// A document as logged, with its chunks' layout (their vectors travel beside the JSON).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DocRecord {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub text: String,
    #[serde(default)]
    pub metadata: serde_json::Value,
    /// Hash of title, text, metadata and chunking settings: an upsert with the same hash
    /// changes nothing and is skipped.
    pub hash: u64,
    pub chunks: Vec<ChunkRecord>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct ChunkRecord {
    /// Collection-wide chunk key (never reused); the HNSW data id and the tantivy key.
    pub key: u64,
    pub byte_start: u32,
    pub byte_end: u32,
    pub char_start: u32,
    pub char_end: u32,
    pub tokens: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Documents replacing any previous version with the same id; `vectors` holds one
    /// vector per chunk, in order.
    Upsert { seq: u64, docs: Vec<DocRecord>, vectors: Vec<f32> },
    Delete { seq: u64, ids: Vec<String> },
    /// Written first in a compacted log: sequence and key counters carry on from here.
    Checkpoint { seq: u64, next_key: u64 },
}

impl Record {
    pub fn seq(&self) -> u64 {
        match self {
            Record::Upsert { seq, .. } | Record::Delete { seq, .. } | Record::Checkpoint { seq, .. } => *seq,
        }
    }
}

const KIND_UPSERT: u8 = 1;
const KIND_DELETE: u8 = 2;
const KIND_CHECKPOINT: u8 = 3;

#[derive(Serialize, Deserialize)]
struct CheckpointJson {
    next_key: u64,
}

pub fn encode(record: &Record) -> Vec<u8> {
    let (seq, kind, json, vectors): (u64, u8, Vec<u8>, &[f32]) = match record {
        Record::Upsert { seq, docs, vectors } => {
            (*seq, KIND_UPSERT, serde_json::to_vec(docs).expect("documents serialize"), vectors)
        }
        Record::Delete { seq, ids } => (*seq, KIND_DELETE, serde_json::to_vec(ids).expect("ids serialize"), &[]),
        Record::Checkpoint { seq, next_key } => (
            *seq,
            KIND_CHECKPOINT,
            serde_json::to_vec(&CheckpointJson { next_key: *next_key }).expect("checkpoint serializes"),
            &[],
        ),
    };
    let payload_len = 8 + 1 + 4 + json.len() + vectors.len() * 4;
    let mut out = Vec::with_capacity(8 + payload_len);
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(&(json.len() as u32).to_le_bytes());
    out.extend_from_slice(&json);
    for v in vectors {
        out.extend_from_slice(&v.to_le_bytes());
    }
    let crc = crc32fast::hash(&out[8..]);
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode(payload: &[u8]) -> Result<Record> {
    let bad = |m: &str| IndexError::Corrupt(format!("log record: {m}"));
    if payload.len() < 13 {
        return Err(bad("too short"));
    }
    let seq = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
    let kind = payload[8];
    let json_len = u32::from_le_bytes(payload[9..13].try_into().expect("4 bytes")) as usize;
    let json = payload.get(13..13 + json_len).ok_or_else(|| bad("json length"))?;
    let rest = &payload[13 + json_len..];
    match kind {
        KIND_UPSERT => {
            let docs: Vec<DocRecord> = serde_json::from_slice(json)?;
            if rest.len() % 4 != 0 {
                return Err(bad("vector bytes"));
            }
            let vectors = rest.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
            Ok(Record::Upsert { seq, docs, vectors })
        }
        KIND_DELETE => Ok(Record::Delete { seq, ids: serde_json::from_slice(json)? }),
        KIND_CHECKPOINT => {
            let c: CheckpointJson = serde_json::from_slice(json)?;
            Ok(Record::Checkpoint { seq, next_key: c.next_key })
        }
        k => Err(bad(&format!("unknown kind {k}"))),
    }
}

/// An open log, positioned at its end.
pub struct Wal {
    path: PathBuf,
    file: File,
    len: u64,
}

impl Wal {
    /// Opens (creating if needed) the log at `path`, replays every intact record into
    /// `apply`, cuts off a torn tail, and returns the log ready for appends.
    pub fn open(path: &Path, mut apply: impl FnMut(Record) -> Result<()>) -> Result<Wal> {
        let existed = path.exists();
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path)?;
        if !existed {
            sync_dir(path)?;
        }
        let total = file.metadata()?.len();
        let mut reader = BufReader::with_capacity(1 << 20, &mut file);
        let mut valid: u64 = 0;
        let mut header = [0u8; 8];
        let mut payload = Vec::new();
        loop {
            if read_full(&mut reader, &mut header)? < 8 {
                break;
            }
            let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as u64;
            let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
            if valid + 8 + len > total {
                break;
            }
            payload.resize(len as usize, 0);
            if read_full(&mut reader, &mut payload)? < payload.len() || crc32fast::hash(&payload) != crc {
                break;
            }
            match decode(&payload) {
                Ok(record) => apply(record)?,
                Err(e) => {
                    tracing::warn!(log = %path.display(), offset = valid, error = %e, "undecodable log record");
                    break;
                }
            }
            valid += 8 + len;
        }
        drop(reader);
        if valid < total {
            tracing::warn!(
                log = %path.display(),
                kept = valid,
                dropped = total - valid,
                "log ends in a torn or corrupt record (a write interrupted before it was acknowledged); cutting it off"
            );
            file.set_len(valid)?;
            file.sync_all()?;
        }
        Ok(Wal { path: path.to_path_buf(), file, len: valid })
    }

    /// Appends one record and makes it durable.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        let bytes = encode(record);
        if let Err(e) = self.file.write_all(&bytes).and_then(|_| self.file.sync_data()) {
            // Leave no partial record behind for the next append to follow.
            let _ = self.file.set_len(self.len);
            return Err(e.into());
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes a whole new log to `path` (through a temporary file, fsynced and renamed, so a
/// crash leaves either the old or the new log).
pub fn write_log(path: &Path, records: impl IntoIterator<Item = Record>) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut w = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        for r in records {
            w.write_all(&encode(&r))?;
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Writes a small file atomically (temporary file, fsync, rename, fsync of the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// fsyncs the directory holding `path`, so that a created or renamed file survives a crash.
pub fn sync_dir(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, key: u64) -> DocRecord {
        DocRecord {
            id: id.into(),
            title: Some("T".into()),
            text: "hello".into(),
            metadata: serde_json::json!({"a": 1}),
            hash: 7,
            chunks: vec![ChunkRecord { key, byte_start: 0, byte_end: 5, char_start: 0, char_end: 5, tokens: 1 }],
        }
    }

    fn replay(path: &Path) -> Vec<Record> {
        let mut out = Vec::new();
        Wal::open(path, |r| {
            out.push(r);
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn records_round_trip_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.wal");
        let a = Record::Upsert { seq: 1, docs: vec![doc("a", 0)], vectors: vec![0.5, -1.0] };
        let b = Record::Delete { seq: 2, ids: vec!["a".into()] };
        {
            let mut wal = Wal::open(&path, |_| Ok(())).unwrap();
            wal.append(&a).unwrap();
            wal.append(&b).unwrap();
        }
        assert_eq!(replay(&path), vec![a.clone(), b.clone()]);
        // A crash in the middle of a third append leaves half a record.
        let c = encode(&Record::Upsert { seq: 3, docs: vec![doc("c", 1)], vectors: vec![1.0; 8] });
        let good = std::fs::metadata(&path).unwrap().len();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&c[..c.len() / 2]).unwrap();
        drop(f);
        assert_eq!(replay(&path), vec![a.clone(), b.clone()]);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good, "the torn tail is cut off");
        // A flipped byte in the last record is caught by its checksum.
        let mut wal = Wal::open(&path, |_| Ok(())).unwrap();
        wal.append(&Record::Checkpoint { seq: 4, next_key: 9 }).unwrap();
        drop(wal);
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 2;
        bytes[last] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(replay(&path), vec![a, b]);
    }
}
