//! Drift monitoring of a collection's queries (see `ragway_index::drift`):
//! `GET /v1/collections/{name}/drift` reports, `PUT .../drift/reference` makes the reference
//! from given queries, `DELETE .../drift/reference` forgets it (the next live queries make a
//! new one). GraphQL's `drift`, `setDriftReference` and `resetDriftReference` call these.

use crate::http::middleware::{op, Authorized};
use crate::service::error::ServiceError;
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::app::AppState;
use crate::service::drift::*;
use actix_web::{delete, get, put, web, HttpResponse};

#[utoipa::path(get, path = "/v1/collections/{name}/drift", tag = "collections", params(("name" = String, Path)),
    responses((status = 200, description = "Drift state: KS, PSI, low-score share, grounding, alert", body = DriftView), (status = 404, description = "No such collection")))]
#[get("/v1/collections/{name}/drift")]
pub async fn report(_: Authorized<op::DriftReport>, state: web::Data<AppState>, name: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(report_of(&state, &name)?))
}

#[utoipa::path(put, path = "/v1/collections/{name}/drift/reference", tag = "collections", params(("name" = String, Path)), request_body = DriftReference,
    responses((status = 200, description = "The reference is made from the queries", body = DriftView), (status = 400, description = "Bad request")))]
#[put("/v1/collections/{name}/drift/reference")]
pub async fn set_reference(_: Authorized<op::SetDriftReference>, state: web::Data<AppState>, name: web::Path<String>, body: web::Json<DriftReference>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(set_reference_of(&state, &name, body.into_inner().queries).await?))
}

#[utoipa::path(delete, path = "/v1/collections/{name}/drift/reference", tag = "collections", params(("name" = String, Path)),
    responses((status = 200, description = "Forgotten; the next live queries make a new reference", body = DriftView)))]
#[delete("/v1/collections/{name}/drift/reference")]
pub async fn reset(_: Authorized<op::ResetDriftReference>, state: web::Data<AppState>, name: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(reset_of(&state, &name)?))
}
