//! The model registry's admin API (`admin` scope): list, register, describe, set routing,
//! retire. GraphQL's `modelRegistry` / `registerModelVersion` / `setModelRouting` /
//! `retireModelVersion` call the same functions.

use crate::http::middleware::{op, Authorized};
use crate::service::error::ServiceError;
use crate::models::routing::Routing;
use crate::models::{ModelKind, VersionSpec};
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::app::AppState;
use actix_web::{delete, get, post, put, web, HttpResponse};
use serde_json::{json, Value};

/// Registers a version from `{"name", "kind"?, "version", "local" | "upstream", "description"?}`;
/// answers the name's description.
pub fn register_from(state: &AppState, body: Value) -> Result<Value, ServiceError> {
    let Value::Object(mut m) = body else { return Err(ServiceError::invalid("body", "expected a JSON object")) };
    let name = match m.remove("name") {
        Some(Value::String(s)) => s,
        _ => return Err(ServiceError::invalid("name", "`name` (a string) is required")),
    };
    let kind = match m.remove("kind") {
        None | Some(Value::Null) => None,
        Some(k) => Some(
            serde_json::from_value::<ModelKind>(k)
                .map_err(|_| ServiceError::invalid("kind", "`kind` is `generation` or `embedding`"))?,
        ),
    };
    let mut spec: VersionSpec =
        serde_json::from_value(Value::Object(m)).map_err(|e| ServiceError::invalid("body", format!("invalid version: {e}")))?;
    if let Some(local) = spec.local.as_mut() {
        local.confine_to(&state.settings.models_dir)?;
    }
    if let Some(upstream) = spec.upstream.as_ref() {
        upstream.check_hosts(&state.settings.upstream_hosts)?;
    }
    state.registry.register(&name, kind, spec)?;
    describe_of(state, &name)
}

pub fn describe_of(state: &AppState, name: &str) -> Result<Value, ServiceError> {
    state.registry.describe(name).ok_or_else(|| ServiceError::model_not_found(name))
}

pub fn set_routing_from(state: &AppState, name: &str, body: Value) -> Result<Value, ServiceError> {
    let routing: Routing =
        serde_json::from_value(body).map_err(|e| ServiceError::invalid("routing", format!("invalid routing: {e}")))?;
    state.registry.set_routing(name, routing)?;
    describe_of(state, name)
}

pub fn retire_of(state: &AppState, name: &str, version: &str) -> Result<Value, ServiceError> {
    state.registry.retire(name, version)?;
    Ok(state.registry.describe(name).unwrap_or_else(|| json!({"name": name, "versions": []})))
}

#[utoipa::path(get, path = "/v1/admin/models", tag = "admin",
    responses((status = 200, description = "Every public model name with its versions, routing and state")))]
#[get("/v1/admin/models")]
pub async fn list(_: Authorized<op::ListModelVersions>, state: web::Data<AppState>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": state.registry.list()})))
}

#[utoipa::path(post, path = "/v1/admin/models", tag = "admin", request_body = Object,
    responses((status = 201, description = "Registered; local models load in the background (state `loading`)"),
        (status = 400, description = "Bad request"), (status = 409, description = "The version exists")))]
#[post("/v1/admin/models")]
pub async fn register(_: Authorized<op::RegisterModelVersion>, state: web::Data<AppState>, body: web::Json<Value>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Created().json(register_from(&state, body.into_inner())?))
}

#[utoipa::path(get, path = "/v1/admin/models/{name}", tag = "admin", params(("name" = String, Path)),
    responses((status = 200, description = "Versions, routing, rollback state, request counts, upstream endpoints"), (status = 404, description = "No such model")))]
#[get("/v1/admin/models/{name}")]
pub async fn describe(_: Authorized<op::GetModelVersions>, state: web::Data<AppState>, name: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(describe_of(&state, &name)?))
}

#[utoipa::path(put, path = "/v1/admin/models/{name}/routing", tag = "admin", params(("name" = String, Path)), request_body = Object,
    responses((status = 200, description = "The new routing is in force"), (status = 400, description = "Invalid policy")))]
#[put("/v1/admin/models/{name}/routing")]
pub async fn set_routing(_: Authorized<op::SetModelRouting>, state: web::Data<AppState>, name: web::Path<String>, body: web::Json<Value>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(set_routing_from(&state, &name, body.into_inner())?))
}

#[utoipa::path(delete, path = "/v1/admin/models/{name}/versions/{version}", tag = "admin",
    params(("name" = String, Path), ("version" = String, Path)),
    responses((status = 200, description = "Retired; a local engine stops after its in-flight requests"), (status = 409, description = "Still routed to")))]
#[delete("/v1/admin/models/{name}/versions/{version}")]
pub async fn retire(_: Authorized<op::RetireModelVersion>, state: web::Data<AppState>, path: web::Path<(String, String)>) -> Result<HttpResponse, ServiceError> {
    let (name, version) = path.into_inner();
    Ok(HttpResponse::Ok().json(retire_of(&state, &name, &version)?))
}
