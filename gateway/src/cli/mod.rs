//! Subcommands besides `serve`: `ingest`, `eval` and `repair`.

pub mod eval;
pub mod ingest;
pub mod repair;
