//! # ragway-index
//!
//! ragway's vector store: collections of chunked documents searchable by meaning (HNSW over
//! embeddings, ragway's own graph) and by words (BM25, tantivy), fused into one ranking; durable
//! through a write-ahead log that both indexes are derived from; fed by bulk ingestion
//! jobs. No HTTP here: the gateway exposes [`IndexService`].

pub mod chunker;
mod cold;
pub mod collection;
pub mod dense;
pub mod drift;
pub mod embedded;
pub mod embedder;
pub mod error;
pub mod filefmt;
pub mod filter;
pub mod fusion;
pub mod hnsw;
pub mod ingest;
pub mod jobs;
pub mod keyword;
mod payload;
pub mod pgtls;
pub mod postgres;
pub mod quant;
mod region;
pub mod service;
pub mod simd;
pub mod store;
mod table;
mod topk;
pub mod types;
pub mod wal;

pub use collection::{Collection, OpenStats};
pub use embedded::EmbeddedStore;
pub use store::ChunkStore;
pub use embedder::{ChunkEmbedder, LateEmbedder, LocalEmbedder};
pub use error::{IndexError, Result};
pub use filter::Filter;
pub use jobs::{JobState, JobView, ProgressView};
pub use service::{IndexService, ServiceOptions};
pub use types::*;
