//! ragway-index: collections of chunks, dense (HNSW) + keyword (BM25) search, fusion, durable storage.
//! Built by the hybrid-index issue; nothing is exported yet.
