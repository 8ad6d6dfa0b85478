//! The embedded store: a collection's documents in its own directory — the log (source of
//! truth), the chunk table in memory, and the two derived indexes, the HNSW graph and the
//! tantivy index.
//!
//! ## Consistency
//! A write is appended to the log and fsynced, then applied to the table, the graph and
//! the tantivy writer, all under the store's writer lock, and only then acknowledged.
//! What searches see is pinned to a log sequence number `V`: the last tantivy commit (its
//! payload). A chunk is visible when it was added at or before `V` and not removed at or
//! before `V`. The keyword half searches the commit `V` itself, which holds exactly those
//! chunks; the dense half filters graph hits on the same rule. So the halves never disagree
//! about which chunks exist, an upsert swaps a document's chunks atomically, and a commit
//! makes a whole batch visible at once.
//!
//! Removed chunks stay in the table until `V` passes their removal, then leave it; their
//! graph points are filtered out of searches until a consolidation
//! ([`EmbeddedStore::consolidate`], run by the service's upkeep) takes them out of the graph
//! without a rebuild and frees their slots, which the next inserts reuse. The log keeps
//! their records until it is mostly garbage; then the upkeep rewrites it with the live
//! documents while writes go on ([`EmbeddedStore::rewrite_log`]: writes wait only for the
//! last few megabytes of records appended meanwhile to be copied over).
//! [`EmbeddedStore::compact`] does that and also rebuilds the graph. The graph holds the one
//! copy of each vector; the table refers to it by point.
//!
//! The graph and the table are saved (`dense.hnsw`, `table.snap`, marked with the last log
//! record they cover) after a compaction, on close, and every [`GRAPH_SAVE_EVERY`] new
//! points (or a quarter of the graph, when more). The periodic save runs on a thread of its
//! own beside the writes: under the writer lock it only takes the graph's cut (its point
//! count and entry point; links to later points are left out as it writes) and the table's
//! documents (shared), then writes the two files while writes and searches go on. An open
//! maps the saved graph, loads the saved table and replays only the log after them (the
//! whole log, and the whole graph built, when none is saved or they do not match the log);
//! tantivy gets the records after its last commit's sequence number.

use crate::collection::chunk_id;
use crate::dense::{exact_search, DenseIndex};
use crate::error::{IndexError, Result};
use crate::filter::Filter;
use crate::keyword::{KeywordChunk, KeywordIndex, KeywordSnapshot};
use crate::store::{ChunkStore, DenseHits, DenseQuery, NewDoc, SampledChunk, StoreStats, StoreView, StoredChunk};
use crate::table::{ChunkEntry, DocEntry, Table, TableMark, NOT_REMOVED, UNPLACED};
use crate::types::*;
use crate::wal::{self, ChunkRecord, DocRecord, Record, Wal};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};

/// Most points of removed chunks one consolidation takes out of the graph (its work is one
/// pass over the graph's lists and a re-selection per list that named one of them).
const CONSOLIDATE_BATCH: usize = 50_000;

/// A log rewrite copies the records written meanwhile without the writer lock until what is
/// left is under this many bytes (see [`EmbeddedStore::rewrite_log`]).
const TAIL_UNDER_LOCK: u64 = 4 << 20;
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
const LOG_FILE: &str = "log.wal";
/// Points inserted since the last save after which a write saves the graph and the table
/// again, or a quarter of the graph when that is more (also saved after a compaction and on
/// close), so that an open replays a bounded log tail.
const GRAPH_SAVE_EVERY: usize = 50_000;

/// New points after which the next save starts, for a graph of `points` points.
fn save_every(points: usize) -> usize {
    GRAPH_SAVE_EVERY.max(points / 4)
}

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

/// The live documents at one moment (see [`EmbeddedStore::live_cut`]).
struct LiveCut {
    /// The writer's sequence number and key counter at the cut.
    checkpoint: Record,
    /// Each document, the sequence number it was written at, its chunks' graph points.
    docs: Vec<(Arc<DocEntry>, u64, Vec<u32>)>,
    /// The log's length at the cut: the records after it are newer than the cut.
    log_end: u64,
    /// Chunks removed before the cut (none of them is in a log written from it).
    garbage: usize,
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
    /// Milliseconds spent mapping the saved graph (tantivy opens meanwhile), loading the
    /// saved table, and on the whole open.
    pub graph_ms: u64,
    pub table_ms: u64,
    pub total_ms: u64,
}

/// A collection's documents in its directory: see the module's documentation.
pub struct EmbeddedStore {
    settings: CollectionSettings,
    dir: PathBuf,
    writer: Mutex<Writer>,
    table: RwLock<Table>,
    dense: RwLock<Arc<DenseIndex>>,
    keyword: KeywordIndex,
    /// Serializes commits (waiters of one commit share it).
    commit_lock: Mutex<()>,
    rebuilding: AtomicBool,
    /// Serializes consolidations and compactions (a consolidation's dead points must be
    /// those of the graph it frees them in).
    maintenance: Mutex<()>,
    /// What the last open read from saved files and from the log.
    open_stats: OpenStats,
    /// The save running beside the writes, if any ([`EmbeddedStore::save_in_background`]).
    saver: Saver,
}

/// A save's thread, waited for when the store goes away (also without a close), so that no
/// save writes into a collection's directory after its store is gone.
#[derive(Default)]
struct Saver(Mutex<Option<std::thread::JoinHandle<()>>>);

impl Saver {
    /// Whether a save is still writing.
    fn running(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Waits for a save started by [`EmbeddedStore::save_in_background`].
    fn finish(&self) {
        let running = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = running {
            let _ = handle.join();
        }
    }
}

impl Drop for Saver {
    fn drop(&mut self) {
        self.finish();
    }
}

impl EmbeddedStore {
    /// Opens the store in `dir`: maps the saved graph, loads the
    /// saved table and replays the log after them (or replays the whole log and builds the
    /// graph when nothing saved matches it), brings tantivy up to date.
    pub fn open(dir: &Path, settings: CollectionSettings) -> Result<EmbeddedStore> {
        for file in [GRAPH_FILE, TABLE_FILE] {
            let _ = std::fs::remove_file(crate::filefmt::temp_path(&dir.join(file)));
        }
        let started = std::time::Instant::now();
        // The graph is mapped while tantivy opens (neither needs the other).
        let (saved, keyword) =
            rayon::join(|| DenseIndex::load(&dir.join(GRAPH_FILE)), || KeywordIndex::open(&dir.join("keyword")));
        let saved = match saved {
            Ok(g) => Some(g),
            Err(IndexError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                // Derived data: rebuilt from the log.
                tracing::warn!(dir = %dir.display(), error = %e, "saved graph unreadable; rebuilding it from the log");
                None
            }
        };
        let graph_ms = started.elapsed().as_millis() as u64;
        let opened = match Self::open_with(dir, settings.clone(), saved, Some(keyword)) {
            Err(OpenError::StaleGraph(why)) => {
                tracing::warn!(dir = %dir.display(), why = %why, "saved graph does not match the log; rebuilding it");
                Self::open_with(dir, settings, None, None).map_err(OpenError::into_index)
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
        settings: CollectionSettings,
        saved: Option<(DenseIndex, u64)>,
        keyword: Option<Result<KeywordIndex>>,
    ) -> std::result::Result<EmbeddedStore, OpenError> {
        let started = std::time::Instant::now();
        let keyword = match keyword.unwrap_or_else(|| KeywordIndex::open(&dir.join("keyword"))) {
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
                let (gd, gdist, gq) = (g.read().dim(), g.read().distance(), g.read().quantization());
                if gd != dim || gdist != settings.distance || gq != settings.quantization {
                    return Err(OpenError::StaleGraph(format!(
                        "graph of {gd}-d {gdist:?} vectors, quantization {gq:?}"
                    )));
                }
                (g, covered)
            }
            None => (DenseIndex::new(settings.hnsw, settings.quantization, settings.distance, dim, 1024), 0),
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
        let log = dir.join(LOG_FILE);
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
        // Points no chunk refers to are dead (their chunks were removed before the save or
        // during the replay): the next consolidation frees them. Free slots, and dead
        // points, stand for removed chunks whose records the log still holds.
        table.dead_points.clear();
        {
            let g = dense.read();
            if g.len() - g.free_len() > table.chunks.len() {
                let mut referenced = vec![false; g.len()];
                for c in table.chunks.values() {
                    if let Some(r) = referenced.get_mut(c.point as usize) {
                        *r = true;
                    }
                }
                table.dead_points = (0..g.len() as u32).filter(|&p| !referenced[p as usize] && !g.is_free(p)).collect();
            }
            table.garbage_chunks = table.dead_points.len() + g.free_len();
        }
        let store = EmbeddedStore {
            dir: dir.to_path_buf(),
            writer: Mutex::new(Writer { wal, next_seq, next_key, unsaved_points: built }),
            table: RwLock::new(table),
            dense: RwLock::new(Arc::new(dense)),
            keyword,
            commit_lock: Mutex::new(()),
            rebuilding: AtomicBool::new(false),
            maintenance: Mutex::new(()),
            settings,
            open_stats: OpenStats {
                graph_loaded: loaded,
                graph_inserted: built,
                table_loaded,
                log_records,
                table_ms,
                ..Default::default()
            },
            saver: Saver::default(),
        };
        // Records that touched nothing in tantivy still count as seen.
        store.keyword.skip(next_seq - 1);
        store.commit()?;
        tracing::info!(
            collection = %store.settings.name,
            documents = store.table.read().expect("table").docs.len(),
            chunks = store.table.read().expect("table").chunks.len(),
            keyword_replayed_records = replayed,
            graph_points_loaded = loaded,
            graph_points_inserted = built,
            table_loaded,
            log_records,
            seconds = started.elapsed().as_secs_f32(),
            "collection opened"
        );
        Ok(store)
    }

    /// The current graph (compaction swaps in a fresh one).
    fn graph(&self) -> Arc<DenseIndex> {
        self.dense.read().expect("dense").clone()
    }

    /// What the last open read from saved files and from the log.
    pub fn open_stats(&self) -> OpenStats {
        self.open_stats
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when the stored version of `id` has this hash (an upsert would change nothing).
    fn is_unchanged(&self, id: &str, hash: u64) -> bool {
        self.table.read().expect("table").docs.get(id).is_some_and(|d| d.hash == hash)
    }

    /// Writes documents as one log record. Documents whose stored version has the same hash
    /// are skipped (re-running an ingestion changes nothing).
    fn write(&self, docs: Vec<NewDoc>) -> Result<WriteResult> {
        let dim = self.settings.dimension;
        let mut writer = self.writer.lock().expect("writer lock");
        let mut result = WriteResult::default();
        let mut records = Vec::with_capacity(docs.len());
        let mut flat: Vec<f32> = Vec::new();
        for doc in docs {
            if self.is_unchanged(&doc.id, doc.hash) {
                result.unchanged += 1;
                continue;
            }
            let mut chunks = Vec::with_capacity(doc.chunks.len());
            for c in doc.chunks {
                if c.vector.len() != dim {
                    return Err(IndexError::Internal(format!(
                        "embedding has {} dimensions, expected {dim}",
                        c.vector.len()
                    )));
                }
                flat.extend_from_slice(&c.vector);
                chunks.push(ChunkRecord {
                    key: writer.next_key,
                    byte_start: c.byte_start,
                    byte_end: c.byte_end,
                    char_start: c.char_start,
                    char_end: c.char_end,
                    tokens: c.tokens,
                });
                writer.next_key += 1;
            }
            result.chunks += chunks.len();
            records.push(DocRecord {
                id: doc.id,
                title: doc.title,
                text: doc.text,
                metadata: doc.metadata,
                hash: doc.hash,
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
        if writer.unsaved_points >= save_every(dense.len()) {
            self.save_in_background(&mut writer);
        }
        result.seq = seq;
        Ok(result)
    }

    /// Deletes documents by id; ids that do not exist are ignored (counted out).
    fn delete(&self, ids: &[String]) -> Result<WriteResult> {
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
        Ok(WriteResult { deleted: present.len(), seq, ..Default::default() })
    }

    /// Deletes every document whose metadata matches `filter`.
    fn delete_where(&self, filter: &Filter) -> Result<WriteResult> {
        let ids: Vec<String> = {
            let table = self.table.read().expect("table");
            table.docs.values().filter(|d| filter.matches(d.id(), d.metadata())).map(|d| d.id().to_string()).collect()
        };
        self.delete(&ids)
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

    /// True when removed chunks make up at least half of the log (and 10,000 chunks), so
    /// that rewriting it with the live documents only is worth its cost.
    pub fn needs_compaction(&self) -> bool {
        let table = self.table.read().expect("table");
        table.garbage_chunks >= 10_000 && table.garbage_chunks >= table.chunks.len()
    }

    /// Slots in the graph: points, points of removed chunks not yet taken out, free slots.
    pub fn graph_slots(&self) -> usize {
        self.graph().len()
    }

    /// True when enough graph points of removed chunks wait to be taken out of the graph:
    /// 1/64 of the graph, or [`CONSOLIDATE_BATCH`].
    pub fn needs_consolidation(&self) -> bool {
        let dead = self.table.read().expect("table").dead_points.len();
        dead > 0 && (dead >= CONSOLIDATE_BATCH || dead * 64 >= self.graph().len())
    }

    /// Takes up to [`CONSOLIDATE_BATCH`] points of removed chunks out of the graph and
    /// frees their slots for later inserts ([`DenseIndex::consolidate`]): deletes and
    /// updates cost no rebuild, and the graph holds as many points as the collection has
    /// chunks (plus the batch). Writes and searches go on meanwhile.
    pub fn consolidate(&self) -> crate::dense::Consolidated {
        let one = self.maintenance.lock().expect("maintenance lock");
        let (dense, dead) = {
            let mut table = self.table.write().expect("table");
            let from = table.dead_points.len().saturating_sub(CONSOLIDATE_BATCH);
            (self.graph(), table.dead_points.split_off(from))
        };
        if dead.is_empty() {
            return Default::default();
        }
        let started = std::time::Instant::now();
        let done = dense.consolidate(&dead);
        drop(one);
        // The freed slots count as changes to save (else the next open finds the points
        // dead again and frees them once more). (Lock order: maintenance, then writer.)
        self.writer.lock().expect("writer lock").unsaved_points += done.freed;
        tracing::info!(
            collection = %self.settings.name,
            freed = done.freed,
            lists = done.lists,
            relinked = done.linked,
            seconds = started.elapsed().as_secs_f32(),
            "deleted points taken out of the graph"
        );
        done
    }

    /// Background upkeep: takes removed chunks' points out of the graph when enough wait,
    /// and rewrites the log when it is mostly garbage (without rebuilding the graph).
    pub fn maintain(&self) -> Result<()> {
        if self.needs_consolidation() {
            self.consolidate();
        }
        if self.needs_compaction() {
            self.rewrite_log()?;
        }
        Ok(())
    }

    fn get(&self, id: &str) -> Option<DocumentView> {
        let table = self.table.read().expect("table");
        let d = table.docs.get(id)?;
        Some(DocumentView {
            id: d.id().to_string(),
            title: d.title().map(str::to_string),
            text: d.text().to_string(),
            metadata: d.metadata().clone(),
            chunks: d
                .chunks()
                .iter()
                .enumerate()
                .map(|(i, c)| ChunkView {
                    chunk_id: chunk_id(d.id(), i),
                    char_start: c.char_start,
                    char_end: c.char_end,
                    tokens: c.tokens,
                })
                .collect(),
        })
    }

    /// A view of the last commit for one search (see [`StoreView`]).
    fn view<'a>(&'a self, filter: Option<&'a Filter>) -> EmbeddedView<'a> {
        // The table first, then the commit: a commit publishes tantivy's snapshot before it
        // drops removed chunks from the table, so a snapshot taken under the table's lock
        // is never older than what the table has already dropped. (The other order could
        // pair an old snapshot with a table that has dropped a replaced document's old
        // chunks: the document would vanish from that search.)
        let table = self.table.read().expect("table");
        let snapshot = self.keyword.snapshot();
        EmbeddedView {
            store: self,
            v: snapshot.seq,
            snapshot,
            table,
            dense: self.graph(),
            filter,
            allowed: OnceLock::new(),
        }
    }

    /// About `n` visible chunks, evenly spaced over the key order.
    fn sample(&self, n: usize) -> Vec<SampledChunk> {
        let table = self.table.read().expect("table");
        let mut keys: Vec<u64> =
            table.chunks.iter().filter(|(_, c)| c.removed == NOT_REMOVED).map(|(k, _)| *k).collect();
        keys.sort_unstable();
        let step = keys.len().div_ceil(n.max(1)).max(1);
        let dense = self.graph();
        let g = dense.read();
        keys.iter()
            .step_by(step)
            .map(|k| {
                let c: &ChunkEntry = &table.chunks[k];
                SampledChunk { vector: g.vector(c.point).to_vec(), text: c.text().to_string() }
            })
            .collect()
    }

    /// The stored vectors of the live chunks, in key order (the order they were written).
    fn vectors(&self) -> Vec<Vec<f32>> {
        let table = self.table.read().expect("table");
        let mut keys: Vec<u64> =
            table.chunks.iter().filter(|(_, c)| c.removed == NOT_REMOVED).map(|(k, _)| *k).collect();
        keys.sort_unstable();
        let dense = self.graph();
        let g = dense.read();
        keys.iter().map(|k| g.vector(table.chunks[k].point).to_vec()).collect()
    }

    /// Counts, sizes and state.
    fn stats(&self) -> StoreStats {
        let last_seq = self.writer.lock().expect("writer lock").next_seq - 1;
        let snapshot = self.keyword.snapshot();
        let table = self.table.read().expect("table");
        let dense_points = self.dense.read().expect("dense").points();
        let dim = self.settings.dimension;
        let text_bytes: usize = table.docs.values().map(|d| d.text().len() + d.id().len() + 64).sum();
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
        StoreStats {
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
        let table = self.table.read().expect("table");
        let snapshot = self.keyword.snapshot();
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

    /// Rebuilds the graph from the live chunks and rewrites the log with live documents
    /// only. Writes wait; searches go on (on the old graph until the swap).
    pub fn compact(&self) -> Result<()> {
        let _one = self.maintenance.lock().expect("maintenance lock");
        let mut writer = self.writer.lock().expect("writer lock");
        self.rebuilding.store(true, Ordering::Relaxed);
        let result = self.rebuild_locked(&mut writer);
        self.rebuilding.store(false, Ordering::Relaxed);
        result
    }

    /// [`EmbeddedStore::compact`] under its locks (maintenance, then writer).
    fn rebuild_locked(&self, writer: &mut Writer) -> Result<()> {
        // A save still writing would mark its table with places in the log replaced below.
        self.saver.finish();
        self.commit()?;
        self.verify_saved_files()?;
        let started = std::time::Instant::now();
        let old = self.graph();
        let (cut, fresh, moved) = {
            let table = self.table.read().expect("table");
            let cut = self.live_cut(&table, writer);
            let fresh = DenseIndex::new(
                self.settings.hnsw,
                self.settings.quantization,
                self.settings.distance,
                self.settings.dimension,
                table.chunks.len(),
            );
            let mut keys: Vec<u64> = table.chunks.keys().copied().collect();
            keys.sort_unstable();
            let g = old.read();
            let items: Vec<(&[f32], u64)> = keys.iter().map(|k| (g.vector(table.chunks[k].point), *k)).collect();
            let points = fresh.insert(&items);
            (cut, fresh, keys.into_iter().zip(points).collect::<Vec<_>>())
        };
        let mut log = wal::LogRewrite::begin(&self.dir.join(LOG_FILE))?;
        self.write_cut(&cut, &mut log)?;
        // The saved table points into the old log; it is saved again below.
        let _ = std::fs::remove_file(self.dir.join(TABLE_FILE));
        self.install_log(writer, log.finish(None))?;
        // The table's points and the graph change together: a search holds the table's read
        // lock while it uses the graph.
        {
            let mut table = self.table.write().expect("table");
            for (k, p) in moved {
                if let Some(c) = table.chunks.get_mut(&k) {
                    c.point = p;
                }
            }
            table.dead_points.clear();
            table.garbage_chunks = 0;
            *self.dense.write().expect("dense") = Arc::new(fresh);
        }
        self.save_graph_or_warn(writer);
        tracing::info!(collection = %self.settings.name, seconds = started.elapsed().as_secs_f32(), "compacted");
        Ok(())
    }

    /// Rewrites the log with the live documents alone while writes go on (the graph stays;
    /// its dead points are consolidation's). The documents are cut under the writer lock
    /// and written to a new log without it; the records appended meanwhile are copied after
    /// them in passes while writes continue, and the last pass — what the writes of one
    /// pass appended — runs under the writer lock with the rename. Memory holds one record
    /// at a time. Returns the bytes copied under the writer lock.
    pub fn rewrite_log(&self) -> Result<u64> {
        let _one = self.maintenance.lock().expect("maintenance lock");
        self.verify_saved_files()?;
        let started = std::time::Instant::now();
        let path = self.dir.join(LOG_FILE);
        let cut = {
            let writer = self.writer.lock().expect("writer lock");
            self.live_cut(&self.table.read().expect("table"), &writer)
        };
        let mut log = wal::LogRewrite::begin(&path)?;
        self.write_cut(&cut, &mut log)?;
        let (mut from, garbage) = (cut.log_end, cut.garbage);
        drop(cut);
        for _ in 0..8 {
            let to = self.writer.lock().expect("writer lock").wal.len();
            if to - from < TAIL_UNDER_LOCK {
                break;
            }
            from = log.copy_from(&path, from, to)?;
        }
        // No save may be running when the log is replaced (its table would be marked with a
        // place in the old log): wait for one outside the writer lock, which a write holds
        // when it starts one, and look again under it.
        let mut writer = loop {
            self.saver.finish();
            let writer = self.writer.lock().expect("writer lock");
            if !self.saver.running() {
                break writer;
            }
        };
        let to = writer.wal.len();
        let _ = std::fs::remove_file(self.dir.join(TABLE_FILE));
        self.install_log(&mut writer, log.finish(Some((&path, from, to))))?;
        {
            let mut table = self.table.write().expect("table");
            table.garbage_chunks = table.garbage_chunks.saturating_sub(garbage);
        }
        self.save_in_background(&mut writer);
        drop(writer);
        tracing::info!(
            collection = %self.settings.name,
            seconds = started.elapsed().as_secs_f32(),
            copied_under_lock = to - from,
            "log rewritten"
        );
        Ok(to - from)
    }

    /// Puts the new log `replaced` gave in place of the writer's (which stays in use until
    /// the new one is durable).
    fn install_log(&self, writer: &mut Writer, replaced: std::result::Result<Wal, wal::ReplaceError>) -> Result<()> {
        writer.wal = match replaced {
            Ok(new_log) => new_log,
            Err(wal::ReplaceError::OldLogKept(e)) => return Err(e),
            Err(wal::ReplaceError::Unknown(e)) => {
                writer
                    .wal
                    .poison(format!("compaction renamed a new log into place but could not make it durable ({e})"));
                return Err(e);
            }
        };
        Ok(())
    }

    /// Checks the vectors the graph and the texts the table read from their saved files
    /// before they are copied into a log (compaction, snapshots): damage there must not
    /// reach the source of truth. A damaged file is removed, so that the next open rebuilds
    /// what it held from the log.
    fn verify_saved_files(&self) -> Result<()> {
        // The saved table's texts likewise (a damaged table file is removed by the check).
        if let Err(e) = self.table.read().expect("table").verify_texts() {
            return Err(IndexError::Corrupt(format!(
                "collection `{}`: {e}; restart to rebuild the table from the log",
                self.settings.name
            )));
        }
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

    /// The live documents as they stand, oldest write first, for a log written from them
    /// ([`EmbeddedStore::write_cut`]), with where the writer's log ends (the caller holds
    /// the writer lock, so the two agree).
    fn live_cut(&self, table: &Table, writer: &Writer) -> LiveCut {
        let mut docs: Vec<(Arc<DocEntry>, u64, Vec<u32>)> = table
            .docs
            .values()
            .map(|d| {
                let seq = d.chunks().first().map_or(0, |c| table.chunks[&c.key].added);
                (d.clone(), seq, d.chunks().iter().map(|c| table.chunks[&c.key].point).collect())
            })
            .collect();
        docs.sort_by_key(|(d, seq, _)| (*seq, d.chunks().first().map_or(0, |c| c.key)));
        LiveCut {
            checkpoint: Record::Checkpoint { seq: writer.next_seq - 1, next_key: writer.next_key },
            docs,
            log_end: writer.wal.len(),
            garbage: table.garbage_chunks,
        }
    }

    /// Writes `cut` as log records (its checkpoint, then one upsert a document), the vectors
    /// read from the graph. The caller holds the maintenance lock: no consolidation frees
    /// (and no insert reuses) the points of documents removed since the cut.
    fn write_cut(&self, cut: &LiveCut, out: &mut wal::LogRewrite) -> Result<()> {
        out.push(&cut.checkpoint)?;
        let dense = self.graph();
        // The graph's read lock a few hundred documents at a time: growing the graph waits
        // for it, and writes may wait for a growth.
        for docs in cut.docs.chunks(256) {
            let g = dense.read();
            for (d, seq, points) in docs {
                let vectors: Vec<f32> = points.iter().flat_map(|&p| g.vector(p).iter().copied()).collect();
                out.push(&Record::Upsert {
                    seq: (*seq).max(1),
                    docs: vec![DocRecord {
                        id: d.id().to_string(),
                        title: d.title().map(str::to_string),
                        text: d.text().to_string(),
                        metadata: d.metadata().clone(),
                        hash: d.hash,
                        chunks: d.chunks().iter().collect(),
                    }],
                    vectors,
                })?;
            }
        }
        Ok(())
    }

    /// Writes a consistent copy of the collection (settings and a compacted log) to `dest`,
    /// which must not exist. Restoring it replays the log (see `IndexService::restore`).
    fn snapshot_to(&self, dest: &Path) -> Result<()> {
        if dest.exists() {
            return Err(IndexError::invalid("path", format!("{} already exists", dest.display())));
        }
        // The documents are cut under the writer lock and written after it is let go, with
        // the maintenance lock keeping their graph points as they are.
        let _one = self.maintenance.lock().expect("maintenance lock");
        self.verify_saved_files()?;
        let cut = {
            let writer = self.writer.lock().expect("writer lock");
            self.commit()?;
            self.live_cut(&self.table.read().expect("table"), &writer)
        };
        std::fs::create_dir_all(dest)?;
        wal::write_atomic(&dest.join("settings.json"), &serde_json::to_vec_pretty(&self.settings)?)?;
        let mut log = wal::LogRewrite::begin(&dest.join(LOG_FILE))?;
        self.write_cut(&cut, &mut log)?;
        log.finish(None).map_err(wal::ReplaceError::into_error)?;
        Ok(())
    }

    /// Commits, saves the graph when it grew, and stops the keyword writer (graceful
    /// shutdown).
    fn close(self) -> Result<()> {
        self.commit()?;
        if let Err(e) = self.save_graph() {
            tracing::warn!(collection = %self.settings.name, error = %e, "could not save the graph");
        }
        self.keyword.close()
    }

    /// Saves the graph when points were added since it was last saved, so that the next
    /// open inserts nothing (graceful shutdown); otherwise waits for a save running in the
    /// background (after the upkeep's log rewrite) to be done. Either way, when it returns
    /// no save is under way.
    pub fn save_graph(&self) -> Result<()> {
        let mut writer = self.writer.lock().expect("writer lock");
        if writer.unsaved_points > 0 {
            self.save_graph_locked(&mut writer)?;
        } else {
            self.saver.finish();
        }
        Ok(())
    }

    /// Saves the graph and the chunk table as covering every record written so far (the
    /// caller holds the writer lock, so neither changes meanwhile). tantivy commits first,
    /// so that the next open finds everything they cover in it and replays only the log
    /// after them.
    fn save_graph_locked(&self, writer: &mut Writer) -> Result<()> {
        self.saver.finish();
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

    /// Starts saving the graph and the table as covering every record written so far, on a
    /// thread of its own, so that writes go on meanwhile (at a million chunks a save
    /// writes ~3 GB). What is taken under the writer lock is cheap: the graph's cut (its
    /// point count and entry point) and the table's documents, shared. The files are
    /// replaced by renames, graph first; an open pairs them by their marks, so a crash at
    /// any point leaves either the previous save or this one usable (or a replay of the
    /// log). One save at a time: while one runs, the next waits for a later write.
    fn save_in_background(&self, writer: &mut Writer) {
        {
            let mut saver = self.saver.0.lock().expect("saver");
            if saver.as_ref().is_some_and(|h| !h.is_finished()) {
                return;
            }
            if let Some(done) = saver.take() {
                let _ = done.join();
            }
        }
        if let Err(e) = self.commit() {
            tracing::warn!(collection = %self.settings.name, error = %e, "could not save the graph");
            return;
        }
        let dense = self.graph();
        // Growing the graph waits for a save: make the room the next saves' worth of
        // inserts needs now, before this save starts.
        dense.reserve(save_every(dense.len()));
        let cut = dense.cut();
        let covered = writer.next_seq - 1;
        let table = writer.wal.mark().map(|mark| {
            let mark = TableMark { covered, mark, next_seq: writer.next_seq, next_key: writer.next_key };
            (self.table.read().expect("table").to_save(), mark)
        });
        writer.unsaved_points = 0;
        let (dir, name) = (self.dir.clone(), self.settings.name.clone());
        tracing::info!(collection = %name, points = cut.points(), "saving the graph and the table in the background");
        let spawned = std::thread::Builder::new().name("ragway-save".into()).spawn(move || {
            let started = std::time::Instant::now();
            let saved = dense.save_cut(&dir.join(GRAPH_FILE), covered, &cut).and_then(|()| match &table {
                Some((table, mark)) => table.write(&dir.join(TABLE_FILE), mark),
                None => Ok(()),
            });
            match saved {
                Ok(()) => tracing::info!(collection = %name, points = cut.points(), seconds = started.elapsed().as_secs_f32(), "graph and table saved"),
                Err(e) => tracing::warn!(collection = %name, error = %e, "could not save the graph"),
            }
        });
        match spawned {
            Ok(handle) => *self.saver.0.lock().expect("saver") = Some(handle),
            Err(e) => tracing::warn!(collection = %self.settings.name, error = %e, "could not start saving the graph"),
        }
    }

    /// [`EmbeddedStore::save_graph_locked`] where a failure is only logged: the graph is
    /// derived data, and a failed save costs the next open a longer replay, nothing more.
    fn save_graph_or_warn(&self, writer: &mut Writer) {
        if let Err(e) = self.save_graph_locked(writer) {
            tracing::warn!(collection = %self.settings.name, error = %e, "could not save the graph");
        }
    }
}

impl ChunkStore for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn unchanged(&self, docs: &[(&str, u64)]) -> Vec<bool> {
        let table = self.table.read().expect("table");
        docs.iter().map(|(id, hash)| table.docs.get(*id).is_some_and(|d| d.hash == *hash)).collect()
    }

    fn upsert(&self, docs: Vec<NewDoc>) -> Result<WriteResult> {
        self.write(docs)
    }

    fn delete(&self, ids: &[String]) -> Result<WriteResult> {
        EmbeddedStore::delete(self, ids)
    }

    fn delete_by_filter(&self, filter: &Filter) -> Result<WriteResult> {
        self.delete_where(filter)
    }

    fn get(&self, id: &str) -> Result<Option<DocumentView>> {
        Ok(EmbeddedStore::get(self, id))
    }

    fn commit(&self) -> Result<u64> {
        EmbeddedStore::commit(self)
    }

    fn wait_visible(&self, seq: u64) -> Result<()> {
        EmbeddedStore::wait_visible(self, seq)
    }

    fn has_pending(&self) -> bool {
        EmbeddedStore::has_pending(self)
    }

    fn view<'a>(&'a self, filter: Option<&'a Filter>) -> Result<Box<dyn StoreView + 'a>> {
        Ok(Box::new(EmbeddedStore::view(self, filter)))
    }

    fn sample(&self, n: usize) -> Result<Vec<SampledChunk>> {
        Ok(EmbeddedStore::sample(self, n))
    }

    fn stats(&self) -> StoreStats {
        EmbeddedStore::stats(self)
    }

    fn vectors(&self) -> Result<Vec<Vec<f32>>> {
        Ok(EmbeddedStore::vectors(self))
    }

    fn snapshot(&self, dest: &Path) -> Result<()> {
        self.snapshot_to(dest)
    }

    fn needs_compaction(&self) -> bool {
        EmbeddedStore::needs_compaction(self)
    }

    fn maintain(&self) -> Result<()> {
        EmbeddedStore::maintain(self)
    }

    fn compact(&self) -> Result<()> {
        EmbeddedStore::compact(self)
    }

    fn flush(&self) -> Result<()> {
        self.save_graph()
    }

    fn close(self: Box<Self>) -> Result<()> {
        EmbeddedStore::close(*self)
    }

    fn as_embedded(&self) -> Option<&EmbeddedStore> {
        Some(self)
    }
}

/// One search's view: the last tantivy commit, the table (read-locked for the search) and
/// the graph, and the set of chunks the filter allows once something needs it.
struct EmbeddedView<'a> {
    store: &'a EmbeddedStore,
    /// The visible sequence number (the snapshot's).
    v: u64,
    snapshot: Arc<KeywordSnapshot>,
    table: RwLockReadGuard<'a, Table>,
    dense: Arc<DenseIndex>,
    filter: Option<&'a Filter>,
    /// The visible chunks the filter allows, built once for both halves.
    allowed: OnceLock<Arc<HashSet<u64>>>,
}

impl EmbeddedView<'_> {
    /// The visible chunks `f` allows: the payload index's candidates when it can narrow the
    /// filter down, else a scan of the table.
    fn allowed_set(&self, f: &Filter) -> Arc<HashSet<u64>> {
        self.allowed
            .get_or_init(|| {
                let (table, v) = (&self.table, self.v);
                if let Some(keys) = table.payload().candidates(f) {
                    let set = keys
                        .into_iter()
                        .filter(|k| {
                            table.chunks.get(k).is_some_and(|c| c.visible(v) && f.matches(c.doc.id(), c.doc.metadata()))
                        })
                        .collect();
                    return Arc::new(set);
                }
                // Chunks of one document are mostly adjacent: test its filter once.
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
                                let m = f.matches(c.doc.id(), c.doc.metadata());
                                last = Some((ptr, m));
                                m
                            }
                        }
                    })
                    .map(|(k, _)| *k)
                    .collect();
                Arc::new(set)
            })
            .clone()
    }

    /// Whether a filtered dense search should walk the graph testing the filter on the
    /// points it meets rather than build the matching set (and then, when few match, use
    /// exact distances to it). The set is kept once built (the keyword half needs it).
    fn walk_lazily(&self, f: &Filter, ef: usize, forced: Option<usize>) -> bool {
        if self.allowed.get().is_some() {
            return false;
        }
        match forced {
            // The walk forced (benchmarks and tests of the plan).
            Some(0) => true,
            Some(_) => false,
            None => match self.table.payload().count(f) {
                // The index finds the candidates without a scan: build the set when exact
                // distances to it cost less than a walk.
                Some(n) => !exact_scan_pays(n, self.dense.len(), ef),
                None => {
                    let share = filter_share(f, &self.table, &self.dense, self.v);
                    let expected = (share * self.table.chunks.len() as f64) as usize;
                    !table_scan_pays(expected, ef)
                }
            },
        }
    }

    /// Exact distances from `q` to the chunks `keys`, best `k` first.
    fn exact(&self, q: &[f32], keys: &mut dyn Iterator<Item = u64>, k: usize) -> Vec<(u64, f32)> {
        let g = self.dense.read();
        let table = &self.table;
        exact_search(
            self.store.settings.distance,
            q,
            keys.filter_map(|key| {
                table.chunks.get(&key).filter(|c| c.point != UNPLACED).map(|c| (key, g.vector(c.point)))
            }),
            k,
        )
    }
}

impl StoreView for EmbeddedView<'_> {
    fn dense_search(&self, query: &DenseQuery<'_>) -> Result<DenseHits> {
        let (q, k, ef) = (query.vector, query.k, query.ef.max(query.k));
        let (table, v) = (&self.table, self.v);
        let allowed = match self.filter {
            Some(f) if !self.walk_lazily(f, ef, query.exact_scan_max) => Some(self.allowed_set(f)),
            _ => None,
        };
        if let Some(set) = &allowed {
            let exact = match query.exact_scan_max {
                Some(max) => set.len() <= max,
                None => exact_scan_pays(set.len(), self.dense.len(), ef),
            };
            if exact {
                return Ok(DenseHits { hits: self.exact(q, &mut set.iter().copied(), k), exact: true });
            }
        }
        let keep = |key: u64| match (&allowed, self.filter) {
            (Some(set), _) => set.contains(&key),
            (None, Some(f)) => {
                table.chunks.get(&key).is_some_and(|c| c.visible(v) && f.matches(c.doc.id(), c.doc.metadata()))
            }
            (None, None) => table.chunks.get(&key).is_some_and(|c| c.visible(v)),
        };
        let hits = self.dense.search(q, k, ef, &keep);
        // Counting what exists is a scan: only when the walk came up short.
        let short = hits.len() < k && {
            let existing = match (&allowed, self.filter) {
                (Some(set), _) => set.len(),
                (None, Some(f)) => self.allowed_set(f).len(),
                (None, None) => table.chunks.values().filter(|c| c.visible(v)).count(),
            };
            hits.len() < existing
        };
        if !short {
            return Ok(DenseHits { hits, exact: false });
        }
        // The filter or tombstones starved the graph walk: never return fewer results than
        // exist.
        let hits = match self.filter {
            Some(f) => self.exact(q, &mut self.allowed_set(f).iter().copied(), k),
            None => self.exact(q, &mut table.chunks.iter().filter(|(_, c)| c.visible(v)).map(|(k, _)| *k), k),
        };
        Ok(DenseHits { hits, exact: true })
    }

    fn keyword_search(&self, query: &str, k: usize, title_boost: f32) -> Result<Vec<(u64, f32)>> {
        let allow = self.filter.map(|f| {
            let set = self.allowed_set(f);
            Arc::new(move |key: u64| set.contains(&key)) as Arc<dyn Fn(u64) -> bool + Send + Sync>
        });
        let hits = self.store.keyword.search(&self.snapshot, query, k, title_boost, allow)?;
        // Drop hits whose chunk left the table since the snapshot was taken (a rare race).
        Ok(hits.into_iter().filter(|(key, _)| self.table.chunks.contains_key(key)).collect())
    }

    fn document_of(&self, key: u64) -> Option<u64> {
        self.table.chunks.get(&key).and_then(|c| c.doc.chunks().first()).map(|c| c.key)
    }

    fn load(&self, keys: &[u64]) -> Result<()> {
        // The results' texts live in the mapped table file: bring them in together.
        self.table.read_ahead(keys);
        Ok(())
    }

    fn chunk(&self, key: u64) -> Option<StoredChunk> {
        let c = self.table.chunks.get(&key)?;
        let r = c.doc.chunks().get(c.index as usize).expect("a chunk of its document");
        Some(StoredChunk {
            document_id: c.doc.id().to_string(),
            chunk_index: c.index,
            text: c.text().to_string(),
            title: c.doc.title().map(str::to_string),
            metadata: c.doc.metadata().clone(),
            char_start: r.char_start,
            char_end: r.char_end,
        })
    }
}

/// The share of visible chunks `f` matches, estimated from up to 512 graph points spread
/// evenly over the insertion order (the planner's selectivity estimate: a few hundred
/// lookups instead of a scan of the table).
fn filter_share(f: &Filter, table: &Table, dense: &DenseIndex, v: u64) -> f64 {
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
            matched += usize::from(f.matches(c.doc.id(), c.doc.metadata()));
        }
    }
    if seen == 0 {
        // Mostly deleted points: let the scan decide.
        return 0.0;
    }
    matched as f64 / seen as f64
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
