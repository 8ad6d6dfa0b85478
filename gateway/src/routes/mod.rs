//! HTTP routes. Handlers parse and validate, call the engine, and shape the answer; the logic
//! itself lives in the domain crates.

pub mod completions;
pub mod embeddings;
pub mod health;
pub mod metrics;
pub mod models;

use actix_web::web;

/// Registers every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(health::health)
        .service(health::ready)
        .service(metrics::metrics)
        .service(models::list)
        .service(models::get)
        .service(embeddings::create)
        .service(completions::chat)
        .service(completions::completions);
}
