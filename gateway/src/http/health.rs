//! Liveness and readiness probes.

use crate::app::AppState;
use crate::http::middleware::authorize_unless;
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::service::auth::Operation;
use crate::service::error::ServiceError;
use actix_web::{get, web, HttpRequest, HttpResponse};

/// Liveness: answers as soon as the server listens.
#[utoipa::path(
    get,
    path = "/health",
    tag = "probes",
    responses((status = 200, description = "live", body = Health))
)]
#[get("/health")]
pub async fn health(http: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ServiceError> {
    authorize_unless(&http, Operation::Probe, state.settings.open_probes)?;
    Ok(HttpResponse::Ok().json(Health { status: "ok" }))
}

/// Liveness.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// Always `ok`.
    #[schema(value_type = String)]
    pub status: &'static str,
}

/// Readiness: each served model's loaded state and the index's.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `loading`.
    #[schema(value_type = String)]
    pub status: &'static str,
    /// Model id → loaded.
    pub models: std::collections::BTreeMap<String, bool>,
    /// `ready`, `loading`, or `storage_unavailable` (the configured PostgreSQL does not
    /// answer).
    #[schema(value_type = String)]
    pub index: &'static str,
}

/// Readiness: 200 once the models are loaded and the index is open (and its PostgreSQL, when
/// configured, answers), 503 otherwise.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "probes",
    responses((status = 200, description = "models and index loaded", body = Readiness), (status = 503, description = "still loading (Retry-After: 1)", body = Readiness))
)]
#[get("/ready")]
pub async fn ready(http: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse, ServiceError> {
    authorize_unless(&http, Operation::Probe, state.settings.open_probes)?;
    let models = [
        (state.settings.embedding_model_id.clone(), state.embedder.get().is_some()),
        (state.settings.generation_model_id.clone(), state.generator.get().is_some()),
    ]
    .into_iter()
    .collect();
    // A configured PostgreSQL that does not answer makes the index unready (load balancers
    // stop sending searches that would fail), without restarting anything.
    let index = match state.index.get() {
        None => "loading",
        Some(index) => {
            let index = index.clone();
            match actix_web::rt::task::spawn_blocking(move || index.check_storage()).await {
                Ok(Ok(())) => "ready",
                _ => "storage_unavailable",
            }
        }
    };
    Ok(if state.is_ready() && index == "ready" {
        HttpResponse::Ok().json(Readiness { status: "ready", models, index })
    } else {
        let status = if index == "storage_unavailable" { "unavailable" } else { "loading" };
        HttpResponse::ServiceUnavailable().insert_header(("Retry-After", "1")).json(Readiness { status, models, index })
    })
}
