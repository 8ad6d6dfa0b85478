//! `GET /openapi.json`: the OpenAPI 3.1 document generated (utoipa) from the handlers'
//! `#[utoipa::path]` attributes and the request and response types themselves (the index
//! crate's types derive their schemas under its `openapi` feature), so the document cannot
//! drift from what the handlers parse.

use actix_web::{get, HttpResponse};
pub use ragway_index::{
    ChunkView, ChunkingParams, CollectionInfo, CollectionSettings, CreateCollection, DocumentInput, DocumentView,
    JobState, JobView, KeywordParams, ProgressView, SearchHit, SearchMode, WriteResult,
};
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

pub use ragway_index::dense::{Distance, HnswParams, Quantization};
pub use ragway_index::fusion::{FusionMethod, FusionParams, SourceHit};
pub use ragway_index::ingest::OnError;
pub use ragway_index::jobs::RecordError;

/// The error of every endpoint (OpenAI's shape).
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

#[derive(Serialize, ToSchema)]
pub struct ErrorObject {
    pub message: String,
    /// `invalid_request_error`, `permission_error`, `rate_limit_error`, `server_error`.
    #[serde(rename = "type")]
    #[schema(rename = "type")]
    pub kind: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// `model_not_found`, `context_length_exceeded`, `collection_not_found`,
    /// `invalid_api_key`, `insufficient_scope`, `rate_limit_exceeded`, `queue_full`, ...
    pub code: Option<String>,
}

/// The errors any endpoint may answer, each in [`ErrorBody`]'s shape.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
pub enum ApiErrors {
    /// Invalid parameter (named in `param`), unparseable JSON, `context_length_exceeded`.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// Missing or unknown API key.
    #[response(status = 401)]
    Unauthenticated(ErrorBody),
    /// The key lacks the scope.
    #[response(status = 403)]
    Forbidden(ErrorBody),
    /// Unknown collection, document, job or model.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// Body too large.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// Queue full or rate limited (see `Retry-After`).
    #[response(status = 429)]
    TooMany(ErrorBody),
    /// Models or index still loading (see `Retry-After`).
    #[response(status = 503)]
    NotReady(ErrorBody),
}

#[derive(Serialize, ToSchema)]
pub struct CollectionList {
    /// `list`
    pub object: String,
    pub data: Vec<CollectionInfo>,
}

#[derive(Serialize, ToSchema)]
pub struct Deleted {
    pub id: String,
    pub object: String,
    pub deleted: bool,
}

#[derive(Serialize, ToSchema)]
pub struct SearchResults {
    /// `list`
    pub object: String,
    pub results: Vec<SearchHit>,
    pub mode: SearchMode,
    /// The dense half ran as an exact scan (selective filter or too few graph results).
    pub dense_exact: bool,
}

#[derive(Serialize, ToSchema)]
pub struct JobStarted {
    pub job_id: String,
    /// `ingest_job`
    pub object: String,
    pub state: JobState,
}

#[derive(Serialize, ToSchema)]
pub struct JobList {
    /// `list`
    pub object: String,
    pub data: Vec<JobView>,
}

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key (`--api-key`, `--api-keys-file`); needed only when keys are configured"))
                    .build(),
            ),
        );
    }
}

use crate::http::{admin, collections, completions, drift, embeddings, evals, health, metrics, models, prompts, rag, tokenize};

#[derive(OpenApi)]
#[openapi(
    info(title = "ragway", description = "OpenAI-compatible inference, hybrid vector search and ingestion. GraphQL lives at /graphql."),
    paths(
        health::health, health::ready, metrics::metrics,
        models::list, models::get,
        embeddings::create, completions::chat, completions::completions,
        tokenize::tokenize, tokenize::detokenize,
        collections::create, collections::list, collections::describe, collections::remove,
        collections::upsert, collections::get_document, collections::delete_document, collections::delete_documents,
        collections::search, collections::ingest, collections::list_jobs, collections::get_job,
        collections::snapshot, collections::restore, collections::compact,
        rag::rag,
        prompts::list, prompts::create, prompts::get, prompts::remove, prompts::create_version_route,
        prompts::set_label, prompts::delete_label, prompts::render,
        evals::start, evals::list, evals::get, evals::report,
        admin::list, admin::register, admin::describe, admin::set_routing, admin::retire,
        drift::report, drift::set_reference, drift::reset,
    ),
    components(schemas(
        ErrorBody, ErrorObject, CollectionList, Deleted, SearchResults, JobStarted, JobList,
        CollectionInfo, CollectionSettings, CreateCollection, DocumentInput, DocumentView, ChunkView, WriteResult,
        SearchHit, SourceHit, SearchMode, JobView, ProgressView, JobState, RecordError, OnError,
        Distance, HnswParams, Quantization, ChunkingParams, KeywordParams, FusionParams, FusionMethod,
        crate::service::evals::StartEval,
        crate::http::openai::ChatCompletion, crate::http::openai::ChatChoice, crate::http::openai::AssistantMessage, crate::http::openai::ToolCall, crate::http::openai::FunctionCall, crate::http::openai::ToolCallDelta, crate::http::openai::FunctionDelta,
        crate::http::openai::TextCompletion, crate::http::openai::TextChoice, crate::service::usage::Usage,
        crate::http::openai::ChatLogprobs, crate::http::openai::ChatTokenLogprob, crate::http::openai::TopLogprob,
        crate::http::openai::TextLogprobs, crate::http::openai::Delta,
        crate::http::openai::ChatChunkChoice, crate::http::openai::TextChunkChoice,
        crate::http::openai::CompletionChunk<crate::http::openai::ChatChunkChoice>,
        crate::http::openai::CompletionChunk<crate::http::openai::TextChunkChoice>,
    )),
    modifiers(&BearerAuth),
    security(("api_key" = [])),
)]
pub struct ApiDoc;

/// The document, built once.
pub fn document() -> &'static str {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DOC.get_or_init(|| ApiDoc::openapi().to_pretty_json().expect("the OpenAPI document serializes"))
}

#[get("/openapi.json")]
pub async fn openapi_json(
    http: actix_web::HttpRequest,
    state: actix_web::web::Data<crate::app::AppState>,
) -> Result<HttpResponse, crate::service::error::ServiceError> {
    crate::http::middleware::authorize_unless(&http, crate::service::auth::Operation::ApiDocs, state.settings.open_docs)?;
    Ok(HttpResponse::Ok().content_type("application/json").body(document()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_route_is_documented_with_its_body() {
        let doc: serde_json::Value = serde_json::from_str(super::document()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        for p in [
            "/v1/chat/completions",
            "/v1/embeddings",
            "/v1/collections/{name}/search",
            "/v1/collections/{name}/documents/{id}",
            "/v1/jobs/{id}",
            "/tokenize",
            "/v1/rag",
            "/v1/prompts",
            "/v1/prompts/{name}/labels/{label}",
            "/v1/prompts/{name}/render",
        ] {
            assert!(paths.contains_key(p), "{p} missing");
        }
        let search = &doc["components"]["schemas"]["SearchBody"];
        assert!(search["properties"]["top_k"].is_object(), "{search}");
        let create = &doc["components"]["schemas"]["CreateCollection"];
        assert_eq!(create["required"], serde_json::json!(["name"]), "{create}");
    }

    /// Every JSON request body and every 2xx JSON answer has a schema with named properties (a
    /// `$ref` to a component or an inline object); no `{}` or bare `object` bodies. Text and
    /// HTML answers (`/metrics`, the eval report) and 204s carry no JSON.
    #[test]
    fn no_untyped_bodies() {
        let doc: serde_json::Value = serde_json::from_str(super::document()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let typed = |s: &serde_json::Value| -> bool {
            let resolved = match s.get("$ref").and_then(|r| r.as_str()) {
                Some(r) => &schemas[r.trim_start_matches("#/components/schemas/")],
                None => s,
            };
            resolved.get("properties").is_some()
                || resolved.get("items").is_some()
                || resolved.get("oneOf").is_some()
                || resolved.get("allOf").is_some()
                || resolved.get("enum").is_some()
                || resolved.get("type").and_then(|t| t.as_str()).is_some_and(|t| t != "object")
        };
        let mut untyped = Vec::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                if let Some(schema) = op.pointer("/requestBody/content/application~1json/schema") {
                    if !typed(schema) {
                        untyped.push(format!("{method} {path} request"));
                    }
                }
                for (status, resp) in op["responses"].as_object().unwrap() {
                    if !status.starts_with('2') || status == "204" {
                        continue;
                    }
                    let content = resp.get("content").and_then(|c| c.as_object());
                    match content {
                        None => untyped.push(format!("{method} {path} {status}: no content")),
                        Some(c) => {
                            if let Some(j) = c.get("application/json") {
                                if !typed(&j["schema"]) {
                                    untyped.push(format!("{method} {path} {status}: untyped"));
                                }
                            }
                        }
                    }
                }
            }
        }
        assert!(untyped.is_empty(), "untyped bodies:\n{}", untyped.join("\n"));
    }
}
