//! A collection: documents chunked, embedded and searched by meaning and by words, kept by a
//! [`ChunkStore`] — the embedded store ([`EmbeddedStore`]: a log, an HNSW graph and a tantivy
//! index in the collection's directory) or another engine behind the same trait.
//!
//! The collection does what does not depend on where documents live: it validates and
//! chunks documents, embeds them (or checks the vectors they bring), plans each search
//! (embedding the query, the candidate counts), fuses the dense and keyword halves, groups
//! results by document and shapes them, and feeds the drift monitor.

use crate::chunker::{chunk_text, ChunkSpan};
use crate::embedded::EmbeddedStore;
use crate::embedder::ChunkEmbedder;
use crate::error::{IndexError, Result};
use crate::filter::Filter;
use crate::fusion::{fuse, Fused, SourceHit};
use crate::simd::dot;
use crate::store::{ChunkStore, DenseQuery, NewChunk, NewDoc};
use crate::types::*;
use crate::wal;
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use crate::embedded::OpenStats;

/// Most results one search returns.
pub const MAX_TOP_K: usize = 1000;
/// Longest query text.
pub const MAX_QUERY_BYTES: usize = 64 << 10;
/// Most candidates one search may ask each half for.
pub const MAX_CANDIDATES: usize = crate::hnsw::MAX_EF;
/// The fewest candidates each half of a hybrid search hands to fusion by default. Fusion
/// scales each half over its own list, so the list's depth changes the ranking: on
/// SciFact, with the default `dbsf` fusion, nDCG@10 rises from 0.7289 with 50 to 0.7324
/// with 200 and 0.7350 with 300 (0.7353 with 400), at 1.4 ms more per search over REST
/// than 50 (docs/benchmarks.md). A fixed depth also keeps a search's first results
/// the same whatever `top_k` asks (up to 150), so an evaluation at `top_k` 100 measures the
/// top 10 that a `top_k` 10 search returns.
pub const DEFAULT_HYBRID_CANDIDATES: usize = 300;
/// The fewest candidates a dense or keyword search takes by default (more than `top_k`, so
/// that grouping by document still fills the results).
pub const DEFAULT_CANDIDATES: usize = 50;

/// The candidates each half of a search takes when the request sets none: twice `top_k`,
/// and at least [`DEFAULT_HYBRID_CANDIDATES`] for hybrid searches ([`DEFAULT_CANDIDATES`]
/// otherwise).
pub fn default_candidates(mode: SearchMode, top_k: usize) -> usize {
    let floor = match mode {
        SearchMode::Hybrid => DEFAULT_HYBRID_CANDIDATES,
        SearchMode::Dense | SearchMode::Keyword => DEFAULT_CANDIDATES,
    };
    top_k.saturating_mul(2).max(floor)
}

/// The candidates each half of `req` takes: its own or the default, never fewer than
/// `top_k`.
pub fn candidates_for(req: &SearchRequest) -> usize {
    req.candidates.unwrap_or_else(|| default_candidates(req.mode, req.top_k)).max(req.top_k)
}

/// Longest document id accepted.
pub const MAX_ID_BYTES: usize = 512;
/// Most chunks a document may bring with its own vectors.
pub const MAX_OWN_CHUNKS: usize = 4096;
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
    store: Box<dyn ChunkStore>,
    drift: crate::drift::DriftMonitor,
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
        let settings: CollectionSettings = serde_json::from_slice(&std::fs::read(dir.join("settings.json"))?)?;
        // The store first: an embedder still loading (`LateEmbedder`) is waited for only
        // once the collection's files are read.
        let store = EmbeddedStore::open(dir, settings.clone())?;
        Self::check_model(&settings, embedder.as_ref())?;
        Ok(Self::with_store(dir, settings, embedder, Box::new(store)))
    }

    /// A collection over any store. `dir` keeps what the collection itself saves (its
    /// settings and drift state).
    pub fn with_store(
        dir: &Path,
        settings: CollectionSettings,
        embedder: Option<Arc<dyn ChunkEmbedder>>,
        store: Box<dyn ChunkStore>,
    ) -> Collection {
        Collection { dir: dir.to_path_buf(), drift: crate::drift::DriftMonitor::open(dir), settings, embedder, store }
    }

    /// A model can serve a collection when it makes vectors of the collection's dimension.
    fn check_model(settings: &CollectionSettings, embedder: Option<&Arc<dyn ChunkEmbedder>>) -> Result<()> {
        match embedder {
            Some(e) if e.dim() != settings.dimension => Err(IndexError::Corrupt(format!(
                "collection `{}` holds {}-d vectors but model `{}` makes {}-d ones",
                settings.name,
                settings.dimension,
                e.model_id(),
                e.dim()
            ))),
            _ => Ok(()),
        }
    }

    /// [`Collection::with_store`], checking that the model makes vectors of the collection's
    /// dimension.
    pub fn on_store(
        dir: &Path,
        settings: CollectionSettings,
        embedder: Option<Arc<dyn ChunkEmbedder>>,
        store: Box<dyn ChunkStore>,
    ) -> Result<Collection> {
        Self::check_model(&settings, embedder.as_ref())?;
        Ok(Self::with_store(dir, settings, embedder, store))
    }

    /// The store holding the collection's documents.
    pub fn store(&self) -> &dyn ChunkStore {
        &*self.store
    }

    /// The embedded store, when the collection lives in one.
    pub fn embedded(&self) -> Option<&EmbeddedStore> {
        self.store.as_embedded()
    }

    /// What the last open read from saved files and from the log (embedded store; default
    /// figures for other stores).
    pub fn open_stats(&self) -> OpenStats {
        self.embedded().map(EmbeddedStore::open_stats).unwrap_or_default()
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

    /// `items` without those whose document is stored with the same content (an upsert
    /// would change nothing), in one look-up of the store; and how many were dropped.
    pub fn skip_unchanged<T>(&self, items: Vec<T>, doc_of: impl Fn(&T) -> &DocumentInput) -> (Vec<T>, usize) {
        let keys: Vec<(&str, u64)> = items.iter().map(|t| (doc_of(t).id.as_str(), doc_hash(doc_of(t)))).collect();
        let same = self.store.unchanged(&keys);
        let skipped = same.iter().filter(|s| **s).count();
        (items.into_iter().zip(same).filter(|(_, s)| !s).map(|(t, _)| t).collect(), skipped)
    }

    /// Upserts documents end to end: validate, skip unchanged ones, chunk, embed, write.
    /// With `wait`, returns once the write is searchable (it is durable either way).
    pub fn upsert(&self, docs: Vec<DocumentInput>, wait: bool) -> Result<WriteResult> {
        validate_batch(&docs)?;
        let (fresh, unchanged) = self.skip_unchanged(docs, |d| d);
        let chunked = fresh.into_par_iter().map(|d| self.chunk(d)).collect::<Result<Vec<_>>>()?;
        let prepared = self.embed(chunked, 256)?;
        let mut result = self.write(prepared)?;
        result.unchanged += unchanged;
        if wait && result.seq > 0 {
            self.wait_visible(result.seq)?;
        }
        Ok(result)
    }

    /// Writes embedded documents in one durable write. Documents whose stored version has
    /// the same hash are skipped (re-running an ingestion changes nothing); within one batch
    /// the last version of a document wins (as if written in order).
    pub fn write(&self, docs: Vec<PreparedDoc>) -> Result<WriteResult> {
        self.write_retrying(docs, Duration::ZERO, |_, _| {})
    }

    /// [`Collection::write`], retrying for up to `retry_for` while the store is
    /// unavailable (a database restarting): the write is idempotent (same documents, same
    /// hashes), so a retry after a commit whose answer was lost only finds them unchanged.
    /// `on_retry` hears each failure and the wait before the next attempt.
    pub fn write_retrying(
        &self,
        docs: Vec<PreparedDoc>,
        retry_for: Duration,
        on_retry: impl Fn(&IndexError, Duration),
    ) -> Result<WriteResult> {
        let (out, mut result) = self.new_docs(docs)?;
        let stored = if retry_for.is_zero() {
            self.store.upsert(out)?
        } else {
            let deadline = Instant::now() + retry_for;
            let mut wait = Duration::from_millis(200);
            loop {
                match self.store.upsert(out.clone()) {
                    Err(e @ IndexError::Unavailable(_)) if Instant::now() + wait < deadline => {
                        on_retry(&e, wait);
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                    r => break r?,
                }
            }
        };
        result.upserted += stored.upserted;
        result.unchanged += stored.unchanged;
        result.chunks += stored.chunks;
        result.seq = stored.seq;
        Ok(result)
    }

    /// The store's form of prepared documents (distance applied, spans and token counts),
    /// the last version of a document given twice winning; the result counts the others.
    fn new_docs(&self, docs: Vec<PreparedDoc>) -> Result<(Vec<NewDoc>, WriteResult)> {
        let dim = self.settings.dimension;
        let mut result = WriteResult::default();
        let mut last: HashMap<String, usize> = HashMap::new();
        for (i, d) in docs.iter().enumerate() {
            last.insert(d.chunked.input.id.clone(), i);
        }
        let mut out = Vec::with_capacity(last.len());
        for (i, doc) in docs.into_iter().enumerate() {
            let input = doc.chunked.input;
            if last[&input.id] != i {
                result.upserted += 1;
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
            for (i, (span, mut vector)) in doc.chunked.spans.iter().zip(doc.vectors).enumerate() {
                if vector.len() != dim {
                    return Err(IndexError::Internal(format!(
                        "embedding has {} dimensions, expected {dim}",
                        vector.len()
                    )));
                }
                self.settings.distance.prepare(&mut vector);
                chunks.push(NewChunk {
                    byte_start: span.byte_start as u32,
                    byte_end: span.byte_end as u32,
                    char_start: span.char_start as u32,
                    char_end: span.char_end as u32,
                    tokens: doc.chunked.embed_inputs.get(i).map_or(0, |t| t.len() as u32),
                    vector,
                });
            }
            out.push(NewDoc {
                id: input.id,
                title: input.title,
                text: input.text,
                metadata: input.metadata.unwrap_or(serde_json::Value::Null),
                hash: doc.chunked.hash,
                chunks,
            });
        }
        Ok((out, result))
    }

    /// Deletes documents by id; ids that do not exist are ignored (counted out).
    pub fn delete(&self, ids: &[String], wait: bool) -> Result<WriteResult> {
        let result = self.store.delete(ids)?;
        if wait && result.seq > 0 {
            self.store.wait_visible(result.seq)?;
        }
        Ok(result)
    }

    /// Deletes every document whose metadata matches `filter`.
    pub fn delete_where(&self, filter: &Filter, wait: bool) -> Result<WriteResult> {
        let result = self.store.delete_by_filter(filter)?;
        if wait && result.seq > 0 {
            self.store.wait_visible(result.seq)?;
        }
        Ok(result)
    }

    /// Makes everything written so far searchable; returns the visible sequence number.
    pub fn commit(&self) -> Result<u64> {
        self.store.commit()
    }

    /// Returns once write `seq` is searchable (committing if nobody has).
    pub fn wait_visible(&self, seq: u64) -> Result<()> {
        self.store.wait_visible(seq)
    }

    /// True when a write is not yet searchable.
    pub fn has_pending(&self) -> bool {
        self.store.has_pending()
    }

    /// True when removed data makes up enough of the store to reclaim it.
    pub fn needs_compaction(&self) -> bool {
        self.store.needs_compaction()
    }

    /// See [`ChunkStore::begin_bulk_load`].
    pub fn begin_bulk_load(&self) -> Result<bool> {
        self.store.begin_bulk_load()
    }

    /// See [`ChunkStore::end_bulk_load`].
    pub fn end_bulk_load(&self) -> Result<()> {
        self.store.end_bulk_load()
    }

    /// Background upkeep (see [`ChunkStore::maintain`]): the embedded store takes removed
    /// chunks' points out of its graph and rewrites its log when mostly garbage.
    pub fn maintain(&self) -> Result<()> {
        self.store.maintain()
    }

    pub fn get(&self, id: &str) -> Result<DocumentView> {
        self.store
            .get(id)?
            .ok_or_else(|| IndexError::DocumentNotFound { collection: self.settings.name.clone(), id: id.to_string() })
    }

    /// Hybrid, dense or keyword search (blocking: call it off the async workers).
    pub fn search(&self, req: &SearchRequest) -> Result<SearchResponse> {
        if req.top_k == 0 || req.top_k > MAX_TOP_K {
            return Err(IndexError::invalid("top_k", format!("top_k must be between 1 and {MAX_TOP_K}")));
        }
        check_candidates(req.candidates)?;
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
        if req.mode != SearchMode::Dense {
            crate::keyword::check_query_terms(&req.query)?;
        }
        let fusion = req.fusion.unwrap_or(self.settings.fusion);
        fusion.validate()?;
        let candidates = candidates_for(req);
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
        let ef = req.ef.unwrap_or(self.settings.hnsw.ef).max(candidates);
        let view = self.store.view(req.filter.as_ref())?;
        // The keyword half first: with a filter it has the store build the matching set,
        // which the dense half then uses too.
        let keyword_hits = match req.mode {
            SearchMode::Dense => Vec::new(),
            _ => view.keyword_search(
                &req.query,
                candidates,
                req.title_boost.unwrap_or(self.settings.keyword.title_boost),
            )?,
        };
        let dense = match &query_vector {
            None => Default::default(),
            Some(q) => {
                view.dense_search(&DenseQuery { vector: q, k: candidates, ef, exact_scan_max: req.exact_scan_max })?
            }
        };
        let (dense_hits, dense_exact) = (dense.hits, dense.exact);
        let best_dense = dense_hits.iter().map(|h| h.1).reduce(f32::max).unwrap_or(0.0);
        // With grouping, each half ranks documents (by their best chunk) before fusion; a
        // document is represented by its first chunk's key.
        let (dense_list, keyword_list, best_chunk) = if req.group_by_document {
            let mut best: HashMap<u64, u64> = HashMap::new();
            let mut collapse = |hits: &[(u64, f32)]| {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                for &(k, s) in hits {
                    let Some(g) = view.document_of(k) else { continue };
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
        let key_of = |f: &Fused| best_chunk.as_ref().map_or(f.id, |b| b[&f.id]);
        view.load(&fused.iter().take(req.top_k).map(key_of).collect::<Vec<_>>())?;
        let mut results = Vec::with_capacity(req.top_k);
        for f in fused {
            if results.len() == req.top_k {
                break;
            }
            let key = key_of(&f);
            // A chunk that left the store since its half ran (a rare race) is passed over.
            let Some(c) = view.chunk(key) else { continue };
            results.push(SearchHit {
                chunk_id: chunk_id(&c.document_id, c.chunk_index as usize),
                document_id: c.document_id,
                chunk_index: c.chunk_index,
                text: c.text,
                title: c.title,
                score: f.score,
                metadata: c.metadata,
                char_start: c.char_start,
                char_end: c.char_end,
                dense: f.dense,
                keyword: f.keyword,
            });
        }
        // The view's read locks go before the drift monitor's profile takes its own.
        drop(view);
        if let (Some(q), None, false) = (&query_vector, &req.vector, req.skip_drift) {
            // Live traffic feeds the drift monitor: the query's best dense score, in the
            // profile's terms.
            self.drift.ensure_profile(|| self.profile());
            self.drift.observe_query(q, best_dense, self.token_count(&req.query));
        }
        Ok(SearchResponse { results, mode: req.mode, dense_exact })
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
    fn profile(&self) -> Option<crate::drift::Profile> {
        let config = self.drift.config();
        let sample = match self.store.sample(config.profile_sample) {
            Ok(sample) => sample,
            Err(e) => {
                tracing::warn!(collection = %self.settings.name, error = %e, "could not sample chunks for the drift profile");
                return None;
            }
        };
        let vectors: Vec<&[f32]> = sample.iter().map(|c| c.vector.as_slice()).collect();
        let tokens: Vec<u32> = sample.iter().map(|c| self.token_count(&c.text)).collect();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        crate::drift::build_profile(&vectors, &tokens, config.projections, now)
    }

    /// Makes the drift reference from `queries` (say, a sample of known-good traffic) instead
    /// of the first live queries; answers how many were observed.
    pub fn set_drift_reference(&self, queries: &[String]) -> Result<usize> {
        if queries.is_empty() {
            return Err(IndexError::invalid("queries", "give at least one query"));
        }
        let profile = self
            .profile()
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

    /// The stored vectors of the live chunks, in the order they were written (benchmarks,
    /// exports).
    pub fn export_vectors(&self) -> Result<Vec<Vec<f32>>> {
        self.store.vectors()
    }

    /// Counts, sizes and state.
    pub fn info(&self) -> CollectionInfo {
        CollectionInfo { settings: self.settings.clone(), storage: self.store.kind(), stats: self.store.stats() }
    }

    /// Reclaims what removed documents hold (the embedded store rebuilds its graph and
    /// rewrites its log with live documents only). Writes wait; searches go on.
    pub fn compact(&self) -> Result<()> {
        self.store.compact()
    }

    /// Writes a consistent copy of the collection to `dest`, which must not exist (see
    /// `IndexService::restore`).
    pub fn snapshot_to(&self, dest: &Path) -> Result<()> {
        self.store.snapshot(dest)
    }

    /// Commits, saves derived state and stops (graceful shutdown).
    pub fn close(self) -> Result<()> {
        self.store.close()
    }

    /// Saves derived state (the embedded store's graph and table) so that the next open
    /// replays nothing (graceful shutdown, idle times).
    pub fn save_graph(&self) -> Result<()> {
        self.store.flush()
    }
}

/// A search's `candidates`, when set: 1 to [`MAX_CANDIDATES`] (also checked up front by
/// callers that start long work before searching, such as evaluation runs).
pub fn check_candidates(candidates: Option<usize>) -> Result<()> {
    if candidates.is_some_and(|c| c == 0 || c > MAX_CANDIDATES) {
        return Err(IndexError::invalid("candidates", format!("candidates must be between 1 and {MAX_CANDIDATES}")));
    }
    Ok(())
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

/// The chunk id clients see: `{document id}#{chunk index}`.
pub fn chunk_id(doc_id: &str, index: usize) -> String {
    format!("{doc_id}#{index}")
}

/// Compact JSON with every object's keys sorted: the same text for the same value whatever
/// order its keys came in (serde_json keeps insertion order in this workspace, which
/// constrained decoding needs for schema property order).
pub fn canonical_json(v: &serde_json::Value) -> String {
    fn write(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                out.push('{');
                for (i, k) in keys.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::Value::from(k.as_str()).to_string());
                    out.push(':');
                    write(&m[k], out);
                }
                out.push('}');
            }
            serde_json::Value::Array(a) => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(x, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

/// FNV-1a over the document's content: stable across versions and platforms (metadata in
/// [`canonical_json`], so key order does not matter).
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
    feed(canonical_json(doc.metadata.as_ref().unwrap_or(&serde_json::Value::Null)).as_bytes());
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

#[cfg(test)]
mod hash_tests {
    use super::*;

    #[test]
    fn metadata_key_order_does_not_change_a_documents_hash() {
        let doc = |meta: &str| DocumentInput {
            id: "d".into(),
            text: "t".into(),
            metadata: Some(serde_json::from_str(meta).unwrap()),
            ..Default::default()
        };
        let a = doc(r#"{"b": 1, "a": {"y": [1, {"q": 2, "p": 3}], "x": "s"}}"#);
        let b = doc(r#"{"a": {"x": "s", "y": [1, {"p": 3, "q": 2}]}, "b": 1}"#);
        assert_eq!(doc_hash(&a), doc_hash(&b));
        // The same text serde_json wrote when its maps were sorted: hashes stored before
        // key order was kept still match.
        assert_eq!(canonical_json(a.metadata.as_ref().unwrap()), r#"{"a":{"x":"s","y":[1,{"p":3,"q":2}]},"b":1}"#);
    }
}
