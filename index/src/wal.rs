//! The collection's log: the source of truth for documents, chunks and vectors.
//!
//! Every write is one record, appended and `fdatasync`ed before it is acknowledged. A record
//! is `[u32 length][u32 crc32][payload]`; the payload is `[u64 seq][u8 kind][u32 json
//! length][json][f32 vectors, little-endian]`. A batch of documents is one record, so it is
//! present after a crash either whole or not at all.
//!
//! Replay stops at the first torn or corrupt record. Since records are appended one at a time
//! and each is fsynced before the next, a crash can only damage the *last* one: a bad record
//! with no intact record after it is a torn tail (never acknowledged) and is cut off. A bad
//! record followed by intact ones is damage to acknowledged data (a disk fault, a stray
//! write): opening refuses with [`IndexError::Corrupt`] naming the offset, and
//! [`repair`] (`ragway repair`) cuts the log there only when asked, after keeping a backup.
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
    Upsert {
        seq: u64,
        docs: Vec<DocRecord>,
        vectors: Vec<f32>,
    },
    Delete {
        seq: u64,
        ids: Vec<String>,
    },
    /// Written first in a compacted log: sequence and key counters carry on from here.
    Checkpoint {
        seq: u64,
        next_key: u64,
    },
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

/// Where a saved state (graph and chunk table) ends in the log: the end of the last record
/// it covers, and that record's start, checksum and sequence number, which identify it. A
/// log rewritten since (by a compaction or a restore) does not match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogMark {
    pub end: u64,
    pub last_start: u64,
    pub last_crc: u32,
    pub last_seq: u64,
}

impl LogMark {
    fn of(start: u64, bytes: &[u8], seq: u64) -> LogMark {
        let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        LogMark { end: start + bytes.len() as u64, last_start: start, last_crc: crc, last_seq: seq }
    }
}

/// An open log, positioned at its end.
pub struct Wal {
    path: PathBuf,
    file: File,
    len: u64,
    /// The last record (`None` while the log is empty).
    last: Option<LogMark>,
    /// Set when a failure left the file's end unknown: every later append is refused, so
    /// nothing is acknowledged that a restart could not read back.
    broken: Option<String>,
}

impl Wal {
    /// Opens (creating if needed) the log at `path`, replays every intact record into
    /// `apply`, cuts off a torn tail, and returns the log ready for appends. Damage before
    /// the tail is an error (see the module docs).
    pub fn open(path: &Path, apply: impl FnMut(Record) -> Result<()>) -> Result<Wal> {
        Ok(Self::open_after(path, None, apply)?.expect("a replay from the start has no mark to miss"))
    }

    /// [`Wal::open`], replaying only the records after `mark` (all of them when `None`).
    /// Answers `None`, having replayed nothing, when the log does not hold the record the
    /// mark names where it says: the saved state belongs to another log.
    pub fn open_after(
        path: &Path,
        mark: Option<LogMark>,
        apply: impl FnMut(Record) -> Result<()>,
    ) -> Result<Option<Wal>> {
        let existed = path.exists();
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(path)?;
        if !existed {
            sync_dir(path)?;
        }
        if let Some(mark) = mark {
            if !mark_matches(&mut file, &mark)? {
                return Ok(None);
            }
        }
        let scan = scan(&mut file, mark, apply)?;
        if scan.valid < scan.total {
            if let Some(next) = scan.intact_after {
                return Err(IndexError::Corrupt(format!(
                    "{}: the record at byte {} is damaged but intact records follow it (at byte {next}), so \
                     acknowledged writes would be lost by cutting it; refusing to open. Restore the \
                     collection from a snapshot, or run `ragway repair --data-dir <dir> <collection>` to \
                     keep a backup of the log and cut it at byte {}",
                    path.display(),
                    scan.valid,
                    scan.valid
                )));
            }
            tracing::warn!(
                log = %path.display(),
                kept = scan.valid,
                dropped = scan.total - scan.valid,
                "log ends in a torn record (a write interrupted before it was acknowledged); cutting it off"
            );
            truncate(&file, scan.valid)?;
        }
        Ok(Some(Wal { path: path.to_path_buf(), file, len: scan.valid, last: scan.last, broken: None }))
    }

    /// The position of the last record, for a saved state that covers the log so far.
    pub fn mark(&self) -> Option<LogMark> {
        self.last
    }

    /// Appends one record and makes it durable.
    pub fn append(&mut self, record: &Record) -> Result<()> {
        if let Some(why) = &self.broken {
            return Err(IndexError::Corrupt(format!(
                "{}: {why}; restart to reopen the collection",
                self.path.display()
            )));
        }
        let bytes = encode(record);
        if let Err(e) = self.file.write_all(&bytes).and_then(|_| self.file.sync_data()) {
            // Leave no partial record behind for the next append to follow. If even that
            // fails the log's end is unknown: the log is broken until it is reopened.
            if let Err(cut) = self.file.set_len(self.len).and_then(|_| self.file.sync_all()) {
                let why = format!("an append failed ({e}) and cutting the partial record failed too ({cut})");
                self.broken = Some(why.clone());
                return Err(IndexError::Corrupt(format!("{}: {why}", self.path.display())));
            }
            return Err(e.into());
        }
        self.last = Some(LogMark::of(self.len, &bytes, record.seq()));
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

/// What a pass over a log found.
struct Scan {
    /// Bytes of intact records from the start.
    valid: u64,
    total: u64,
    /// Offset of an intact record after the first bad one (damage, not a torn tail).
    intact_after: Option<u64>,
    last: Option<LogMark>,
}

/// Whether the log holds, at `mark.last_start`, the record the mark names, ending where it
/// says.
fn mark_matches(file: &mut File, mark: &LogMark) -> Result<bool> {
    use std::io::{Seek, SeekFrom};
    let total = file.metadata()?.len();
    if mark.end > total || mark.last_start.checked_add(8 + 13).is_none_or(|e| e > mark.end) {
        return Ok(false);
    }
    file.seek(SeekFrom::Start(mark.last_start))?;
    let mut head = [0u8; 16];
    if read_full(file, &mut head)? < 16 {
        return Ok(false);
    }
    let len = u32::from_le_bytes(head[0..4].try_into().expect("4 bytes")) as u64;
    let crc = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let seq = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
    Ok(mark.last_start + 8 + len == mark.end && crc == mark.last_crc && seq == mark.last_seq)
}

/// Replays the intact records of `file` after `from` (from the start when `None`) into
/// `apply` and looks past the first bad one.
fn scan(file: &mut File, from: Option<LogMark>, mut apply: impl FnMut(Record) -> Result<()>) -> Result<Scan> {
    use std::io::{Seek, SeekFrom};
    let total = file.metadata()?.len();
    let mut valid: u64 = from.map_or(0, |m| m.end);
    let mut last = from;
    let mut last_seq = from.map_or(0, |m| m.last_seq);
    file.seek(SeekFrom::Start(valid))?;
    let mut reader = BufReader::with_capacity(1 << 20, &mut *file);
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
            Ok(record) => {
                last_seq = record.seq();
                last = Some(LogMark { end: valid + 8 + len, last_start: valid, last_crc: crc, last_seq });
                apply(record)?
            }
            Err(e) => {
                tracing::warn!(offset = valid, error = %e, "undecodable log record");
                break;
            }
        }
        valid += 8 + len;
    }
    drop(reader);
    let intact_after = if valid < total { find_intact(file, valid, total, last_seq)? } else { None };
    Ok(Scan { valid, total, intact_after, last })
}

/// The offset of the first intact record (checksum right, decodable, sequence after
/// `last_seq`) that starts after `bad`, if any. Candidates are pruned by their length and
/// sequence fields before their checksum is computed, so the search is one pass over the
/// bytes after the damage in practice.
fn find_intact(file: &mut File, bad: u64, total: u64, last_seq: u64) -> Result<Option<u64>> {
    use std::io::{Seek, SeekFrom};
    file.seek(SeekFrom::Start(bad))?;
    let mut rest = Vec::with_capacity((total - bad) as usize);
    file.take(total - bad).read_to_end(&mut rest)?;
    // Zeros (a file extended by a crash before its data reached the disk) are a torn tail.
    if rest.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    for off in 1..rest.len().saturating_sub(8 + 13) + 1 {
        let len = u32::from_le_bytes(rest[off..off + 4].try_into().expect("4 bytes")) as usize;
        if len < 13 || off + 8 + len > rest.len() {
            continue;
        }
        let payload = &rest[off + 8..off + 8 + len];
        let seq = u64::from_le_bytes(payload[0..8].try_into().expect("8 bytes"));
        if seq <= last_seq || seq - last_seq > 1 << 32 {
            continue;
        }
        let crc = u32::from_le_bytes(rest[off + 4..off + 8].try_into().expect("4 bytes"));
        if crc32fast::hash(payload) == crc && decode(payload).is_ok() {
            return Ok(Some(bad + off as u64));
        }
    }
    Ok(None)
}

fn truncate(file: &File, len: u64) -> Result<()> {
    file.set_len(len)?;
    file.sync_all()?;
    Ok(())
}

/// What [`repair`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repair {
    /// Bytes of the log kept (every intact record before the first damaged one).
    pub kept: u64,
    /// Bytes cut off.
    pub dropped: u64,
    /// The copy of the whole log taken before cutting (None when nothing needed cutting).
    pub backup: Option<PathBuf>,
}

/// Cuts the log at `path` at its first damaged record after copying it whole to
/// `<path>.bak-<unix seconds>` (fsynced). The records after the damage are lost from the
/// collection but stay in the backup. A log with no damage is left as it is.
pub fn repair(path: &Path) -> Result<Repair> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let scan = scan(&mut file, None, |_| Ok(()))?;
    if scan.valid == scan.total {
        return Ok(Repair { kept: scan.valid, dropped: 0, backup: None });
    }
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".bak-{stamp}"));
    let backup = path.with_file_name(name);
    std::fs::copy(path, &backup)?;
    File::open(&backup)?.sync_all()?;
    sync_dir(&backup)?;
    truncate(&file, scan.valid)?;
    Ok(Repair { kept: scan.valid, dropped: scan.total - scan.valid, backup: Some(backup) })
}

/// Writes a whole new log to `path` (through a temporary file, fsynced and renamed, so a
/// crash leaves either the old or the new log).
pub fn write_log(path: &Path, records: impl IntoIterator<Item = Record>) -> Result<()> {
    replace_log(path, records).map(drop).map_err(ReplaceError::into_error)
}

/// [`write_log`], returning the new log opened for appends. The append handle is opened
/// before the rename: once the new log is in place there is no step left that could fail
/// and leave a writer appending to the old, unlinked file. A failed rename leaves the old
/// log in place and in use; a failed directory fsync after it leaves the new log's place
/// unknown, so the returned error says the old handle must not be used either.
pub fn replace_log(path: &Path, records: impl IntoIterator<Item = Record>) -> std::result::Result<Wal, ReplaceError> {
    let mut rewrite = LogRewrite::begin(path).map_err(ReplaceError::OldLogKept)?;
    for r in records {
        rewrite.push(&r).map_err(ReplaceError::OldLogKept)?;
    }
    rewrite.finish(None)
}

/// A new log written beside the one in use while writes go on: records are pushed into a
/// temporary file one at a time (memory stays bounded by one record), then the records the
/// old log gained meanwhile are copied over as they are — in passes while writes continue,
/// and a last one, under the caller's writer lock, that is as short as the writes of one
/// pass — and the new log is renamed into place ([`LogRewrite::finish`]).
pub struct LogRewrite {
    path: PathBuf,
    tmp: PathBuf,
    out: BufWriter<File>,
    at: u64,
    last: Option<LogMark>,
}

impl LogRewrite {
    /// Starts a new log for `path` (in `<path>.tmp`, replacing a leftover one).
    pub fn begin(path: &Path) -> Result<LogRewrite> {
        let tmp = path.with_extension("tmp");
        let out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
        Ok(LogRewrite { path: path.to_path_buf(), tmp, out, at: 0, last: None })
    }

    /// Appends one record (not yet durable).
    pub fn push(&mut self, record: &Record) -> Result<()> {
        self.put(&encode(record), record.seq())
    }

    /// Appends one encoded record of sequence number `seq`.
    fn put(&mut self, bytes: &[u8], seq: u64) -> Result<()> {
        self.out.write_all(bytes)?;
        self.last = Some(LogMark::of(self.at, bytes, seq));
        self.at += bytes.len() as u64;
        Ok(())
    }

    /// Copies the old log's records between bytes `from` and `to` (whole records the writer
    /// has appended: `to` is a length [`Wal::len`] gave, read under the writer lock) to the
    /// end of the new one, checking each. Returns `to`, where the next copy starts.
    pub fn copy_from(&mut self, old: &Path, from: u64, to: u64) -> Result<u64> {
        use std::io::{Seek, SeekFrom};
        let mut file = File::open(old)?;
        file.seek(SeekFrom::Start(from))?;
        let mut reader = BufReader::with_capacity(1 << 20, file.take(to.saturating_sub(from)));
        let mut at = from;
        let mut record = Vec::new();
        while at < to {
            let mut header = [0u8; 8];
            reader.read_exact(&mut header)?;
            let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as u64;
            if len < 13 || at + 8 + len > to {
                return Err(IndexError::Corrupt(format!("{}: no whole record at byte {at}", old.display())));
            }
            record.clear();
            record.extend_from_slice(&header);
            record.resize(8 + len as usize, 0);
            reader.read_exact(&mut record[8..])?;
            let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
            if crc32fast::hash(&record[8..]) != crc {
                return Err(IndexError::Corrupt(format!("{}: the record at byte {at} is damaged", old.display())));
            }
            let seq = u64::from_le_bytes(record[8..16].try_into().expect("8 bytes"));
            self.put(&record, seq)?;
            at += record.len() as u64;
        }
        Ok(to)
    }

    /// Makes the new log durable and renames it over the old one (see [`replace_log`]);
    /// `tail` is a last [`LogRewrite::copy_from`] (old log, from, to) to run first, under the
    /// caller's writer lock.
    pub fn finish(mut self, tail: Option<(&Path, u64, u64)>) -> std::result::Result<Wal, ReplaceError> {
        if let Some((old, from, to)) = tail {
            self.copy_from(old, from, to).map_err(ReplaceError::OldLogKept)?;
        }
        let (path, tmp, last) = (self.path.clone(), self.tmp.clone(), self.last);
        let file = (|| -> Result<File> {
            let file = self.out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            Ok(OpenOptions::new().read(true).append(true).open(&tmp)?)
        })()
        .map_err(ReplaceError::OldLogKept)?;
        let len = file.metadata().map_err(|e| ReplaceError::OldLogKept(e.into()))?.len();
        std::fs::rename(&tmp, &path).map_err(|e| ReplaceError::OldLogKept(e.into()))?;
        sync_dir(&path).map_err(ReplaceError::Unknown)?;
        Ok(Wal { path, file, len, last, broken: None })
    }
}

/// How [`replace_log`] failed.
#[derive(Debug)]
pub enum ReplaceError {
    /// Before the rename: the old log is still the log.
    OldLogKept(IndexError),
    /// After it: which log a restart finds is unknown.
    Unknown(IndexError),
}

impl ReplaceError {
    /// The error, whichever log a restart finds (for a log nobody appends to yet).
    pub fn into_error(self) -> IndexError {
        match self {
            ReplaceError::OldLogKept(e) | ReplaceError::Unknown(e) => e,
        }
    }
}

impl Wal {
    /// Refuses every later append (see [`Wal::append`]).
    pub fn poison(&mut self, why: impl Into<String>) {
        self.broken = Some(why.into());
    }
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

    /// A log rewritten beside the one in use: the records appended to the old log meanwhile
    /// are copied after the new log's own, in two steps (one while writes go on, one at the
    /// swap); the new log replays as the cut and then every later record, its mark is the
    /// one a reopen finds, and it takes appends. A damaged record in a copied range is an
    /// error that leaves the old log in place.
    #[test]
    fn a_rewritten_log_takes_the_records_appended_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.wal");
        let mut old = Wal::open(&path, |_| Ok(())).unwrap();
        let early: Vec<Record> =
            (1..=5).map(|s| Record::Upsert { seq: s, docs: vec![doc("a", s)], vectors: vec![s as f32; 4] }).collect();
        for r in &early {
            old.append(r).unwrap();
        }
        let cut = old.len();
        let mut rewrite = LogRewrite::begin(&path).unwrap();
        let kept = [
            Record::Checkpoint { seq: 5, next_key: 6 },
            Record::Upsert { seq: 5, docs: vec![doc("a", 5)], vectors: vec![5.0; 4] },
        ];
        for r in &kept {
            rewrite.push(r).unwrap();
        }
        let later: Vec<Record> = (6..=12)
            .map(|s| match s % 3 {
                0 => Record::Delete { seq: s, ids: vec![format!("d{s}")] },
                _ => Record::Upsert { seq: s, docs: vec![doc(&format!("d{s}"), s)], vectors: vec![-(s as f32); 4] },
            })
            .collect();
        for r in &later[..4] {
            old.append(r).unwrap();
        }
        let mid = old.len();
        assert_eq!(rewrite.copy_from(&path, cut, mid).unwrap(), mid);
        for r in &later[4..] {
            old.append(r).unwrap();
        }
        let end = old.len();
        let mut new = rewrite.finish(Some((&path, mid, end))).unwrap();
        let mut expected: Vec<Record> = kept.iter().chain(&later).cloned().collect();
        assert_eq!(replay(&path), expected);
        let reopened = Wal::open(&path, |_| Ok(())).unwrap();
        assert_eq!(new.mark(), reopened.mark());
        assert_eq!(new.len(), reopened.len());
        let last = Record::Delete { seq: 13, ids: vec!["a".into()] };
        new.append(&last).unwrap();
        expected.push(last);
        assert_eq!(replay(&path), expected);

        // A flipped byte in the range being copied: refused, the log in place is untouched.
        let before = std::fs::read(&path).unwrap();
        let mut damaged = before.clone();
        let at = damaged.len() - 3;
        damaged[at] ^= 0x40;
        let copy = dir.path().join("damaged.wal");
        std::fs::write(&copy, &damaged).unwrap();
        let mut rewrite = LogRewrite::begin(&path).unwrap();
        rewrite.push(&Record::Checkpoint { seq: 13, next_key: 14 }).unwrap();
        assert!(matches!(rewrite.copy_from(&copy, 0, damaged.len() as u64), Err(IndexError::Corrupt(_))));
        let mut rewrite = LogRewrite::begin(&path).unwrap();
        rewrite.push(&Record::Checkpoint { seq: 13, next_key: 14 }).unwrap();
        let len = damaged.len() as u64;
        assert!(matches!(rewrite.finish(Some((&copy, 0, len))), Err(ReplaceError::OldLogKept(_))));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        // A range that ends inside a record is refused too.
        let mut rewrite = LogRewrite::begin(&path).unwrap();
        assert!(rewrite.copy_from(&path, 0, len - 1).is_err());
    }

    /// Low finding: after a compaction replaced the log, a failed reopen left the writer
    /// appending to the old, unlinked file. The new log now comes back already open, a failed
    /// rename keeps the old log in use, and a log whose state is unknown refuses appends.
    #[test]
    fn replacing_a_log_never_leaves_a_writer_on_an_unlinked_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.wal");
        let mut old = Wal::open(&path, |_| Ok(())).unwrap();
        old.append(&Record::Delete { seq: 1, ids: vec!["a".into()] }).unwrap();
        let mut new = replace_log(&path, [Record::Checkpoint { seq: 1, next_key: 5 }]).unwrap();
        new.append(&Record::Delete { seq: 2, ids: vec!["b".into()] }).unwrap();
        assert_eq!(
            replay(&path),
            vec![Record::Checkpoint { seq: 1, next_key: 5 }, Record::Delete { seq: 2, ids: vec!["b".into()] }],
            "appends after the swap land in the log a restart reads"
        );
        // A rename that fails (the target is a non-empty directory): the old log stays.
        let blocked = dir.path().join("blocked.wal");
        std::fs::create_dir_all(blocked.join("x")).unwrap();
        assert!(matches!(
            replace_log(&blocked, [Record::Checkpoint { seq: 1, next_key: 1 }]),
            Err(ReplaceError::OldLogKept(_))
        ));
        new.poison("test");
        assert!(matches!(new.append(&Record::Delete { seq: 3, ids: vec![] }), Err(IndexError::Corrupt(_))));
    }

    /// Audit finding 6: one bad byte in the middle of a log silently cut every later write.
    #[test]
    fn damage_before_the_tail_refuses_to_open_and_repair_keeps_a_backup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.wal");
        let records: Vec<Record> = (1..=20)
            .map(|i| Record::Upsert { seq: i, docs: vec![doc(&format!("d{i}"), i)], vectors: vec![i as f32; 4] })
            .collect();
        {
            let mut wal = Wal::open(&path, |_| Ok(())).unwrap();
            for r in &records {
                wal.append(r).unwrap();
            }
        }
        let clean = std::fs::read(&path).unwrap();
        let record_len = encode(&records[0]).len();
        for at in [record_len * 3 + 20, record_len * 3 + 2, 40] {
            let mut bytes = clean.clone();
            bytes[at] ^= 0x5a;
            std::fs::write(&path, &bytes).unwrap();
            let err = Wal::open(&path, |_| Ok(())).err().expect("damage in the middle must refuse to open");
            let msg = err.to_string();
            assert!(msg.contains("ragway repair") && msg.contains("intact records follow"), "{msg}");
            assert_eq!(std::fs::read(&path).unwrap(), bytes, "refusing to open changes nothing");
        }
        // Repair: a backup of the whole log, then the cut.
        let damaged = std::fs::read(&path).unwrap();
        let report = repair(&path).unwrap();
        let backup = report.backup.clone().unwrap();
        assert_eq!(std::fs::read(&backup).unwrap(), damaged);
        assert_eq!(report.kept, 0);
        assert_eq!(replay(&path), Vec::<Record>::new());
        // Damage in record 4: records 1-3 are kept.
        let mut bytes = clean.clone();
        bytes[record_len * 3 + 20] ^= 0x5a;
        std::fs::write(&path, &bytes).unwrap();
        let report = repair(&path).unwrap();
        assert_eq!((report.kept, report.dropped), ((record_len * 3) as u64, (clean.len() - record_len * 3) as u64));
        assert_eq!(replay(&path), records[..3].to_vec());
        assert_eq!(repair(&path).unwrap().backup, None, "an intact log needs no repair");
        // A zero-filled tail (the file grew, its data never reached the disk) is torn, not damage.
        let mut bytes = clean.clone();
        bytes.extend(std::iter::repeat_n(0u8, 4096));
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(replay(&path), records);
    }
}
