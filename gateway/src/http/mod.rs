//! The REST transport: routes, the OpenAI request/response shapes, SSE, the middleware, the
//! OpenAPI document and the server itself. Handlers extract the caller and the typed body,
//! call the service operation (which authorizes), and shape the answer.

pub mod admin;
pub mod collections;
pub mod completions;
pub mod dispatch;
pub mod error;
pub mod drift;
pub mod embeddings;
pub mod evals;
pub mod health;
pub mod metrics;
pub mod middleware;
pub mod models;
pub mod openai;
pub mod openapi;
pub mod prompts;
pub mod rag;
pub mod server;
pub mod sse;
pub mod tokenize;

use actix_web::web;

/// Registers every route.
pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(health::health)
        .service(health::ready)
        .service(metrics::metrics)
        .service(openapi::openapi_json)
        .service(models::list)
        .service(models::get)
        .service(embeddings::create)
        .service(completions::chat)
        .service(completions::completions)
        .service(tokenize::tokenize)
        .service(tokenize::detokenize)
        .service(collections::create)
        .service(collections::list)
        .service(collections::describe)
        .service(collections::remove)
        .service(collections::upsert)
        // `documents/delete` before `documents/{id:.*}`, which would swallow it.
        .service(collections::delete_documents)
        .service(collections::get_document)
        .service(collections::delete_document)
        .service(collections::search)
        .service(collections::ingest)
        .service(collections::snapshot)
        .service(collections::restore)
        .service(collections::compact)
        .service(collections::list_jobs)
        .service(collections::get_job)
        .service(rag::rag)
        .service(prompts::list)
        .service(prompts::create)
        .service(prompts::get)
        .service(prompts::remove)
        .service(prompts::create_version_route)
        .service(prompts::set_label)
        .service(prompts::delete_label)
        .service(prompts::render)
        .service(evals::start)
        .service(evals::list)
        .service(evals::report)
        .service(evals::get)
        .service(admin::list)
        .service(admin::register)
        .service(admin::describe)
        .service(admin::set_routing)
        .service(admin::retire)
        .service(drift::report)
        .service(drift::set_reference)
        .service(drift::reset);
}
