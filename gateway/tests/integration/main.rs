//! Gateway tests against the real `ragway` binary and real weights (one test binary, one
//! module per area).

mod audit;
mod auth;
mod collections;
mod common;
mod deploy;
mod drift;
mod durability;
mod completions;
mod embeddings;
mod eval;
mod fleet;
mod graphiql_browser;
mod graphql;
mod openai_client;
mod openapi_fuzz;
mod rag;
mod server;
