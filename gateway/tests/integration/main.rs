//! Gateway tests against the real `ragway` binary and real weights (one test binary, one
//! module per area).

mod collections;
mod common;
mod durability;
mod completions;
mod embeddings;
mod openai_client;
mod server;
