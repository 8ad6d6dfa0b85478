//! Retrieval-augmented answers: the options of `/v1/rag` and of a chat completion's `rag`
//! object, the question and history, the pipeline's start (condense, retrieve, render) and
//! finish (cite, check, count), and whole answers for REST and GraphQL.

use crate::app::AppState;
use crate::service::auth::Principal;
use crate::service::completions::{
    chat_messages, compile, generator, new_id, output_constraint, request_over, template_request, Common,
};
use crate::service::error::ServiceError;
use crate::service::now;
use crate::service::usage::Usage;
use ragway_engine::generate::{ChatMessage, GenerateHandle, GenerationRequest, Grammar};
use ragway_index::{Filter, SearchMode};
use ragway_prompts::rag::{generate_text, sampling_from, Pipeline, Prepared, RagAnswer, RagRequest, Rerank, TemplateSpec};
use ragway_prompts::registry::{key_of, Arm};
use serde::Deserialize;
use serde_json::{Map, Value};

/// What to retrieve and how to answer: the body of `/v1/rag` and the `rag` object of a
/// chat completion.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct RagOptions {
    /// Collection to retrieve from.
    #[serde(default)]
    pub collection: String,
    /// Passages retrieved (default 5, at most 50).
    #[serde(default)]
    pub top_k: Option<usize>,
    /// `dense`, `keyword` or `hybrid` (default).
    #[serde(default)]
    pub mode: Option<SearchMode>,
    /// Metadata filter, as in search.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub filter: Option<Value>,
    /// `name`, `name@3`, `name:label`, or a split between versions:
    /// `{"name": "rag-answer", "split": {"production": 90, "staging": 10}}` (labels or `@3`).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub template: Option<Value>,
    /// Passages with a lower query cosine are not offered (default: server setting).
    #[serde(default)]
    pub min_relevance: Option<f32>,
    /// Grounding score below which the answer is flagged (default: server setting).
    #[serde(default)]
    pub grounding_threshold: Option<f32>,
    /// Token budget of the passages (default: server setting).
    #[serde(default)]
    pub context_tokens: Option<usize>,
    /// `"mmr"` or `{"type": "mmr", "lambda": 0.7}`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub rerank: Option<Value>,
    /// Condense a follow-up with the chat history (default true when there is history).
    #[serde(default)]
    pub condense: Option<bool>,
    /// More variables, for templates that declare them.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub variables: Option<Map<String, Value>>,
}

/// `POST /v1/rag`: the options, the question (`query`, or chat `messages` whose last one is
/// the user's question), an optional `answer` to check instead of generating one, and the
/// sampling fields of chat completions (`top_k` here is retrieval's).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct RagBody {
    #[serde(flatten)]
    pub options: RagOptions,
    #[serde(default)]
    pub query: Option<String>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub messages: Option<Value>,
    /// Cite and check this answer instead of generating one (evaluation, tests).
    #[serde(default)]
    pub answer: Option<String>,
    #[serde(flatten)]
    pub common: Common,
}

/// The `rag` object of a chat completion: unknown keys are refused.
#[derive(Debug, Deserialize)]
struct StrictOptions {
    #[serde(flatten)]
    options: RagOptions,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

pub fn parse_options(v: Value) -> Result<RagOptions, ServiceError> {
    if !v.is_object() {
        return Err(ServiceError::invalid("rag", "rag must be an object: {\"collection\": ..., ...}"));
    }
    let s: StrictOptions = serde_json::from_value(v).map_err(|e| ServiceError::invalid("rag", format!("rag: {e}")))?;
    if let Some(k) = s.extra.keys().next() {
        return Err(ServiceError::invalid(format!("rag.{k}"), format!("unknown rag option `{k}`")));
    }
    Ok(s.options)
}

fn template_spec(v: Value) -> Result<TemplateSpec, ServiceError> {
    let bad = || {
        ServiceError::invalid(
            "template",
            "template must be a reference (`name`, `name@3`, `name:label`) or {\"name\": ..., \"split\": {\"label\": weight, ...}}",
        )
    };
    match v {
        Value::String(s) => Ok(TemplateSpec::Reference(s)),
        Value::Object(o) => {
            let name = o.get("name").and_then(Value::as_str).ok_or_else(bad)?.to_string();
            if o.keys().any(|k| k != "name" && k != "split") {
                return Err(bad());
            }
            let arms = match o.get("split") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Object(split)) => split
                    .iter()
                    .map(|(target, w)| {
                        w.as_f64().map(|weight| Arm { target: target.clone(), weight }).ok_or_else(|| {
                            ServiceError::invalid("template.split", format!("the weight of `{target}` must be a number"))
                        })
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(bad()),
            };
            Ok(TemplateSpec::Split { name, arms })
        }
        _ => Err(bad()),
    }
}

fn rerank(v: Value) -> Result<Option<Rerank>, ServiceError> {
    let bad = || ServiceError::invalid("rerank", "rerank must be \"mmr\" or {\"type\": \"mmr\", \"lambda\": 0..1}");
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s == "none" => Ok(None),
        Value::String(s) if s == "mmr" => Ok(Some(Rerank::Mmr { lambda: 0.7 })),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("mmr") => {
            let lambda = match o.get("lambda") {
                None => 0.7,
                Some(l) => l.as_f64().ok_or_else(bad)? as f32,
            };
            Ok(Some(Rerank::Mmr { lambda }))
        }
        _ => Err(bad()),
    }
}

/// The question and the history before it, from `query` or chat `messages`.
pub fn question_and_history(
    query: Option<String>,
    messages: Option<&Value>,
) -> Result<(String, Vec<ChatMessage>), ServiceError> {
    match (query, messages) {
        (Some(_), Some(_)) => Err(ServiceError::invalid("messages", "give `query` or `messages`, not both")),
        (Some(q), None) => Ok((q, Vec::new())),
        (None, Some(m)) => {
            let mut msgs = chat_messages(m)?;
            let last = msgs.pop().expect("chat_messages refuses an empty list");
            if last.role != "user" {
                return Err(ServiceError::invalid("messages", "the last message must be the user's question"));
            }
            // System prompts belong to the template; the history is the conversation.
            msgs.retain(|m| m.role != "system");
            Ok((last.content, msgs))
        }
        (None, None) => Err(ServiceError::invalid("query", "`query` (or `messages`) is required")),
    }
}

/// A RAG request from the parsed options.
pub fn rag_request(
    o: RagOptions,
    question: String,
    history: Vec<ChatMessage>,
    routing_key: Option<u64>,
    max_tokens: Option<usize>,
) -> Result<RagRequest, ServiceError> {
    if o.collection.is_empty() {
        return Err(ServiceError::invalid("collection", "collection is required"));
    }
    let filter = match o.filter {
        None | Some(Value::Null) => None,
        Some(f) => Some(Filter::parse(&f)?),
    };
    Ok(RagRequest {
        collection: o.collection,
        question,
        history,
        top_k: o.top_k,
        mode: o.mode,
        filter,
        template: o.template.map(template_spec).transpose()?,
        routing_key,
        variables: o.variables.unwrap_or_default(),
        min_relevance: o.min_relevance,
        grounding_threshold: o.grounding_threshold,
        context_tokens: o.context_tokens,
        max_tokens,
        rerank: o.rerank.map(rerank).transpose()?.flatten(),
        condense: o.condense,
    })
}

/// A split's routing key: the caller's `user`, else the seed, else none (a random draw).
pub fn routing_key(c: &Common) -> Option<u64> {
    c.extra.get("user").and_then(Value::as_str).map(key_of).or(c.seed_key())
}

/// What `/v1/rag` (plain and streamed), GraphQL's `rag` and chat completions with `rag`
/// share: the sampling fields are checked before anything is retrieved, then the question
/// is condensed, retrieved for and rendered.
pub async fn start(
    state: &AppState,
    h: &GenerateHandle,
    c: &Common,
    logprobs: Option<usize>,
    options: RagOptions,
    query: Option<String>,
    messages: Option<&Value>,
) -> Result<(Pipeline, Prepared), ServiceError> {
    template_request(c, logprobs, h)?;
    let (question, history) = question_and_history(query, messages)?;
    let req = rag_request(options, question, history, routing_key(c), c.max_tokens_usize())?;
    let pipe = state.rag().ok_or_else(|| ServiceError::not_ready("index"))?;
    let prepared = pipe.prepare(h, req).await?;
    Ok((pipe, prepared))
}

/// The engine request for a prepared prompt: the template's parameters under the request's.
/// A `response_format` constrains the answer; ragway's `{"type": "cited_answer"}` asks for
/// `{"answer": "...", "citations": [n, ...]}` where each `n` can only be a passage offered.
pub fn engine_request(c: &Common, h: &GenerateHandle, p: &Prepared, logprobs: Option<usize>) -> Result<GenerationRequest, ServiceError> {
    let params = &p.parameters;
    let mut req = request_over(c, logprobs, h.tokenizer().vocab_size(), sampling_from(params), params.max_tokens.or(Some(256)), params.stop.clone())?;
    if req.n != 1 {
        return Err(ServiceError::invalid("n", "retrieval-augmented answers have one choice (n = 1)"));
    }
    req.prompt = p.prompt.clone();
    req.constraint = if wants_cited(c) {
        Some(compile(h, &Grammar::JsonSchema(cited_schema(p)), "response_format")?)
    } else {
        output_constraint(h, c)?
    };
    Ok(req)
}

/// Whether the request asks for ragway's `cited_answer` format.
pub fn wants_cited(c: &Common) -> bool {
    c.response_format.as_ref().and_then(|f| f.get("type")).and_then(Value::as_str) == Some("cited_answer")
}

/// The JSON an answer with listed citations has: the answer's text and the numbers of the
/// passages it rests on, drawn from those offered.
fn cited_schema(p: &Prepared) -> Value {
    let numbers: Vec<usize> = p.passages.iter().map(|x| x.index).collect();
    serde_json::json!({
        "type": "object",
        "properties": {
            "answer": {"type": "string", "maxLength": 4000},
            "citations": {"type": "array", "items": {"enum": numbers}, "maxItems": numbers.len().max(1)}
        },
        "required": ["answer", "citations"]
    })
}

/// Cites and checks the answer off the async workers; counts it in the metrics. With
/// `cited` (the `cited_answer` format), `text` is that JSON: its `answer` is what is checked
/// and its `citations` count as markers (text that does not parse, cut by `max_tokens`, is
/// checked as it is).
pub async fn finish(state: &AppState, pipe: Pipeline, prepared: Prepared, text: String, cited: bool) -> Result<RagAnswer, ServiceError> {
    let collection = prepared.collection.clone();
    let (text, listed) = match serde_json::from_str::<Value>(&text).ok().filter(|_| cited) {
        Some(v) => (
            v["answer"].as_str().unwrap_or_default().to_string(),
            v["citations"].as_array().into_iter().flatten().filter_map(Value::as_u64).map(|n| n as usize).collect(),
        ),
        None => (text, Vec::new()),
    };
    let answer =
        crate::service::limits::blocking(move || pipe.finish_with(&prepared, &text, &listed).map_err(ServiceError::from)).await?;
    state.rag_metrics.observe(&answer);
    if !answer.dont_know && !answer.grounding.abstained {
        // Grounding over time, per collection: a model-quality signal beside query drift.
        if let Some(c) = state.index.get().and_then(|i| i.get(&collection).ok()) {
            c.drift().record_grounding(answer.grounding.flagged);
        }
    }
    Ok(answer)
}

pub fn usage_json(prompt: usize, completion: usize, caller: Option<&Principal>) -> Value {
    Usage::charged(prompt, completion, caller).json()
}

/// Parses `/v1/rag`'s body; `model` defaults to the generation model.
pub fn parse_body(state: &AppState, mut v: Value) -> Result<RagBody, ServiceError> {
    let Some(o) = v.as_object_mut() else {
        return Err(ServiceError::invalid("body", "the body must be a JSON object"));
    };
    o.entry("model").or_insert_with(|| Value::String(state.settings.generation_model_id.clone()));
    serde_json::from_value(v).map_err(|e| ServiceError::invalid("body", e.to_string()))
}

/// Answers a parsed body without streaming (REST and GraphQL).
/// A whole `rag.answer`: the answer with its citations and grounding, and the response's
/// id, model, finish reason and usage.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct RagResponse {
    pub id: String,
    /// Always `rag.answer`.
    #[schema(value_type = String)]
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    /// `stop` or `length`.
    #[schema(value_type = String)]
    pub finish_reason: &'static str,
    pub usage: Usage,
    #[serde(flatten)]
    pub answer: RagAnswer,
}

pub async fn answer(state: &AppState, body: RagBody, caller: Option<&Principal>) -> Result<RagResponse, ServiceError> {
    let h = generator(state, &body.common.model)?.clone();
    let (pipe, prepared) = start(state, &h, &body.common, None, body.options, body.query, body.messages.as_ref()).await?;
    let (cp, cc) = prepared.condense_tokens;
    let (text, finish_reason, pt, ct) = match (&prepared.dont_know, body.answer) {
        (Some(dk), _) => (dk.clone(), "stop", 0, 0),
        (None, Some(a)) => (a, "stop", 0, 0),
        (None, None) => {
            let g = generate_text(&h, engine_request(&body.common, &h, &prepared, None)?).await?;
            (g.text, g.finish_reason.as_str(), g.prompt_tokens, g.completion_tokens)
        }
    };
    let model = h.model_id().to_string();
    let answer = finish(state, pipe, prepared, text, wants_cited(&body.common)).await?;
    Ok(RagResponse {
        id: new_id("rag"),
        object: "rag.answer",
        created: now(),
        model,
        finish_reason,
        usage: Usage::charged(cp + pt, cc + ct, caller),
        answer,
    })
}

/// The `rag` extra of a chat completion, as JSON (citations, grounding, template).
pub fn rag_extra(ans: &RagAnswer) -> Value {
    let mut v = serde_json::to_value(ans).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        // The answer is the message content already.
        o.remove("answer");
    }
    v
}

