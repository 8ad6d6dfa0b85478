//! Index tests with the real all-MiniLM-L6-v2, real tantivy on disk and ragway's HNSW graph.

mod collection;
mod common;
mod ingest;
