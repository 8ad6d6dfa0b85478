//! `GET /v1/models` and `GET /v1/models/{id}` in OpenAI's format.

use crate::http::middleware::{op, Authorized};
use crate::service::error::ServiceError;
use crate::service::models::{generation_defaults, GenerationDefaults};
use crate::app::AppState;
#[allow(unused_imports)]
use crate::http::openapi::*;
use actix_web::{get, web, HttpResponse};
use serde::Serialize;

/// An OpenAI model object.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Model {
    id: String,
    /// Always `model`.
    #[schema(value_type = String)]
    object: &'static str,
    created: u64,
    #[schema(value_type = String)]
    owned_by: &'static str,
    /// Generation models served here (`GET /v1/models/{id}` only): what a request gets for
    /// the sampling fields and `max_tokens` it leaves unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_defaults: Option<GenerationDefaults>,
}

/// OpenAI's model list.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// Always `list`.
    #[schema(value_type = String)]
    object: &'static str,
    data: Vec<Model>,
}

/// Every public name and every pinned `name@version` the registry serves.
fn served(state: &AppState) -> Vec<Model> {
    state
        .registry
        .served()
        .into_iter()
        .map(|(id, _, _)| Model { id, object: "model", created: state.started_unix, owned_by: "ragway", generation_defaults: None })
        .collect()
}

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    responses((status = 200, description = "OpenAI model list", body = ModelList), ApiErrors)
)]
#[get("/v1/models")]
pub async fn list(_: Authorized<op::ListModels>, state: web::Data<AppState>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(ModelList { object: "list", data: served(&state) }))
}

#[utoipa::path(
    get,
    path = "/v1/models/{id}",
    tag = "openai",
    params(("id" = String, Path, description = "document, job or model id")),
    responses((status = 200, description = "OpenAI model", body = Model), ApiErrors)
)]
#[get("/v1/models/{id:.*}")]
pub async fn get(_: Authorized<op::GetModel>, state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    served(&state)
        .into_iter()
        .find(|m| m.id == id.as_str())
        .map(|m| HttpResponse::Ok().json(Model { generation_defaults: generation_defaults(&state, &m.id), ..m }))
        .ok_or_else(|| ServiceError::model_not_found(&id))
}
