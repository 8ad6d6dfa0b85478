//! The operations of ragway, shared by REST and GraphQL: who may call them
//! ([`auth::Operation`]), what they accept ([`limits`]), and how they fail ([`error`]).
//! Nothing here knows about actix or async-graphql.

pub mod auth;
pub mod collections;
pub mod completions;
pub mod drift;
pub mod error;
pub mod evals;
pub mod limits;
pub mod models;
pub mod prompts;
pub mod rag;
pub mod structured;
pub mod usage;

/// Seconds since the Unix epoch (OpenAI's `created`, job and run times).
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
