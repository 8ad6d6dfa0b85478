//! `POST /v1/chat/completions` and `POST /v1/completions` in OpenAI's format, streaming (SSE)
//! or not. The handlers turn the body into engine requests (one per prompt; `n` sequences
//! each), then either gather the events into one response or forward them as chunks as they
//! are decoded. A client that disconnects drops the stream, which cancels its sequences.

use crate::http::middleware::{op, Authorized};
use crate::service::auth::Principal;
use crate::http::middleware::principal;
use crate::service::error::ServiceError;
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::models::ModelKind;
use crate::http::dispatch::{self as dispatch, parse_body, Endpoint};
use crate::http::openai::{AssistantMessage, ChatChoice, ChatCompletion, TextChoice, TextCompletion};
use crate::app::AppState;
use actix_web::web::Bytes;
use actix_web::{post, web, HttpRequest, HttpResponse};
use futures::stream::{self, Stream, StreamExt};
use ragway_engine::generate::sampling::random_seed;
use ragway_engine::generate::{
    ChatMessage, GenEvent, GenerateHandle, GenerationRequest, GenerationStream, SamplingParams, TokenLogprob,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

/// Sampling and limit fields shared by both endpoints (OpenAI's, plus vLLM's `top_k`,
/// `min_p`, `repetition_penalty`, `ignore_eos`).
#[derive(Debug, Deserialize)]
#[derive(utoipa::ToSchema)]
pub struct Common {
    pub(crate) model: String,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    repetition_penalty: Option<f32>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    logit_bias: Option<HashMap<String, f32>>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    pub(crate) stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    ignore_eos: Option<bool>,
    /// Everything else: accepted when it is an OpenAI field ragway can honour by ignoring it,
    /// refused otherwise (a typo must not pass silently).
    #[serde(flatten)]
    #[schema(ignore)]
    pub(crate) extra: Map<String, Value>,
}

impl Common {
    /// The seed as a routing key for template splits.
    pub(crate) fn seed_key(&self) -> Option<u64> {
        self.seed.map(|s| s as u64)
    }

    pub(crate) fn max_tokens_usize(&self) -> Option<usize> {
        self.max_completion_tokens.or(self.max_tokens).map(|m| usize::try_from(m).unwrap_or(usize::MAX))
    }
}

#[derive(Debug, Deserialize)]
#[derive(utoipa::ToSchema)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
#[derive(utoipa::ToSchema)]
pub struct ChatRequest {
    messages: Value,
    #[serde(default)]
    logprobs: Option<bool>,
    #[serde(default)]
    top_logprobs: Option<usize>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
#[derive(utoipa::ToSchema)]
pub struct CompletionRequest {
    prompt: Value,
    #[serde(default)]
    logprobs: Option<usize>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(flatten)]
    common: Common,
}

/// OpenAI fields that change nothing here.
const IGNORED: &[&str] = &["user", "store", "metadata", "service_tier", "parallel_tool_calls", "stream_options"];

fn check_extra(extra: &Map<String, Value>) -> Result<(), ServiceError> {
    for (k, v) in extra {
        if IGNORED.contains(&k.as_str()) || v.is_null() {
            continue;
        }
        let msg = match k.as_str() {
            "tools" | "tool_choice" | "functions" | "function_call" => {
                if k == "tool_choice" && v == "none" || v.as_array().is_some_and(|a| a.is_empty()) {
                    continue;
                }
                format!("`{k}` is not supported: this server does not do tool calling")
            }
            "response_format" => {
                if v.get("type").and_then(Value::as_str) == Some("text") {
                    continue;
                }
                "only `response_format: {\"type\": \"text\"}` is supported".to_string()
            }
            "best_of" => {
                if v.as_u64() == Some(1) {
                    continue;
                }
                "`best_of` other than 1 is not supported".to_string()
            }
            "suffix" => "`suffix` is not supported".to_string(),
            _ => format!("unknown parameter `{k}`"),
        };
        return Err(ServiceError::invalid(k.clone(), msg));
    }
    Ok(())
}

/// The local engine of the version `model` routes to (for the endpoints that need one in
/// this process: RAG, GraphQL).
pub(crate) fn generator(state: &AppState, model: &str) -> Result<GenerateHandle, ServiceError> {
    state.registry.route(model, ModelKind::Generation, None, None, &|_| None)?.local_generator("model", "this")
}

/// Builds one engine request (without its prompt) from the shared fields.
pub(crate) fn template_request(c: &Common, logprobs: Option<usize>, vocab: usize) -> Result<GenerationRequest, ServiceError> {
    request_over(c, logprobs, vocab, SamplingParams::default(), None, Vec::new())
}

/// The engine request of `c` over defaults (a prompt template's parameters): fields the
/// request sets win.
pub(crate) fn request_over(
    c: &Common,
    logprobs: Option<usize>,
    vocab: usize,
    base: SamplingParams,
    base_max_tokens: Option<usize>,
    base_stop: Vec<String>,
) -> Result<GenerationRequest, ServiceError> {
    check_extra(&c.extra)?;
    let mut sampling = SamplingParams { logprobs, ..base };
    if let Some(t) = c.temperature {
        sampling.temperature = t;
    }
    if let Some(p) = c.top_p {
        sampling.top_p = p;
    }
    if let Some(k) = c.top_k {
        // vLLM: -1 (or 0) turns top-k off.
        sampling.top_k = if k <= 0 { 0 } else { k as usize };
    }
    if let Some(p) = c.min_p {
        sampling.min_p = p;
    }
    if let Some(p) = c.repetition_penalty {
        sampling.repetition_penalty = p;
    }
    if let Some(p) = c.presence_penalty {
        sampling.presence_penalty = p;
    }
    if let Some(p) = c.frequency_penalty {
        sampling.frequency_penalty = p;
    }
    if let Some(bias) = &c.logit_bias {
        for (k, &v) in bias {
            let id: u32 = k.parse().map_err(|_| {
                ServiceError::invalid("logit_bias", format!("logit_bias keys must be token ids, got `{k}`"))
            })?;
            sampling.logit_bias.push((id, v));
        }
        sampling.logit_bias.sort_by_key(|b| b.0);
    }
    sampling.seed = c.seed.map(|s| s as u64);
    sampling.validate(vocab).map_err(|e| ServiceError::from_engine(e, "body"))?;
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        Some(0) => return Err(ServiceError::invalid("max_tokens", "max_tokens must be at least 1")),
        Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
        None => base_max_tokens,
    };
    let stop = match &c.stop {
        None | Some(Value::Null) => base_stop,
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ServiceError::invalid("stop", "stop must be a string or an array of strings"))?,
        Some(_) => return Err(ServiceError::invalid("stop", "stop must be a string or an array of strings")),
    };
    let n = c.n.unwrap_or(1);
    if n == 0 || n > 16 {
        return Err(ServiceError::invalid("n", format!("n must be between 1 and 16, got {n}")));
    }
    Ok(GenerationRequest {
        prompt: Vec::new(),
        max_tokens,
        sampling,
        stop,
        n,
        ignore_eos: c.ignore_eos.unwrap_or(false),
        span: tracing::Span::current(),
    })
}

pub(crate) fn chat_messages(v: &Value) -> Result<Vec<ChatMessage>, ServiceError> {
    let arr = v.as_array().ok_or_else(|| ServiceError::invalid("messages", "messages must be an array"))?;
    if arr.is_empty() {
        return Err(ServiceError::invalid("messages", "messages must contain at least one message"));
    }
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ServiceError::invalid(&param, format!("{param}.role must be a string")))?;
            let role = match role {
                "system" | "user" | "assistant" => role,
                "developer" => "system",
                other => {
                    return Err(ServiceError::invalid(
                        format!("{param}.role"),
                        format!("unsupported role `{other}` (system, developer, user, assistant)"),
                    ))
                }
            };
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None if role == "assistant" => String::new(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(ServiceError::invalid(
                                    format!("{param}.content[{j}]"),
                                    format!(
                                        "content parts must be {{\"type\": \"text\", \"text\": ...}}; got {}",
                                        kind.unwrap_or("no type")
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
                _ => {
                    return Err(ServiceError::invalid(
                        format!("{param}.content"),
                        "content must be a string or an array of text parts",
                    ))
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn completion_prompts(v: &Value, h: &GenerateHandle) -> Result<Vec<Vec<u32>>, ServiceError> {
    let bad = || {
        ServiceError::invalid(
            "prompt",
            "prompt must be a string, an array of strings, an array of token ids, or an array of token-id arrays",
        )
    };
    let ids = |a: &[Value]| -> Result<Vec<u32>, ServiceError> {
        a.iter().map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(bad)).collect()
    };
    let encode = |s: &str| h.tokenizer().encode(s, true).map_err(|e| ServiceError::from_engine(e, "prompt"));
    // Sizes first, before anything is tokenized.
    if let Value::Array(a) = v {
        if a.len() > 64 {
            return Err(ServiceError::invalid("prompt", "at most 64 prompts per request"));
        }
    }
    let text_bytes = match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.iter().filter_map(Value::as_str).map(str::len).sum(),
        _ => 0,
    };
    crate::service::limits::check_prompt_bytes(text_bytes, "prompt")?;
    let prompts = match v {
        Value::String(s) => vec![encode(s)?],
        Value::Array(a) if a.is_empty() => return Err(ServiceError::invalid("prompt", "prompt must not be empty")),
        Value::Array(a) if a.iter().all(Value::is_string) => {
            a.iter().map(|s| encode(s.as_str().unwrap_or_default())).collect::<Result<_, _>>()?
        }
        Value::Array(a) if a.iter().all(Value::is_number) => vec![ids(a)?],
        Value::Array(a) if a.iter().all(Value::is_array) => {
            a.iter().map(|x| ids(x.as_array().map(Vec::as_slice).unwrap_or_default())).collect::<Result<_, _>>()?
        }
        _ => return Err(bad()),
    };
    if prompts.len() > 64 {
        return Err(ServiceError::invalid("prompt", "at most 64 prompts per request"));
    }
    if prompts.iter().any(Vec::is_empty) {
        return Err(ServiceError::invalid("prompt", "a prompt is empty"));
    }
    Ok(prompts)
}

/// Queues one engine request per prompt; all or nothing.
fn submit_all(
    h: &GenerateHandle,
    template: &GenerationRequest,
    prompts: Vec<Vec<u32>>,
    param: &str,
) -> Result<Vec<GenerationStream>, ServiceError> {
    prompts
        .into_iter()
        .map(|p| {
            let mut req = template.clone();
            req.prompt = p;
            h.submit(req).map_err(|e| ServiceError::from_engine(e, param))
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Chat,
    Text,
}

/// Events of every prompt's stream, tagged with the choice index `prompt * n + index`.
pub(crate) type Events = Pin<Box<dyn Stream<Item = (usize, GenEvent)> + Send>>;

pub(crate) fn merge(streams: Vec<GenerationStream>, n: usize) -> Events {
    let parts = streams.into_iter().enumerate().map(|(p, s)| {
        stream::unfold(s, |mut s| async move { s.next().await.map(|e| (e, s)) })
            .map(move |e| {
                let base = p * n;
                let shifted = match e {
                    GenEvent::Token { index, token, text, logprob } => {
                        GenEvent::Token { index: base + index, token, text, logprob }
                    }
                    GenEvent::Text { index, text } => GenEvent::Text { index: base + index, text },
                    GenEvent::Done { index, finish_reason, prompt_tokens, completion_tokens } => {
                        GenEvent::Done { index: base + index, finish_reason, prompt_tokens, completion_tokens }
                    }
                    e @ GenEvent::Error { .. } => e,
                };
                (p, shifted)
            })
            .boxed()
    });
    stream::select_all(parts).boxed()
}

/// OpenAI's text-completion logprob parts for one token: its text, its logprob, and the
/// alternatives as `{token: logprob}`.
fn text_logprob(h: &GenerateHandle, lp: &TokenLogprob) -> (String, f32, Value) {
    let top: Map<String, Value> = lp.top.iter().map(|&(id, l)| (h.tokenizer().token_text(id), json!(l))).collect();
    (h.tokenizer().token_text(lp.id), lp.logprob, Value::Object(top))
}

/// OpenAI's chat logprob entry for one token.
fn chat_logprob(h: &GenerateHandle, lp: &TokenLogprob) -> Value {
    let entry = |id: u32, logprob: f32| {
        let text = h.tokenizer().token_text(id);
        json!({"token": text, "logprob": logprob, "bytes": text.as_bytes()})
    };
    let mut v = entry(lp.id, lp.logprob);
    v["top_logprobs"] = lp.top.iter().map(|&(id, l)| entry(id, l)).collect();
    v
}

pub(crate) struct Choice {
    text: String,
    finish: Option<&'static str>,
    completion_tokens: usize,
    prompt_tokens: usize,
    chat_logprobs: Vec<Value>,
    tokens: Vec<String>,
    token_logprobs: Vec<f32>,
    top_logprobs: Vec<Value>,
}

pub(crate) async fn gather(
    h: &GenerateHandle,
    mut events: Events,
    choices: usize,
    kind: Kind,
    echo: Option<&[String]>,
    n: usize,
) -> Result<Vec<Choice>, ServiceError> {
    let mut out: Vec<Choice> = (0..choices)
        .map(|i| Choice {
            text: echo.map(|e| e[i / n].clone()).unwrap_or_default(),
            finish: None,
            completion_tokens: 0,
            prompt_tokens: 0,
            chat_logprobs: Vec::new(),
            tokens: Vec::new(),
            token_logprobs: Vec::new(),
            top_logprobs: Vec::new(),
        })
        .collect();
    let mut done = 0;
    while let Some((_, ev)) = events.next().await {
        match ev {
            GenEvent::Token { index, text, logprob, .. } => {
                let c = &mut out[index];
                c.text.push_str(&text);
                if let Some(lp) = logprob {
                    match kind {
                        Kind::Chat => c.chat_logprobs.push(chat_logprob(h, &lp)),
                        Kind::Text => {
                            let (token, logprob, top) = text_logprob(h, &lp);
                            c.tokens.push(token);
                            c.token_logprobs.push(logprob);
                            c.top_logprobs.push(top);
                        }
                    }
                }
            }
            GenEvent::Text { index, text } => out[index].text.push_str(&text),
            GenEvent::Done { index, finish_reason, prompt_tokens, completion_tokens } => {
                let c = &mut out[index];
                c.finish = Some(finish_reason.as_str());
                c.prompt_tokens = prompt_tokens;
                c.completion_tokens = completion_tokens;
                done += 1;
                if done == choices {
                    break;
                }
            }
            GenEvent::Error { message } => return Err(ServiceError::internal(message)),
        }
    }
    Ok(out)
}

pub(crate) fn usage(choices: &[Choice], n: usize, caller: Option<&Principal>) -> crate::service::usage::Usage {
    // Each prompt counts once, however many sequences it has.
    let prompt: usize = choices.iter().step_by(n.max(1)).map(|c| c.prompt_tokens).sum();
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    crate::service::usage::Usage::charged(prompt, completion, caller)
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub(crate) fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// Work run on a finished stream's text (choice 0), whose value rides in an extra final
/// chunk (`choices: []`, `rag: {...}`): how chat completions with `rag` return citations.
pub(crate) type Tail = Box<dyn FnOnce(String) -> Pin<Box<dyn std::future::Future<Output = Value>>>>;

/// The SSE body: chunks as the engine decodes, a final usage chunk on request, `[DONE]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sse_body(
    h: GenerateHandle,
    events: Events,
    kind: Kind,
    id: String,
    model: String,
    choices: usize,
    prompt_tokens: Vec<usize>,
    include_usage: bool,
    caller: Option<Arc<Principal>>,
    tail: Option<Tail>,
) -> impl Stream<Item = Result<Bytes, actix_web::Error>> {
    let created = now();
    let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = move |choice: Value, usage_field: bool| {
        let mut v = json!({"id": id, "object": object, "created": created, "model": model, "system_fingerprint": null, "choices": [choice]});
        if usage_field {
            v["usage"] = Value::Null;
        }
        v
    };
    struct St {
        events: Events,
        done: usize,
        completion_tokens: usize,
        finished: bool,
        started: Vec<bool>,
        tail: Option<Tail>,
        text: String,
    }
    let st = St {
        events,
        done: 0,
        completion_tokens: 0,
        finished: false,
        started: vec![false; choices],
        tail,
        text: String::new(),
    };
    let prompt_total: usize = prompt_tokens.iter().sum();
    stream::unfold(st, move |mut st| {
        let h = h.clone();
        let chunk = chunk.clone();
        let caller = caller.clone();
        async move {
            // A chat choice's first chunk carries the role, as OpenAI's do.
            let open_chat_choice = |started: &mut Vec<bool>, index: usize, out: &mut Vec<u8>| {
                if kind == Kind::Chat && !started[index] {
                    started[index] = true;
                    let first = json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                    out.extend_from_slice(&sse(&chunk(first, include_usage)));
                }
            };
            if st.finished {
                return None;
            }
            let mut out: Vec<u8> = Vec::new();
            loop {
                let Some((_, ev)) = st.events.next().await else {
                    st.finished = true;
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    break;
                };
                match ev {
                    GenEvent::Token { index, text, logprob, .. } => {
                        open_chat_choice(&mut st.started, index, &mut out);
                        if st.tail.is_some() && index == 0 {
                            st.text.push_str(&text);
                        }
                        if text.is_empty() && logprob.is_none() {
                            continue;
                        }
                        let c = match kind {
                            Kind::Chat => json!({"index": index, "delta": {"content": text},
                                "logprobs": logprob.map(|lp| json!({"content": [chat_logprob(&h, &lp)]})), "finish_reason": null}),
                            Kind::Text => json!({"index": index, "text": text, "logprobs": logprob.map(|lp| {
                                let (token, logprob, top) = text_logprob(&h, &lp);
                                json!({"tokens": [token], "token_logprobs": [logprob], "top_logprobs": [top]})
                            }), "finish_reason": null}),
                        };
                        out.extend_from_slice(&sse(&chunk(c, include_usage)));
                        break;
                    }
                    GenEvent::Text { index, text } => {
                        if st.tail.is_some() && index == 0 {
                            st.text.push_str(&text);
                        }
                        let c = match kind {
                            Kind::Chat => {
                                json!({"index": index, "delta": {"content": text}, "logprobs": null, "finish_reason": null})
                            }
                            Kind::Text => {
                                json!({"index": index, "text": text, "logprobs": null, "finish_reason": null})
                            }
                        };
                        out.extend_from_slice(&sse(&chunk(c, include_usage)));
                        break;
                    }
                    GenEvent::Done { index, finish_reason, completion_tokens, .. } => {
                        open_chat_choice(&mut st.started, index, &mut out);
                        st.completion_tokens += completion_tokens;
                        let c = match kind {
                            Kind::Chat => {
                                json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": finish_reason.as_str()})
                            }
                            Kind::Text => {
                                json!({"index": index, "text": "", "logprobs": null, "finish_reason": finish_reason.as_str()})
                            }
                        };
                        out.extend_from_slice(&sse(&chunk(c, include_usage)));
                        st.done += 1;
                        if st.done == choices {
                            let usage = crate::service::usage::Usage::charged(prompt_total, st.completion_tokens, caller.as_deref());
                            if let Some(tail) = st.tail.take() {
                                let extra = tail(std::mem::take(&mut st.text)).await;
                                let mut last = chunk(Value::Null, include_usage);
                                last["choices"] = json!([]);
                                last["rag"] = extra;
                                out.extend_from_slice(&sse(&last));
                            }
                            if include_usage {
                                let mut last = chunk(Value::Null, false);
                                last["choices"] = json!([]);
                                last["usage"] = usage.json();
                                out.extend_from_slice(&sse(&last));
                            }
                            out.extend_from_slice(b"data: [DONE]\n\n");
                            st.finished = true;
                        }
                        break;
                    }
                    GenEvent::Error { message } => {
                        // The status line is gone: report the failure in the stream itself.
                        let err =
                            json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
                        out.extend_from_slice(&sse(&err));
                        st.finished = true;
                        break;
                    }
                }
            }
            Some((Ok::<_, actix_web::Error>(Bytes::from(out)), st))
        }
    })
}

pub(crate) fn sse_response(body: impl Stream<Item = Result<Bytes, actix_web::Error>> + 'static) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}

pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}{:08x}", random_seed(), random_seed() as u32)
}

/// A chat request admitted by the engine: its events, as both the REST handler and the
/// GraphQL resolvers consume them.
pub(crate) struct StartedChat {
    pub h: GenerateHandle,
    pub events: Events,
    pub n: usize,
    pub prompt_tokens: usize,
    top: Option<usize>,
    stream: bool,
    include_usage: bool,
}

/// Validates a chat request, renders and tokenizes its prompt, and queues it.
pub(crate) fn start_chat(state: &AppState, req: ChatRequest) -> Result<StartedChat, ServiceError> {
    let h = generator(state, &req.common.model)?;
    start_chat_on(h, req)
}

/// [`start_chat`] on a given engine.
pub(crate) fn start_chat_on(h: GenerateHandle, req: ChatRequest) -> Result<StartedChat, ServiceError> {
    let top = if req.logprobs.unwrap_or(false) {
        Some(req.top_logprobs.unwrap_or(0))
    } else if req.top_logprobs.is_some_and(|k| k > 0) {
        return Err(ServiceError::invalid("top_logprobs", "top_logprobs requires logprobs: true"));
    } else {
        None
    };
    let template = template_request(&req.common, top, h.tokenizer().vocab_size())?;
    let messages = chat_messages(&req.messages)?;
    crate::service::limits::check_prompt_bytes(messages.iter().map(|m| m.content.len()).sum(), "messages")?;
    let chat_template = h.chat_template().ok_or_else(|| {
        ServiceError::invalid(
            "messages",
            "this model has no chat template; use /v1/completions or configure --chat-template",
        )
    })?;
    let rendered = chat_template.render(&messages, true).map_err(|e| ServiceError::from_engine(e, "messages"))?;
    let prompt = h.tokenizer().encode(&rendered, false).map_err(|e| ServiceError::from_engine(e, "messages"))?;
    let prompt_tokens = prompt.len();
    let n = template.n;
    let streams = submit_all(&h, &template, vec![prompt], "messages")?;
    Ok(StartedChat {
        events: merge(streams, n),
        h,
        n,
        prompt_tokens,
        top,
        stream: req.common.stream.unwrap_or(false),
        include_usage: req.common.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

/// One finished chat choice (for GraphQL's `generate`).
pub(crate) struct ChatOutcome {
    pub text: String,
    pub finish_reason: Option<&'static str>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Runs a started chat to the end; charges the caller's token budget.
pub(crate) async fn finish_chat(started: StartedChat, caller: Option<&Principal>) -> Result<Vec<ChatOutcome>, ServiceError> {
    let choices = gather(&started.h, started.events, started.n, Kind::Chat, None, started.n).await?;
    usage(&choices, started.n, caller);
    Ok(choices
        .into_iter()
        .map(|c| ChatOutcome {
            text: c.text,
            finish_reason: c.finish,
            prompt_tokens: started.prompt_tokens,
            completion_tokens: c.completion_tokens,
        })
        .collect())
}

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = ChatRequest,
    responses((status = 200, description = "`chat.completion`, or with `stream` an SSE stream of `chat.completion.chunk` ending with `data: [DONE]`", body = ChatCompletion), ApiErrors)
)]
#[post("/v1/chat/completions")]
pub async fn chat(_: Authorized<op::Chat>, http: HttpRequest, state: web::Data<AppState>, body: web::Json<Value>) -> Result<HttpResponse, ServiceError> {
    let raw = body.into_inner();
    let mut req: ChatRequest = parse_body(&raw)?;
    let Some(rag) = req.common.extra.remove("rag").filter(|v| !v.is_null()) else {
        let model = req.common.model.clone();
        return dispatch::handle(&state, &http, &model, raw, dispatch::Request::Chat(req)).await;
    };
    let routed = dispatch::route(&state, &http, Endpoint::Chat, &req.common.model, &raw)?;
    let started = std::time::Instant::now();
    let result = match routed.local_generator("rag", "`rag`") {
        Ok(h) => chat_rag(http.clone(), state.clone(), h, req, rag, routed.served_as()).await,
        Err(e) => Err(e),
    };
    dispatch::finish(&state, routed, Endpoint::Chat, raw, started, result)
}

/// A chat completion on a local engine, answered as `model`.
pub(crate) async fn chat_local(
    caller: Option<Arc<Principal>>,
    h: GenerateHandle,
    req: ChatRequest,
    model: String,
) -> Result<HttpResponse, ServiceError> {
    let StartedChat { h, events, n, prompt_tokens, top, stream, include_usage } =
        crate::service::limits::blocking(move || start_chat_on(h, req)).await?;
    let id = new_id("chatcmpl");
    if stream {
        return Ok(sse_response(sse_body(h, events, Kind::Chat, id, model, n, vec![prompt_tokens], include_usage, caller, None)));
    }
    let choices = gather(&h, events, n, Kind::Chat, None, n).await?;
    let usage = usage(&choices, n, caller.as_deref());
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| ChatChoice {
            index: i,
            logprobs: top.is_some().then(|| json!({"content": c.chat_logprobs})),
            finish_reason: c.finish,
            message: AssistantMessage::new(c.text),
        })
        .collect();
    Ok(HttpResponse::Ok().json(ChatCompletion::new(id, model, choices, usage, None)))
}

/// A chat completion answered with retrieval (`rag` in the body): the last user message is
/// the question, earlier turns the history; the response is a normal `chat.completion`
/// with an extra `rag` field (citations, uncited passages, grounding, template), and a
/// stream ends with a chunk carrying `rag` and `choices: []` before `[DONE]`.
async fn chat_rag(
    http: HttpRequest,
    state: web::Data<AppState>,
    h: GenerateHandle,
    req: ChatRequest,
    rag: Value,
    model: String,
) -> Result<HttpResponse, ServiceError> {
    use crate::http::rag as r;
    let top = if req.logprobs.unwrap_or(false) { Some(req.top_logprobs.unwrap_or(0)) } else { None };
    let options = r::parse_options(rag)?;
    let (pipe, prepared) = r::start(&state, &h, &req.common, top, options, None, Some(&req.messages)).await?;
    let (cp, cc) = prepared.condense_tokens;
    let id = new_id("chatcmpl");
    let stream = req.common.stream.unwrap_or(false);
    let include_usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if let Some(dk) = prepared.dont_know.clone() {
        let ans = r::finish(&state, pipe, prepared, dk.clone()).await?;
        let usage = crate::service::usage::Usage::uncharged(cp, cc).json();
        if !stream {
            let choice = ChatChoice { index: 0, message: AssistantMessage::new(dk), logprobs: None, finish_reason: Some("stop") };
            return Ok(HttpResponse::Ok().json(ChatCompletion::new(
                id,
                model,
                vec![choice],
                crate::service::usage::Usage::uncharged(cp, cc),
                Some(r::rag_extra(&ans)),
            )));
        }
        let base = json!({"id": id, "object": "chat.completion.chunk", "created": now(), "model": model, "system_fingerprint": null});
        let with = |choices: Value, extra: Option<(&str, Value)>| {
            let mut v = base.clone();
            v["choices"] = choices;
            if let Some((k, x)) = extra {
                v[k] = x;
            }
            sse(&v)
        };
        let mut out = Vec::new();
        out.extend_from_slice(&with(json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), None));
        out.extend_from_slice(&with(json!([{"index": 0, "delta": {"content": dk}, "logprobs": null, "finish_reason": null}]), None));
        out.extend_from_slice(&with(json!([{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]), None));
        out.extend_from_slice(&with(json!([]), Some(("rag", r::rag_extra(&ans)))));
        if include_usage {
            out.extend_from_slice(&with(json!([]), Some(("usage", usage))));
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        return Ok(sse_response(stream::iter([Ok::<_, actix_web::Error>(Bytes::from(out))])));
    }
    let greq = r::engine_request(&req.common, &h, &prepared, top)?;
    let prompt_tokens = greq.prompt.len();
    let streams = submit_all(&h, &greq, vec![greq.prompt.clone()], "messages")?;
    let events = merge(streams, 1);
    if stream {
        let tail = r::tail(state.clone().into_inner(), pipe, prepared);
        return Ok(sse_response(sse_body(h, events, Kind::Chat, id, model, 1, vec![prompt_tokens + cp], include_usage, principal(&http), Some(tail))));
    }
    let mut choices = gather(&h, events, 1, Kind::Chat, None, 1).await?;
    let c = choices.remove(0);
    let ans = r::finish(&state, pipe, prepared, c.text.clone()).await?;
    let usage = crate::service::usage::Usage::charged(c.prompt_tokens + cp, c.completion_tokens + cc, principal(&http).as_deref());
    let choice = ChatChoice {
        index: 0,
        logprobs: top.is_some().then(|| json!({"content": c.chat_logprobs})),
        finish_reason: c.finish,
        message: AssistantMessage::new(c.text),
    };
    Ok(HttpResponse::Ok().json(ChatCompletion::new(id, model, vec![choice], usage, Some(r::rag_extra(&ans)))))
}

#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    request_body = CompletionRequest,
    responses((status = 200, description = "`text_completion` (SSE chunks with `stream`)", body = TextCompletion), ApiErrors)
)]
#[post("/v1/completions")]
pub async fn completions(_: Authorized<op::Completions>, http: HttpRequest, state: web::Data<AppState>, body: web::Json<Value>) -> Result<HttpResponse, ServiceError> {
    let raw = body.into_inner();
    let req: CompletionRequest = parse_body(&raw)?;
    let model = req.common.model.clone();
    dispatch::handle(&state, &http, &model, raw, dispatch::Request::Completions(req)).await
}

/// A text completion on a local engine, answered as `model`.
pub(crate) async fn completions_local(
    caller: Option<Arc<Principal>>,
    h: GenerateHandle,
    req: CompletionRequest,
    model: String,
) -> Result<HttpResponse, ServiceError> {
    if req.logprobs.is_some_and(|k| k > 5) {
        return Err(ServiceError::invalid("logprobs", "logprobs must be between 0 and 5"));
    }
    let template = template_request(&req.common, req.logprobs, h.tokenizer().vocab_size())?;
    let (prompts, h, req) = crate::service::limits::blocking(move || Ok((completion_prompts(&req.prompt, &h)?, h, req))).await?;
    let echo_texts: Option<Vec<String>> = if req.echo.unwrap_or(false) {
        if req.common.stream.unwrap_or(false) {
            return Err(ServiceError::invalid("echo", "echo is not supported with stream"));
        }
        Some(prompts.iter().map(|p| h.tokenizer().decode(p).unwrap_or_default()).collect())
    } else {
        None
    };
    let n = template.n;
    let prompt_tokens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let total = prompts.len() * n;
    let streams = submit_all(&h, &template, prompts, "prompt")?;
    let events = merge(streams, n);
    let id = new_id("cmpl");
    if req.common.stream.unwrap_or(false) {
        let include_usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
        return Ok(sse_response(sse_body(h, events, Kind::Text, id, model, total, prompt_tokens, include_usage, caller, None)));
    }
    let choices = gather(&h, events, total, Kind::Text, echo_texts.as_deref(), n).await?;
    let usage = usage(&choices, n, caller.as_deref());
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| TextChoice {
            index: i,
            logprobs: req.logprobs.is_some().then(|| {
                json!({"tokens": c.tokens, "token_logprobs": c.token_logprobs, "top_logprobs": c.top_logprobs, "text_offset": Value::Null})
            }),
            finish_reason: c.finish,
            text: c.text,
        })
        .collect();
    Ok(HttpResponse::Ok().json(TextCompletion::new(id, model, choices, usage)))
}

/// Property tests over the OpenAI request types: any JSON body either parses and validates
/// or is refused with an error naming the parameter — never a panic, never a wrapped number.
/// CI runs proptest's default number of cases; `scripts/fuzz.sh` runs long campaigns.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn field_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            any::<u64>().prop_map(|n| json!(n)),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| json!(f)),
            ".{0,12}".prop_map(Value::String),
            prop::collection::vec(any::<u32>().prop_map(|n| json!(n)), 0..4).prop_map(Value::Array),
            prop::collection::vec(".{0,6}".prop_map(Value::String), 0..5).prop_map(Value::Array),
            Just(json!([{"role": "user", "content": "hi"}])),
            Just(json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}])),
            Just(json!({"type": "json_object"})),
            Just(json!({"1": 5.0, "x": 1})),
        ]
    }

    fn body() -> impl Strategy<Value = Value> {
        let key = prop_oneof![
            Just("model"), Just("messages"), Just("prompt"), Just("max_tokens"), Just("max_completion_tokens"),
            Just("temperature"), Just("top_p"), Just("top_k"), Just("min_p"), Just("n"), Just("stop"), Just("seed"),
            Just("logprobs"), Just("top_logprobs"), Just("logit_bias"), Just("stream"), Just("stream_options"),
            Just("presence_penalty"), Just("frequency_penalty"), Just("repetition_penalty"), Just("echo"),
            Just("response_format"), Just("tools"), Just("input"), Just("encoding_format"), Just("dimensions"),
            Just("user"), Just("bogus"),
        ];
        prop::collection::vec((key, field_value()), 0..10)
            .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
    }

    proptest! {
        #[test]
        fn request_bodies_parse_and_validate_without_panicking(raw in body(), vocab in 1usize..200_000) {
            if let Ok(req) = dispatch::parse_body::<ChatRequest>(&raw) {
                if let Ok(messages) = chat_messages(&req.messages) {
                    let _ = crate::service::limits::check_prompt_bytes(messages.iter().map(|m| m.content.len()).sum(), "messages");
                }
                if let Ok(r) = template_request(&req.common, req.top_logprobs, vocab) {
                    prop_assert!((1..=16).contains(&r.n));
                    prop_assert!(r.max_tokens.is_none_or(|m| m >= 1));
                }
            }
            if let Ok(req) = dispatch::parse_body::<CompletionRequest>(&raw) {
                let _ = template_request(&req.common, req.logprobs, vocab);
            }
            if let Ok(req) = dispatch::parse_body::<crate::http::embeddings::EmbeddingsRequest>(&raw) {
                let _ = crate::http::embeddings::parse_input(&req.input);
            }
        }
    }
}
