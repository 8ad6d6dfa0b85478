//! # ragway-gateway
//!
//! The `ragway` server and command line, in layers (see ARCHITECTURE.md, "Request flow"):
//!
//! - [`service`]: the operations both APIs offer — typed inputs and outputs, authorization
//!   per operation ([`service::auth`]), limits ([`service::limits`]) and the one error type
//!   ([`service::error`]). No actix or async-graphql types.
//! - [`http`]: REST routes, OpenAI request/response shapes, SSE, middleware, OpenAPI.
//! - [`graphql`]: the GraphQL schema over the same services.
//! - [`models`]: the model registry, routing policies and upstream pools.
//! - [`cli`]: the `ingest`, `eval` and `repair` subcommands (`serve` is [`http::server`]).
//! - [`app`]: the state every request shares.

pub mod app;
pub mod cli;
pub mod config;
pub mod graphql;
pub mod http;
pub mod models;
pub mod service;
pub mod telemetry;
