//! The model registry's admin API (`admin` scope): list, register, describe, set routing,
//! retire. GraphQL's `modelRegistry` / `registerModelVersion` / `setModelRouting` /
//! `retireModelVersion` call the same functions.

use crate::http::middleware::{op, Authorized};
use crate::service::error::ServiceError;
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::app::AppState;
use crate::service::models::{self as svc, RegisterVersion};
use actix_web::{delete, get, post, put, web, HttpResponse};

#[utoipa::path(get, path = "/v1/admin/models", tag = "admin",
    responses((status = 200, description = "Every public model name with its versions, routing and state", body = crate::models::ModelList)))]
#[get("/v1/admin/models")]
pub async fn list(_: Authorized<op::ListModelVersions>, state: web::Data<AppState>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(crate::models::ModelList { object: "list".into(), data: state.registry.list() }))
}

#[utoipa::path(post, path = "/v1/admin/models", tag = "admin", request_body = RegisterVersion,
    responses((status = 201, description = "Registered; local models load in the background (state `loading`)", body = crate::models::ModelView),
        (status = 400, description = "Bad request"), (status = 409, description = "The version exists")))]
#[post("/v1/admin/models")]
pub async fn register(_: Authorized<op::RegisterModelVersion>, state: web::Data<AppState>, body: web::Json<RegisterVersion>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Created().json(svc::register(&state, body.into_inner())?))
}

#[utoipa::path(get, path = "/v1/admin/models/{name}", tag = "admin", params(("name" = String, Path)),
    responses((status = 200, description = "Versions, routing, rollback state, request counts, upstream endpoints", body = crate::models::ModelView), (status = 404, description = "No such model")))]
#[get("/v1/admin/models/{name}")]
pub async fn describe(_: Authorized<op::GetModelVersions>, state: web::Data<AppState>, name: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(svc::describe_of(&state, &name)?))
}

#[utoipa::path(put, path = "/v1/admin/models/{name}/routing", tag = "admin", params(("name" = String, Path)), request_body = crate::models::routing::Routing,
    responses((status = 200, description = "The new routing is in force", body = crate::models::ModelView), (status = 400, description = "Invalid policy")))]
#[put("/v1/admin/models/{name}/routing")]
pub async fn set_routing(_: Authorized<op::SetModelRouting>, state: web::Data<AppState>, name: web::Path<String>, body: web::Json<crate::models::routing::Routing>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(svc::set_routing(&state, &name, body.into_inner())?))
}

#[utoipa::path(delete, path = "/v1/admin/models/{name}/versions/{version}", tag = "admin",
    params(("name" = String, Path), ("version" = String, Path)),
    responses((status = 200, description = "Retired; a local engine stops after its in-flight requests", body = crate::models::ModelView), (status = 409, description = "Still routed to")))]
#[delete("/v1/admin/models/{name}/versions/{version}")]
pub async fn retire(_: Authorized<op::RetireModelVersion>, state: web::Data<AppState>, path: web::Path<(String, String)>) -> Result<HttpResponse, ServiceError> {
    let (name, version) = path.into_inner();
    Ok(HttpResponse::Ok().json(svc::retire_of(&state, &name, &version)?))
}
