//! `POST /tokenize` and `POST /detokenize`, accepting both the vLLM shapes (`prompt` or chat
//! `messages`; answer `tokens`, `count`, `max_model_len`) and the llama.cpp server's
//! (`content`, `add_special`, `with_pieces`; answer `tokens`, detokenized `content`), for the
//! generation model (default) or the embedding model (`model`).

use crate::http::middleware::{op, Authorized};
use crate::service::error::ServiceError;
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::app::AppState;
use actix_web::{post, web, HttpResponse};
use serde::Deserialize;
use serde_json::Value;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[derive(utoipa::ToSchema)]
pub struct TokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    /// llama.cpp's name for `prompt`.
    #[serde(default)]
    content: Option<String>,
    /// Chat messages, rendered with the model's chat template first.
    #[serde(default)]
    messages: Option<Value>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
    /// Add the model's special tokens (BOS, or [CLS]/[SEP]) [default: true for text, false
    /// for rendered chat, which carries its own].
    #[serde(default, alias = "add_special")]
    add_special_tokens: Option<bool>,
    /// Also return each token's text piece.
    #[serde(default)]
    with_pieces: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[derive(utoipa::ToSchema)]
pub struct DetokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    tokens: Vec<Value>,
}

enum Target<'a> {
    Generation(&'a ragway_engine::generate::GenerateHandle),
    Embedding(&'a ragway_engine::embed::worker::EmbedHandle),
}

fn target<'a>(state: &'a AppState, model: Option<&str>) -> Result<Target<'a>, ServiceError> {
    let s = &state.settings;
    match model {
        None => state.generator.get().map(Target::Generation).ok_or_else(|| ServiceError::not_ready(&s.generation_model_id)),
        Some(m) if m == s.generation_model_id => {
            state.generator.get().map(Target::Generation).ok_or_else(|| ServiceError::not_ready(m))
        }
        Some(m) if m == s.embedding_model_id => {
            state.embedder.get().map(Target::Embedding).ok_or_else(|| ServiceError::not_ready(m))
        }
        Some(m) => Err(ServiceError::model_not_found(m)),
    }
}

#[utoipa::path(
    post,
    path = "/tokenize",
    tag = "openai",
    request_body = TokenizeRequest,
    responses((status = 200, description = "token ids (and pieces)", body = Tokenized), ApiErrors)
)]
#[post("/tokenize")]
pub async fn tokenize(_: Authorized<op::Tokenize>, state: web::Data<AppState>, body: web::Json<TokenizeRequest>) -> Result<HttpResponse, ServiceError> {
    let req = body.into_inner();
    let text_given = req.prompt.is_some() as u8 + req.content.is_some() as u8 + req.messages.is_some() as u8;
    if text_given != 1 {
        return Err(ServiceError::invalid("prompt", "give exactly one of `prompt`, `content` and `messages`"));
    }
    let model_param = req.model.clone();
    let state = state.into_inner();
    let text_bytes = req.prompt.as_ref().or(req.content.as_ref()).map_or(0, String::len);
    crate::service::limits::check_prompt_bytes(text_bytes, "prompt")?;
    crate::service::limits::blocking(move || -> Result<Tokenized, ServiceError> {
        let (ids, pieces, model, max_len) = match target(&state, model_param.as_deref())? {
            Target::Generation(h) => {
                let (text, default_special) = match &req.messages {
                    Some(m) => {
                        let messages = crate::service::completions::chat_messages(m)?;
                        let template = h
                            .chat_template()
                            .ok_or_else(|| ServiceError::invalid("messages", "this model has no chat template"))?;
                        let text = template
                            .render(&messages, req.add_generation_prompt.unwrap_or(true))
                            .map_err(|e| ServiceError::from_engine(e, "messages"))?;
                        (text, false)
                    }
                    None => (req.prompt.clone().or(req.content.clone()).unwrap_or_default(), true),
                };
                let special = req.add_special_tokens.unwrap_or(default_special);
                let ids = h.tokenizer().encode(&text, special).map_err(|e| ServiceError::from_engine(e, "prompt"))?;
                let pieces: Vec<String> = ids.iter().map(|&id| h.tokenizer().token_text(id)).collect();
                (ids, pieces, h.model_id().to_string(), h.context_length())
            }
            Target::Embedding(e) => {
                if req.messages.is_some() {
                    return Err(ServiceError::invalid("messages", "an embedding model has no chat template"));
                }
                let text = req.prompt.clone().or(req.content.clone()).unwrap_or_default();
                let special = req.add_special_tokens.unwrap_or(true);
                let tk = e.embedder().tokenizer();
                let enc = tk.encode(text.as_str(), special).map_err(|err| ServiceError::invalid("prompt", err.to_string()))?;
                let ids = enc.get_ids().to_vec();
                let pieces = enc.get_tokens().to_vec();
                (ids, pieces, e.model_id().to_string(), e.embedder().max_seq_length())
            }
        };
        let pieces = req.with_pieces.unwrap_or(false).then_some(pieces);
        Ok(Tokenized { model, count: ids.len(), max_model_len: max_len, tokens: ids, pieces })
    })
    .await
    .map(|v| HttpResponse::Ok().json(v))
}

#[utoipa::path(
    post,
    path = "/detokenize",
    tag = "openai",
    request_body = DetokenizeRequest,
    responses((status = 200, description = "text", body = Detokenized), ApiErrors)
)]
#[post("/detokenize")]
pub async fn detokenize(_: Authorized<op::Detokenize>, state: web::Data<AppState>,
    body: web::Json<DetokenizeRequest>,) -> Result<HttpResponse, ServiceError> {
    let req = body.into_inner();
    let ids: Vec<u32> = req
        .tokens
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| ServiceError::invalid(format!("tokens[{i}]"), "tokens must be non-negative integer ids"))
        })
        .collect::<Result<_, _>>()?;
    let (text, model) = match target(&state, req.model.as_deref())? {
        Target::Generation(h) => {
            let vocab = h.tokenizer().vocab_size();
            if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
                return Err(ServiceError::invalid(format!("tokens[{i}]"), format!("token id {id} is outside the vocabulary of {vocab}")));
            }
            // Special tokens are spelled out, as vLLM and llama.cpp do.
            let text = h.tokenizer().decode_with_special(&ids).map_err(|e| ServiceError::invalid("tokens", e.to_string()))?;
            (text, h.model_id().to_string())
        }
        Target::Embedding(e) => {
            let tk = e.embedder().tokenizer();
            let vocab = tk.get_vocab_size(true);
            if let Some((i, id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
                return Err(ServiceError::invalid(format!("tokens[{i}]"), format!("token id {id} is outside the vocabulary of {vocab}")));
            }
            (tk.decode(&ids, false).map_err(|err| ServiceError::invalid("tokens", err.to_string()))?, e.model_id().to_string())
        }
    };
    Ok(HttpResponse::Ok().json(Detokenized { model, prompt: text.clone(), content: text }))
}

/// Token ids of a text (vLLM's and llama.cpp's `/tokenize`).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Tokenized {
    pub model: String,
    pub count: usize,
    /// The model's context length (generation) or input limit (embedding).
    pub max_model_len: usize,
    pub tokens: Vec<u32>,
    /// Each token's text, with `with_pieces`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pieces: Option<Vec<String>>,
}

/// The text of token ids (`prompt` as vLLM names it, `content` as llama.cpp does).
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Detokenized {
    pub model: String,
    pub prompt: String,
    pub content: String,
}
