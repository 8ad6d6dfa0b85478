//! Prompt templates: `GET/POST /v1/prompts`, `GET/DELETE /v1/prompts/{name}`,
//! `POST /v1/prompts/{name}/versions`, `PUT/DELETE /v1/prompts/{name}/labels/{label}` and
//! `POST /v1/prompts/{name}/render`: the REST shapes over `service::prompts`.

use crate::http::middleware::{op, Authorized};
use crate::service::error::ServiceError;
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::app::AppState;
use actix_web::{delete, get, post, put, web, HttpResponse};
use crate::service::prompts::{self as svc, create_version, move_label, render_prompt, LabelBody, RenderBody, CreatePrompt, LabelSet, RenderedPrompt, VersionCreated};
use serde_json::{json, Value};

/// A removed label.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct LabelDeleted {
    name: String,
    label: String,
    deleted: bool,
}

/// Every template.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct PromptList {
    /// Always `list`.
    #[schema(value_type = String)]
    object: &'static str,
    data: Vec<ragway_prompts::registry::Summary>,
}

#[utoipa::path(get, path = "/v1/prompts", tag = "prompts",
    responses((status = 200, description = "every template", body = PromptList), ApiErrors))]
#[get("/v1/prompts")]
pub async fn list(_: Authorized<op::ListPrompts>, state: web::Data<AppState>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(PromptList { object: "list", data: state.prompts.list() }))
}

#[utoipa::path(post, path = "/v1/prompts", tag = "prompts", request_body = CreatePrompt,
    responses((status = 201, description = "The new version", body = VersionCreated), (status = 200, description = "The same version existed already", body = VersionCreated), ApiErrors))]
#[post("/v1/prompts")]
pub async fn create(_: Authorized<op::CreatePromptVersion>, state: web::Data<AppState>, body: web::Json<Value>) -> Result<HttpResponse, ServiceError> {
    let (v, created) = create_version(&state, body.into_inner(), None).await?;
    Ok(if created { HttpResponse::Created().json(v) } else { HttpResponse::Ok().json(v) })
}

#[utoipa::path(get, path = "/v1/prompts/{name}", tag = "prompts", params(("name" = String, Path)),
    responses((status = 200, description = "The template: every version (header, body, source, origin) and its labels", body = ragway_prompts::registry::Detail), ApiErrors))]
#[get("/v1/prompts/{name}")]
pub async fn get(_: Authorized<op::GetPrompt>, state: web::Data<AppState>, name: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(state.prompts.get(&name)?))
}

#[utoipa::path(delete, path = "/v1/prompts/{name}", tag = "prompts", params(("name" = String, Path)),
    responses((status = 200, description = "Deleted (templates created through the API only)", body = Deleted), ApiErrors))]
#[delete("/v1/prompts/{name}")]
pub async fn remove(_: Authorized<op::DeletePrompt>, state: web::Data<AppState>, name: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    let name = name.into_inner();
    svc::delete(&state, name.clone()).await?;
    Ok(HttpResponse::Ok().json(json!({"name": name, "deleted": true})))
}

#[utoipa::path(post, path = "/v1/prompts/{name}/versions", tag = "prompts", params(("name" = String, Path)), request_body = CreatePrompt,
    responses((status = 201, description = "The new version", body = VersionCreated), (status = 200, description = "The same version existed already", body = VersionCreated), ApiErrors))]
#[post("/v1/prompts/{name}/versions")]
pub async fn create_version_route(_: Authorized<op::CreatePromptVersion>, state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Json<Value>,) -> Result<HttpResponse, ServiceError> {
    let (v, created) = create_version(&state, body.into_inner(), Some(&name)).await?;
    Ok(if created { HttpResponse::Created().json(v) } else { HttpResponse::Ok().json(v) })
}


#[utoipa::path(put, path = "/v1/prompts/{name}/labels/{label}", tag = "prompts",
    params(("name" = String, Path), ("label" = String, Path)), request_body = LabelBody,
    responses((status = 200, description = "where the label points now", body = LabelSet), ApiErrors))]
#[put("/v1/prompts/{name}/labels/{label}")]
pub async fn set_label(_: Authorized<op::SetPromptLabel>, state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    body: web::Json<LabelBody>,) -> Result<HttpResponse, ServiceError> {
    let (name, label) = path.into_inner();
    Ok(HttpResponse::Ok().json(move_label(&state, name, label, body.version).await?))
}

#[utoipa::path(delete, path = "/v1/prompts/{name}/labels/{label}", tag = "prompts",
    params(("name" = String, Path), ("label" = String, Path)),
    responses((status = 200, description = "the label is gone", body = LabelDeleted), ApiErrors))]
#[delete("/v1/prompts/{name}/labels/{label}")]
pub async fn delete_label(_: Authorized<op::DeletePromptLabel>, state: web::Data<AppState>, path: web::Path<(String, String)>) -> Result<HttpResponse, ServiceError> {
    let (name, label) = path.into_inner();
    svc::delete_label(&state, name.clone(), label.clone()).await?;
    Ok(HttpResponse::Ok().json(LabelDeleted { name, label, deleted: true }))
}

#[utoipa::path(post, path = "/v1/prompts/{name}/render", tag = "prompts",
    params(("name" = String, Path, description = "`name`, `name@3` or `name:label`")), request_body = RenderBody,
    responses((status = 200, description = "the rendered template", body = RenderedPrompt), ApiErrors))]
#[post("/v1/prompts/{name}/render")]
pub async fn render(_: Authorized<op::RenderPrompt>, state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Json<RenderBody>,) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(render_prompt(&state, &name, body.into_inner()).await?))
}
