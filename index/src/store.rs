//! The storage under a collection, behind one trait: where documents, chunks and vectors are
//! kept, and the two searches over them.
//!
//! A [`Collection`](crate::Collection) validates, chunks and embeds documents, plans
//! searches, fuses the dense and keyword halves and shapes the results; a [`ChunkStore`]
//! keeps what it is given durably and answers the two halves. The embedded store
//! ([`EmbeddedStore`](crate::embedded::EmbeddedStore): a log, an HNSW graph and a tantivy
//! index in the collection's directory) is one implementation; another engine holds
//! collections behind the same API by implementing this trait.
//!
//! ## What an implementation promises
//! - **Acknowledged means durable.** `upsert` and `delete` return once the write survives a
//!   crash, with a sequence number; `wait_visible(seq)` returns once searches see it.
//! - **Documents are atomic.** A search never sees part of a document's chunks: an upsert
//!   replaces all of them at once.
//! - **One view, one state.** The halves of one search come from one [`StoreView`], which sees
//!   one state of the store: both halves and the chunks they return agree on what exists.
//! - **Never short.** A dense search with a filter returns `k` hits whenever `k` chunks match,
//!   however few match.

use crate::filter::Filter;
use crate::types::{DocumentView, WriteResult};
use crate::Result;
use std::path::Path;

/// A document ready to store: validated, chunked, its vectors in stored form (the
/// collection's distance already applied).
#[derive(Debug, Clone)]
pub struct NewDoc {
    pub id: String,
    pub title: Option<String>,
    pub text: String,
    pub metadata: serde_json::Value,
    /// Content hash: a document stored with the same hash is not written again.
    pub hash: u64,
    pub chunks: Vec<NewChunk>,
}

/// One chunk of a [`NewDoc`]: its span of the text, its token count and its vector.
#[derive(Debug, Clone)]
pub struct NewChunk {
    pub byte_start: u32,
    pub byte_end: u32,
    pub char_start: u32,
    pub char_end: u32,
    pub tokens: u32,
    pub vector: Vec<f32>,
}

/// The dense half of a search.
#[derive(Debug, Clone, Copy)]
pub struct DenseQuery<'a> {
    /// In stored form (the collection's distance applied).
    pub vector: &'a [f32],
    /// Hits wanted.
    pub k: usize,
    /// Candidate list size of the graph walk (at least `k`).
    pub ef: usize,
    /// Forces the plan (benchmarks and tests): exact distances when at most this many chunks
    /// match the filter, else the graph walk; `Some(0)` always walks.
    pub exact_scan_max: Option<usize>,
}

/// The dense half's hits, best first, and whether exact distances produced them (rather
/// than the approximate index).
#[derive(Debug, Clone, Default)]
pub struct DenseHits {
    pub hits: Vec<(u64, f32)>,
    pub exact: bool,
}

/// What a search result shows of a stored chunk.
#[derive(Debug, Clone)]
pub struct StoredChunk {
    pub document_id: String,
    pub chunk_index: u32,
    pub text: String,
    pub title: Option<String>,
    pub metadata: serde_json::Value,
    pub char_start: u32,
    pub char_end: u32,
}

/// A chunk's vector and text, for the drift monitor's profile of a collection.
#[derive(Debug, Clone)]
pub struct SampledChunk {
    pub vector: Vec<f32>,
    pub text: String,
}

/// Counts, sizes and state of a store (a collection's info, without its settings).
#[derive(Debug, Clone, Default, serde::Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StoreStats {
    pub documents: usize,
    pub chunks: usize,
    /// Points in the dense index (the embedded graph keeps deleted ones until the next
    /// rebuild).
    pub dense_points: usize,
    /// Chunks in the searchable keyword snapshot.
    pub keyword_chunks: u64,
    /// Last write's sequence number, and the one searches see.
    pub last_seq: u64,
    pub visible_seq: u64,
    pub disk_bytes: u64,
    /// Estimate of what ragway holds in memory: vectors, texts, graph links and tables (0
    /// for a store held by a database server).
    pub memory_bytes: u64,
    /// `ready`, `indexing` (writes not yet searchable), `rebuilding` or `unavailable`.
    pub state: &'static str,
}

/// Where a collection's documents live and how they are searched.
pub trait ChunkStore: Send + Sync {
    /// The engine's name as a collection's info shows it (`embedded`, ...).
    fn kind(&self) -> &'static str;

    /// For each `(id, content hash)`, whether the document is stored with that hash (an
    /// upsert of it would change nothing), in one look-up. A store that cannot tell (say,
    /// its database is down) answers `false`: the write decides again.
    fn unchanged(&self, docs: &[(&str, u64)]) -> Vec<bool>;

    /// Stores documents, each replacing any stored version of it, in one durable write.
    /// Documents stored with the same hash are skipped (counted as unchanged).
    fn upsert(&self, docs: Vec<NewDoc>) -> Result<WriteResult>;

    /// How many [`ChunkStore::upsert`]s of different documents are worth running at once
    /// (an ingestion job's writers); 1 where writes are serialized anyway.
    fn parallel_writes(&self) -> usize {
        1
    }

    /// Removes documents by id; ids not stored are ignored.
    fn delete(&self, ids: &[String]) -> Result<WriteResult>;

    /// Removes every document whose id and metadata match `filter`.
    fn delete_by_filter(&self, filter: &Filter) -> Result<WriteResult>;

    /// A stored document with its chunks, `None` when it is not stored.
    fn get(&self, id: &str) -> Result<Option<DocumentView>>;

    /// Makes everything written so far searchable; returns the visible sequence number.
    fn commit(&self) -> Result<u64>;

    /// Returns once write `seq` is searchable.
    fn wait_visible(&self, seq: u64) -> Result<()>;

    /// True when a write is not yet searchable.
    fn has_pending(&self) -> bool;

    /// A view of one state of the store for one search, restricted to the chunks whose
    /// document matches `filter`.
    fn view<'a>(&'a self, filter: Option<&'a Filter>) -> Result<Box<dyn StoreView + 'a>>;

    /// About `n` visible chunks spread over the collection.
    fn sample(&self, n: usize) -> Result<Vec<SampledChunk>>;

    /// Counts, sizes and state.
    fn stats(&self) -> StoreStats;

    /// The stored vectors of the live chunks, in the order they were written.
    fn vectors(&self) -> Result<Vec<Vec<f32>>>;

    /// Writes a copy of the collection that a restore can open (`dest` must not exist).
    fn snapshot(&self, dest: &Path) -> Result<()>;

    /// True when removed data makes up enough of the store to reclaim it.
    fn needs_compaction(&self) -> bool;

    /// Reclaims what removed data holds.
    fn compact(&self) -> Result<()>;

    /// Background upkeep, run by the service between commits: by default a compaction
    /// when [`ChunkStore::needs_compaction`] says so.
    fn maintain(&self) -> Result<()> {
        if self.needs_compaction() {
            self.compact()?;
        }
        Ok(())
    }

    /// Prepares for a bulk load (an ingestion job): the store may put off index upkeep
    /// that is cheaper done once at the end. Returns whether it did; then
    /// [`ChunkStore::end_bulk_load`] must follow, whatever becomes of the load. By default
    /// nothing is put off.
    fn begin_bulk_load(&self) -> Result<bool> {
        Ok(false)
    }

    /// Ends a bulk load that [`ChunkStore::begin_bulk_load`] began: does what it put off.
    fn end_bulk_load(&self) -> Result<()> {
        Ok(())
    }

    /// Saves derived state so that the next open does less (graceful shutdown, idle times).
    fn flush(&self) -> Result<()>;

    /// Commits, flushes and stops (graceful shutdown).
    fn close(self: Box<Self>) -> Result<()>;

    /// The embedded store, for what only it has (open statistics, consistency checks).
    fn as_embedded(&self) -> Option<&crate::embedded::EmbeddedStore> {
        None
    }
}

/// One state of a store, for the two halves of one search and the chunks they return.
pub trait StoreView {
    /// The `k` chunks nearest to the query vector among those the view's filter allows.
    fn dense_search(&self, query: &DenseQuery<'_>) -> Result<DenseHits>;

    /// The `k` chunks best matching `query` by words among those the view's filter allows,
    /// with the title's words weighted by `title_boost`.
    fn keyword_search(&self, query: &str, k: usize, title_boost: f32) -> Result<Vec<(u64, f32)>>;

    /// The document a chunk belongs to, as a key unique within this view (the key of the
    /// document's first chunk); `None` when the chunk is not in this view.
    fn document_of(&self, key: u64) -> Option<u64>;

    /// Fetches what [`StoreView::chunk`] shows of these chunks in one go (the results of a
    /// search, once fused), for stores whose halves return keys only.
    fn load(&self, _keys: &[u64]) -> Result<()> {
        Ok(())
    }

    /// What a result shows of a chunk (after [`StoreView::load`]); `None` when it is not in
    /// this view.
    fn chunk(&self, key: u64) -> Option<StoredChunk>;
}
