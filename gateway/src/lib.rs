//! # ragway-gateway
//!
//! The `ragway` server: OpenAI-compatible REST over the engine's handles, configuration,
//! errors in OpenAI's shape. The binary (`src/main.rs`) adds the subcommands.

pub mod auth;
pub mod config;
pub mod error;
pub mod eval_cmd;
pub mod evals;
pub mod graphql;
pub mod ingest_cmd;
pub mod middleware;
pub mod openapi;
pub mod registry;
pub mod routes;
pub mod server;
pub mod state;
pub mod telemetry;
