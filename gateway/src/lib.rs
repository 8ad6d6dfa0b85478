//! # ragway-gateway
//!
//! The `ragway` server: OpenAI-compatible REST over the engine's handles, configuration,
//! errors in OpenAI's shape. The binary (`src/main.rs`) adds the subcommands.

pub mod config;
pub mod error;
pub mod ingest_cmd;
pub mod routes;
pub mod server;
pub mod state;
