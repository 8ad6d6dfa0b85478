//! Evaluation runs over REST: `POST /v1/evals` starts one, `GET /v1/evals` lists them,
//! `GET /v1/evals/{id}` gives status, progress and summary, `GET /v1/evals/{id}/report`
//! the HTML report. GraphQL calls the same [`crate::service::evals::EvalRuns`].

use crate::http::middleware::{op, Authorized};
use crate::service::error::ServiceError;
use crate::service::evals::{no_run, StartEval};
use crate::app::AppState;
use actix_web::{get, post, web, HttpResponse};
use serde_json::Value;

/// Starts an evaluation run (202 with the run's view).
#[utoipa::path(post, path = "/v1/evals", request_body = StartEval, tag = "evals",
    responses((status = 202, description = "The run, started", body = crate::service::evals::EvalRunView), (status = 400, description = "Bad request")))]
#[post("/v1/evals")]
pub async fn start(_: Authorized<op::StartEval>, state: web::Data<AppState>, body: web::Json<Value>) -> Result<HttpResponse, ServiceError> {
    let req: StartEval = serde_json::from_value(body.into_inner()).map_err(|e| ServiceError::invalid("body", format!("invalid run request: {e}")))?;
    let view = state.evals.start(state.clone().into_inner(), req)?;
    Ok(HttpResponse::Accepted().json(view))
}

#[utoipa::path(get, path = "/v1/evals", tag = "evals", responses((status = 200, description = "Runs, newest first", body = crate::service::evals::EvalRunList)))]
#[get("/v1/evals")]
pub async fn list(_: Authorized<op::ListEvals>, state: web::Data<AppState>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(crate::service::evals::EvalRunList { object: "list".into(), data: state.evals.list() }))
}

#[utoipa::path(get, path = "/v1/evals/{id}", tag = "evals", params(("id" = String, Path)),
    responses((status = 200, description = "Status, progress and summary", body = crate::service::evals::EvalRunView), (status = 404, description = "No such run")))]
#[get("/v1/evals/{id}")]
pub async fn get(_: Authorized<op::GetEval>, state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    let v = state.evals.get(&id).ok_or_else(|| no_run(&id))?;
    Ok(HttpResponse::Ok().json(v))
}

#[utoipa::path(get, path = "/v1/evals/{id}/report", tag = "evals", params(("id" = String, Path)),
    responses((status = 200, description = "The HTML report", content_type = "text/html"), (status = 404, description = "No finished run")))]
#[get("/v1/evals/{id}/report")]
pub async fn report(_: Authorized<op::GetEval>, state: web::Data<AppState>, id: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    let html = state.evals.report(&id).ok_or_else(|| no_run(&id))?;
    Ok(HttpResponse::Ok().content_type("text/html; charset=utf-8").body(html))
}
