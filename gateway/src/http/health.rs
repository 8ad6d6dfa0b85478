//! Liveness and readiness probes.

use crate::app::AppState;
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::http::middleware::authorize_unless;
use crate::service::auth::Operation;
use crate::service::error::ServiceError;
use actix_web::{get, web, HttpRequest, HttpResponse};
use serde_json::json;

/// Liveness: answers as soon as the server listens.
#[utoipa::path(
    get,
    path = "/health",
    tag = "probes",
    responses((status = 200, description = "live", body = Object))
)]
#[get("/health")]
pub async fn health(http: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ServiceError> {
    authorize_unless(&http, Operation::Probe, state.settings.open_probes)?;
    Ok(HttpResponse::Ok().json(json!({"status": "ok"})))
}

/// Readiness: 200 once the models are loaded and the index is open, 503 before.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "probes",
    responses((status = 200, description = "models and index loaded", body = Object))
)]
#[get("/ready")]
pub async fn ready(http: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ServiceError> {
    authorize_unless(&http, Operation::Probe, state.settings.open_probes)?;
    let models = json!({
        state.settings.embedding_model_id.clone(): state.embedder.get().is_some(),
        state.settings.generation_model_id.clone(): state.generator.get().is_some(),
    });
    let index = if state.index.get().is_some() { "ready" } else { "loading" };
    Ok(if state.is_ready() {
        HttpResponse::Ok().json(json!({"status": "ready", "models": models, "index": index}))
    } else {
        HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", "1"))
            .json(json!({"status": "loading", "models": models, "index": index}))
    })
}
