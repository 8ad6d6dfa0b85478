//! `GET /v1/models` and `GET /v1/models/{id}` in OpenAI's format.

use crate::error::ApiError;
use crate::state::AppState;
#[allow(unused_imports)]
use crate::openapi::*;
use actix_web::{get, web, HttpResponse};
use serde::Serialize;

#[derive(Serialize)]
struct Model<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    owned_by: &'static str,
}

fn served(state: &AppState) -> Vec<Model<'_>> {
    [&state.settings.embedding_model_id, &state.settings.generation_model_id]
        .into_iter()
        .map(|id| Model { id, object: "model", created: state.started_unix, owned_by: "ragway" })
        .collect()
}

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    responses((status = 200, description = "OpenAI model list", body = Object), ApiErrors)
)]
#[get("/v1/models")]
pub async fn list(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"object": "list", "data": served(&state)}))
}

#[utoipa::path(
    get,
    path = "/v1/models/{id}",
    tag = "openai",
    params(("id" = String, Path, description = "document, job or model id")),
    responses((status = 200, description = "OpenAI model", body = Object), ApiErrors)
)]
#[get("/v1/models/{id:.*}")]
pub async fn get(state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ApiError> {
    served(&state)
        .into_iter()
        .find(|m| m.id == id.as_str())
        .map(|m| HttpResponse::Ok().json(m))
        .ok_or_else(|| ApiError::model_not_found(&id))
}
