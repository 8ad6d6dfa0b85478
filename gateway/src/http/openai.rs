//! OpenAI's response shapes for chat and text completions, as types: the handlers build
//! these, and `/openapi.json` documents them from the same definitions.

use crate::http::completions::now;
use crate::service::usage::Usage;
use serde::Serialize;
use serde_json::Value;

/// A `chat.completion`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    /// Always `chat.completion`.
    #[schema(value_type = String)]
    pub object: &'static str,
    pub created: u64,
    /// The version that answered: `name@version`.
    pub model: String,
    pub system_fingerprint: Option<String>,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// With a `rag` request: citations, uncited passages, grounding and the template.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub rag: Option<Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    /// `{"content": [...]}` when `logprobs` was asked for.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
    /// `stop` or `length`.
    #[schema(value_type = Option<String>)]
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    #[schema(value_type = String)]
    pub role: &'static str,
    pub content: String,
    pub refusal: Option<String>,
}

impl AssistantMessage {
    pub fn new(content: String) -> Self {
        Self { role: "assistant", content, refusal: None }
    }
}

/// A `text_completion`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TextCompletion {
    pub id: String,
    /// Always `text_completion`.
    #[schema(value_type = String)]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: Option<String>,
    pub choices: Vec<TextChoice>,
    pub usage: Usage,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TextChoice {
    pub index: usize,
    pub text: String,
    /// `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` when `logprobs` was set.
    #[schema(value_type = Option<Object>)]
    pub logprobs: Option<Value>,
    #[schema(value_type = Option<String>)]
    pub finish_reason: Option<&'static str>,
}

impl ChatCompletion {
    pub fn new(id: String, model: String, choices: Vec<ChatChoice>, usage: Usage, rag: Option<Value>) -> Self {
        Self { id, object: "chat.completion", created: now(), model, system_fingerprint: None, choices, usage, rag }
    }
}

impl TextCompletion {
    pub fn new(id: String, model: String, choices: Vec<TextChoice>, usage: Usage) -> Self {
        Self { id, object: "text_completion", created: now(), model, system_fingerprint: None, choices, usage }
    }
}
