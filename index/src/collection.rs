//! A collection: the log (source of truth), the chunk table in memory, and the two derived
//! indexes — the HNSW graph and the tantivy index.
//!
//! ## Consistency
//! A write is appended to the log and fsynced, then applied to the table, the graph and
//! the tantivy writer, all under the collection's writer lock, and only then acknowledged.
//! What searches see is pinned to a log sequence number `V`: the last tantivy commit (its
//! payload). A chunk is visible when it was added at or before `V` and not removed at or
//! before `V`. The keyword half searches the commit `V` itself, which holds exactly those
//! chunks; the dense half filters graph hits on the same rule. So the halves never disagree
//! about which chunks exist, an upsert swaps a document's chunks atomically, and a commit
//! makes a whole batch visible at once.
//!
//! Removed chunks stay in the table until `V` passes their removal, then leave it; their
//! graph points stay and are filtered out until a rebuild ([`Collection::compact`]) builds a
//! fresh graph and rewrites the log with live documents. The graph holds the one copy of
//! each vector; the table refers to it by point.
//!
//! The graph is saved (`dense.hnsw`, marked with the last log record it covers) after a
//! compaction, on close, and every [`GRAPH_SAVE_EVERY`] new points. On open, the log is
//! replayed into the table, the saved graph is loaded and gets only the chunks written after
//! it (the whole graph is built when none is saved or it does not match the log), and
//! tantivy gets the records after its last commit's sequence number.

use crate::chunker::{chunk_text, ChunkSpan};
use crate::dense::{exact_search, DenseIndex};
use crate::embedder::ChunkEmbedder;
use crate::error::{IndexError, Result};
use crate::filter::Filter;
use crate::fusion::{fuse, Fused, SourceHit};
use crate::keyword::{KeywordChunk, KeywordIndex};
use crate::simd::dot;
use crate::table::{ChunkEntry, DocEntry, Table, TableMark, NOT_REMOVED, UNPLACED};
use crate::types::*;
use crate::wal::{self, ChunkRecord, DocRecord, Record, Wal};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// Most results one search returns.
pub const MAX_TOP_K: usize = 1000;
/// Longest query text.
pub const MAX_QUERY_BYTES: usize = 64 << 10;
/// Most candidates one search may ask each half for.
pub const MAX_CANDIDATES: usize = 10_000;

/// Longest document id accepted.
pub const MAX_ID_BYTES: usize = 512;
/// Most chunks a document may bring with its own vectors.
pub const MAX_OWN_CHUNKS: usize = 4096;
/// Filters matching at most this many chunks are always served by an exact scan.
const EXACT_SCAN_MIN: usize = 1024;
/// What a filtered graph walk spends per result slot and per unit of 1/selectivity, over
/// what testing the filter on one chunk of the table costs (`filter-bench` at 100,000
/// chunks: about 7 µs against 0.3 µs).
const WALK_OVER_FILTER_TEST: f64 = 20.0;
/// The same walk cost when the matching set is already built (a set lookup per point), over
/// the cost of one exact distance (about 2 µs against 0.2 µs).
const WALK_OVER_DISTANCE: f64 = 10.0;

/// Whether a dense-only filtered search expected to match `expected` chunks should scan the
/// table (testing the filter on every chunk, then exact distances to the matches) rather
/// than walk the graph testing it on the points met. The scan costs `N` filter tests; the
/// walk about `ef / selectivity = ef · N / expected` steps; `N` cancels out.
fn table_scan_pays(expected: usize, ef: usize) -> bool {
    expected as f64 <= WALK_OVER_FILTER_TEST * ef as f64
}

/// With the matching set already built (keyword and hybrid searches need it for tantivy):
/// whether exact distances to its `matching` chunks cost less than a walk of a graph of
/// `total` points that needs `ef` of them: `matching² ≤ c · ef · total`.
fn exact_scan_pays(matching: usize, total: usize, ef: usize) -> bool {
    let m = matching as f64;
    matching <= EXACT_SCAN_MIN || m * m <= WALK_OVER_DISTANCE * ef as f64 * total as f64
}

/// The saved graph.
const GRAPH_FILE: &str = "dense.hnsw";
/// The saved chunk table (saved with the graph, covering the same log records).
const TABLE_FILE: &str = "table.snap";
/// Points inserted since the last save after which a write saves the graph and the table
/// again, or a quarter of the graph when that is more (also saved after a compaction and on
/// close), so that an open replays a bounded log tail.
const GRAPH_SAVE_EVERY: usize = 50_000;

/// Why an open failed: a saved graph that does not match the log is rebuilt, not fatal.
enum OpenError {
    StaleGraph(String),
    Index(IndexError),
}

impl OpenError {
    fn into_index(self) -> IndexError {
        match self {
            OpenError::StaleGraph(why) => IndexError::Corrupt(why),
            OpenError::Index(e) => e,
        }
    }
}

impl From<IndexError> for OpenError {
    fn from(e: IndexError) -> Self {
        OpenError::Index(e)
    }
}

impl From<std::io::Error> for OpenError {
    fn from(e: std::io::Error) -> Self {
        OpenError::Index(e.into())
    }
}

impl From<serde_json::Error> for OpenError {
    fn from(e: serde_json::Error) -> Self {
        OpenError::Index(e.into())
    }
}

struct Writer {
    wal: Wal,
    next_seq: u64,
    next_key: u64,
    /// Graph points inserted since the graph was last saved.
    unsaved_points: usize,
}

/// What an open read from saved files and what it had to redo from the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenStats {
    /// Graph points loaded from the saved graph.
    pub graph_loaded: usize,
    /// Graph points inserted from the log (written after the saved graph).
    pub graph_inserted: usize,
    /// Whether the chunk table came from its saved file (else from the whole log).
    pub table_loaded: bool,
    /// Log records read.
    pub log_records: usize,
    /// Milliseconds spent mapping the saved graph, opening tantivy and loading the saved
    /// table, and on the whole open.
    pub graph_ms: u64,
    pub table_ms: u64,
    pub total_ms: u64,
}

/// A document chunked and ready to embed.
pub struct ChunkedDoc {
    pub input: DocumentInput,
    pub hash: u64,
    pub spans: Vec<ChunkSpan>,
    /// Embedding inputs, one per span (title tokens in front when configured; empty for
    /// chunks that brought their own vectors).
    pub embed_inputs: Vec<Vec<u32>>,
    /// The vectors the document brought (checked and in stored form), one per span.
    pub vectors: Option<Vec<Vec<f32>>>,
}

/// A document with its chunks' vectors.
pub struct PreparedDoc {
    pub chunked: ChunkedDoc,
    pub vectors: Vec<Vec<f32>>,
}

pub struct Collection {
    settings: CollectionSettings,
    dir: PathBuf,
    /// The embedding model; `None` for a collection whose documents and searches bring their
    /// own vectors.
    embedder: Option<Arc<dyn ChunkEmbedder>>,
    writer: Mutex<Writer>,
    table: RwLock<Table>,
    dense: RwLock<Arc<DenseIndex>>,
    keyword: KeywordIndex,
    /// Serializes commits (waiters of one commit share it).
    commit_lock: Mutex<()>,
    rebuilding: AtomicBool,
    drift: crate::drift::DriftMonitor,
    /// What the last open read from saved files and from the log.
    open_stats: OpenStats,
}

impl Collection {
    /// Creates a collection directory with its settings.
    pub fn create(dir: &Path, settings: CollectionSettings, embedder: Arc<dyn ChunkEmbedder>) -> Result<Collection> {
        Self::create_with(dir, settings, Some(embedder))
    }

    /// [`Collection::create`], for a collection with or without an embedding model.
    pub fn create_with(
        dir: &Path,
        settings: CollectionSettings,
        embedder: Option<Arc<dyn ChunkEmbedder>>,
    ) -> Result<Collection> {
        std::fs::create_dir_all(dir)?;
        // The collection's directory entry itself must survive a crash, not only its files.
        wal::sync_dir(dir)?;
        wal::write_atomic(&dir.join("settings.json"), &serde_json::to_vec_pretty(&settings)?)?;
        Self::open_embedded_by(dir, embedder)
    }

    /// Opens a collection: replays its log into the table, loads the saved graph and inserts
    /// what the log holds beyond it (or builds the graph when none is saved), brings tantivy
    /// up to date.
    pub fn open(dir: &Path, embedder: Arc<dyn ChunkEmbedder>) -> Result<Collection> {
        Self::open_embedded_by(dir, Some(embedder))
    }

    /// [`Collection::open`], for a collection with or without an embedding model.
    pub fn open_embedded_by(dir: &Path, embedder: Option<Arc<dyn ChunkEmbedder>>) -> Result<Collection> {
        for file in [GRAPH_FILE, TABLE_FILE] {
            let _ = std::fs::remove_file(crate::filefmt::temp_path(&dir.join(file)));
        }
        let started = std::time::Instant::now();
        let saved = match DenseIndex::load(&dir.join(GRAPH_FILE)) {
            Ok(g) => Some(g),
            Err(IndexError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                // Derived data: rebuilt from the log.
                tracing::warn!(dir = %dir.display(), error = %e, "saved graph unreadable; rebuilding it from the log");
                None
            }
        };
        let graph_ms = started.elapsed().as_millis() as u64;
        let opened = match Self::open_with(dir, embedder.clone(), saved) {
            Err(OpenError::StaleGraph(why)) => {
                tracing::warn!(dir = %dir.display(), why = %why, "saved graph does not match the log; rebuilding it");
                Self::open_with(dir, embedder, None).map_err(OpenError::into_index)
            }
            other => other.map_err(OpenError::into_index),
        };
        opened.map(|mut c| {
            c.open_stats.graph_ms = graph_ms;
            c.open_stats.total_ms = started.elapsed().as_millis() as u64;
            c
        })
    }

    fn open_with(
        dir: &Path,
        embedder: Option<Arc<dyn ChunkEmbedder>>,
        saved: Option<(DenseIndex, u64)>,
    ) -> std::result::Result<Collection, OpenError> {
        let settings: CollectionSettings = serde_json::from_slice(&std::fs::read(dir.join("settings.json"))?)?;
        if let Some(embedder) = &embedder {
            if embedder.dim() != settings.dimension {
                return Err(OpenError::Index(IndexError::Corrupt(format!(
                    "collection `{}` holds {}-d vectors but model `{}` makes {}-d ones",
                    settings.name,
                    settings.dimension,
                    embedder.model_id(),
                    embedder.dim()
                ))));
            }
        }
        let started = std::time::Instant::now();
        let keyword = match KeywordIndex::open(&dir.join("keyword")) {
            Ok(k) => k,
            Err(e) => {
                // Derived data: rebuild it from the log.
                tracing::warn!(collection = %settings.name, error = %e, "keyword index unreadable; rebuilding it from the log");
                std::fs::remove_dir_all(dir.join("keyword"))?;
                KeywordIndex::open(&dir.join("keyword"))?
            }
        };
        let keyword_seq = keyword.snapshot().seq;
        let dim = settings.dimension;
        let (dense, covered) = match saved {
            Some((g, covered)) => {
                let (gd, gdist) = (g.read().dim(), g.read().distance());
                if gd != dim || gdist != settings.distance {
                    return Err(OpenError::StaleGraph(format!("graph of {gd}-d {gdist:?} vectors")));
                }
                (g, covered)
            }
            None => (DenseIndex::new(settings.hnsw, settings.distance, dim, 1024), 0),
        };
        let loaded = dense.len();
        // The saved table, when it covers what the saved graph covers and tantivy holds all
        // of it: then only the log after it is replayed.
        let mut snapshot = if loaded > 0 && keyword_seq >= covered {
            let g = dense.read();
            match Table::load(&dir.join(TABLE_FILE), |p| ((p as usize) < g.len()).then(|| g.key(p))) {
                Ok((t, m)) if m.covered == covered => Some((t, m)),
                Ok((_, m)) => {
                    tracing::info!(collection = %settings.name, table = m.covered, graph = covered, "saved table and graph cover different log records; replaying the whole log");
                    None
                }
                Err(IndexError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    tracing::warn!(collection = %settings.name, error = %e, "saved table unreadable; replaying the whole log");
                    None
                }
            }
        } else {
            None
        };
        let table_ms = started.elapsed().as_millis() as u64;
        let log = dir.join("log.wal");
        let (wal, mut replay, table_loaded) = loop {
            let from_snapshot = snapshot.is_some();
            let (mut replay, mark) = match snapshot.take() {
                Some((table, m)) => (Replay::new(table, m.next_seq, m.next_key, covered, covered, dim), Some(m.mark)),
                None => (Replay::new(Table::default(), 1, 0, 0, covered, dim).with_placed(&dense), None),
            };
            let opened = Wal::open_after(&log, mark, |record| replay.apply(record, &keyword, keyword_seq))?;
            match opened {
                Some(wal) => break (wal, replay, from_snapshot),
                None if from_snapshot => {
                    tracing::warn!(collection = %settings.name, "saved table does not match the log; replaying the whole log");
                }
                None => unreachable!("a replay from the start has no mark to miss"),
            }
        };
        let (next_seq, next_key, last_seq, replayed, log_records) =
            (replay.next_seq, replay.next_key, replay.last_seq, replay.replayed, replay.records);
        let mut table = std::mem::take(&mut replay.table);
        let mut pending = std::mem::take(&mut replay.pending);
        drop(replay);
        // After the replay everything is committed below, so nothing removed stays visible.
        table.collect(u64::MAX);
        if covered > last_seq {
            return Err(OpenError::StaleGraph(format!(
                "graph covers log record {covered}, the log ends at {last_seq}"
            )));
        }
        let mut unplaced: Vec<u64> = Vec::new();
        for (k, c) in &table.chunks {
            if c.point == UNPLACED {
                if c.added <= covered {
                    return Err(OpenError::StaleGraph(format!("chunk {k} is missing from the graph")));
                }
                unplaced.push(*k);
            }
        }
        unplaced.sort_unstable();
        let built = unplaced.len();
        {
            let items: Vec<(&[f32], u64)> = unplaced.iter().map(|k| (&*pending[k], *k)).collect();
            let points = dense.insert(&items);
            for (k, p) in unplaced.iter().zip(points) {
                if let Some(c) = table.chunks.get_mut(k) {
                    c.point = p;
                }
            }
        }
        pending.clear();
        table.dead_points = dense.len().saturating_sub(table.chunks.len());
        let collection = Collection {
            dir: dir.to_path_buf(),
            embedder,
            writer: Mutex::new(Writer { wal, next_seq, next_key, unsaved_points: built }),
            table: RwLock::new(table),
            dense: RwLock::new(Arc::new(dense)),
            keyword,
            commit_lock: Mutex::new(()),
            rebuilding: AtomicBool::new(false),
            drift: crate::drift::DriftMonitor::open(dir),
            settings,
            open_stats: OpenStats {
                graph_loaded: loaded,
                graph_inserted: built,
                table_loaded,
                log_records,
                table_ms,
                ..Default::default()
            },
        };
        // Records that touched nothing in tantivy still count as seen.
        collection.keyword.skip(next_seq - 1);
        collection.commit()?;
        tracing::info!(
            collection = %collection.settings.name,
            documents = collection.table.read().expect("table").docs.len(),
            chunks = collection.table.read().expect("table").chunks.len(),
            keyword_replayed_records = replayed,
            graph_points_loaded = loaded,
            graph_points_inserted = built,
            table_loaded,
            log_records,
            seconds = started.elapsed().as_secs_f32(),
            "collection opened"
        );
        Ok(collection)
    }

    /// The current graph (compaction swaps in a fresh one).
    fn graph(&self) -> Arc<DenseIndex> {
        self.dense.read().expect("dense").clone()
    }

    /// What the last open read from saved files and from the log.
    pub fn open_stats(&self) -> OpenStats {
        self.open_stats
    }

    pub fn settings(&self) -> &CollectionSettings {
        &self.settings
    }

    pub fn name(&self) -> &str {
        &self.settings.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The embedding model (`None`: documents and searches bring their own vectors).
    pub fn embedder(&self) -> Option<&Arc<dyn ChunkEmbedder>> {
        self.embedder.as_ref()
    }

    /// The embedding model, or an error saying what to send instead.
    fn model(&self, needs: &str) -> Result<&Arc<dyn ChunkEmbedder>> {
        self.embedder.as_ref().ok_or_else(|| {
            IndexError::invalid(
                "vector",
                format!("collection `{}` has no embedding model: {needs}", self.settings.name),
            )
        })
    }

    /// A vector a request brought, checked and brought into stored form.
    fn own_vector(&self, doc: &str, param: &str, mut v: Vec<f32>) -> Result<Vec<f32>> {
        let dim = self.settings.dimension;
        if v.len() != dim {
            return Err(IndexError::invalid(
                param,
                format!("document `{doc}`: `{param}` has {} dimensions; the collection's have {dim}", v.len()),
            ));
        }
        if !v.iter().all(|x| x.is_finite()) || !dot(&v, &v).is_finite() {
            return Err(IndexError::invalid(
                param,
                format!("document `{doc}`: `{param}` must hold finite numbers of moderate size"),
            ));
        }
        self.settings.distance.prepare(&mut v);
        Ok(v)
    }

    /// Validates a document and chunks it (tokenizing once). A document that brings its own
    /// vector is one chunk; one that brings `chunks` keeps them as given.
    pub fn chunk(&self, mut input: DocumentInput) -> Result<ChunkedDoc> {
        let hash = doc_hash(&input);
        if let Some(chunks) = input.chunks.take() {
            let mut text = String::new();
            let mut chars = 0usize;
            let mut spans = Vec::with_capacity(chunks.len());
            let mut vectors = Vec::with_capacity(chunks.len());
            for (i, c) in chunks.into_iter().enumerate() {
                if i > 0 {
                    text.push_str("\n\n");
                    chars += 2;
                }
                let (byte_start, char_start) = (text.len(), chars);
                text.push_str(&c.text);
                chars += c.text.chars().count();
                spans.push(ChunkSpan {
                    byte_start,
                    byte_end: text.len(),
                    char_start,
                    char_end: chars,
                    token_ids: Vec::new(),
                });
                vectors.push(self.own_vector(&input.id, &format!("chunks[{i}].vector"), c.vector)?);
            }
            input.text = text;
            let embed_inputs = vec![Vec::new(); spans.len()];
            return Ok(ChunkedDoc { input, hash, spans, embed_inputs, vectors: Some(vectors) });
        }
        if let Some(v) = input.vector.take() {
            let v = self.own_vector(&input.id, "vector", v)?;
            let span = ChunkSpan {
                byte_start: 0,
                byte_end: input.text.len(),
                char_start: 0,
                char_end: input.text.chars().count(),
                token_ids: Vec::new(),
            };
            return Ok(ChunkedDoc {
                input,
                hash,
                spans: vec![span],
                embed_inputs: vec![Vec::new()],
                vectors: Some(vec![v]),
            });
        }
        let embedder = self.model(&format!("document `{}` needs `vector` or `chunks` with vectors", input.id))?;
        let model_max = embedder.max_input_tokens();
        let budget = self.settings.chunking.max_tokens.unwrap_or(model_max).min(model_max);
        let tokenizer = embedder.tokenizer();
        let title_ids: Vec<u32> = match (&input.title, self.settings.chunking.embed_title) {
            (Some(t), true) if !t.trim().is_empty() => tokenizer
                .encode(t.as_str(), false)
                .map_err(|e| IndexError::Internal(format!("tokenizer: {e}")))?
                .get_ids()
                .to_vec(),
            _ => Vec::new(),
        };
        // The title takes its share of the budget, but never more than half of it.
        let title_ids = &title_ids[..title_ids.len().min(budget / 2)];
        let text_budget = budget - title_ids.len();
        let overlap = self.settings.chunking.overlap_tokens.min(text_budget / 2);
        let mut spans = chunk_text(tokenizer, &input.text, text_budget, overlap)?;
        if spans.is_empty() && !title_ids.is_empty() {
            // A document with a title and no text: one empty chunk, embedded from the title.
            spans.push(ChunkSpan { byte_start: 0, byte_end: 0, char_start: 0, char_end: 0, token_ids: Vec::new() });
        }
        let embed_inputs = spans.iter().map(|s| [title_ids, &s.token_ids[..]].concat()).collect();
        Ok(ChunkedDoc { input, hash, spans, embed_inputs, vectors: None })
    }

    /// Embeds chunked documents (in batches of `batch` inputs); documents that brought their
    /// own vectors keep them.
    pub fn embed(&self, docs: Vec<ChunkedDoc>, batch: usize) -> Result<Vec<PreparedDoc>> {
        let inputs: Vec<Vec<u32>> =
            docs.iter().filter(|d| d.vectors.is_none()).flat_map(|d| d.embed_inputs.iter().cloned()).collect();
        let mut vectors = Vec::with_capacity(inputs.len());
        let mut inputs = inputs.into_iter().peekable();
        if inputs.peek().is_some() {
            let embedder = self.model("documents need `vector` or `chunks` with vectors")?;
            while inputs.peek().is_some() {
                let part: Vec<Vec<u32>> = inputs.by_ref().take(batch.max(1)).collect();
                vectors.extend(embedder.embed_ids(part)?);
            }
        }
        let mut vectors = vectors.into_iter();
        Ok(docs
            .into_iter()
            .map(|mut chunked| match chunked.vectors.take() {
                Some(own) => PreparedDoc { chunked, vectors: own },
                None => {
                    let n = chunked.spans.len();
                    PreparedDoc { chunked, vectors: vectors.by_ref().take(n).collect() }
                }
            })
            .collect())
    }

    /// True when the stored version of `id` has this hash (an upsert would change nothing).
    pub fn is_unchanged(&self, id: &str, hash: u64) -> bool {
        self.table.read().expect("table").docs.get(id).is_some_and(|d| d.hash == hash)
    }

    /// Upserts documents end to end: validate, skip unchanged ones, chunk, embed, write.
    /// With `wait`, returns once the write is searchable (it is durable either way).
    pub fn upsert(&self, docs: Vec<DocumentInput>, wait: bool) -> Result<WriteResult> {
        validate_batch(&docs)?;
        let mut unchanged = 0;
        let fresh: Vec<DocumentInput> = docs
            .into_iter()
            .filter(|d| {
                let same = self.is_unchanged(&d.id, doc_hash(d));
                unchanged += same as usize;
                !same
            })
            .collect();
        let chunked = fresh.into_par_iter().map(|d| self.chunk(d)).collect::<Result<Vec<_>>>()?;
        let prepared = self.embed(chunked, 256)?;
        let mut result = self.write(prepared)?;
        result.unchanged += unchanged;
        if wait && result.seq > 0 {
            self.wait_visible(result.seq)?;
        }
        Ok(result)
    }

    /// Writes embedded documents as one log record. Documents whose stored version has the
    /// same hash are skipped (re-running an ingestion changes nothing).
    pub fn write(&self, docs: Vec<PreparedDoc>) -> Result<WriteResult> {
        let dim = self.settings.dimension;
        let mut writer = self.writer.lock().expect("writer lock");
        let mut result = WriteResult::default();
        let mut records = Vec::with_capacity(docs.len());
        let mut flat: Vec<f32> = Vec::new();
        // Within one batch the last version of a document wins (as if written in order).
        let mut last: HashMap<String, usize> = HashMap::new();
        for (i, d) in docs.iter().enumerate() {
            last.insert(d.chunked.input.id.clone(), i);
        }
        for (i, doc) in docs.into_iter().enumerate() {
            let input = doc.chunked.input;
            if last[&input.id] != i {
                result.upserted += 1;
                continue;
            }
            if self.is_unchanged(&input.id, doc.chunked.hash) {
                result.unchanged += 1;
                continue;
            }
            if doc.vectors.len() != doc.chunked.spans.len() {
                return Err(IndexError::Internal(format!(
                    "{} vectors for {} chunks of `{}`",
                    doc.vectors.len(),
                    doc.chunked.spans.len(),
                    input.id
                )));
            }
            let mut chunks = Vec::with_capacity(doc.chunked.spans.len());
            for (span, mut vector) in doc.chunked.spans.iter().zip(doc.vectors) {
                if vector.len() != dim {
                    return Err(IndexError::Internal(format!(
                        "embedding has {} dimensions, expected {dim}",
                        vector.len()
                    )));
                }
                self.settings.distance.prepare(&mut vector);
                flat.extend_from_slice(&vector);
                chunks.push(ChunkRecord {
                    key: writer.next_key,
                    byte_start: span.byte_start as u32,
                    byte_end: span.byte_end as u32,
                    char_start: span.char_start as u32,
                    char_end: span.char_end as u32,
                    tokens: doc.chunked.embed_inputs.get(chunks.len()).map_or(0, |t| t.len() as u32),
                });
                writer.next_key += 1;
            }
            result.chunks += chunks.len();
            records.push(DocRecord {
                id: input.id,
                title: input.title,
                text: input.text,
                metadata: input.metadata.unwrap_or(serde_json::Value::Null),
                hash: doc.chunked.hash,
                chunks,
            });
        }
        if records.is_empty() {
            return Ok(result);
        }
        result.upserted += records.len();
        let seq = writer.next_seq;
        let record = Record::Upsert { seq, docs: records, vectors: flat };
        writer.wal.append(&record)?;
        writer.next_seq += 1;
        let Record::Upsert { docs, vectors, .. } = record else { unreachable!() };
        let items: Vec<(&[f32], u64)> =
            docs.iter().flat_map(|d| d.chunks.iter()).zip(vectors.chunks_exact(dim)).map(|(c, v)| (v, c.key)).collect();
        let dense = self.graph();
        let points = dense.insert(&items);
        drop(items);
        self.table.write().expect("table").upsert(seq, &docs, &points);
        apply_keyword(&self.keyword, seq, &docs)?;
        writer.unsaved_points += points.len();
        // Saves grow with the collection, so they come at a fixed share of its size: the
        // work over a whole ingestion stays proportional to its size.
        if writer.unsaved_points >= GRAPH_SAVE_EVERY.max(dense.len() / 4) {
            self.save_graph_or_warn(&mut writer);
        }
        result.seq = seq;
        Ok(result)
    }

    /// Deletes documents by id; ids that do not exist are ignored (counted out).
    pub fn delete(&self, ids: &[String], wait: bool) -> Result<WriteResult> {
        let mut writer = self.writer.lock().expect("writer lock");
        let present: Vec<String> = {
            let table = self.table.read().expect("table");
            let mut seen = HashSet::new();
            ids.iter().filter(|id| table.docs.contains_key(*id) && seen.insert(*id)).cloned().collect()
        };
        if present.is_empty() {
            return Ok(WriteResult::default());
        }
        let seq = writer.next_seq;
        writer.wal.append(&Record::Delete { seq, ids: present.clone() })?;
        writer.next_seq += 1;
        self.table.write().expect("table").delete(seq, &present);
        let refs: Vec<&str> = present.iter().map(String::as_str).collect();
        self.keyword.apply(seq, &refs, &[])?;
        drop(writer);
        if wait {
            self.wait_visible(seq)?;
        }
        Ok(WriteResult { deleted: present.len(), seq, ..Default::default() })
    }

    /// Deletes every document whose metadata matches `filter`.
    pub fn delete_where(&self, filter: &Filter, wait: bool) -> Result<WriteResult> {
        let ids: Vec<String> = {
            let table = self.table.read().expect("table");
            table.docs.values().filter(|d| filter.matches(&d.id, &d.metadata)).map(|d| d.id.clone()).collect()
        };
        self.delete(&ids, wait)
    }

    /// Makes everything written so far searchable; returns the visible sequence number.
    pub fn commit(&self) -> Result<u64> {
        let _guard = self.commit_lock.lock().expect("commit lock");
        let v = self.keyword.commit()?;
        self.table.write().expect("table").collect(v);
        Ok(v)
    }

    /// Returns once log record `seq` is searchable (committing if nobody has).
    pub fn wait_visible(&self, seq: u64) -> Result<()> {
        if self.keyword.snapshot().seq >= seq {
            return Ok(());
        }
        // Waiters queue on the commit lock; one commit covers all of them.
        let _guard = self.commit_lock.lock().expect("commit lock");
        if self.keyword.snapshot().seq >= seq {
            return Ok(());
        }
        let v = self.keyword.commit()?;
        self.table.write().expect("table").collect(v);
        Ok(())
    }

    /// True when a write is not yet searchable.
    pub fn has_pending(&self) -> bool {
        self.keyword.pending_seq() > self.keyword.snapshot().seq
    }

    /// True when deleted points make up enough of the graph to rebuild it.
    pub fn needs_compaction(&self) -> bool {
        let table = self.table.read().expect("table");
        let points = self.dense.read().expect("dense").len();
        table.dead_points >= 1000 && table.dead_points * 4 >= points
    }

    pub fn get(&self, id: &str) -> Result<DocumentView> {
        let table = self.table.read().expect("table");
        let d = table.docs.get(id).ok_or_else(|| IndexError::DocumentNotFound {
            collection: self.settings.name.clone(),
            id: id.to_string(),
        })?;
        Ok(DocumentView {
            id: d.id.clone(),
            title: d.title.clone(),
            text: d.text.to_string(),
            metadata: d.metadata.clone(),
            chunks: d
                .chunks
                .iter()
                .enumerate()
                .map(|(i, c)| ChunkView {
                    chunk_id: chunk_id(&d.id, i),
                    char_start: c.char_start,
                    char_end: c.char_end,
                    tokens: c.tokens,
                })
                .collect(),
        })
    }

    /// Hybrid, dense or keyword search (blocking: call it off the async workers).
    pub fn search(&self, req: &SearchRequest) -> Result<SearchResponse> {
        if req.top_k == 0 || req.top_k > MAX_TOP_K {
            return Err(IndexError::invalid("top_k", format!("top_k must be between 1 and {MAX_TOP_K}")));
        }
        if req.candidates.is_some_and(|c| c == 0 || c > MAX_CANDIDATES) {
            return Err(IndexError::invalid(
                "candidates",
                format!("candidates must be between 1 and {MAX_CANDIDATES}"),
            ));
        }
        if req.ef.is_some_and(|ef| ef == 0 || ef > MAX_CANDIDATES) {
            return Err(IndexError::invalid("ef", format!("ef must be between 1 and {MAX_CANDIDATES}")));
        }
        if req.title_boost.is_some_and(|t| !(0.0..=100.0).contains(&t)) {
            return Err(IndexError::invalid("title_boost", "title_boost must be between 0 and 100"));
        }
        if req.query.trim().is_empty() && req.vector.is_none() {
            return Err(IndexError::invalid("query", "query must not be empty"));
        }
        if req.query.len() > MAX_QUERY_BYTES {
            return Err(IndexError::invalid("query", format!("query must be at most {MAX_QUERY_BYTES} bytes")));
        }
        let fusion = req.fusion.unwrap_or(self.settings.fusion);
        let candidates = req.candidates.unwrap_or((req.top_k * 2).max(50)).max(req.top_k);
        let query_vector = match (req.mode, &req.vector) {
            (SearchMode::Keyword, _) => None,
            (_, Some(v)) => {
                if v.len() != self.settings.dimension {
                    return Err(IndexError::invalid(
                        "vector",
                        format!("vector has {} dimensions; the collection's have {}", v.len(), self.settings.dimension),
                    ));
                }
                if !v.iter().all(|x| x.is_finite()) {
                    return Err(IndexError::invalid("vector", "vector values must be finite numbers"));
                }
                let mut v = v.clone();
                self.settings.distance.prepare(&mut v);
                // Non-finite values would reach the graph walk's distance code (a NaN
                // distance orders nowhere); refuse them here.
                if !v.iter().all(|x| x.is_finite()) {
                    return Err(IndexError::invalid("vector", "vector values must be finite numbers"));
                }
                Some(v)
            }
            (mode, None) => {
                let needs = match mode {
                    SearchMode::Dense => "dense searches need `vector`",
                    _ => "hybrid searches need `vector` (or use `mode: keyword`)",
                };
                let mut v = self.model(needs)?.embed_query(&req.query)?;
                self.settings.distance.prepare(&mut v);
                Some(v)
            }
        };
        let snapshot = self.keyword.snapshot();
        let v = snapshot.seq;
        let table = self.table.read().expect("table");
        let ef = req.ef.unwrap_or(self.settings.hnsw.ef).max(candidates);
        let dense = self.graph();
        // Chunks the filter allows (visible ones only): the payload index's candidates when it
        // can narrow the filter down, else a scan of the table.
        let allowed_set = |f: &Filter| -> Arc<HashSet<u64>> {
            if let Some(keys) = table.payload().candidates(f) {
                let set = keys
                    .into_iter()
                    .filter(|k| {
                        table.chunks.get(k).is_some_and(|c| c.visible(v) && f.matches(&c.doc.id, &c.doc.metadata))
                    })
                    .collect();
                return Arc::new(set);
            }
            let mut last: Option<(*const DocEntry, bool)> = None;
            let set = table
                .chunks
                .iter()
                .filter(|(_, c)| c.visible(v))
                .filter(|(_, c)| {
                    let ptr = Arc::as_ptr(&c.doc);
                    match last {
                        Some((p, m)) if p == ptr => m,
                        _ => {
                            let m = f.matches(&c.doc.id, &c.doc.metadata);
                            last = Some((ptr, m));
                            m
                        }
                    }
                })
                .map(|(k, _)| *k)
                .collect();
            Arc::new(set)
        };
        // A dense-only search whose filter the planner expects to match many chunks walks the
        // graph testing the filter on the points it meets, and never scans the table (the
        // keyword half needs the whole set inside tantivy's collector, so other modes scan).
        let walk_lazily = match (&req.filter, req.mode, req.exact_scan_max) {
            (Some(f), SearchMode::Dense, None) if query_vector.is_some() => match table.payload().count(f) {
                // The index finds the candidates without a scan: build the set when exact
                // distances to it cost less than a walk.
                Some(n) => !exact_scan_pays(n, dense.len(), ef),
                None => {
                    let share = self.filter_share(f, &table, &dense, v);
                    let expected = (share * table.chunks.len() as f64) as usize;
                    !table_scan_pays(expected, ef)
                }
            },
            // The walk forced (benchmarks and tests of the plan).
            (Some(_), SearchMode::Dense, Some(0)) => query_vector.is_some(),
            _ => false,
        };
        let allowed: Option<Arc<HashSet<u64>>> = match &req.filter {
            Some(f) if !walk_lazily => Some(allowed_set(f)),
            _ => None,
        };
        let mut dense_exact = false;
        let dense_hits = match &query_vector {
            None => Vec::new(),
            Some(q) => {
                let distance = self.settings.distance;
                let exact = |keys: &mut dyn Iterator<Item = u64>| {
                    let g = dense.read();
                    exact_search(
                        distance,
                        q,
                        keys.filter_map(|k| {
                            table.chunks.get(&k).filter(|c| c.point != UNPLACED).map(|c| (k, g.vector(c.point)))
                        }),
                        candidates,
                    )
                };
                match &allowed {
                    Some(set)
                        if match req.exact_scan_max {
                            Some(max) => set.len() <= max,
                            None => exact_scan_pays(set.len(), dense.len(), ef),
                        } =>
                    {
                        dense_exact = true;
                        exact(&mut set.iter().copied())
                    }
                    _ => {
                        let keep = |key: u64| match (&allowed, &req.filter) {
                            (Some(set), _) => set.contains(&key),
                            (None, Some(f)) => table
                                .chunks
                                .get(&key)
                                .is_some_and(|c| c.visible(v) && f.matches(&c.doc.id, &c.doc.metadata)),
                            (None, None) => table.chunks.get(&key).is_some_and(|c| c.visible(v)),
                        };
                        let hits = dense.search(q, candidates, ef, &keep);
                        // Counting what exists is a scan: only when the walk came up short.
                        let short = hits.len() < candidates && {
                            let existing = match (&allowed, &req.filter) {
                                (Some(set), _) => set.len(),
                                (None, Some(f)) => allowed_set(f).len(),
                                (None, None) => table.chunks.values().filter(|c| c.visible(v)).count(),
                            };
                            hits.len() < existing
                        };
                        if short {
                            // The filter or tombstones starved the graph walk: never return
                            // fewer results than exist.
                            dense_exact = true;
                            match (&allowed, &req.filter) {
                                (Some(set), _) => exact(&mut set.iter().copied()),
                                (None, Some(f)) => exact(&mut allowed_set(f).iter().copied()),
                                (None, None) => {
                                    exact(&mut table.chunks.iter().filter(|(_, c)| c.visible(v)).map(|(k, _)| *k))
                                }
                            }
                        } else {
                            hits
                        }
                    }
                }
            }
        };
        if let (Some(q), None, false) = (&query_vector, &req.vector, req.skip_drift) {
            // Live traffic feeds the drift monitor: the query's best dense score, in the
            // profile's terms.
            self.drift.ensure_profile(|| self.profile_of(&table));
            let best = dense_hits.iter().map(|h| h.1).reduce(f32::max).unwrap_or(0.0);
            self.drift.observe_query(q, best, self.token_count(&req.query));
        }
        let keyword_hits = if req.mode == SearchMode::Dense {
            Vec::new()
        } else {
            let allow = allowed
                .clone()
                .map(|set| Arc::new(move |k: u64| set.contains(&k)) as Arc<dyn Fn(u64) -> bool + Send + Sync>);
            self.keyword.search(
                &snapshot,
                &req.query,
                candidates,
                req.title_boost.unwrap_or(self.settings.keyword.title_boost),
                allow,
            )?
        };
        // Drop hits whose chunk left the table since the snapshot was taken (a rare race).
        let present = |hits: Vec<(u64, f32)>| -> Vec<(u64, f32)> {
            hits.into_iter().filter(|(k, _)| table.chunks.contains_key(k)).collect()
        };
        let (dense_hits, keyword_hits) = (present(dense_hits), present(keyword_hits));
        // With grouping, each half ranks documents (by their best chunk) before fusion; a
        // document is represented by its first chunk's key.
        let group_key = |k: u64| table.chunks[&k].doc.chunks[0].key;
        let (dense_list, keyword_list, best_chunk) = if req.group_by_document {
            let mut best: HashMap<u64, u64> = HashMap::new();
            let mut collapse = |hits: &[(u64, f32)]| {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                for &(k, s) in hits {
                    let g = group_key(k);
                    if seen.insert(g) {
                        best.entry(g).or_insert(k);
                        out.push((g, s));
                    }
                }
                out
            };
            let d = collapse(&dense_hits);
            let kw = collapse(&keyword_hits);
            (d, kw, Some(best))
        } else {
            (dense_hits, keyword_hits, None)
        };
        let fused: Vec<Fused> = match req.mode {
            SearchMode::Hybrid => fuse(&fusion, &dense_list, &keyword_list),
            SearchMode::Dense => single(&dense_list, true),
            SearchMode::Keyword => single(&keyword_list, false),
        };
        let results = fused
            .into_iter()
            .take(req.top_k)
            .map(|f| {
                let key = best_chunk.as_ref().map_or(f.id, |b| b[&f.id]);
                let c = &table.chunks[&key];
                let r = &c.doc.chunks[c.index as usize];
                SearchHit {
                    chunk_id: chunk_id(&c.doc.id, c.index as usize),
                    document_id: c.doc.id.clone(),
                    chunk_index: c.index,
                    text: c.text().to_string(),
                    title: c.doc.title.clone(),
                    score: f.score,
                    metadata: c.doc.metadata.clone(),
                    char_start: r.char_start,
                    char_end: r.char_end,
                    dense: f.dense,
                    keyword: f.keyword,
                }
            })
            .collect();
        Ok(SearchResponse { results, mode: req.mode, dense_exact })
    }

    /// The share of visible chunks `f` matches, estimated from up to 512 graph points spread
    /// evenly over the insertion order (the planner's selectivity estimate: a few hundred
    /// lookups instead of a scan of the table).
    fn filter_share(&self, f: &Filter, table: &Table, dense: &DenseIndex, v: u64) -> f64 {
        const SAMPLE: usize = 512;
        let g = dense.read();
        let n = g.len();
        if n == 0 {
            return 0.0;
        }
        let step = (n / SAMPLE).max(1);
        let (mut seen, mut matched) = (0usize, 0usize);
        for id in (0..n).step_by(step).take(SAMPLE) {
            if let Some(c) = table.chunks.get(&g.key(id as u32)).filter(|c| c.visible(v)) {
                seen += 1;
                matched += usize::from(f.matches(&c.doc.id, &c.doc.metadata));
            }
        }
        if seen == 0 {
            // Mostly deleted points: let the scan decide.
            return 0.0;
        }
        matched as f64 / seen as f64
    }

    /// The drift monitor of this collection's queries.
    pub fn drift(&self) -> &crate::drift::DriftMonitor {
        &self.drift
    }

    fn token_count(&self, text: &str) -> u32 {
        match &self.embedder {
            Some(e) => e.tokenizer().encode(text, false).map_or(0, |e| e.get_ids().len() as u32),
            // Without a model, words stand in for tokens.
            None => text.split_whitespace().count() as u32,
        }
    }

    /// The drift profile of (an evenly spaced sample of) the visible chunks.
    fn profile_of(&self, table: &Table) -> Option<crate::drift::Profile> {
        let config = self.drift.config();
        let mut keys: Vec<u64> =
            table.chunks.iter().filter(|(_, c)| c.removed == NOT_REMOVED).map(|(k, _)| *k).collect();
        keys.sort_unstable();
        let step = keys.len().div_ceil(config.profile_sample.max(1)).max(1);
        let sample: Vec<&ChunkEntry> = keys.iter().step_by(step).map(|k| &table.chunks[k]).collect();
        let dense = self.graph();
        let g = dense.read();
        let vectors: Vec<&[f32]> = sample.iter().map(|c| g.vector(c.point)).collect();
        let tokens: Vec<u32> = sample.iter().map(|c| self.token_count(c.text())).collect();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        crate::drift::build_profile(&vectors, &tokens, config.projections, now)
    }

    /// Makes the drift reference from `queries` (say, a sample of known-good traffic) instead
    /// of the first live queries; answers how many were observed.
    pub fn set_drift_reference(&self, queries: &[String]) -> Result<usize> {
        if queries.is_empty() {
            return Err(IndexError::invalid("queries", "give at least one query"));
        }
        let profile = {
            let table = self.table.read().expect("table");
            self.profile_of(&table)
        }
        .ok_or_else(|| IndexError::invalid("collection", "the collection has no chunks to profile"))?;
        let mut observations = Vec::with_capacity(queries.len());
        for (i, q) in queries.iter().enumerate() {
            if q.trim().is_empty() {
                return Err(IndexError::invalid(format!("queries[{i}]"), "queries must not be empty"));
            }
            let mut v = self.model("a drift reference is made by embedding its queries")?.embed_query(q)?;
            self.settings.distance.prepare(&mut v);
            let req = SearchRequest {
                query: q.clone(),
                top_k: 1,
                mode: SearchMode::Dense,
                vector: Some(v.clone()),
                skip_drift: true,
                ..Default::default()
            };
            let best = self.search(&req)?.results.first().and_then(|h| h.dense.as_ref()).map_or(0.0, |d| d.score);
            observations.push(profile.observe(&v, best, self.token_count(q)));
        }
        let n = observations.len();
        self.drift.set_reference(profile, observations);
        Ok(n)
    }

    /// The stored vectors of the live chunks, in key order (benchmarks, exports).
    pub fn export_vectors(&self) -> Vec<Vec<f32>> {
        let table = self.table.read().expect("table");
        let mut keys: Vec<u64> =
            table.chunks.iter().filter(|(_, c)| c.removed == NOT_REMOVED).map(|(k, _)| *k).collect();
        keys.sort_unstable();
        let dense = self.graph();
        let g = dense.read();
        keys.iter().map(|k| g.vector(table.chunks[k].point).to_vec()).collect()
    }

    /// Counts, sizes and state.
    pub fn info(&self) -> CollectionInfo {
        let last_seq = self.writer.lock().expect("writer lock").next_seq - 1;
        let snapshot = self.keyword.snapshot();
        let table = self.table.read().expect("table");
        let dense_points = self.dense.read().expect("dense").len();
        let dim = self.settings.dimension;
        let text_bytes: usize = table.docs.values().map(|d| d.text.len() + d.id.len() + 64).sum();
        let chunk_bytes = table.chunks.len() * 96;
        // The one copy of each vector, 2·M + 1 link slots of 4 bytes at layer 0, a lock,
        // key and level (upper layers are a few percent more).
        let graph_bytes = dense_points * (dim * 4 + (self.settings.hnsw.m * 2 + 1) * 4 + 24);
        let state = if self.rebuilding.load(Ordering::Relaxed) {
            "rebuilding"
        } else if snapshot.seq < last_seq {
            "indexing"
        } else {
            "ready"
        };
        CollectionInfo {
            settings: self.settings.clone(),
            documents: table.docs.len(),
            chunks: table.live_chunks(),
            dense_points,
            keyword_chunks: KeywordIndex::num_chunks(&snapshot),
            last_seq,
            visible_seq: snapshot.seq,
            disk_bytes: dir_size(&self.dir),
            memory_bytes: (text_bytes + chunk_bytes + graph_bytes) as u64,
            state,
        }
    }

    /// Consistency check used by tests and `ragway check`: the keys each half can return
    /// under the current snapshot, and the table's visible keys.
    pub fn visible_keys(&self) -> Result<(Vec<u64>, Vec<u64>, Vec<u64>)> {
        let snapshot = self.keyword.snapshot();
        let table = self.table.read().expect("table");
        let mut visible: Vec<u64> =
            table.chunks.iter().filter(|(_, c)| c.visible(snapshot.seq)).map(|(k, _)| *k).collect();
        visible.sort_unstable();
        let graph = self.graph();
        let mut in_graph: Vec<u64> = visible
            .iter()
            .copied()
            .filter(|k| {
                let v = graph.read().vector(table.chunks[k].point).to_vec();
                graph.search(&v, 1, 16, &|key| key == *k).len() == 1
            })
            .collect();
        in_graph.sort_unstable();
        let keyword = self.keyword.all_keys(&snapshot)?;
        Ok((visible, in_graph, keyword))
    }

    /// Rebuilds the graph without deleted points and rewrites the log with live documents
    /// only. Writes wait; searches go on (on the old graph until the swap).
    pub fn compact(&self) -> Result<()> {
        let mut writer = self.writer.lock().expect("writer lock");
        self.rebuilding.store(true, Ordering::Relaxed);
        let result = self.compact_locked(&mut writer);
        self.rebuilding.store(false, Ordering::Relaxed);
        result
    }

    fn compact_locked(&self, writer: &mut Writer) -> Result<()> {
        self.commit()?;
        self.verify_saved_vectors()?;
        let started = std::time::Instant::now();
        let old = self.graph();
        let (records, fresh, moved) = {
            let table = self.table.read().expect("table");
            let records = self.live_records(&table, writer);
            let fresh = DenseIndex::new(
                self.settings.hnsw,
                self.settings.distance,
                self.settings.dimension,
                table.chunks.len(),
            );
            let mut keys: Vec<u64> = table.chunks.keys().copied().collect();
            keys.sort_unstable();
            let g = old.read();
            let items: Vec<(&[f32], u64)> = keys.iter().map(|k| (g.vector(table.chunks[k].point), *k)).collect();
            let points = fresh.insert(&items);
            (records, fresh, keys.into_iter().zip(points).collect::<Vec<_>>())
        };
        // The saved table points into the old log; it is saved again below.
        let _ = std::fs::remove_file(self.dir.join(TABLE_FILE));
        // The new log comes back open for appends; until then the old one stays in use.
        writer.wal = match wal::replace_log(&self.dir.join("log.wal"), records) {
            Ok(new_log) => new_log,
            Err(wal::ReplaceError::OldLogKept(e)) => return Err(e),
            Err(wal::ReplaceError::Unknown(e)) => {
                writer
                    .wal
                    .poison(format!("compaction renamed a new log into place but could not make it durable ({e})"));
                return Err(e);
            }
        };
        // The table's points and the graph change together: a search holds the table's read
        // lock while it uses the graph.
        {
            let mut table = self.table.write().expect("table");
            for (k, p) in moved {
                if let Some(c) = table.chunks.get_mut(&k) {
                    c.point = p;
                }
            }
            table.dead_points = 0;
            *self.dense.write().expect("dense") = Arc::new(fresh);
        }
        self.save_graph_or_warn(writer);
        tracing::info!(collection = %self.settings.name, seconds = started.elapsed().as_secs_f32(), "compacted");
        Ok(())
    }

    /// Checks the vectors the graph reads from its saved file before they are copied into a
    /// log (compaction, snapshots): damage there must not reach the source of truth. A
    /// damaged file is removed, so that the next open rebuilds the graph from the log.
    fn verify_saved_vectors(&self) -> Result<()> {
        if let Err(e) = self.graph().read().verify_vectors() {
            tracing::error!(collection = %self.settings.name, error = %e, "saved graph damaged; it will be rebuilt from the log on the next open");
            for file in [GRAPH_FILE, TABLE_FILE] {
                let _ = std::fs::remove_file(self.dir.join(file));
            }
            return Err(IndexError::Corrupt(format!(
                "collection `{}`: {e}; restart to rebuild the graph from the log",
                self.settings.name
            )));
        }
        Ok(())
    }

    /// The live documents as log records (a checkpoint first), oldest write first.
    fn live_records(&self, table: &Table, writer: &Writer) -> Vec<Record> {
        let mut docs: Vec<(&Arc<DocEntry>, u64)> =
            table.docs.values().map(|d| (d, d.chunks.first().map_or(0, |c| table.chunks[&c.key].added))).collect();
        docs.sort_by_key(|(d, seq)| (*seq, d.chunks.first().map_or(0, |c| c.key)));
        let mut out = vec![Record::Checkpoint { seq: writer.next_seq - 1, next_key: writer.next_key }];
        let dense = self.graph();
        let g = dense.read();
        for (d, seq) in docs {
            let vectors: Vec<f32> =
                d.chunks.iter().flat_map(|c| g.vector(table.chunks[&c.key].point).iter().copied()).collect();
            out.push(Record::Upsert {
                seq: seq.max(1),
                docs: vec![DocRecord {
                    id: d.id.clone(),
                    title: d.title.clone(),
                    text: d.text.to_string(),
                    metadata: d.metadata.clone(),
                    hash: d.hash,
                    chunks: d.chunks.clone(),
                }],
                vectors,
            });
        }
        out
    }

    /// Writes a consistent copy of the collection (settings and a compacted log) to `dest`,
    /// which must not exist. Restoring it replays the log (see `IndexService::restore`).
    pub fn snapshot_to(&self, dest: &Path) -> Result<()> {
        if dest.exists() {
            return Err(IndexError::invalid("path", format!("{} already exists", dest.display())));
        }
        let writer = self.writer.lock().expect("writer lock");
        self.commit()?;
        self.verify_saved_vectors()?;
        let records = {
            let table = self.table.read().expect("table");
            self.live_records(&table, &writer)
        };
        std::fs::create_dir_all(dest)?;
        wal::write_atomic(&dest.join("settings.json"), &serde_json::to_vec_pretty(&self.settings)?)?;
        wal::write_log(&dest.join("log.wal"), records)?;
        Ok(())
    }

    /// Commits, saves the graph when it grew, and stops the keyword writer (graceful
    /// shutdown).
    pub fn close(self) -> Result<()> {
        self.commit()?;
        if let Err(e) = self.save_graph() {
            tracing::warn!(collection = %self.settings.name, error = %e, "could not save the graph");
        }
        self.keyword.close()
    }

    /// Saves the graph when points were added since it was last saved, so that the next
    /// open inserts nothing (graceful shutdown).
    pub fn save_graph(&self) -> Result<()> {
        let mut writer = self.writer.lock().expect("writer lock");
        if writer.unsaved_points > 0 {
            self.save_graph_locked(&mut writer)?;
        }
        Ok(())
    }

    /// Saves the graph and the chunk table as covering every record written so far (the
    /// caller holds the writer lock, so neither changes meanwhile). tantivy commits first,
    /// so that the next open finds everything they cover in it and replays only the log
    /// after them.
    fn save_graph_locked(&self, writer: &mut Writer) -> Result<()> {
        self.commit()?;
        let dense = self.graph();
        let covered = writer.next_seq - 1;
        dense.save(&self.dir.join(GRAPH_FILE), covered)?;
        writer.unsaved_points = 0;
        if let Some(mark) = writer.wal.mark() {
            let mark = TableMark { covered, mark, next_seq: writer.next_seq, next_key: writer.next_key };
            self.table.read().expect("table").save(&self.dir.join(TABLE_FILE), &mark)?;
        }
        Ok(())
    }

    /// [`Collection::save_graph_locked`] where a failure is only logged: the graph is
    /// derived data, and a failed save costs the next open a longer replay, nothing more.
    fn save_graph_or_warn(&self, writer: &mut Writer) {
        if let Err(e) = self.save_graph_locked(writer) {
            tracing::warn!(collection = %self.settings.name, error = %e, "could not save the graph");
        }
    }
}

/// The state a log replay builds on open.
struct Replay {
    table: Table,
    /// Vectors of chunks written after the saved graph, inserted once the replay is done.
    pending: HashMap<u64, Box<[f32]>>,
    /// Chunks the saved graph holds, by key (needed only when records it covers are
    /// replayed).
    placed: HashMap<u64, u32>,
    next_seq: u64,
    next_key: u64,
    last_seq: u64,
    /// The log record the saved graph covers up to.
    covered: u64,
    dim: usize,
    /// Records applied to tantivy.
    replayed: usize,
    /// Records read.
    records: usize,
}

impl Replay {
    fn new(table: Table, next_seq: u64, next_key: u64, last_seq: u64, covered: u64, dim: usize) -> Replay {
        Replay {
            table,
            pending: HashMap::new(),
            placed: HashMap::new(),
            next_seq,
            next_key,
            last_seq,
            covered,
            dim,
            replayed: 0,
            records: 0,
        }
    }

    fn with_placed(mut self, dense: &DenseIndex) -> Replay {
        let g = dense.read();
        self.placed = (0..g.len() as u32).map(|p| (g.key(p), p)).collect();
        drop(g);
        self
    }

    fn apply(&mut self, record: Record, keyword: &KeywordIndex, keyword_seq: u64) -> Result<()> {
        let seq = record.seq();
        self.records += 1;
        self.next_seq = self.next_seq.max(seq + 1);
        self.last_seq = self.last_seq.max(seq);
        match &record {
            Record::Upsert { docs, vectors, .. } => {
                let mut points = Vec::new();
                let mut offset = 0;
                for d in docs {
                    for c in &d.chunks {
                        if seq <= self.covered {
                            points.push(self.placed.get(&c.key).copied().unwrap_or(UNPLACED));
                        } else {
                            points.push(UNPLACED);
                            let v = vectors.get(offset..offset + self.dim).ok_or_else(|| {
                                IndexError::Corrupt(format!("log record {seq} has too few vector values"))
                            })?;
                            self.pending.insert(c.key, v.into());
                        }
                        offset += self.dim;
                        self.next_key = self.next_key.max(c.key + 1);
                    }
                }
                self.table.upsert(seq, docs, &points);
                if seq > keyword_seq {
                    apply_keyword(keyword, seq, docs)?;
                    self.replayed += 1;
                }
            }
            Record::Delete { ids, .. } => {
                self.table.delete(seq, ids);
                if seq > keyword_seq {
                    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                    keyword.apply(seq, &refs, &[])?;
                    self.replayed += 1;
                }
            }
            Record::Checkpoint { next_key: k, .. } => self.next_key = self.next_key.max(*k),
        }
        Ok(())
    }
}

fn single(list: &[(u64, f32)], dense: bool) -> Vec<Fused> {
    list.iter()
        .enumerate()
        .map(|(i, &(id, score))| {
            let hit = Some(SourceHit { rank: i + 1, score });
            Fused { id, score, dense: if dense { hit } else { None }, keyword: if dense { None } else { hit } }
        })
        .collect()
}

fn apply_keyword(keyword: &KeywordIndex, seq: u64, docs: &[DocRecord]) -> Result<()> {
    let replaced: Vec<&str> = docs.iter().map(|d| d.id.as_str()).collect();
    let chunks: Vec<KeywordChunk<'_>> = docs
        .iter()
        .flat_map(|d| {
            d.chunks.iter().map(move |c| KeywordChunk {
                key: c.key,
                doc_id: &d.id,
                title: d.title.as_deref().unwrap_or(""),
                text: &d.text[c.byte_start as usize..c.byte_end as usize],
            })
        })
        .collect();
    keyword.apply(seq, &replaced, &chunks)
}

/// The chunk id clients see: `{document id}#{chunk index}`.
pub fn chunk_id(doc_id: &str, index: usize) -> String {
    format!("{doc_id}#{index}")
}

/// FNV-1a over the document's content: stable across versions and platforms.
pub fn doc_hash(doc: &DocumentInput) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes.iter().chain(&[0xff]) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    };
    feed(doc.title.as_deref().unwrap_or("").as_bytes());
    feed(doc.text.as_bytes());
    feed(
        serde_json::to_string(doc.metadata.as_ref().unwrap_or(&serde_json::Value::Null)).unwrap_or_default().as_bytes(),
    );
    // Own vectors count only when given, so the hashes of plain documents never change.
    let floats = |v: &[f32]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    if let Some(v) = &doc.vector {
        feed(&floats(v));
    }
    for c in doc.chunks.iter().flatten() {
        feed(c.text.as_bytes());
        feed(&floats(&c.vector));
    }
    h
}

/// Checks a batch of documents; errors name the document (`documents[3].id`).
pub fn validate_batch(docs: &[DocumentInput]) -> Result<()> {
    let mut seen = HashMap::new();
    for (i, d) in docs.iter().enumerate() {
        validate_doc(d, &format!("documents[{i}]"))?;
        if let Some(j) = seen.insert(d.id.as_str(), i) {
            return Err(IndexError::invalid(
                format!("documents[{i}].id"),
                format!("document id `{}` appears twice in the batch (documents[{j}] and documents[{i}])", d.id),
            ));
        }
    }
    Ok(())
}

pub fn validate_doc(d: &DocumentInput, at: &str) -> Result<()> {
    if d.id.is_empty() || d.id.len() > MAX_ID_BYTES {
        return Err(IndexError::invalid(format!("{at}.id"), format!("`{at}.id` must be 1 to {MAX_ID_BYTES} bytes")));
    }
    match (&d.vector, &d.chunks) {
        (Some(_), Some(_)) => {
            return Err(IndexError::invalid(
                format!("{at}.chunks"),
                format!("`{at}`: give `vector` or `chunks`, not both"),
            ))
        }
        (_, Some(chunks)) => {
            if chunks.is_empty() || chunks.len() > MAX_OWN_CHUNKS {
                return Err(IndexError::invalid(
                    format!("{at}.chunks"),
                    format!("`{at}.chunks` must hold 1 to {MAX_OWN_CHUNKS} chunks"),
                ));
            }
            if !d.text.is_empty() {
                return Err(IndexError::invalid(
                    format!("{at}.text"),
                    format!("`{at}`: with `chunks`, the text is the chunks' texts; leave `text` out"),
                ));
            }
        }
        _ if d.text.trim().is_empty() && d.title.as_deref().is_none_or(|t| t.trim().is_empty()) => {
            return Err(IndexError::invalid(format!("{at}.text"), format!("`{at}` has neither text nor title")));
        }
        _ => {}
    }
    if let Some(m) = &d.metadata {
        if !m.is_object() && !m.is_null() {
            return Err(IndexError::invalid(format!("{at}.metadata"), format!("`{at}.metadata` must be an object")));
        }
    }
    Ok(())
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
