//! Index tests with the real all-MiniLM-L6-v2, real tantivy on disk, ragway's HNSW graph and a real
//! PostgreSQL with pgvector.

mod collection;
mod common;
mod ingest;
mod postgres;
mod tlsproxy;
