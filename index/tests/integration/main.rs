//! Index tests with the real all-MiniLM-L6-v2, real tantivy on disk and real hnsw_rs.

mod collection;
mod common;
mod ingest;
