//! Prompt templates: `GET/POST /v1/prompts`, `GET/DELETE /v1/prompts/{name}`,
//! `POST /v1/prompts/{name}/versions`, `PUT/DELETE /v1/prompts/{name}/labels/{label}` and
//! `POST /v1/prompts/{name}/render`. The functions under the handlers are what GraphQL
//! calls too.

use crate::http::middleware::{op, Authorized};
use crate::service::error::ServiceError;
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::app::AppState;
use actix_web::{delete, get, post, put, web, HttpResponse};
use ragway_prompts::rag::chat_text;
use ragway_prompts::registry::Detail;
use ragway_prompts::{FewShotMode, Header, Rendered, Template};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// A new version: the file text as `source`, or its parts (`template` is the body, the
/// other fields are the header's).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct CreatePrompt {
    /// The whole file: `+++`, TOML header, `+++`, minijinja body.
    source: Option<String>,
    name: Option<String>,
    /// Default: the latest version + 1.
    version: Option<u32>,
    description: Option<String>,
    /// `chat` (sections `::system::`, `::user::`, `::assistant::`, `::examples::`) or `text`.
    kind: Option<String>,
    #[schema(value_type = Object)]
    variables: Option<Value>,
    #[schema(value_type = Object)]
    parameters: Option<Value>,
    #[schema(value_type = Object)]
    fewshot: Option<Value>,
    dont_know: Option<String>,
    /// Labels pointed at the new version.
    labels: Option<Vec<String>>,
    /// The minijinja body.
    template: Option<String>,
}

/// Parses a creation body into a template; `path_name` is the `{name}` of the URL.
pub(crate) fn template_from_body(body: Value, path_name: Option<&str>) -> Result<Template, ServiceError> {
    let Value::Object(mut o) = body else {
        return Err(ServiceError::invalid("body", "the body must be a JSON object"));
    };
    if let Some(name) = path_name {
        match o.get("name") {
            None => {
                o.insert("name".into(), Value::String(name.to_string()));
            }
            Some(Value::String(n)) if n == name => {}
            Some(_) if o.contains_key("source") => {}
            Some(_) => return Err(ServiceError::invalid("name", format!("the body names another template than `{name}`"))),
        }
    }
    let t = if let Some(source) = o.remove("source") {
        let Value::String(source) = source else {
            return Err(ServiceError::invalid("source", "source must be a string"));
        };
        if let Some(k) = o.keys().find(|k| *k != "name") {
            return Err(ServiceError::invalid(k.clone(), "give the whole file as `source`, or its parts, not both"));
        }
        Template::parse(&source)?
    } else {
        let body = match o.remove("template") {
            Some(Value::String(b)) => b,
            Some(_) => return Err(ServiceError::invalid("template", "template must be a string (the minijinja body)")),
            None => return Err(ServiceError::invalid("template", "`template` (the body) or `source` (the whole file) is required")),
        };
        let header: Header = serde_json::from_value(Value::Object(o)).map_err(|e| ServiceError::invalid("body", e.to_string()))?;
        Template::from_parts(header, body)?
    };
    if let Some(name) = path_name {
        if t.name() != name {
            return Err(ServiceError::invalid("name", format!("the template is named `{}`, not `{name}`", t.name())));
        }
    }
    Ok(t)
}

fn version_json(d: &Detail, v: u32) -> Value {
    let view = d.versions.iter().find(|x| x.version == v);
    json!({"name": d.name, "version": v, "labels": d.labels, "detail": view})
}

/// Adds a version (201; 200 when the same version already existed).
pub(crate) async fn create_version(state: &AppState, body: Value, path_name: Option<&str>) -> Result<(Value, bool), ServiceError> {
    let t = template_from_body(body, path_name)?;
    let reg = state.prompts.clone();
    let (v, created, detail) = crate::service::limits::blocking(move || -> Result<_, ServiceError> {
        let (v, created) = reg.create(t)?;
        let detail = reg.get(v.template.name())?;
        Ok((v.template.version(), created, detail))
    })
    .await?;
    Ok((version_json(&detail, v), created))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LabelBody {
    /// The version the label points at from now on.
    pub version: u32,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenderBody {
    /// The template's variables.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub variables: Map<String, Value>,
    /// Few-shot override: `zero`, `fixed` or `similar`.
    #[serde(default)]
    pub fewshot_mode: Option<FewShotMode>,
    /// Few-shot override: how many examples.
    #[serde(default)]
    pub fewshot_k: Option<usize>,
    /// Also apply this model's chat template and count the prompt's tokens.
    #[serde(default)]
    pub model: Option<String>,
}

/// Renders `reference` (`name`, `name@3`, `name:label`).
pub(crate) async fn render_prompt(state: &AppState, reference: &str, body: RenderBody) -> Result<Value, ServiceError> {
    let r = state.prompts.resolve(reference)?;
    let reg = state.prompts.clone();
    let embedder = state.embedder.get().cloned();
    let (vars, mode, k) = (body.variables, body.fewshot_mode, body.fewshot_k);
    let r2 = r.clone();
    let rendered = crate::service::limits::blocking(move || -> Result<Rendered, ServiceError> {
        let embed = |texts: &[String]| -> ragway_prompts::Result<Vec<Vec<f32>>> {
            let e = embedder.as_ref().ok_or_else(|| {
                ragway_prompts::PromptError::invalid("fewshot_mode", "the embedding model is still loading")
            })?;
            Ok(ragway_index::ChunkEmbedder::embed_text_batch(e, texts)?)
        };
        Ok(reg.render(&r2, &vars, mode, k, Some(&embed))?)
    })
    .await?;
    let t = &r.version.template;
    let mut out = json!({
        "template": {"name": t.name(), "version": t.version(), "label": r.label},
        "kind": t.header.kind,
        "parameters": t.header.parameters,
    });
    match &rendered {
        Rendered::Chat { messages } => out["messages"] = json!(messages),
        Rendered::Text { text } => out["text"] = json!(text),
    }
    if let Some(model) = body.model {
        let h = crate::http::completions::generator(state, &model)?;
        let prompt = chat_text(&h, &rendered.into_messages())?;
        out["prompt_tokens"] = json!(h.tokenizer().encode(&prompt, false).map_err(|e| ServiceError::from_engine(e, "messages"))?.len());
        out["prompt"] = json!(prompt);
    }
    Ok(out)
}

#[utoipa::path(get, path = "/v1/prompts", tag = "prompts",
    responses((status = 200, description = "`{object: list, data: [{name, description, kind, latest, versions, labels}]}`", body = Object), ApiErrors))]
#[get("/v1/prompts")]
pub async fn list(_: Authorized<op::ListPrompts>, state: web::Data<AppState>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(json!({"object": "list", "data": state.prompts.list()})))
}

#[utoipa::path(post, path = "/v1/prompts", tag = "prompts", request_body = CreatePrompt,
    responses((status = 201, description = "The new version", body = Object), (status = 200, description = "The same version existed already", body = Object), ApiErrors))]
#[post("/v1/prompts")]
pub async fn create(_: Authorized<op::CreatePromptVersion>, state: web::Data<AppState>, body: web::Json<Value>) -> Result<HttpResponse, ServiceError> {
    let (v, created) = create_version(&state, body.into_inner(), None).await?;
    Ok(if created { HttpResponse::Created().json(v) } else { HttpResponse::Ok().json(v) })
}

#[utoipa::path(get, path = "/v1/prompts/{name}", tag = "prompts", params(("name" = String, Path)),
    responses((status = 200, description = "The template: every version (header, body, source, origin) and its labels", body = Object), ApiErrors))]
#[get("/v1/prompts/{name}")]
pub async fn get(_: Authorized<op::GetPrompt>, state: web::Data<AppState>, name: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(state.prompts.get(&name)?))
}

#[utoipa::path(delete, path = "/v1/prompts/{name}", tag = "prompts", params(("name" = String, Path)),
    responses((status = 200, description = "Deleted (templates created through the API only)", body = Object), ApiErrors))]
#[delete("/v1/prompts/{name}")]
pub async fn remove(_: Authorized<op::DeletePrompt>, state: web::Data<AppState>, name: web::Path<String>) -> Result<HttpResponse, ServiceError> {
    let reg = state.prompts.clone();
    let n = name.clone();
    crate::service::limits::blocking(move || reg.delete(&n).map_err(ServiceError::from)).await?;
    Ok(HttpResponse::Ok().json(json!({"name": name.into_inner(), "deleted": true})))
}

#[utoipa::path(post, path = "/v1/prompts/{name}/versions", tag = "prompts", params(("name" = String, Path)), request_body = CreatePrompt,
    responses((status = 201, description = "The new version", body = Object), (status = 200, description = "The same version existed already", body = Object), ApiErrors))]
#[post("/v1/prompts/{name}/versions")]
pub async fn create_version_route(_: Authorized<op::CreatePromptVersion>, state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Json<Value>,) -> Result<HttpResponse, ServiceError> {
    let (v, created) = create_version(&state, body.into_inner(), Some(&name)).await?;
    Ok(if created { HttpResponse::Created().json(v) } else { HttpResponse::Ok().json(v) })
}


/// Points a label at a version (a rollback is moving it back).
pub(crate) async fn move_label(state: &AppState, name: String, label: String, version: u32) -> Result<Value, ServiceError> {
    let reg = state.prompts.clone();
    let (n, l) = (name.clone(), label.clone());
    crate::service::limits::blocking(move || reg.set_label(&n, &l, version).map_err(ServiceError::from)).await?;
    Ok(json!({"name": name, "label": label, "version": version}))
}

#[utoipa::path(put, path = "/v1/prompts/{name}/labels/{label}", tag = "prompts",
    params(("name" = String, Path), ("label" = String, Path)), request_body = LabelBody,
    responses((status = 200, description = "`{name, label, version}`", body = Object), ApiErrors))]
#[put("/v1/prompts/{name}/labels/{label}")]
pub async fn set_label(_: Authorized<op::SetPromptLabel>, state: web::Data<AppState>,
    path: web::Path<(String, String)>,
    body: web::Json<LabelBody>,) -> Result<HttpResponse, ServiceError> {
    let (name, label) = path.into_inner();
    Ok(HttpResponse::Ok().json(move_label(&state, name, label, body.version).await?))
}

#[utoipa::path(delete, path = "/v1/prompts/{name}/labels/{label}", tag = "prompts",
    params(("name" = String, Path), ("label" = String, Path)),
    responses((status = 200, description = "`{name, label, deleted: true}`", body = Object), ApiErrors))]
#[delete("/v1/prompts/{name}/labels/{label}")]
pub async fn delete_label(_: Authorized<op::DeletePromptLabel>, state: web::Data<AppState>, path: web::Path<(String, String)>) -> Result<HttpResponse, ServiceError> {
    let (name, label) = path.into_inner();
    let reg = state.prompts.clone();
    let (n, l) = (name.clone(), label.clone());
    crate::service::limits::blocking(move || reg.delete_label(&n, &l).map_err(ServiceError::from)).await?;
    Ok(HttpResponse::Ok().json(json!({"name": name, "label": label, "deleted": true})))
}

#[utoipa::path(post, path = "/v1/prompts/{name}/render", tag = "prompts",
    params(("name" = String, Path, description = "`name`, `name@3` or `name:label`")), request_body = RenderBody,
    responses((status = 200, description = "`{template, kind, parameters, messages | text}` (+ `prompt`, `prompt_tokens` with `model`)", body = Object), ApiErrors))]
#[post("/v1/prompts/{name}/render")]
pub async fn render(_: Authorized<op::RenderPrompt>, state: web::Data<AppState>,
    name: web::Path<String>,
    body: web::Json<RenderBody>,) -> Result<HttpResponse, ServiceError> {
    Ok(HttpResponse::Ok().json(render_prompt(&state, &name, body.into_inner()).await?))
}
