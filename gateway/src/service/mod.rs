//! The operations of ragway, shared by REST and GraphQL: who may call them
//! ([`auth::Operation`]), what they accept ([`limits`]), and how they fail ([`error`]).
//! Nothing here knows about actix or async-graphql.

pub mod auth;
pub mod error;
pub mod evals;
pub mod limits;
pub mod usage;
