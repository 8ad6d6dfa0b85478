//! Chat and text completions on a local engine: the OpenAI request types, their
//! validation into engine requests, prompt rendering and tokenizing, queueing (one engine
//! request per prompt; `n` sequences each), and gathering the events into choices. The REST
//! handlers (`http::completions`) and GraphQL's `generate` call these; the SSE encoding of
//! a stream is HTTP's (`http::sse`).

use crate::app::AppState;
use crate::models::ModelKind;
use crate::service::auth::Principal;
use crate::service::error::ServiceError;
use crate::service::structured::{self, ToolChoice, ToolFormat, Tools};
use crate::service::usage::Usage;
use futures::stream::{self, Stream, StreamExt};
use ragway_engine::generate::sampling::random_seed;
use ragway_engine::generate::{
    ChatMessage, Constraint, GenEvent, GenerateHandle, GenerationRequest, Grammar, LazyConstraint, GenerationStream, SamplingParams, TokenLogprob,
};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::pin::Pin;

/// Sampling and limit fields shared by both endpoints (OpenAI's, plus vLLM's `top_k`,
/// `min_p`, `repetition_penalty`, `ignore_eos`).
#[derive(Debug, Default, Deserialize)]
#[derive(utoipa::ToSchema)]
pub struct Common {
    pub model: String,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub min_p: Option<f32>,
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub logit_bias: Option<HashMap<String, f32>>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub n: Option<usize>,
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub ignore_eos: Option<bool>,
    /// `{"type": "text"}`, `{"type": "json_object"}`, `{"type": "json_schema", "json_schema":
    /// {"name", "schema", "strict"}}`, or ragway's `{"type": "regex", "pattern"}` and
    /// `{"type": "grammar", "grammar"}` (Lark, llguidance's dialect).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<Value>,
    /// Everything else: accepted when it is an OpenAI field ragway can honour by ignoring it,
    /// refused otherwise (a typo must not pass silently).
    #[serde(flatten)]
    #[schema(ignore)]
    pub extra: Map<String, Value>,
}

impl Common {
    /// The seed as a routing key for template splits.
    pub fn seed_key(&self) -> Option<u64> {
        self.seed.map(|s| s as u64)
    }

    pub fn max_tokens_usize(&self) -> Option<usize> {
        self.max_completion_tokens.or(self.max_tokens).map(|m| usize::try_from(m).unwrap_or(usize::MAX))
    }
}

#[derive(Debug, Deserialize)]
#[derive(utoipa::ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Default, Deserialize)]
#[derive(utoipa::ToSchema)]
pub struct ChatRequest {
    pub messages: Value,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<usize>,
    /// Function tools: `[{"type": "function", "function": {"name", "description", "parameters"}}]`.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Value>,
    /// `none`, `auto` (the default with tools), `required`, or `{"type": "function", "function": {"name"}}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<Value>,
    /// Whether one turn may hold several calls (default true).
    #[serde(default)]
    #[schema(value_type = Option<bool>)]
    pub parallel_tool_calls: Option<Value>,
    #[serde(flatten)]
    pub common: Common,
}

#[derive(Debug, Deserialize)]
#[derive(utoipa::ToSchema)]
pub struct CompletionRequest {
    pub prompt: Value,
    #[serde(default)]
    pub logprobs: Option<usize>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(flatten)]
    pub common: Common,
}

/// OpenAI fields that change nothing here.
const IGNORED: &[&str] = &["user", "store", "metadata", "service_tier", "stream_options"];

fn check_extra(extra: &Map<String, Value>) -> Result<(), ServiceError> {
    for (k, v) in extra {
        if IGNORED.contains(&k.as_str()) || v.is_null() {
            continue;
        }
        let msg = match k.as_str() {
            "tools" | "tool_choice" | "parallel_tool_calls" => {
                format!("`{k}` is a chat completions parameter; /v1/completions takes `response_format`")
            }
            "functions" | "function_call" => format!("`{k}` is deprecated by OpenAI; use `tools` and `tool_choice`"),
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
pub fn generator(state: &AppState, model: &str) -> Result<GenerateHandle, ServiceError> {
    state.registry.route(model, ModelKind::Generation, None, None, &|_| None)?.local_generator("model", "this")
}

/// Builds one engine request (without its prompt) from the shared fields; the fields it
/// leaves unset take the engine's defaults (the model's recommendations, then ragway's), and
/// an unset `max_tokens` the engine's cap.
pub fn template_request(c: &Common, logprobs: Option<usize>, h: &GenerateHandle) -> Result<GenerationRequest, ServiceError> {
    request_over(c, logprobs, h.tokenizer().vocab_size(), h.default_sampling(), None, Vec::new())
}

/// The engine request of `c` over defaults (a prompt template's parameters): fields the
/// request sets win.
pub fn request_over(
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
        constraint: None,
        lazy: None,
    })
}

/// Parses OpenAI chat messages (text parts only; `developer` is `system`) and applies the
/// prompt-size limit to their text.
pub fn chat_messages(v: &Value) -> Result<Vec<ChatMessage>, ServiceError> {
    let arr = v.as_array().ok_or_else(|| ServiceError::invalid("messages", "messages must be an array"))?;
    if arr.is_empty() {
        return Err(ServiceError::invalid("messages", "messages must contain at least one message"));
    }
    let messages = arr
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let param = format!("messages[{i}]");
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ServiceError::invalid(&param, format!("{param}.role must be a string")))?;
            let role = match role {
                "system" | "user" | "assistant" | "tool" => role,
                "developer" => "system",
                other => {
                    return Err(ServiceError::invalid(
                        format!("{param}.role"),
                        format!("unsupported role `{other}` (system, developer, user, assistant, tool)"),
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
            let mut msg = ChatMessage::new(role, content);
            if role == "assistant" {
                msg.tool_calls = assistant_calls(m.get("tool_calls"), &param)?;
            }
            if role == "tool" {
                let id = m.get("tool_call_id").and_then(Value::as_str).ok_or_else(|| {
                    ServiceError::invalid(format!("{param}.tool_call_id"), "a tool message needs its tool_call_id")
                })?;
                msg.tool_call_id = Some(id.to_string());
            }
            Ok(msg)
        })
        .collect::<Result<Vec<_>, _>>()?;
    // A tool result carries the name of the function whose call it answers.
    let mut names: HashMap<String, String> = HashMap::new();
    let mut messages = messages;
    for m in &mut messages {
        for c in m.tool_calls.as_ref().and_then(Value::as_array).into_iter().flatten() {
            if let (Some(id), Some(name)) = (c["id"].as_str(), c["function"]["name"].as_str()) {
                names.insert(id.to_string(), name.to_string());
            }
        }
        if let Some(id) = &m.tool_call_id {
            m.name = names.get(id).cloned();
        }
    }
    // The prompt-size limit, before anything renders or tokenizes the messages.
    crate::service::limits::check_prompt_bytes(messages.iter().map(|m| m.content.len()).sum(), "messages")?;
    Ok(messages)
}

/// An assistant message's `tool_calls`, with each call's `arguments` (a JSON string in
/// OpenAI's format) parsed into the object templates expect.
fn assistant_calls(v: Option<&Value>, param: &str) -> Result<Option<Value>, ServiceError> {
    let calls = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) if a.len() <= crate::service::structured::MAX_TOOLS => a,
        Some(_) => {
            return Err(ServiceError::invalid(
                format!("{param}.tool_calls"),
                format!("tool_calls must be an array of at most {} calls", crate::service::structured::MAX_TOOLS),
            ))
        }
    };
    let mut out = Vec::with_capacity(calls.len());
    for (j, c) in calls.iter().enumerate() {
        let p = format!("{param}.tool_calls[{j}]");
        let f = c.get("function").and_then(Value::as_object);
        let (Some(id), Some(name), Some(args)) = (
            c.get("id").and_then(Value::as_str),
            f.and_then(|f| f.get("name")).and_then(Value::as_str),
            f.and_then(|f| f.get("arguments")),
        ) else {
            return Err(ServiceError::invalid(p, "a tool call is {\"id\", \"type\": \"function\", \"function\": {\"name\", \"arguments\"}}"));
        };
        let arguments = match args {
            Value::String(s) => serde_json::from_str::<Value>(s).map_err(|e| {
                ServiceError::invalid(format!("{p}.function.arguments"), format!("arguments must be JSON text: {e}"))
            })?,
            other => other.clone(),
        };
        out.push(serde_json::json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}));
    }
    Ok(Some(Value::Array(out)))
}

pub fn completion_prompts(v: &Value, h: &GenerateHandle) -> Result<Vec<Vec<u32>>, ServiceError> {
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
pub fn submit_all(
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

/// Events of every prompt's stream, tagged with the choice index `prompt * n + index`.
pub type Events = Pin<Box<dyn Stream<Item = (usize, GenEvent)> + Send>>;

pub fn merge(streams: Vec<GenerationStream>, n: usize) -> Events {
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

/// One choice, gathered to its end.
pub struct Choice {
    pub text: String,
    pub finish: Option<&'static str>,
    pub completion_tokens: usize,
    pub prompt_tokens: usize,
    /// Each generated token's logprob and alternatives, when they were asked for.
    pub logprobs: Vec<TokenLogprob>,
}

/// Collects the events of `choices` sequences into whole choices (`echo`: each prompt's
/// text, put before its `n` choices).
pub async fn gather(mut events: Events, choices: usize, echo: Option<&[String]>, n: usize) -> Result<Vec<Choice>, ServiceError> {
    let mut out: Vec<Choice> = (0..choices)
        .map(|i| Choice {
            text: echo.map(|e| e[i / n].clone()).unwrap_or_default(),
            finish: None,
            completion_tokens: 0,
            prompt_tokens: 0,
            logprobs: Vec::new(),
        })
        .collect();
    let mut done = 0;
    while let Some((_, ev)) = events.next().await {
        match ev {
            GenEvent::Token { index, text, logprob, .. } => {
                let c = &mut out[index];
                c.text.push_str(&text);
                c.logprobs.extend(logprob);
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

/// The usage of gathered choices, charged to `caller`.
pub fn usage(choices: &[Choice], n: usize, caller: Option<&Principal>) -> Usage {
    // Each prompt counts once, however many sequences it has.
    let prompt: usize = choices.iter().step_by(n.max(1)).map(|c| c.prompt_tokens).sum();
    let completion: usize = choices.iter().map(|c| c.completion_tokens).sum();
    Usage::charged(prompt, completion, caller)
}

pub fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}{:08x}", random_seed(), random_seed() as u32)
}

/// A chat request admitted by the engine: its events, as both the REST handler and the
/// GraphQL resolvers consume them.
pub struct StartedChat {
    pub h: GenerateHandle,
    pub events: Events,
    pub n: usize,
    pub prompt_tokens: usize,
    /// `Some(top_logprobs)` when logprobs were asked for.
    pub top: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// With tools on: how calls are read out of the text.
    pub tools: Option<ToolOutput>,
}

/// How a chat's text turns into `tool_calls`.
#[derive(Debug, Clone, Copy)]
pub struct ToolOutput {
    pub format: ToolFormat,
    /// Required or named: the whole output is calls.
    pub forced: bool,
}

/// `grammar` compiled for `h`; its errors name `param`, the request field it came from.
pub fn compile(h: &GenerateHandle, grammar: &Grammar, param: &str) -> Result<Constraint, ServiceError> {
    h.compile(grammar, param).map_err(|e| ServiceError::from_engine(e, param))
}

/// `response_format` of a request, compiled for `h` (checked before anything is queued).
pub fn output_constraint(h: &GenerateHandle, c: &Common) -> Result<Option<Constraint>, ServiceError> {
    let format = structured::response_format(c.response_format.as_ref())?;
    format.map(|g| compile(h, &g, "response_format")).transpose()
}

/// Validates a chat request, renders and tokenizes its prompt, and queues it.
pub fn start_chat(state: &AppState, req: ChatRequest) -> Result<StartedChat, ServiceError> {
    let h = generator(state, &req.common.model)?;
    start_chat_on(h, req)
}

/// [`start_chat`] on a given engine.
pub fn start_chat_on(h: GenerateHandle, req: ChatRequest) -> Result<StartedChat, ServiceError> {
    let top = if req.logprobs.unwrap_or(false) {
        Some(req.top_logprobs.unwrap_or(0))
    } else if req.top_logprobs.is_some_and(|k| k > 0) {
        return Err(ServiceError::invalid("top_logprobs", "top_logprobs requires logprobs: true"));
    } else {
        None
    };
    let mut template = template_request(&req.common, top, &h)?;
    let messages = chat_messages(&req.messages)?;
    let chat_template = h.chat_template().ok_or_else(|| {
        ServiceError::invalid(
            "messages",
            "this model has no chat template; use /v1/completions or configure --chat-template",
        )
    })?;
    let tools = Tools::parse(req.tools.as_ref(), req.tool_choice.as_ref(), req.parallel_tool_calls.as_ref())?;
    let active = tools.as_ref().filter(|t| t.choice != ToolChoice::None);
    let (format, native) = ToolFormat::of(chat_template);
    let output_format = structured::response_format(req.common.response_format.as_ref())?;
    if output_format.is_some() && active.is_some() {
        return Err(ServiceError::invalid(
            "response_format",
            "response_format cannot be combined with tools the model may call; set tool_choice to none, or drop response_format",
        ));
    }
    template.constraint = match (active.and_then(|t| t.grammar(format)), output_format) {
        (Some(g), _) => Some(compile(&h, &g, "tools")?),
        (None, Some(g)) => Some(compile(&h, &g, "response_format")?),
        (None, None) => None,
    };
    if let Some((trigger, g)) = active.and_then(|t| t.lazy_grammar(format)) {
        let constraint = compile(&h, &g, "tools")?;
        template.lazy = Some(LazyConstraint { trigger, constraint, anchored: format == ToolFormat::Bare });
    }
    let messages = structured::prepare_messages(messages, tools.as_ref(), native);
    let rendered = chat_template
        .render_with_tools(&messages, active.filter(|_| native).map(|t| &t.defs), true)
        .map_err(|e| ServiceError::from_engine(e, "messages"))?;
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
        tools: active.map(|t| ToolOutput { format, forced: t.forced() }),
    })
}

/// One finished chat choice (for GraphQL's `generate`).
pub struct ChatOutcome {
    pub text: String,
    pub finish_reason: Option<&'static str>,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// Runs a started chat to the end; charges the caller's token budget.
pub async fn finish_chat(started: StartedChat, caller: Option<&Principal>) -> Result<Vec<ChatOutcome>, ServiceError> {
    let choices = gather(started.events, started.n, None, started.n).await?;
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

