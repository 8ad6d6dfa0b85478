//! `POST /v1/embeddings` in OpenAI's format: `input` as a string, an array of strings, an
//! array of token ids or an array of token-id arrays; `encoding_format` `float` (default) or
//! `base64` (little-endian f32, as the `openai` clients decode it). The header
//! `x-ragway-truncated-inputs` counts inputs cut to the model's `max_seq_length`.

use crate::http::middleware::{op, Authorized};
use crate::service::error::ServiceError;
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::app::AppState;
use crate::service::auth::Principal;
use crate::http::dispatch;
use ragway_engine::embed::worker::EmbedHandle;
use std::sync::Arc;
use actix_web::{post, web, HttpRequest, HttpResponse};
use base64::Engine as _;
use ragway_engine::embed::EmbedInput;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[derive(utoipa::ToSchema)]
pub struct EmbeddingsRequest {
    pub(crate) input: Value,
    model: String,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EmbeddingObject {
    /// Always `embedding`.
    #[schema(value_type = String)]
    object: &'static str,
    index: usize,
    /// The vector: numbers, or with `encoding_format: base64` the little-endian f32 bytes
    /// in base64.
    embedding: Embedding,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Embedding {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EmbeddingsUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

/// OpenAI's embedding list.
#[derive(Serialize, utoipa::ToSchema)]
pub struct EmbeddingsResponse {
    /// Always `list`.
    #[schema(value_type = String)]
    object: &'static str,
    data: Vec<EmbeddingObject>,
    model: String,
    usage: EmbeddingsUsage,
}

const INPUT_SHAPE: &str =
    "`input` must be a string, an array of strings, an array of token ids, or an array of token-id arrays";

fn token_ids(v: &[Value], param: &str) -> Result<Vec<u32>, ServiceError> {
    v.iter()
        .map(|x| {
            x.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| ServiceError::invalid(param, format!("{param} must contain non-negative integer token ids")))
        })
        .collect()
}

/// Turns OpenAI's `input` into engine inputs.
pub fn parse_input(input: &Value) -> Result<Vec<EmbedInput>, ServiceError> {
    // Each input is cut to the model's window after tokenizing; the text is bounded before.
    let text_bytes = match input {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().filter_map(Value::as_str).map(str::len).sum(),
        _ => 0,
    };
    crate::service::limits::check_prompt_bytes(text_bytes, "input")?;
    match input {
        Value::String(s) => Ok(vec![EmbedInput::Text(s.clone())]),
        Value::Array(items) if items.is_empty() => Err(ServiceError::invalid("input", "`input` must not be empty")),
        Value::Array(items) => {
            if items.iter().all(Value::is_string) {
                Ok(items.iter().map(|s| EmbedInput::Text(s.as_str().unwrap_or_default().to_string())).collect())
            } else if items.iter().all(Value::is_number) {
                Ok(vec![EmbedInput::Tokens(token_ids(items, "input")?)])
            } else if items.iter().all(Value::is_array) {
                items
                    .iter()
                    .enumerate()
                    .map(|(i, a)| {
                        let param = format!("input[{i}]");
                        token_ids(a.as_array().map(Vec::as_slice).unwrap_or_default(), &param).map(EmbedInput::Tokens)
                    })
                    .collect()
            } else {
                Err(ServiceError::invalid("input", INPUT_SHAPE))
            }
        }
        _ => Err(ServiceError::invalid("input", INPUT_SHAPE)),
    }
}

fn encode_base64(v: &[f32]) -> String {
    let mut bytes = Vec::with_capacity(v.len() * 4);
    for x in v {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[utoipa::path(
    post,
    path = "/v1/embeddings",
    tag = "openai",
    request_body = EmbeddingsRequest,
    responses((status = 200, description = "OpenAI embedding list", body = EmbeddingsResponse), ApiErrors)
)]
#[post("/v1/embeddings")]
pub async fn create(_: Authorized<op::Embeddings>, http: HttpRequest, state: web::Data<AppState>, body: web::Json<Value>) -> Result<HttpResponse, ServiceError> {
    let raw = body.into_inner();
    let req: EmbeddingsRequest = dispatch::parse_body(&raw)?;
    let model = req.model.clone();
    dispatch::handle(&state, &http, &model, raw, dispatch::Request::Embeddings(req)).await
}

/// Embeddings from a local model, answered as `model`.
pub(crate) async fn embed_local(
    caller: Option<Arc<Principal>>,
    handle: EmbedHandle,
    req: EmbeddingsRequest,
    model: String,
) -> Result<HttpResponse, ServiceError> {
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ServiceError::invalid(
                "encoding_format",
                format!("`encoding_format` must be `float` or `base64`, not `{other}`"),
            ))
        }
    };
    let dim = handle.embedder().dim();
    if let Some(d) = req.dimensions {
        if d != dim {
            return Err(ServiceError::invalid(
                "dimensions",
                format!("`{}` produces {dim}-dimensional embeddings and cannot shorten them to {d}", req.model),
            ));
        }
    }
    let inputs = parse_input(&req.input)?;
    let embeddings = handle.embed(inputs).await.map_err(|e| ServiceError::from_engine(e, "input"))?;
    let prompt_tokens = embeddings.iter().map(|e| e.num_tokens).sum();
    if let Some(p) = caller {
        p.charge_tokens(prompt_tokens);
    }
    // Inputs longer than the model's max_seq_length are truncated, never refused; the
    // response says how many were (OpenAI's format has no field for it).
    let truncated = embeddings.iter().filter(|e| e.truncated).count();
    let data = embeddings
        .into_iter()
        .enumerate()
        .map(|(index, e)| EmbeddingObject {
            object: "embedding",
            index,
            embedding: if base64 { Embedding::Base64(encode_base64(&e.vector)) } else { Embedding::Float(e.vector) },
        })
        .collect();
    Ok(HttpResponse::Ok().insert_header(("x-ragway-truncated-inputs", truncated.to_string())).json(
        EmbeddingsResponse {
            object: "list",
            data,
            model,
            usage: EmbeddingsUsage { prompt_tokens, total_tokens: prompt_tokens },
        },
    ))
}
