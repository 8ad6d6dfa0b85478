//! The chunk table: every document's current version and its chunks, with the graph point
//! that holds each chunk's vector and the log records that added and removed it.
//!
//! The table is rebuilt from the log on open. To spare an open the replay of the whole log,
//! it is saved (`table.snap`) together with the graph, marked with the log position both
//! cover ([`LogMark`]); an open then loads both and replays only the records after the mark.
//!
//! `table.snap` is a [`crate::filefmt`] file: a header of u64s (format version, covered
//! sequence number, next sequence number, next chunk key, the log mark — end, last record's
//! start, checksum and sequence number — and the document count), then per document its
//! id, title (`u32::MAX` length for none), text and metadata JSON as length-prefixed byte
//! strings, its hash and the sequence number that added it, its chunk count, and per chunk
//! its key (u64), byte and char spans, token count and graph point (u32 each). Version 2
//! ends with where each document starts (u64 offsets into the body, one per document), so
//! that an open parses the documents in parallel from the start; version 1 files (without
//! them) are read with a first pass over the length fields.

use crate::error::{IndexError, Result};
use crate::filefmt::{Checked, Cursor, SumWriter};
use crate::payload::PayloadIndex;
use crate::wal::{ChunkRecord, DocRecord, LogMark};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

pub(crate) const NOT_REMOVED: u64 = u64::MAX;
const MAGIC: &[u8; 8] = b"RGWTABL1";
const FORMAT_VERSION: u64 = 2;
/// No title (a length no string in the file can have).
const NO_TITLE: u32 = u32::MAX;
/// A chunk's record: key (u64) and six u32s.
const CHUNK_BYTES: usize = 8 + 6 * 4;

/// A document's text: its own, or a range of the saved table it was loaded from (the
/// memory-mapped file; the text is read from the page cache where it is used and never
/// copied on open).
pub(crate) enum Text {
    Owned(String),
    Saved { file: Arc<Checked>, start: usize, len: usize },
}

impl std::ops::Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            Text::Owned(s) => s,
            Text::Saved { file, start, len } => {
                let bytes = &file.body()[*start..*start + *len];
                // SAFETY: checked to be UTF-8 when the table was loaded; the mapping is
                // read-only and its file is only ever replaced by a rename.
                unsafe { std::str::from_utf8_unchecked(bytes) }
            }
        }
    }
}

/// A document's metadata: given (a write), or the JSON of the saved table it was loaded
/// from, parsed on first use (by a filter, the payload index or a read). An open thus does
/// not parse every document's metadata, nor hold it parsed until something needs it.
pub(crate) struct Metadata {
    saved: Option<Text>,
    parsed: OnceLock<serde_json::Value>,
}

impl Metadata {
    pub fn new(value: serde_json::Value) -> Self {
        let parsed = OnceLock::new();
        let _ = parsed.set(value);
        Self { saved: None, parsed }
    }

    fn saved(json: Text) -> Self {
        Self { saved: Some(json), parsed: OnceLock::new() }
    }

    /// The JSON text to save.
    fn to_json(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        Ok(match &self.saved {
            Some(json) => std::borrow::Cow::Borrowed(json.as_bytes()),
            None => std::borrow::Cow::Owned(serde_json::to_vec(&**self)?),
        })
    }
}

impl std::ops::Deref for Metadata {
    type Target = serde_json::Value;

    fn deref(&self) -> &serde_json::Value {
        self.parsed.get_or_init(|| {
            let json = self.saved.as_deref().unwrap_or("null");
            serde_json::from_str(json).unwrap_or_else(|e| {
                // Only a faulty writer gets here: the file's checksum held.
                tracing::error!(error = %e, "saved metadata is not JSON; read as null");
                serde_json::Value::Null
            })
        })
    }
}

/// What a saved table covers: the log up to `mark`, and the counters to carry on with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TableMark {
    /// The last log record applied (in a compacted log this is not the last record's
    /// sequence number: its records keep their original ones).
    pub covered: u64,
    pub mark: LogMark,
    pub next_seq: u64,
    pub next_key: u64,
}

/// One version of a document.
pub(crate) struct DocEntry {
    pub id: String,
    pub title: Option<Text>,
    pub text: Text,
    pub metadata: Metadata,
    pub hash: u64,
    pub chunks: Vec<ChunkRecord>,
}

pub(crate) struct ChunkEntry {
    pub doc: Arc<DocEntry>,
    pub index: u32,
    /// The chunk's point in the graph, which holds its vector ([`UNPLACED`] while a replay
    /// has not inserted it yet).
    pub point: u32,
    pub added: u64,
    pub removed: u64,
}

/// The point of a chunk whose vector is not in the graph yet.
pub(crate) const UNPLACED: u32 = u32::MAX;

impl ChunkEntry {
    pub fn visible(&self, v: u64) -> bool {
        self.added <= v && self.removed > v
    }

    pub fn text(&self) -> &str {
        let r = &self.doc.chunks[self.index as usize];
        &self.doc.text[r.byte_start as usize..r.byte_end as usize]
    }
}

#[derive(Default)]
pub(crate) struct Table {
    pub docs: HashMap<String, Arc<DocEntry>>,
    /// By chunk key. Keys are ragway's own sequence numbers, never a client's, so a fast
    /// non-keyed hash is safe here (document ids, which clients choose, keep SipHash); every
    /// open inserts each chunk and every search looks its hits up.
    pub chunks: rustc_hash::FxHashMap<u64, ChunkEntry>,
    /// Removed chunks still in `chunks`, with their removal sequence number.
    pub garbage: Vec<(u64, u64)>,
    /// Graph points whose chunk is gone.
    pub dead_points: usize,
    /// Chunk keys by metadata value (every chunk in `chunks`, and some that left it), built
    /// by the first filtered search after an open ([`Table::payload`]), then kept up to date.
    payload: std::sync::OnceLock<PayloadIndex>,
}

impl Table {
    /// Applies a logged upsert; `points` are its chunks' graph points, in order.
    pub fn upsert(&mut self, seq: u64, docs: &[DocRecord], points: &[u32]) {
        let mut points = points.iter().copied();
        for d in docs {
            if let Some(old) = self.docs.get(&d.id).cloned() {
                for c in &old.chunks {
                    self.mark_removed(c.key, seq);
                }
            }
            let entry = Arc::new(DocEntry {
                id: d.id.clone(),
                title: d.title.clone().map(Text::Owned),
                text: Text::Owned(d.text.clone()),
                metadata: Metadata::new(d.metadata.clone()),
                hash: d.hash,
                chunks: d.chunks.clone(),
            });
            for (i, c) in d.chunks.iter().enumerate() {
                let point = points.next().unwrap_or(UNPLACED);
                if let Some(p) = self.payload.get_mut() {
                    p.add(c.key, &d.metadata);
                }
                self.chunks.insert(
                    c.key,
                    ChunkEntry { doc: entry.clone(), index: i as u32, point, added: seq, removed: NOT_REMOVED },
                );
            }
            self.docs.insert(d.id.clone(), entry);
        }
    }

    pub fn delete(&mut self, seq: u64, ids: &[String]) {
        for id in ids {
            if let Some(old) = self.docs.remove(id) {
                for c in &old.chunks {
                    self.mark_removed(c.key, seq);
                }
            }
        }
    }

    fn mark_removed(&mut self, key: u64, seq: u64) {
        if let Some(c) = self.chunks.get_mut(&key) {
            if c.removed == NOT_REMOVED {
                c.removed = seq;
                self.garbage.push((key, seq));
            }
        }
    }

    /// Drops removed chunks that no search can see any more.
    pub fn collect(&mut self, visible: u64) {
        let mut kept = Vec::new();
        for (key, removed) in std::mem::take(&mut self.garbage) {
            if removed <= visible {
                self.chunks.remove(&key);
                self.dead_points += 1;
                if let Some(p) = self.payload.get_mut() {
                    p.removed();
                }
            } else {
                kept.push((key, removed));
            }
        }
        self.garbage = kept;
        if self.payload.get().is_some_and(PayloadIndex::needs_rebuild) {
            self.payload = std::sync::OnceLock::new();
        }
    }

    /// The payload index, built from the chunks on first use (an open does not pay for it;
    /// the first filtered search does, once).
    pub fn payload(&self) -> &PayloadIndex {
        self.payload.get_or_init(|| {
            let mut p = PayloadIndex::default();
            for (k, c) in &self.chunks {
                p.add(*k, &c.doc.metadata);
            }
            p
        })
    }

    pub fn live_chunks(&self) -> usize {
        self.chunks.len() - self.garbage.len()
    }
}

impl Table {
    /// Saves the table as covering the log up to `mark` (the caller holds the writer lock,
    /// so the table does not change meanwhile; a save beside writes takes
    /// [`Table::to_save`] under the lock and writes it after).
    pub fn save(&self, path: &Path, mark: &TableMark) -> Result<()> {
        self.to_save().write(path, mark)
    }

    /// What a save writes, taken from the table as it stands (cheap: the documents are
    /// shared, only each chunk's point and each document's first sequence number are
    /// copied), so that the writing can run while the table changes.
    pub fn to_save(&self) -> TableSave {
        let mut save = TableSave {
            docs: Vec::with_capacity(self.docs.len()),
            added: Vec::with_capacity(self.docs.len()),
            points: Vec::with_capacity(self.chunks.len()),
        };
        for d in self.docs.values() {
            let added = d.chunks.first().and_then(|c| self.chunks.get(&c.key)).map_or(0, |c| c.added);
            save.added.push(added);
            save.points.extend(d.chunks.iter().map(|c| self.chunks.get(&c.key).map_or(UNPLACED, |e| e.point)));
            save.docs.push(d.clone());
        }
        save
    }
}

/// A table's documents as a save writes them (see [`Table::to_save`]).
pub(crate) struct TableSave {
    docs: Vec<Arc<DocEntry>>,
    /// Per document: the sequence number of its first chunk's upsert.
    added: Vec<u64>,
    /// Every document's chunks' points, in document order.
    points: Vec<u32>,
}

impl TableSave {
    /// Writes the table as covering the log up to `mark` (a temporary file, fsynced, then
    /// renamed).
    pub fn write(&self, path: &Path, mark: &TableMark) -> Result<()> {
        let mut w = SumWriter::create(path, MAGIC)?;
        let m = &mark.mark;
        for x in [
            FORMAT_VERSION,
            mark.covered,
            mark.next_seq,
            mark.next_key,
            m.end,
            m.last_start,
            m.last_crc as u64,
            m.last_seq,
            self.docs.len() as u64,
        ] {
            w.u64(x)?;
        }
        let mut starts = Vec::with_capacity(self.docs.len());
        let mut points = self.points.iter().copied();
        for (d, &added) in self.docs.iter().zip(&self.added) {
            // Offsets into the body (after the magic).
            starts.push(w.position() - MAGIC.len() as u64);
            w.bytes(d.id.as_bytes())?;
            match &d.title {
                Some(t) => w.bytes(t.as_bytes())?,
                None => w.u32(NO_TITLE)?,
            }
            w.bytes(d.text.as_bytes())?;
            w.bytes(&d.metadata.to_json()?)?;
            w.u64(d.hash)?;
            w.u64(added)?;
            w.u32(d.chunks.len() as u32)?;
            for c in &d.chunks {
                let point = points.next().unwrap_or(UNPLACED);
                w.u64(c.key)?;
                for x in [c.byte_start, c.byte_end, c.char_start, c.char_end, c.tokens, point] {
                    w.u32(x)?;
                }
            }
        }
        for start in starts {
            w.u64(start)?;
        }
        w.finish()
    }
}

impl Table {
    /// Reads a table written by [`Table::save`]. Every chunk's point is checked against
    /// `key_of` (the saved graph's key at a point, `None` past its end): a table and a graph
    /// that do not belong together are refused, never mixed.
    pub fn load(path: &Path, key_of: impl Fn(u32) -> Option<u64> + Sync) -> Result<(Table, TableMark)> {
        use rayon::prelude::*;
        let file = Arc::new(Checked::open(path, MAGIC, "chunk table")?);
        let body = file.body();
        let bad = |why: &str| IndexError::Corrupt(format!("{}: {why}", path.display()));
        let mut r = Cursor::new(body);
        let header: Vec<u64> = (0..9).map(|_| r.u64()).collect::<Option<_>>().ok_or_else(|| bad("short header"))?;
        let [version, covered, next_seq, next_key, end, last_start, last_crc, last_seq, docs] = header[..] else {
            unreachable!()
        };
        if version != 1 && version != FORMAT_VERSION {
            return Err(bad(&format!("format version {version}, this build reads 1 and {FORMAT_VERSION}")));
        }
        let last_crc = u32::try_from(last_crc).map_err(|_| bad("checksum field"))?;
        let mark = TableMark { covered, mark: LogMark { end, last_start, last_crc, last_seq }, next_seq, next_key };
        // Each document takes at least 4 × 4 + 8 + 8 + 4 bytes: a count beyond that is damage.
        if docs > (body.len() / 36) as u64 {
            return Err(bad("document count"));
        }
        // Where each document starts, and where the documents end.
        let docs = docs as usize;
        let (starts, docs_end) = if version >= 2 {
            // Saved after the documents.
            let index_at = body.len().checked_sub(docs * 8).filter(|&at| at >= r.at).ok_or_else(|| bad("document index"))?;
            let mut index = Cursor { data: body, at: index_at };
            let starts: Vec<usize> = (0..docs).map(|_| index.u64().map(|x| x as usize)).collect::<Option<_>>().ok_or_else(|| bad("document index"))?;
            if starts.first().is_some_and(|&s| s != r.at) || starts.windows(2).any(|w| w[0] >= w[1]) || starts.last().is_some_and(|&s| s >= index_at) {
                return Err(bad("document index"));
            }
            (starts, index_at)
        } else {
            // A pass over the length fields only, so that the documents can then be parsed
            // in parallel.
            let mut starts = Vec::with_capacity(docs);
            for _ in 0..docs {
                starts.push(r.at);
                let short = || bad("short document");
                r.bytes().ok_or_else(short)?;
                match r.u32().ok_or_else(short)? {
                    NO_TITLE => {}
                    n => {
                        r.take(n as usize).ok_or_else(short)?;
                    }
                }
                r.bytes().ok_or_else(short)?;
                r.bytes().ok_or_else(short)?;
                r.take(16).ok_or_else(short)?;
                let n = r.u32().ok_or_else(short)? as usize;
                r.take(n.checked_mul(CHUNK_BYTES).ok_or_else(short)?).ok_or_else(short)?;
            }
            if !r.is_done() {
                return Err(bad("trailing bytes"));
            }
            (starts, body.len())
        };
        if docs == 0 && docs_end != r.at {
            return Err(bad("trailing bytes"));
        }
        // Document `i`, which must end where the next one starts.
        let parse = |i: usize| -> Result<(Arc<DocEntry>, Vec<u32>, u64)> {
            let mut r = Cursor { data: body, at: starts[i] };
            let end = starts.get(i + 1).copied().unwrap_or(docs_end);
            let short = || bad("short document");
            let string =
                |b: &[u8], what: &str| String::from_utf8(b.to_vec()).map_err(|_| bad(&format!("{what} is not UTF-8")));
            let id = string(r.bytes().ok_or_else(short)?, "an id")?;
            // Title, text and metadata stay in the mapped file (checked to be UTF-8 here).
            let saved = |bytes: &[u8], at: usize, what: &str| -> Result<Text> {
                std::str::from_utf8(bytes).map_err(|_| bad(&format!("{what} is not UTF-8")))?;
                Ok(Text::Saved { file: file.clone(), start: at - bytes.len(), len: bytes.len() })
            };
            let title = match r.u32().ok_or_else(short)? {
                NO_TITLE => None,
                n => Some(saved(r.take(n as usize).ok_or_else(short)?, r.at, "a title")?),
            };
            let text_bytes = r.bytes().ok_or_else(short)?;
            let text_start = r.at - text_bytes.len();
            let text = std::str::from_utf8(text_bytes).map_err(|_| bad("a text is not UTF-8"))?;
            let metadata = Metadata::saved(saved(r.bytes().ok_or_else(short)?, r.at, "metadata")?);
            let hash = r.u64().ok_or_else(short)?;
            let added = r.u64().ok_or_else(short)?;
            let n = r.u32().ok_or_else(short)? as usize;
            // Sized by the count only once the document has room for that many records.
            if n.checked_mul(CHUNK_BYTES).is_none_or(|b| r.at + b > end) {
                return Err(short());
            }
            let mut chunks = Vec::with_capacity(n);
            let mut points = Vec::with_capacity(n);
            for _ in 0..n {
                let key = r.u64().ok_or_else(short)?;
                let mut f = [0u32; 6];
                for x in &mut f {
                    *x = r.u32().ok_or_else(short)?;
                }
                let c = ChunkRecord {
                    key,
                    byte_start: f[0],
                    byte_end: f[1],
                    char_start: f[2],
                    char_end: f[3],
                    tokens: f[4],
                };
                let (s, e) = (c.byte_start as usize, c.byte_end as usize);
                if s > e || e > text.len() || !text.is_char_boundary(s) || !text.is_char_boundary(e) {
                    return Err(bad(&format!("chunk {key} spans outside its text")));
                }
                if key >= next_key || added > covered {
                    return Err(bad(&format!("chunk {key} is newer than the table")));
                }
                if key_of(f[5]) != Some(key) {
                    return Err(bad(&format!("chunk {key} is not at its point in the saved graph")));
                }
                chunks.push(c);
                points.push(f[5]);
            }
            if r.at != end {
                return Err(bad("documents overlap"));
            }
            let text = Text::Saved { file: file.clone(), start: text_start, len: text_bytes.len() };
            Ok((Arc::new(DocEntry { id, title, text, metadata, hash, chunks }), points, added))
        };
        let parsed = (0..docs).into_par_iter().map(parse).collect::<Result<Vec<_>>>()?;
        let mut table = Table::default();
        table.docs.reserve(parsed.len());
        table.chunks.reserve(parsed.len());
        for (doc, points, added) in parsed {
            for (i, (c, point)) in doc.chunks.iter().zip(points).enumerate() {
                let entry = ChunkEntry { doc: doc.clone(), index: i as u32, point, added, removed: NOT_REMOVED };
                if table.chunks.insert(c.key, entry).is_some() {
                    return Err(bad(&format!("chunk {} appears twice", c.key)));
                }
            }
            if table.docs.insert(doc.id.clone(), doc).is_some() {
                return Err(bad("a document appears twice"));
            }
        }
        Ok((table, mark))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A table file holding `body` under a valid checksum: what a buggy writer could leave.
    fn file_with(dir: &Path, body: &[u8]) -> std::path::PathBuf {
        let path = dir.join("table.snap");
        let mut w = SumWriter::create(&path, MAGIC).unwrap();
        w.put(body).unwrap();
        w.finish().unwrap();
        path
    }

    fn sample_body(dir: &Path) -> Vec<u8> {
        let mut table = Table::default();
        let docs: Vec<DocRecord> = (0..5u64)
            .map(|i| DocRecord {
                id: format!("d{i}"),
                title: (i % 2 == 0).then(|| format!("T{i}")),
                text: "héllo wörld, twice".repeat(i as usize + 1),
                metadata: serde_json::json!({"i": i}),
                hash: i,
                chunks: vec![ChunkRecord { key: i, byte_start: 0, byte_end: 6, char_start: 0, char_end: 5, tokens: 2 }],
            })
            .collect();
        table.upsert(1, &docs, &[0, 1, 2, 3, 4]);
        let mark = TableMark {
            covered: 1,
            mark: LogMark { end: 100, last_start: 0, last_crc: 7, last_seq: 1 },
            next_seq: 2,
            next_key: 5,
        };
        let path = dir.join("table.snap");
        table.save(&path, &mark).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        bytes[8..bytes.len() - 4].to_vec()
    }

    #[test]
    fn a_saved_table_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let body = sample_body(dir.path());
        let path = file_with(dir.path(), &body);
        let (t, mark) = Table::load(&path, |p| (p < 5).then_some(p as u64)).unwrap();
        assert_eq!((t.docs.len(), t.chunks.len(), mark.next_key), (5, 5, 5));
        assert_eq!(&*t.docs["d3"].text, "héllo wörld, twice".repeat(4));
        assert_eq!(t.chunks[&3].text(), "héllo");
        // A table whose points do not match the graph is refused.
        assert!(Table::load(&path, |p| (p < 5).then_some(p as u64 + 1)).is_err());
    }

    #[test]
    fn version_1_tables_load_and_a_wrong_document_index_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let body = sample_body(dir.path());
        let key_of = |p: u32| (p < 5).then_some(p as u64);
        // Version 1: no document index at the end.
        let mut v1 = body.clone();
        v1[..8].copy_from_slice(&1u64.to_le_bytes());
        v1.truncate(body.len() - 5 * 8);
        let (t, _) = Table::load(&file_with(dir.path(), &v1), key_of).unwrap();
        assert_eq!((t.docs.len(), t.chunks.len()), (5, 5));
        assert_eq!(&*t.docs["d3"].text, "héllo wörld, twice".repeat(4));
        assert_eq!(t.docs["d2"].title.as_deref(), Some("T2"));
        assert_eq!(*t.docs["d4"].metadata, serde_json::json!({"i": 4}));
        // Version 2 with an index that does not tile the documents.
        for (at, delta) in [(body.len() - 8, 1i64), (body.len() - 8, -3), (body.len() - 40, 2)] {
            let mut b = body.clone();
            let x = u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as i64 + delta;
            b[at..at + 8].copy_from_slice(&(x as u64).to_le_bytes());
            assert!(Table::load(&file_with(dir.path(), &b), key_of).is_err(), "index off by {delta} at {at}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Damaged tables under a valid checksum (a buggy writer) are refused, never panic.
        #[test]
        fn damaged_tables_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
                                      cut in any::<prop::sample::Index>(), garbage in prop::collection::vec(any::<u8>(), 0..200)) {
            let dir = tempfile::tempdir().unwrap();
            let mut body = sample_body(dir.path());
            for (at, x) in &flips {
                let i = at.index(body.len());
                body[i] ^= x | 1;
            }
            let _ = Table::load(&file_with(dir.path(), &body), |p| (p < 5).then_some(p as u64));
            let cut = cut.index(body.len());
            let _ = Table::load(&file_with(dir.path(), &body[..cut]), |p| (p < 5).then_some(p as u64));
            let _ = Table::load(&file_with(dir.path(), &garbage), |p| (p < 5).then_some(p as u64));
        }
    }
}
