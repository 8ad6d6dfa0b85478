//! The chunk table: every document's current version and its chunks, with the graph point
//! that holds each chunk's vector and the log records that added and removed it.
//!
//! The table is rebuilt from the log on open. To spare an open the replay of the whole log,
//! it is saved (`table.snap`) together with the graph, marked with the log position both
//! cover ([`LogMark`]); an open then loads both and replays only the records after the mark.
//!
//! `table.snap`, format 3 (magic `RGWTABL3`), is a [`crate::filefmt`] file of two
//! sections (`Checked::open_tail`). The first holds the texts: per document its title (if
//! any), text and metadata JSON, back to back, then their checksum. The second holds the
//! records: a header of u64s (format version, covered sequence number, next sequence
//! number, next chunk key, the log mark — end, last record's start, checksum and sequence
//! number — and the document count); per document its id (length-prefixed), hash, the
//! sequence number that added it, where its texts start (u64), the lengths of its title
//! (`u32::MAX` for none), text and metadata (u32 each), its chunk count, and per chunk its
//! key (u64), byte and char spans, token count and graph point (u32 each); where each
//! document's record starts (u64 each, so that an open parses them in parallel); where the
//! records start; their checksum. An open reads and checks only the records (~110 bytes a
//! one-chunk document, against ~1.6 KB with its text): texts are read from the page cache
//! where they are used, checked to be UTF-8 on each read, and their checksum is checked
//! before they are copied into another table file or a log ([`SavedTable::verify_texts`]).
//!
//! Formats 1 and 2 (magic `RGWTABL1`, one checksum over the whole file, which an open
//! reads) hold each document's id, title, text and metadata among its record's fields;
//! version 2 ends with the records' offsets, version 1 files are read with a first pass
//! over the length fields. Both still load, and are written again in format 3 at the next
//! save.

use crate::cold::{major_faults, ColdSpell};
use crate::error::{IndexError, Result};
use crate::filefmt::{Checked, Cursor, SumWriter};
use crate::payload::PayloadIndex;
use crate::wal::{ChunkRecord, DocRecord, LogMark};
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::{Arc, OnceLock};

pub(crate) const NOT_REMOVED: u64 = u64::MAX;
/// Formats 1 and 2 (texts among the records).
const MAGIC: &[u8; 8] = b"RGWTABL1";
/// Format 3 (texts in a section of their own, before the records).
const MAGIC3: &[u8; 8] = b"RGWTABL3";
const FORMAT_VERSION: u64 = 3;
/// No title (a length no string in the file can have).
const NO_TITLE: u32 = u32::MAX;
/// A chunk's record: key (u64) and six u32s.
const CHUNK_BYTES: usize = 8 + 6 * 4;

/// One version of a document: as written (its fields owned), or as loaded from a saved
/// table, where its fields stay in the memory-mapped file and are read from the page cache
/// where they are used. An open thus copies no id, text or metadata and allocates one small
/// entry per document; metadata is parsed on first use (by a filter, the payload index or
/// a read), not on open.
pub(crate) struct DocEntry {
    pub hash: u64,
    fields: Fields,
    metadata: OnceLock<Box<serde_json::Value>>,
}

enum Fields {
    Owned(Box<OwnedFields>),
    /// The document's record starts at `at` in the saved table's body; it was checked when
    /// the table was loaded (lengths in bounds, chunk spans inside the text, the id UTF-8,
    /// and in formats 1 and 2 every string UTF-8), and the mapping is read-only, its file
    /// only ever replaced by a rename.
    Saved {
        table: Arc<SavedTable>,
        at: usize,
    },
}

struct OwnedFields {
    id: String,
    title: Option<String>,
    text: String,
    chunks: Vec<ChunkRecord>,
}

/// A saved table file, mapped, that loaded documents read their fields from.
pub(crate) struct SavedTable {
    file: Checked,
    /// Format 3: where the structure section starts in the body (the texts lie before it,
    /// under their own checksum, which an open does not read); `None` for formats 1 and 2
    /// (texts among the records, the whole file checked on open).
    structure_at: Option<usize>,
    path: std::path::PathBuf,
    /// The file's inode when it was loaded (a damaged file is removed only while it is
    /// still the one at `path`).
    ino: Option<u64>,
    /// The texts' checksum, checked once before the texts are copied anywhere.
    texts_checked: OnceLock<bool>,
    /// Whether searches read their results' records and texts ahead ([`Table::read_ahead`]).
    cold: ColdSpell,
}

impl SavedTable {
    fn body(&self) -> &[u8] {
        self.file.body()
    }

    /// Checks the texts section's checksum (once; reads every text): before the texts are
    /// copied into another table file or into a log, so that damage on disk is never
    /// carried into a file that checks.
    pub fn verify_texts(&self) -> Result<()> {
        let ok = *self.texts_checked.get_or_init(|| match self.structure_at {
            Some(at) => self.file.verify_bulk(at),
            None => true,
        });
        if ok {
            return Ok(());
        }
        // The next open rebuilds the table from the log (the graph stays).
        if Self::ino_of(&self.path).is_some_and(|ino| Some(ino) == self.ino) && std::fs::remove_file(&self.path).is_ok()
        {
            tracing::error!(file = %self.path.display(), "saved table's texts damaged; removed, the next open rebuilds it from the log");
        }
        Err(IndexError::Corrupt(format!("{}: the texts' checksum does not match", self.path.display())))
    }

    fn new(file: Checked, structure_at: Option<usize>, path: &Path) -> SavedTable {
        let ino = Self::ino_of(path);
        SavedTable {
            file,
            structure_at,
            path: path.to_path_buf(),
            ino,
            texts_checked: OnceLock::new(),
            cold: ColdSpell::new(true),
        }
    }

    fn ino_of(path: &Path) -> Option<u64> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(path).ok().map(|m| m.ino())
        }
        #[cfg(not(unix))]
        {
            let _ = path;
            None
        }
    }
}

/// Where a saved document's fields lie in the table's body (see the module's layout).
struct Spans {
    title: Option<std::ops::Range<usize>>,
    text: std::ops::Range<usize>,
    metadata: std::ops::Range<usize>,
    /// The first chunk record and the count.
    chunks: (usize, usize),
}

impl Spans {
    /// Reads the length fields of the document at `at`, checked when the table was loaded;
    /// `None` only for a record that was never checked.
    fn read(table: &SavedTable, at: usize) -> Option<Spans> {
        fn string(r: &mut Cursor) -> Option<std::ops::Range<usize>> {
            let b = r.bytes()?;
            Some(r.at - b.len()..r.at)
        }
        let mut r = Cursor { data: table.body(), at };
        string(&mut r)?; // the id (read by `DocEntry::id` on its own)
        let spans = if table.structure_at.is_some() {
            // Format 3: hash, added, where the texts start, their lengths, chunk count.
            r.take(16)?;
            let texts = r.u64()? as usize;
            let [title, text, metadata, n] = [r.u32()?, r.u32()?, r.u32()?, r.u32()?];
            let title_len = if title == NO_TITLE { 0 } else { title as usize };
            let text_at = texts + title_len;
            let metadata_at = text_at + text as usize;
            Spans {
                title: (title != NO_TITLE).then(|| texts..text_at),
                text: text_at..metadata_at,
                metadata: metadata_at..metadata_at + metadata as usize,
                chunks: (r.at, n as usize),
            }
        } else {
            let title = match r.u32()? {
                NO_TITLE => None,
                n => {
                    r.take(n as usize)?;
                    Some(r.at - n as usize..r.at)
                }
            };
            let text = string(&mut r)?;
            let metadata = string(&mut r)?;
            r.take(16)?;
            let n = r.u32()? as usize;
            Spans { title, text, metadata, chunks: (r.at, n) }
        };
        Some(spans)
    }
}

/// A chunk record as saved: key, then byte and char spans, token count and graph point.
fn saved_chunk(b: &[u8]) -> (ChunkRecord, u32) {
    let u32_at = |i: usize| u32::from_le_bytes(b[8 + 4 * i..12 + 4 * i].try_into().expect("4 bytes"));
    let c = ChunkRecord {
        key: u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        byte_start: u32_at(0),
        byte_end: u32_at(1),
        char_start: u32_at(2),
        char_end: u32_at(3),
        tokens: u32_at(4),
    };
    (c, u32_at(5))
}

/// A document's chunk records, owned or read from the saved table.
#[derive(Clone, Copy)]
pub(crate) enum Chunks<'a> {
    Owned(&'a [ChunkRecord]),
    Saved(&'a [u8]),
}

impl<'a> Chunks<'a> {
    pub fn len(self) -> usize {
        match self {
            Chunks::Owned(c) => c.len(),
            Chunks::Saved(b) => b.len() / CHUNK_BYTES,
        }
    }

    pub fn get(self, i: usize) -> Option<ChunkRecord> {
        match self {
            Chunks::Owned(c) => c.get(i).copied(),
            Chunks::Saved(b) => b.get(i * CHUNK_BYTES..(i + 1) * CHUNK_BYTES).map(|b| saved_chunk(b).0),
        }
    }

    pub fn first(self) -> Option<ChunkRecord> {
        self.get(0)
    }

    pub fn iter(self) -> impl ExactSizeIterator<Item = ChunkRecord> + 'a {
        (0..self.len()).map(move |i| self.get(i).expect("in range"))
    }
}

/// How much of a saved record [`DocEntry::will_need_record`] asks for.
const RECORD_AHEAD: usize = 256;

/// What a damaged text of a saved table reads as (its file's texts checksum would not hold;
/// it is refused before being copied anywhere).
const DAMAGED: &str = "\u{FFFD}";

impl DocEntry {
    pub fn new(d: &DocRecord) -> Self {
        DocEntry {
            hash: d.hash,
            fields: Fields::Owned(Box::new(OwnedFields {
                id: d.id.clone(),
                title: d.title.clone(),
                text: d.text.clone(),
                chunks: d.chunks.clone(),
            })),
            metadata: OnceLock::from(Box::new(d.metadata.clone())),
        }
    }

    fn saved(&self) -> Option<(&SavedTable, Spans)> {
        match &self.fields {
            Fields::Owned(_) => None,
            Fields::Saved { table, at } => {
                Some((table, Spans::read(table, *at).expect("a document checked when its table was loaded")))
            }
        }
    }

    /// The saved table this document was loaded from.
    pub fn saved_table(&self) -> Option<&Arc<SavedTable>> {
        match &self.fields {
            Fields::Owned(_) => None,
            Fields::Saved { table, .. } => Some(table),
        }
    }

    /// A string of the saved table: checked on open in formats 1 and 2, here in format 3
    /// (whose texts an open does not read).
    fn str_at(table: &SavedTable, r: std::ops::Range<usize>) -> &str {
        let bytes = &table.body()[r];
        if table.structure_at.is_none() {
            // SAFETY: checked to be UTF-8 when the table was loaded (see `Fields::Saved`).
            return unsafe { std::str::from_utf8_unchecked(bytes) };
        }
        simdutf8::basic::from_utf8(bytes).unwrap_or_else(|_| {
            tracing::error!(file = %table.path.display(), "a saved text is not UTF-8: the file is damaged");
            DAMAGED
        })
    }

    /// Asks for the page of this document's saved record (where it starts; a record of one
    /// chunk is ~110 bytes): the first step of [`Table::read_ahead`].
    fn will_need_record(&self) {
        if let Fields::Saved { table, at } = &self.fields {
            table.file.will_need(*at..at.saturating_add(RECORD_AHEAD));
        }
    }

    /// Where this saved document's title, text and metadata lie (back to back in format 3;
    /// in formats 1 and 2 among its record's fields); reads its record.
    fn texts_span(&self) -> Option<(&SavedTable, std::ops::Range<usize>)> {
        let (table, s) = self.saved()?;
        let start = s.title.as_ref().map_or(s.text.start, |t| t.start).min(s.text.start);
        Some((table, start..s.metadata.end.max(s.text.end)))
    }

    pub fn id(&self) -> &str {
        match &self.fields {
            Fields::Owned(f) => &f.id,
            Fields::Saved { table, at } => {
                // Only the id's length and bytes: the id is read on every lookup by id.
                let body = table.body();
                let n = u32::from_le_bytes(body[*at..*at + 4].try_into().expect("4 bytes")) as usize;
                // SAFETY: every format's ids are checked to be UTF-8 when the table is loaded.
                unsafe { std::str::from_utf8_unchecked(&body[*at + 4..*at + 4 + n]) }
            }
        }
    }

    pub fn title(&self) -> Option<&str> {
        match &self.fields {
            Fields::Owned(f) => f.title.as_deref(),
            Fields::Saved { .. } => {
                let (table, s) = self.saved()?;
                s.title.map(|r| Self::str_at(table, r))
            }
        }
    }

    pub fn text(&self) -> &str {
        match &self.fields {
            Fields::Owned(f) => &f.text,
            Fields::Saved { .. } => {
                let (table, s) = self.saved().expect("saved");
                Self::str_at(table, s.text)
            }
        }
    }

    /// Chunk `i`'s text (a damaged file's spans read as [`DAMAGED`], never a panic).
    pub fn chunk_text(&self, r: &ChunkRecord) -> &str {
        self.text().get(r.byte_start as usize..r.byte_end as usize).unwrap_or(DAMAGED)
    }

    pub fn metadata(&self) -> &serde_json::Value {
        self.metadata.get_or_init(|| {
            let json = match self.saved() {
                Some((table, s)) => &table.body()[s.metadata],
                None => b"null",
            };
            Box::new(serde_json::from_slice(json).unwrap_or_else(|e| {
                // Only a faulty writer or a damaged texts section gets here.
                tracing::error!(error = %e, "saved metadata is not JSON; read as null");
                serde_json::Value::Null
            }))
        })
    }

    /// The metadata's JSON text, as saved.
    fn metadata_json(&self) -> Result<std::borrow::Cow<'_, [u8]>> {
        Ok(match self.saved() {
            Some((table, s)) => std::borrow::Cow::Borrowed(&table.body()[s.metadata]),
            None => std::borrow::Cow::Owned(serde_json::to_vec(self.metadata())?),
        })
    }

    pub fn chunks(&self) -> Chunks<'_> {
        match &self.fields {
            Fields::Owned(f) => Chunks::Owned(&f.chunks),
            Fields::Saved { .. } => {
                let (table, s) = self.saved().expect("saved");
                let (at, n) = s.chunks;
                Chunks::Saved(&table.body()[at..at + n * CHUNK_BYTES])
            }
        }
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
        let r = self.doc.chunks().get(self.index as usize).expect("a chunk of its document");
        self.doc.chunk_text(&r)
    }
}

/// The current documents by id: one pointer a slot, keyed by the id the entry holds (no
/// second copy of the id as a key). Ids are the clients' own, so they are hashed with a
/// keyed SipHash.
#[derive(Default)]
pub(crate) struct Docs {
    table: hashbrown::HashTable<Arc<DocEntry>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Docs {
    pub fn get(&self, id: &str) -> Option<&Arc<DocEntry>> {
        self.table.find(self.hasher.hash_one(id), |d| d.id() == id)
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    /// Puts `doc` in place of the document with its id, returning that one.
    pub fn insert(&mut self, doc: Arc<DocEntry>) -> Option<Arc<DocEntry>> {
        let hash = self.hash_of(doc.id());
        self.insert_hashed(hash, doc)
    }

    /// The hash of an id, as [`Docs::insert_hashed`] takes it.
    fn hash_of(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    /// [`Docs::insert`], with the id's hash computed beforehand ([`Docs::hash_of`]).
    fn insert_hashed(&mut self, hash: u64, doc: Arc<DocEntry>) -> Option<Arc<DocEntry>> {
        let Docs { table, hasher } = self;
        let id = doc.id();
        match table.entry(hash, |d| d.id() == id, |d| hasher.hash_one(d.id())) {
            hashbrown::hash_table::Entry::Occupied(mut e) => Some(std::mem::replace(e.get_mut(), doc)),
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert(doc);
                None
            }
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<Arc<DocEntry>> {
        self.table.find_entry(self.hasher.hash_one(id), |d| d.id() == id).ok().map(|e| e.remove().0)
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<DocEntry>> {
        self.table.iter()
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    fn reserve(&mut self, n: usize) {
        let Docs { table, hasher } = self;
        table.reserve(n, |d| hasher.hash_one(d.id()));
    }
}

impl std::ops::Index<&str> for Docs {
    type Output = DocEntry;

    fn index(&self, id: &str) -> &DocEntry {
        self.get(id).expect("no document with that id")
    }
}

#[derive(Default)]
pub(crate) struct Table {
    pub docs: Docs,
    /// By chunk key. Keys are ragway's own sequence numbers, never a client's, so a fast
    /// non-keyed hash is safe here (document ids, which clients choose, keep SipHash); every
    /// open inserts each chunk and every search looks its hits up.
    pub chunks: rustc_hash::FxHashMap<u64, ChunkEntry>,
    /// Removed chunks still in `chunks`, with their removal sequence number.
    pub garbage: Vec<(u64, u64)>,
    /// Graph points whose chunk is gone, for the next consolidation to free.
    pub dead_points: Vec<u32>,
    /// Chunks removed since the log was last rewritten (a lower bound after an open): how
    /// much of the log is garbage.
    pub garbage_chunks: usize,
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
                for c in old.chunks().iter() {
                    self.mark_removed(c.key, seq);
                }
            }
            let entry = Arc::new(DocEntry::new(d));
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
            self.docs.insert(entry);
        }
    }

    pub fn delete(&mut self, seq: u64, ids: &[String]) {
        for id in ids {
            if let Some(old) = self.docs.remove(id) {
                for c in old.chunks().iter() {
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
                if let Some(c) = self.chunks.remove(&key) {
                    if c.point != UNPLACED {
                        self.dead_points.push(c.point);
                    }
                    self.garbage_chunks += 1;
                }
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
                p.add(*k, c.doc.metadata());
            }
            p
        })
    }

    pub fn live_chunks(&self) -> usize {
        self.chunks.len() - self.garbage.len()
    }

    /// Brings the saved records and texts of these chunks' documents (a search's results,
    /// about to be read) into the page cache. Where memory holds only part of the table
    /// file, each result's record and text would be a page fault of its own, taken one after
    /// another; while the file's pages are found cold (see [`crate::cold`]), the records
    /// are asked for all at once, then the texts, so that a search waits about two disk
    /// reads instead of two per result. Otherwise it only reads them, counting the faults.
    pub fn read_ahead(&self, keys: &[u64]) {
        let docs: Vec<&DocEntry> = keys.iter().filter_map(|k| self.chunks.get(k)).map(|c| &*c.doc).collect();
        // The saved table most of them come from: the one an open loaded (a save replaces
        // it only for the documents written since).
        let Some(saved) = docs.iter().find_map(|d| d.saved_table()) else { return };
        let faults = major_faults();
        let ahead = saved.cold.on();
        if ahead {
            for d in &docs {
                d.will_need_record();
            }
        }
        // Reads the records (asked for above while cold).
        let spans: Vec<_> = docs.iter().filter_map(|d| d.texts_span()).collect();
        if ahead {
            for (table, span) in &spans {
                table.file.will_need(span.clone());
            }
        }
        // Read a byte of each page now, where the faults are counted.
        for (table, span) in spans {
            let bytes = &table.body()[span];
            for i in (0..bytes.len()).step_by(PAGE).chain(bytes.len().checked_sub(1)) {
                std::hint::black_box(bytes[i]);
            }
        }
        saved.cold.after(major_faults() > faults);
    }
}

/// The smallest page size; a read per `PAGE` bytes touches every page of a span.
const PAGE: usize = 4096;

impl Table {
    /// Saves the table as covering the log up to `mark` (the caller holds the writer lock,
    /// so the table does not change meanwhile; a save beside writes takes
    /// [`Table::to_save`] under the lock and writes it after).
    pub fn save(&self, path: &Path, mark: &TableMark) -> Result<()> {
        self.to_save().write(path, mark)
    }

    /// Checks the texts of every saved table the documents read from (see
    /// [`SavedTable::verify_texts`]): before they are copied into a log.
    pub fn verify_texts(&self) -> Result<()> {
        verify_saved_texts(self.docs.values())
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
            let added = d.chunks().first().and_then(|c| self.chunks.get(&c.key)).map_or(0, |c| c.added);
            save.added.push(added);
            save.points.extend(d.chunks().iter().map(|c| self.chunks.get(&c.key).map_or(UNPLACED, |e| e.point)));
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
    /// renamed), in format 3: the texts first, then the records.
    pub fn write(&self, path: &Path, mark: &TableMark) -> Result<()> {
        // Texts read from a saved table are checked before they are copied into this one.
        verify_saved_texts(self.docs.iter())?;
        let len = |b: &[u8]| {
            u32::try_from(b.len())
                .ok()
                .filter(|&n| n != NO_TITLE)
                .ok_or_else(|| IndexError::Internal("text over 4 GiB".into()))
        };
        let mut w = SumWriter::create(path, MAGIC3)?;
        // Per document: where its texts start (in the body, after the magic) and the lengths
        // of its title (`NO_TITLE` for none), text and metadata JSON.
        let mut texts = Vec::with_capacity(self.docs.len());
        for d in &self.docs {
            let at = w.position() - MAGIC3.len() as u64;
            let title = match d.title() {
                Some(t) => {
                    w.put(t.as_bytes())?;
                    len(t.as_bytes())?
                }
                None => NO_TITLE,
            };
            let json = d.metadata_json()?;
            w.put(d.text().as_bytes())?;
            w.put(&json)?;
            texts.push((at, [title, len(d.text().as_bytes())?, len(&json)?]));
        }
        w.seal()?;
        let structure_at = w.position() - MAGIC3.len() as u64;
        put_header(&mut w, FORMAT_VERSION, mark, self.docs.len())?;
        let mut starts = Vec::with_capacity(self.docs.len());
        let mut points = self.points.iter().copied();
        for ((d, &added), (at, lens)) in self.docs.iter().zip(&self.added).zip(texts) {
            starts.push(w.position() - MAGIC3.len() as u64);
            w.bytes(d.id().as_bytes())?;
            w.u64(d.hash)?;
            w.u64(added)?;
            w.u64(at)?;
            for x in lens {
                w.u32(x)?;
            }
            put_chunks(&mut w, d, &mut points)?;
        }
        for start in starts {
            w.u64(start)?;
        }
        w.u64(structure_at)?;
        w.finish()
    }

    /// Writes format 2 (texts among the records; the whole file checked on open), as
    /// earlier builds did: the tests' files of the previous format.
    #[cfg(test)]
    pub fn write_v2(&self, path: &Path, mark: &TableMark) -> Result<()> {
        let mut w = SumWriter::create(path, MAGIC)?;
        put_header(&mut w, 2, mark, self.docs.len())?;
        let mut starts = Vec::with_capacity(self.docs.len());
        let mut points = self.points.iter().copied();
        for (d, &added) in self.docs.iter().zip(&self.added) {
            starts.push(w.position() - MAGIC.len() as u64);
            w.bytes(d.id().as_bytes())?;
            match d.title() {
                Some(t) => w.bytes(t.as_bytes())?,
                None => w.u32(NO_TITLE)?,
            }
            w.bytes(d.text().as_bytes())?;
            w.bytes(&d.metadata_json()?)?;
            w.u64(d.hash)?;
            w.u64(added)?;
            put_chunks(&mut w, d, &mut points)?;
        }
        for start in starts {
            w.u64(start)?;
        }
        w.finish()
    }
}

/// Where each of `docs` documents starts: the u64 offsets that end `data`, the first at
/// `first`, each after the one before, all before the offsets themselves (returned with
/// where they start).
fn document_index(
    data: &[u8],
    first: usize,
    docs: usize,
    bad: &impl Fn(&str) -> IndexError,
) -> Result<(Vec<usize>, usize)> {
    let index_at = docs
        .checked_mul(8)
        .and_then(|b| data.len().checked_sub(b))
        .filter(|&at| at >= first)
        .ok_or_else(|| bad("document index"))?;
    let mut index = Cursor { data, at: index_at };
    let starts: Vec<usize> = (0..docs)
        .map(|_| index.u64().map(|x| x as usize))
        .collect::<Option<_>>()
        .ok_or_else(|| bad("document index"))?;
    if starts.first().is_some_and(|&s| s != first)
        || starts.windows(2).any(|w| w[0] >= w[1])
        || starts.last().is_some_and(|&s| s >= index_at)
        || (docs == 0 && index_at != first)
    {
        return Err(bad("document index"));
    }
    Ok((starts, index_at))
}

/// Checks a document's saved chunk records: spans inside its text (`spans_ok`), keys and
/// the document's sequence number (`added`) not newer than the table (`covered`,
/// `next_key`), each chunk at its point in the saved graph (`key_of`).
fn check_chunks(
    records: &[u8],
    spans_ok: impl Fn(&ChunkRecord) -> bool,
    (added, covered, next_key): (u64, u64, u64),
    key_of: &impl Fn(u32) -> Option<u64>,
    bad: &impl Fn(&str) -> IndexError,
) -> Result<()> {
    for record in records.chunks_exact(CHUNK_BYTES) {
        let (c, point) = saved_chunk(record);
        let key = c.key;
        if !spans_ok(&c) {
            return Err(bad(&format!("chunk {key} spans outside its text")));
        }
        if key >= next_key || added > covered {
            return Err(bad(&format!("chunk {key} is newer than the table")));
        }
        if key_of(point) != Some(key) {
            return Err(bad(&format!("chunk {key} is not at its point in the saved graph")));
        }
    }
    Ok(())
}

/// Checks the texts of every saved table `docs` read from ([`SavedTable::verify_texts`];
/// documents of one table come in runs, so each run asks once).
fn verify_saved_texts<'a>(docs: impl Iterator<Item = &'a Arc<DocEntry>>) -> Result<()> {
    let mut checked: Option<*const SavedTable> = None;
    for t in docs.filter_map(|d| d.saved_table()) {
        if checked != Some(Arc::as_ptr(t)) {
            t.verify_texts()?;
            checked = Some(Arc::as_ptr(t));
        }
    }
    Ok(())
}

/// The header of u64s every format's records start with: version, covered sequence number,
/// next sequence number, next chunk key, the log mark and the document count.
fn put_header(w: &mut SumWriter, version: u64, mark: &TableMark, docs: usize) -> Result<()> {
    let m = &mark.mark;
    for x in [
        version,
        mark.covered,
        mark.next_seq,
        mark.next_key,
        m.end,
        m.last_start,
        m.last_crc as u64,
        m.last_seq,
        docs as u64,
    ] {
        w.u64(x)?;
    }
    Ok(())
}

/// A document's chunk count and chunk records, each with its point, taken from `points`.
fn put_chunks(w: &mut SumWriter, d: &DocEntry, points: &mut impl Iterator<Item = u32>) -> Result<()> {
    let chunks = d.chunks();
    w.u32(chunks.len() as u32)?;
    for c in chunks.iter() {
        let point = points.next().unwrap_or(UNPLACED);
        w.u64(c.key)?;
        for x in [c.byte_start, c.byte_end, c.char_start, c.char_end, c.tokens, point] {
            w.u32(x)?;
        }
    }
    Ok(())
}

impl Table {
    /// Reads a table written by [`Table::save`]. Every chunk's point is checked against
    /// `key_of` (the saved graph's key at a point, `None` past its end): a table and a graph
    /// that do not belong together are refused, never mixed.
    pub fn load(path: &Path, key_of: impl Fn(u32) -> Option<u64> + Sync) -> Result<(Table, TableMark)> {
        match crate::filefmt::magic_of(path)? {
            Some(m) if &m == MAGIC3 => Self::load_v3(path, key_of),
            _ => Self::load_v12(path, key_of),
        }
    }

    /// Format 3: only the records' section is read and checked; the texts are read where
    /// they are used (UTF-8 checked on each read) and their checksum before any copy.
    fn load_v3(path: &Path, key_of: impl Fn(u32) -> Option<u64> + Sync) -> Result<(Table, TableMark)> {
        use rayon::prelude::*;
        let (file, structure_at) = Checked::open_tail(path, MAGIC3, "chunk table")?;
        let saved = Arc::new(SavedTable::new(file, Some(structure_at), path));
        let body = saved.body();
        let bad = |why: &str| IndexError::Corrupt(format!("{}: {why}", path.display()));
        // The texts end with their checksum; the records end with where they start (u64).
        let texts_end = structure_at - 4;
        let structure_end = body.len() - 8;
        let mut r = Cursor { data: &body[..structure_end], at: structure_at };
        let header: Vec<u64> = (0..9).map(|_| r.u64()).collect::<Option<_>>().ok_or_else(|| bad("short header"))?;
        let [version, covered, next_seq, next_key, end, last_start, last_crc, last_seq, docs] = header[..] else {
            unreachable!()
        };
        if version != 3 {
            return Err(bad(&format!("format version {version} in a format-3 file")));
        }
        let last_crc = u32::try_from(last_crc).map_err(|_| bad("checksum field"))?;
        let mark = TableMark { covered, mark: LogMark { end, last_start, last_crc, last_seq }, next_seq, next_key };
        // A record takes at least 4 + 3 × 8 + 4 × 4 bytes, and 8 in the index.
        if docs > ((structure_end - r.at) / 52) as u64 {
            return Err(bad("document count"));
        }
        let docs = docs as usize;
        let (starts, index_at) = document_index(&body[..structure_end], r.at, docs, &bad)?;
        let records = &body[..index_at];
        let parse = |i: usize| -> Result<(Arc<DocEntry>, u64)> {
            let mut r = Cursor { data: records, at: starts[i] };
            let end = starts.get(i + 1).copied().unwrap_or(index_at);
            let short = || bad("short document");
            simdutf8::basic::from_utf8(r.bytes().ok_or_else(short)?).map_err(|_| bad("an id is not UTF-8"))?;
            let hash = r.u64().ok_or_else(short)?;
            let added = r.u64().ok_or_else(short)?;
            let texts_at = r.u64().ok_or_else(short)?;
            let [title, text, metadata, n] = [
                r.u32().ok_or_else(short)?,
                r.u32().ok_or_else(short)?,
                r.u32().ok_or_else(short)?,
                r.u32().ok_or_else(short)?,
            ];
            let title = if title == NO_TITLE { 0 } else { u64::from(title) };
            let texts_end_here = texts_at + title + u64::from(text) + u64::from(metadata);
            if texts_at > texts_end as u64 || texts_end_here > texts_end as u64 {
                return Err(bad("a document's texts lie outside the texts section"));
            }
            let n = n as usize;
            if n.checked_mul(CHUNK_BYTES).is_none_or(|b| r.at + b != end) {
                return Err(bad("documents overlap"));
            }
            // Spans inside the text's length (char boundaries are checked where it is read).
            let spans_ok = |c: &ChunkRecord| c.byte_start <= c.byte_end && c.byte_end <= text;
            check_chunks(&records[r.at..end], spans_ok, (added, covered, next_key), &key_of, &bad)?;
            let fields = Fields::Saved { table: saved.clone(), at: starts[i] };
            Ok((Arc::new(DocEntry { hash, fields, metadata: OnceLock::new() }), added))
        };
        let parsed = (0..docs).into_par_iter().map(parse).collect::<Result<Vec<_>>>()?;
        Ok((Self::assemble(parsed, bad)?, mark))
    }

    /// Formats 1 and 2: the whole file checked, every string checked to be UTF-8.
    fn load_v12(path: &Path, key_of: impl Fn(u32) -> Option<u64> + Sync) -> Result<(Table, TableMark)> {
        use rayon::prelude::*;
        let file = Checked::open(path, MAGIC, "chunk table")?;
        let saved = Arc::new(SavedTable::new(file, None, path));
        let body = saved.body();
        let bad = |why: &str| IndexError::Corrupt(format!("{}: {why}", path.display()));
        let mut r = Cursor::new(body);
        let header: Vec<u64> = (0..9).map(|_| r.u64()).collect::<Option<_>>().ok_or_else(|| bad("short header"))?;
        let [version, covered, next_seq, next_key, end, last_start, last_crc, last_seq, docs] = header[..] else {
            unreachable!()
        };
        if version != 1 && version != 2 {
            return Err(bad(&format!(
                "format version {version} in a format-1/2 file (this build reads 1 to {FORMAT_VERSION})"
            )));
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
            document_index(body, r.at, docs, &bad)?
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
        let parse = |i: usize| -> Result<(Arc<DocEntry>, u64)> {
            let mut r = Cursor { data: body, at: starts[i] };
            let end = starts.get(i + 1).copied().unwrap_or(docs_end);
            let short = || bad("short document");
            // Every field stays in the mapped file, checked here once (see `Fields::Saved`).
            let utf8 = |b: &[u8], what: &str| -> Result<()> {
                simdutf8::basic::from_utf8(b).map(drop).map_err(|_| bad(&format!("{what} is not UTF-8")))
            };
            utf8(r.bytes().ok_or_else(short)?, "an id")?;
            match r.u32().ok_or_else(short)? {
                NO_TITLE => {}
                n => utf8(r.take(n as usize).ok_or_else(short)?, "a title")?,
            }
            let text =
                simdutf8::basic::from_utf8(r.bytes().ok_or_else(short)?).map_err(|_| bad("a text is not UTF-8"))?;
            utf8(r.bytes().ok_or_else(short)?, "metadata")?;
            let hash = r.u64().ok_or_else(short)?;
            let added = r.u64().ok_or_else(short)?;
            let n = r.u32().ok_or_else(short)? as usize;
            if n.checked_mul(CHUNK_BYTES).is_none_or(|b| r.at + b != end) {
                return Err(bad("documents overlap"));
            }
            let spans_ok = |c: &ChunkRecord| {
                let (s, e) = (c.byte_start as usize, c.byte_end as usize);
                s <= e && e <= text.len() && text.is_char_boundary(s) && text.is_char_boundary(e)
            };
            check_chunks(&body[r.at..end], spans_ok, (added, covered, next_key), &key_of, &bad)?;
            let fields = Fields::Saved { table: saved.clone(), at: starts[i] };
            Ok((Arc::new(DocEntry { hash, fields, metadata: OnceLock::new() }), added))
        };
        let parsed = (0..docs).into_par_iter().map(parse).collect::<Result<Vec<_>>>()?;
        Ok((Self::assemble(parsed, bad)?, mark))
    }

    /// The table of loaded documents (with the sequence number that added each).
    ///
    /// The two maps are filled side by side, one thread each (with a million documents,
    /// their inserts were most of an open's serial time), the ids' SipHashes computed
    /// beforehand by all threads.
    fn assemble(parsed: Vec<(Arc<DocEntry>, u64)>, bad: impl Fn(&str) -> IndexError + Sync) -> Result<Table> {
        use rayon::prelude::*;
        let mut table = Table::default();
        let (docs, chunks) = (&mut table.docs, &mut table.chunks);
        let hashes: Vec<u64> = parsed.par_iter().map(|(d, _)| docs.hash_of(d.id())).collect();
        let (by_key, by_id) = rayon::join(
            || -> Result<()> {
                chunks.reserve(parsed.len());
                for (doc, added) in &parsed {
                    let Chunks::Saved(records) = doc.chunks() else { unreachable!("a loaded document") };
                    for (i, record) in records.chunks_exact(CHUNK_BYTES).enumerate() {
                        let (c, point) = saved_chunk(record);
                        let entry = ChunkEntry {
                            doc: doc.clone(),
                            index: i as u32,
                            point,
                            added: *added,
                            removed: NOT_REMOVED,
                        };
                        if chunks.insert(c.key, entry).is_some() {
                            return Err(bad(&format!("chunk {} appears twice", c.key)));
                        }
                    }
                }
                Ok(())
            },
            || -> Result<()> {
                docs.reserve(parsed.len());
                for ((doc, _), &hash) in parsed.iter().zip(&hashes) {
                    if docs.insert_hashed(hash, doc.clone()).is_some() {
                        return Err(bad("a document appears twice"));
                    }
                }
                Ok(())
            },
        );
        by_key?;
        by_id?;
        Ok(table)
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

    /// The body of a format-2 file of the sample table (what earlier builds wrote).
    fn sample_body(dir: &Path) -> Vec<u8> {
        let (table, mark) = sample_table();
        let path = dir.join("table.snap");
        table.to_save().write_v2(&path, &mark).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        bytes[8..bytes.len() - 4].to_vec()
    }

    /// The sample table saved in the current format: the file's bytes and where its records
    /// start in the body.
    fn sample_v3(dir: &Path) -> (std::path::PathBuf, Vec<u8>, usize) {
        let (table, mark) = sample_table();
        let path = dir.join("table.snap");
        table.save(&path, &mark).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let tail_at = u64::from_le_bytes(bytes[bytes.len() - 12..bytes.len() - 4].try_into().unwrap()) as usize;
        (path, bytes, tail_at)
    }

    /// Both checksums of a format-3 file recomputed: damage a buggy writer could leave.
    fn reseal(bytes: &mut [u8], tail_at: usize) {
        let texts_end = 8 + tail_at - 4;
        let crc = crc32fast::hash(&bytes[..texts_end]);
        bytes[texts_end..texts_end + 4].copy_from_slice(&crc.to_le_bytes());
        let n = bytes.len();
        let crc = crc32fast::hash(&bytes[8 + tail_at..n - 4]);
        bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
    }

    /// Reads every field of every document and chunk (what searches and reads do).
    fn read_all(t: &Table) {
        for d in t.docs.values() {
            let _ = (d.id().len(), d.title().map(str::len), d.text().len(), d.metadata().is_null());
            for c in d.chunks().iter() {
                let _ = d.chunk_text(&c).len();
            }
        }
        for c in t.chunks.values() {
            let _ = c.text().len();
        }
    }

    fn sample_table() -> (Table, TableMark) {
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
        (table, mark)
    }

    #[test]
    fn a_saved_table_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _, _) = sample_v3(dir.path());
        assert_eq!(crate::filefmt::magic_of(&path).unwrap().as_ref(), Some(MAGIC3));
        let (t, mark) = Table::load(&path, |p| (p < 5).then_some(p as u64)).unwrap();
        assert_eq!(mark, sample_table().1);
        assert_eq!((t.docs.len(), t.chunks.len(), mark.next_key), (5, 5, 5));
        assert_eq!(t.docs["d3"].text(), "héllo wörld, twice".repeat(4));
        assert_eq!(t.chunks[&3].text(), "héllo");
        // A table whose points do not match the graph is refused.
        assert!(Table::load(&path, |p| (p < 5).then_some(p as u64 + 1)).is_err());
    }

    #[test]
    fn loaded_documents_read_as_written_and_are_replaced_and_removed_by_id() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _, _) = sample_v3(dir.path());
        let (mut t, _) = Table::load(&path, |p| (p < 5).then_some(p as u64)).unwrap();
        for i in 0..5u64 {
            let d = t.docs.get(&format!("d{i}")).expect("loaded");
            assert!(matches!(d.fields, Fields::Saved { .. }));
            assert_eq!(d.id(), format!("d{i}"));
            assert_eq!(d.title(), (i % 2 == 0).then(|| format!("T{i}")).as_deref());
            assert_eq!(d.text(), "héllo wörld, twice".repeat(i as usize + 1));
            assert_eq!(*d.metadata(), serde_json::json!({"i": i}));
            assert_eq!(d.hash, i);
            let chunks: Vec<ChunkRecord> = d.chunks().iter().collect();
            assert_eq!(
                chunks,
                [ChunkRecord { key: i, byte_start: 0, byte_end: 6, char_start: 0, char_end: 5, tokens: 2 }]
            );
            assert_eq!(t.chunks[&i].point, i as u32);
        }
        assert!(t.docs.get("d5").is_none() && !t.docs.contains_key("d"));
        // A written version replaces the loaded one under the same id; the old chunk is removed.
        let new = DocRecord {
            id: "d2".into(),
            title: None,
            text: "new text".into(),
            metadata: serde_json::json!({"new": true}),
            hash: 42,
            chunks: vec![ChunkRecord { key: 9, byte_start: 0, byte_end: 3, char_start: 0, char_end: 3, tokens: 1 }],
        };
        t.upsert(7, &[new], &[9]);
        assert_eq!((t.docs.len(), t.docs["d2"].text(), t.docs["d2"].hash), (5, "new text", 42));
        assert_eq!((t.chunks[&2].removed, t.chunks[&9].text()), (7, "new"));
        t.delete(8, &["d3".into(), "missing".into()]);
        assert_eq!((t.docs.len(), t.chunks[&3].removed), (4, 8));
        assert!(t.docs.get("d3").is_none());
        let mut ids: Vec<&str> = t.docs.values().map(|d| d.id()).collect();
        ids.sort();
        assert_eq!(ids, ["d0", "d1", "d2", "d4"]);
        // Saved again (loaded and written documents mixed), it loads back the same.
        let mark = TableMark {
            covered: 8,
            mark: LogMark { end: 200, last_start: 100, last_crc: 1, last_seq: 8 },
            next_seq: 9,
            next_key: 10,
        };
        let again = dir.path().join("again.snap");
        t.save(&again, &mark).unwrap();
        let (u, m) =
            Table::load(&again, |p| [0, 1, 9, 3, 4, 5, 6, 7, 8, 9].get(p as usize).map(|&k| k as u64)).unwrap();
        assert_eq!(m, mark);
        for d in t.docs.values() {
            let e = &u.docs[d.id()];
            assert_eq!((e.title(), e.text(), e.metadata(), e.hash), (d.title(), d.text(), d.metadata(), d.hash));
            assert_eq!(e.chunks().iter().collect::<Vec<_>>(), d.chunks().iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_loaded_table_reads_results_ahead_while_cold_and_stops_once_warm() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _, _) = sample_v3(dir.path());
        let (t, _) = Table::load(&path, |p| (p < 5).then_some(p as u64)).unwrap();
        let saved = t.docs["d0"].saved_table().unwrap().clone();
        // Just opened: its pages may be on disk only.
        assert!(saved.cold.on());
        // What is read ahead is each document's title, text and metadata, exactly.
        for d in t.docs.values() {
            let (_, span) = d.texts_span().unwrap();
            let want =
                format!("{}{}{}", d.title().unwrap_or(""), d.text(), serde_json::to_string(d.metadata()).unwrap());
            assert_eq!(std::str::from_utf8(&saved.body()[span]).unwrap(), want, "{}", d.id());
        }
        let faults = major_faults();
        for _ in 0..crate::cold::COLD_SEARCHES {
            // A key not in the table (a chunk gone since its half ran) is passed over.
            t.read_ahead(&[4, 0, 99, 3]);
        }
        if major_faults() == faults {
            // Every page was in memory: the searches counted the spell down.
            assert!(!saved.cold.on());
        }
        assert_eq!((t.chunks[&3].text(), t.docs["d4"].title()), ("héllo", Some("T4")));
        // Written documents are in memory: nothing to read ahead.
        let (written, _) = sample_table();
        written.read_ahead(&[0, 1]);
        assert!(written.docs.values().all(|d| d.texts_span().is_none()));
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
        assert_eq!(t.docs["d3"].text(), "héllo wörld, twice".repeat(4));
        assert_eq!(t.docs["d2"].title(), Some("T2"));
        assert_eq!(t.docs["d1"].title(), None);
        assert_eq!(*t.docs["d4"].metadata(), serde_json::json!({"i": 4}));
        // Version 2 with an index that does not tile the documents.
        for (at, delta) in [(body.len() - 8, 1i64), (body.len() - 8, -3), (body.len() - 40, 2)] {
            let mut b = body.clone();
            let x = u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as i64 + delta;
            b[at..at + 8].copy_from_slice(&(x as u64).to_le_bytes());
            assert!(Table::load(&file_with(dir.path(), &b), key_of).is_err(), "index off by {delta} at {at}");
        }
    }

    #[test]
    fn format_2_tables_load_and_are_saved_again_in_format_3() {
        let dir = tempfile::tempdir().unwrap();
        let body = sample_body(dir.path());
        let v2 = file_with(dir.path(), &body);
        let key_of = |p: u32| (p < 5).then_some(p as u64);
        let (t, mark) = Table::load(&v2, key_of).unwrap();
        assert_eq!(t.docs["d4"].text(), "héllo wörld, twice".repeat(5));
        let v3 = dir.path().join("v3.snap");
        t.save(&v3, &mark).unwrap();
        assert_eq!(crate::filefmt::magic_of(&v3).unwrap().as_ref(), Some(MAGIC3));
        let (u, m) = Table::load(&v3, key_of).unwrap();
        assert_eq!(m, mark);
        for d in t.docs.values() {
            let e = &u.docs[d.id()];
            assert_eq!((e.title(), e.text(), e.metadata()), (d.title(), d.text(), d.metadata()));
        }
    }

    /// Format 3 does not read the texts on open: damage there (bit rot, not a writer) opens,
    /// reads as damaged text without a panic, and is refused before it is copied into
    /// another table.
    #[test]
    fn damaged_texts_are_caught_before_they_are_copied() {
        let dir = tempfile::tempdir().unwrap();
        let (path, bytes, tail_at) = sample_v3(dir.path());
        let key_of = |p: u32| (p < 5).then_some(p as u64);
        let text = "héllo wörld, twice".repeat(4);
        let at = bytes.windows(text.len()).position(|w| w == text.as_bytes()).unwrap();
        assert!(at + text.len() < 8 + tail_at, "texts before the records");
        for (what, damage) in [("not UTF-8", 0xFFu8), ("other letters", b'#')] {
            let mut b = bytes.clone();
            b[at + 1] = damage;
            std::fs::write(&path, &b).unwrap();
            let (t, mark) = Table::load(&path, key_of).unwrap();
            read_all(&t);
            if damage == 0xFF {
                // d3's text, or d4's, which starts with the same bytes (documents are saved
                // in the map's order).
                assert!(t.docs.values().any(|d| d.text() == DAMAGED), "{what}");
            }
            let err = t.save(&dir.path().join("copy.snap"), &mark).unwrap_err().to_string();
            assert!(err.contains("texts' checksum"), "{what}: {err}");
            assert!(!dir.path().join("copy.snap").exists());
            assert!(!path.exists(), "{what}: the damaged table is removed (the next open replays the log)");
        }
        // Damage among the records is caught on open.
        let mut b = bytes.clone();
        b[8 + tail_at + 20] ^= 1;
        std::fs::write(&path, &b).unwrap();
        let err = Table::load(&path, key_of).err().expect("refused").to_string();
        assert!(err.contains("checksum"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Damaged format-3 tables under valid checksums (a buggy writer) are refused or read
        /// without a panic.
        #[test]
        fn damaged_v3_tables_never_panic(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
                                         cut in any::<prop::sample::Index>()) {
            let dir = tempfile::tempdir().unwrap();
            let (path, bytes, tail_at) = sample_v3(dir.path());
            let key_of = |p: u32| (p < 5).then_some(p as u64);
            let mut b = bytes.clone();
            for (at, x) in &flips {
                let i = 8 + at.index(b.len() - 8 - 16);
                b[i] ^= x | 1;
            }
            reseal(&mut b, tail_at);
            std::fs::write(&path, &b).unwrap();
            if let Ok((t, _)) = Table::load(&path, key_of) {
                read_all(&t);
            }
            let cut = cut.index(bytes.len());
            std::fs::write(&path, &bytes[..cut]).unwrap();
            prop_assert!(Table::load(&path, key_of).is_err());
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
