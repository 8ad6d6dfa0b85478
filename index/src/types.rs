//! Settings and request/response types of collections (serde-ready for the API layers).

use crate::dense::{Distance, HnswParams, Quantization};
use crate::fusion::{FusionParams, SourceHit};
use serde::{Deserialize, Serialize};

/// How documents are cut into chunks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChunkingParams {
    /// Token budget of a chunk (the title's tokens included when `embed_title`); default:
    /// everything the embedding model takes without truncation.
    pub max_tokens: Option<usize>,
    /// Tokens a chunk repeats from the end of the previous one (whole pieces only).
    pub overlap_tokens: usize,
    /// Embed each chunk with its document's title in front (as BEIR's dense baselines do).
    pub embed_title: bool,
}

impl Default for ChunkingParams {
    fn default() -> Self {
        Self { max_tokens: None, overlap_tokens: 32, embed_title: true }
    }
}

/// BM25 settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeywordParams {
    /// Extra weight of a match in the title field. The text field already holds the title
    /// (BM25 over "title + text"), so 0 (the default, best on SciFact) searches it once.
    pub title_boost: f32,
}

impl Default for KeywordParams {
    fn default() -> Self {
        Self { title_boost: 0.0 }
    }
}

/// A collection's fixed settings, stored in `settings.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionSettings {
    pub name: String,
    /// Embedding model id the collection is bound to; `null`: none (documents and searches
    /// bring their own vectors).
    pub model: Option<String>,
    pub dimension: usize,
    #[serde(default)]
    pub distance: Distance,
    #[serde(default)]
    pub hnsw: HnswParams,
    /// Codes the dense search walks on, rescored exactly from the f32 vectors
    /// (`none`, `f16`, `int8`).
    #[serde(default)]
    pub quantization: Quantization,
    #[serde(default)]
    pub chunking: ChunkingParams,
    /// Default fusion of hybrid searches (a request may override it).
    #[serde(default)]
    pub fusion: FusionParams,
    #[serde(default)]
    pub keyword: KeywordParams,
    /// Unix seconds.
    pub created_at: u64,
}

/// `POST /v1/collections`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateCollection {
    pub name: String,
    /// The embedding model [default: the server's]; `null` for a collection without one,
    /// whose documents and searches bring their own vectors (then `dimension` is required).
    #[serde(default, deserialize_with = "present")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub model: Option<Option<String>>,
    /// The vectors' dimension: required without a model, checked against the model's
    /// otherwise.
    #[serde(default)]
    pub dimension: Option<usize>,
    #[serde(default)]
    pub distance: Option<Distance>,
    #[serde(default)]
    pub hnsw: Option<HnswParams>,
    /// `none` (default), `f16` or `int8`: what the dense search walks on before it rescores
    /// its candidates exactly.
    #[serde(default)]
    pub quantization: Option<Quantization>,
    #[serde(default)]
    pub chunking: Option<ChunkingParams>,
    #[serde(default)]
    pub fusion: Option<FusionParams>,
    #[serde(default)]
    pub keyword: Option<KeywordParams>,
}

/// Tells a field given as `null` (`Some(None)`) from a missing one (`None`).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// A document to upsert. With no `vector` or `chunks`, its text is chunked and embedded by
/// the collection's model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DocumentInput {
    pub id: String,
    /// The text; with `chunks`, leave it out (the text is the chunks' texts, joined).
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
    /// The document's own vector: the text is then stored as one chunk, not split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector: Option<Vec<f32>>,
    /// The document's own chunks, each with its vector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks: Option<Vec<ChunkInput>>,
}

/// A chunk that brings its own vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChunkInput {
    pub text: String,
    pub vector: Vec<f32>,
}

/// A stored document with its chunks' layout.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DocumentView {
    pub id: String,
    pub title: Option<String>,
    pub text: String,
    pub metadata: serde_json::Value,
    pub chunks: Vec<ChunkView>,
}

#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChunkView {
    pub chunk_id: String,
    pub char_start: u32,
    pub char_end: u32,
    pub tokens: u32,
}

/// What an upsert did.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WriteResult {
    /// Documents written (new or changed).
    pub upserted: usize,
    /// Documents identical to the stored version (nothing written).
    pub unchanged: usize,
    pub deleted: usize,
    pub chunks: usize,
    /// Log sequence number of the write (0 when nothing was written).
    pub seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum SearchMode {
    Dense,
    Keyword,
    #[default]
    Hybrid,
}

impl SearchMode {
    /// A mode by its API name (`dense`, `keyword`, `hybrid`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "dense" => Some(Self::Dense),
            "keyword" => Some(Self::Keyword),
            "hybrid" => Some(Self::Hybrid),
            _ => None,
        }
    }
}

/// A search. `filter` is parsed by [`crate::filter::Filter::parse`].
#[derive(Debug, Clone, Default)]
pub struct SearchRequest {
    pub query: String,
    pub top_k: usize,
    pub mode: SearchMode,
    pub filter: Option<crate::filter::Filter>,
    /// HNSW search breadth (default: the collection's).
    pub ef: Option<usize>,
    /// Fusion override (default: the collection's).
    pub fusion: Option<FusionParams>,
    /// Candidates each half contributes to fusion (default: max(2·top_k, 300) for hybrid
    /// searches, max(2·top_k, 50) for dense or keyword ones).
    pub candidates: Option<usize>,
    /// One result per document (its best chunk); fusion then ranks documents.
    pub group_by_document: bool,
    /// A precomputed query vector (skips embedding the query).
    pub vector: Option<Vec<f32>>,
    /// BM25 weight of title matches (default: the collection's).
    pub title_boost: Option<f32>,
    /// Filters matching at most this many chunks are served by an exact scan (default: the
    /// planner decides from the filter's match count and the collection's size).
    pub exact_scan_max: Option<usize>,
    /// Keep this search out of the drift monitor (evaluation and reference queries).
    pub skip_drift: bool,
}

#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SearchHit {
    pub chunk_id: String,
    pub document_id: String,
    pub chunk_index: u32,
    pub text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub score: f32,
    pub metadata: serde_json::Value,
    pub char_start: u32,
    pub char_end: u32,
    pub dense: Option<SourceHit>,
    pub keyword: Option<SourceHit>,
}

#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SearchResponse {
    pub results: Vec<SearchHit>,
    pub mode: SearchMode,
    /// The dense half ran as an exact scan (selective filter or too few graph results).
    pub dense_exact: bool,
}

/// Counts and state of a collection.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CollectionInfo {
    pub settings: CollectionSettings,
    /// Where the collection's documents live: `embedded` (the data directory) or `postgres`.
    pub storage: &'static str,
    /// What its store counts (shown beside the settings).
    #[serde(flatten)]
    pub stats: crate::store::StoreStats,
}

/// `info.documents` reads the store's counts.
impl std::ops::Deref for CollectionInfo {
    type Target = crate::store::StoreStats;
    fn deref(&self) -> &Self::Target {
        &self.stats
    }
}
