//! OpenAI's response shapes for chat and text completions, whole and as stream chunks, as
//! types: the handlers and the SSE encoder build these, and `/openapi.json` documents them
//! from the same definitions.

use crate::service::now;
use crate::service::usage::Usage;
use ragway_engine::generate::tokenizer::TextTokenizer;
use ragway_engine::generate::TokenLogprob;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

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
    /// When `logprobs` was asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop` or `length`.
    #[schema(value_type = Option<String>)]
    pub finish_reason: Option<&'static str>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AssistantMessage {
    /// Always `assistant`.
    #[schema(value_type = String)]
    pub role: &'static str,
    /// The text; `null` when the turn is only tool calls.
    pub content: Option<String>,
    pub refusal: Option<String>,
    /// The functions the model calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

impl AssistantMessage {
    pub fn new(content: String) -> Self {
        Self { role: "assistant", content: Some(content), refusal: None, tool_calls: None }
    }

    /// A turn read for tool calls: `content` is `null` when there is only calls.
    pub fn with_calls(content: String, calls: Vec<(String, String, String)>) -> Self {
        if calls.is_empty() {
            return Self::new(content);
        }
        let tool_calls = calls
            .into_iter()
            .map(|(id, name, arguments)| ToolCall { id, kind: "function", function: FunctionCall { name, arguments } })
            .collect();
        Self {
            role: "assistant",
            content: (!content.is_empty()).then_some(content),
            refusal: None,
            tool_calls: Some(tool_calls),
        }
    }
}

/// One call in an assistant message.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ToolCall {
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    pub function: FunctionCall,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// A piece of a call in a stream: the first carries `id`, `type` and the name, the rest
/// pieces of `arguments`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
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
    /// When `logprobs` was set.
    pub logprobs: Option<TextLogprobs>,
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

/// A chat choice's logprobs: one entry per generated token.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatLogprobs {
    pub content: Vec<ChatTokenLogprob>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f32,
    /// The token's UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The `top_logprobs` most likely tokens at this position.
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl ChatLogprobs {
    pub fn of(tok: &TextTokenizer, lps: &[TokenLogprob]) -> Self {
        let top = |id: u32, logprob: f32| {
            let token = tok.token_text(id);
            TopLogprob { bytes: token.as_bytes().to_vec(), token, logprob }
        };
        let content = lps
            .iter()
            .map(|lp| {
                let token = tok.token_text(lp.id);
                ChatTokenLogprob {
                    bytes: token.as_bytes().to_vec(),
                    token,
                    logprob: lp.logprob,
                    top_logprobs: lp.top.iter().map(|&(id, l)| top(id, l)).collect(),
                }
            })
            .collect();
        Self { content }
    }
}

/// A text choice's logprobs (the legacy completions shape).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TextLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    /// Per position, the alternatives as `{token: logprob}`.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Not computed: always null.
    pub text_offset: Option<Vec<usize>>,
}

impl TextLogprobs {
    pub fn of(tok: &TextTokenizer, lps: &[TokenLogprob]) -> Self {
        Self {
            tokens: lps.iter().map(|lp| tok.token_text(lp.id)).collect(),
            token_logprobs: lps.iter().map(|lp| lp.logprob).collect(),
            top_logprobs: lps.iter().map(|lp| lp.top.iter().map(|&(id, l)| (tok.token_text(id), l)).collect()).collect(),
            text_offset: None,
        }
    }
}

/// One server-sent event of a stream: a `chat.completion.chunk` (choices are
/// [`ChatChunkChoice`]) or a `text_completion` chunk ([`TextChunkChoice`]).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CompletionChunk<C> {
    pub id: String,
    /// `chat.completion.chunk` or `text_completion`.
    #[schema(value_type = String)]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: Option<String>,
    /// One choice per chunk; empty in the final usage (and `rag`) chunks.
    pub choices: Vec<C>,
    /// With `stream_options.include_usage`: null on every chunk but the last, which has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
    /// With a `rag` chat request: the last chunk before usage carries citations.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub rag: Option<Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<ChatLogprobs>,
    #[schema(value_type = Option<String>)]
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds to the assistant message: the role in a choice's first chunk, then text.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TextChunkChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<TextLogprobs>,
    #[schema(value_type = Option<String>)]
    pub finish_reason: Option<&'static str>,
}
