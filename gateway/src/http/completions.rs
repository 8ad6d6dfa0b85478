//! `POST /v1/chat/completions` and `POST /v1/completions` in OpenAI's format, streaming (SSE)
//! or not: the REST shapes over `service::completions`. A response either gathers the
//! events into one body or forwards them as chunks as they are decoded (`http::sse`). A
//! client that disconnects drops the stream, which cancels its sequences.

use crate::app::AppState;
use crate::http::dispatch::{self as dispatch, parse_body, Endpoint};
use crate::http::middleware::{op, Authorized};
use crate::http::openai::{AssistantMessage, ChatChoice, ChatCompletion, ChatLogprobs, TextChoice, TextCompletion, TextLogprobs};
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::http::sse::{self, ChoiceFormat, Encoder};
use crate::service::auth::Principal;
use crate::service::completions::{
    completion_prompts, gather, merge, new_id, output_constraint, start_chat_on, submit_all, template_request, usage, ChatRequest,
    CompletionRequest, StartedChat,
};
use crate::service::error::ServiceError;
use crate::service::structured::{finish_reason, split_calls};
use crate::service::usage::Usage;
use actix_web::web::Bytes;
use actix_web::{post, web, HttpRequest, HttpResponse};
use futures::stream;
use ragway_engine::generate::GenerateHandle;
use serde_json::Value;
use std::sync::Arc;


#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    request_body = ChatRequest,
    responses((status = 200, description = "`chat.completion`, or with `stream` an SSE stream of `chat.completion.chunk` ending with `data: [DONE]`", body = ChatCompletion), ApiErrors)
)]
#[post("/v1/chat/completions")]
pub async fn chat(who: Authorized<op::Chat>, http: HttpRequest, state: web::Data<AppState>, body: web::Json<Value>) -> Result<HttpResponse, ServiceError> {
    let raw = body.into_inner();
    let mut req: ChatRequest = parse_body(&raw)?;
    let Some(rag) = req.common.extra.remove("rag").filter(|v| !v.is_null()) else {
        let model = req.common.model.clone();
        return dispatch::handle(&state, &http, &model, raw, dispatch::Request::Chat(req)).await;
    };
    let routed = dispatch::route(&state, &http, Endpoint::Chat, &req.common.model, &raw)?;
    let started = std::time::Instant::now();
    let result = match routed.local_generator("rag", "`rag`") {
        Ok(h) => chat_rag(Some(who.principal), state.clone(), h, req, rag, routed.served_as()).await,
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
    let StartedChat { h, events, n, prompt_tokens, top, stream, include_usage, tools } =
        crate::service::limits::blocking(move || start_chat_on(h, req)).await?;
    let id = new_id("chatcmpl");
    if stream {
        let enc = Encoder::new(h, ChoiceFormat::Chat, id, model, include_usage).with_tools(tools);
        return Ok(sse::response(sse::body(enc, events, n, prompt_tokens, caller, None)));
    }
    let choices = gather(events, n, None, n).await?;
    let usage = usage(&choices, n, caller.as_deref());
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let (message, finish_reason) = match tools {
                Some(t) => {
                    let (content, calls) = split_calls(t.format, t.forced, &c.text);
                    let reason = c.finish.map(|f| finish_reason(f, calls.len()));
                    (AssistantMessage::with_calls(content, calls), reason)
                }
                None => (AssistantMessage::new(c.text), c.finish),
            };
            ChatChoice {
                index: i,
                logprobs: top.is_some().then(|| ChatLogprobs::of(h.tokenizer(), &c.logprobs)),
                finish_reason,
                message,
            }
        })
        .collect();
    Ok(HttpResponse::Ok().json(ChatCompletion::new(id, model, choices, usage, None)))
}

/// A chat completion answered with retrieval (`rag` in the body): the last user message is
/// the question, earlier turns the history; the response is a normal `chat.completion`
/// with an extra `rag` field (citations, uncited passages, grounding, template), and a
/// stream ends with a chunk carrying `rag` and `choices: []` before `[DONE]`.
async fn chat_rag(
    caller: Option<Arc<Principal>>,
    state: web::Data<AppState>,
    h: GenerateHandle,
    req: ChatRequest,
    rag: Value,
    model: String,
) -> Result<HttpResponse, ServiceError> {
    use crate::service::rag as r;
    let top = if req.logprobs.unwrap_or(false) { Some(req.top_logprobs.unwrap_or(0)) } else { None };
    let options = r::parse_options(rag)?;
    let (pipe, prepared) = r::start(&state, &h, &req.common, top, options, None, Some(&req.messages)).await?;
    let (cp, cc) = prepared.condense_tokens;
    let id = new_id("chatcmpl");
    let stream = req.common.stream.unwrap_or(false);
    let include_usage = req.common.stream_options.as_ref().is_some_and(|o| o.include_usage);
    if let Some(dk) = prepared.dont_know.clone() {
        let ans = r::finish(&state, pipe, prepared, dk.clone(), false).await?;
        let usage = Usage::uncharged(cp, cc);
        if !stream {
            let choice = ChatChoice { index: 0, message: AssistantMessage::new(dk), logprobs: None, finish_reason: Some("stop") };
            return Ok(HttpResponse::Ok().json(ChatCompletion::new(
                id,
                model,
                vec![choice],
                usage,
                Some(r::rag_extra(&ans)),
            )));
        }
        let enc = Encoder::new(h, ChoiceFormat::Chat, id, model, include_usage);
        let mut out = Vec::new();
        for part in [enc.role(0), enc.text(0, dk, None), enc.finish(0, "stop"), enc.rag(r::rag_extra(&ans)), enc.end(usage)] {
            out.extend_from_slice(&part);
        }
        return Ok(sse::response(stream::iter([Ok::<_, actix_web::Error>(Bytes::from(out))])));
    }
    let greq = r::engine_request(&req.common, &h, &prepared, top)?;
    let prompt_tokens = greq.prompt.len();
    let streams = submit_all(&h, &greq, vec![greq.prompt.clone()], "messages")?;
    let events = merge(streams, 1);
    if stream {
        let tail = crate::http::rag::tail(state.clone().into_inner(), pipe, prepared, r::wants_cited(&req.common));
        let enc = Encoder::new(h, ChoiceFormat::Chat, id, model, include_usage);
        return Ok(sse::response(sse::body(enc, events, 1, prompt_tokens + cp, caller, Some(tail))));
    }
    let mut choices = gather(events, 1, None, 1).await?;
    let c = choices.remove(0);
    let ans = r::finish(&state, pipe, prepared, c.text.clone(), r::wants_cited(&req.common)).await?;
    let usage = Usage::charged(c.prompt_tokens + cp, c.completion_tokens + cc, caller.as_deref());
    let choice = ChatChoice {
        index: 0,
        logprobs: top.is_some().then(|| ChatLogprobs::of(h.tokenizer(), &c.logprobs)),
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
    let mut template = template_request(&req.common, req.logprobs, &h)?;
    let (prompts, constraint, h, req) = crate::service::limits::blocking(move || {
        Ok((completion_prompts(&req.prompt, &h)?, output_constraint(&h, &req.common)?, h, req))
    })
    .await?;
    template.constraint = constraint;
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
        let enc = Encoder::new(h, ChoiceFormat::Text, id, model, include_usage);
        return Ok(sse::response(sse::body(enc, events, total, prompt_tokens.iter().sum(), caller, None)));
    }
    let choices = gather(events, total, echo_texts.as_deref(), n).await?;
    let usage = usage(&choices, n, caller.as_deref());
    let choices = choices
        .into_iter()
        .enumerate()
        .map(|(i, c)| TextChoice {
            index: i,
            logprobs: req.logprobs.is_some().then(|| TextLogprobs::of(h.tokenizer(), &c.logprobs)),
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
    use crate::service::completions::{chat_messages, request_over};
    use ragway_engine::generate::SamplingParams;
    use proptest::prelude::*;
    use serde_json::json;

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
            Just(json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}})),
            Just(json!({"type": "regex"})),
            Just(json!({"1": 5.0, "x": 1})),
            Just(json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])),
            Just(json!([{"type": "function", "function": {"name": "f g"}}, {"type": "function"}])),
            Just(json!({"type": "function", "function": {"name": "f"}})),
            Just(json!("required")),
            Just(json!([{"role": "assistant", "content": null, "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
                        {"role": "tool", "tool_call_id": "c", "content": "ok"}])),
            Just(json!([{"role": "assistant", "tool_calls": [{"id": 3, "function": {"arguments": "{"}}]}, {"role": "tool"}])),
        ]
    }

    fn body() -> impl Strategy<Value = Value> {
        let key = prop_oneof![
            Just("model"), Just("messages"), Just("prompt"), Just("max_tokens"), Just("max_completion_tokens"),
            Just("temperature"), Just("top_p"), Just("top_k"), Just("min_p"), Just("n"), Just("stop"), Just("seed"),
            Just("logprobs"), Just("top_logprobs"), Just("logit_bias"), Just("stream"), Just("stream_options"),
            Just("presence_penalty"), Just("frequency_penalty"), Just("repetition_penalty"), Just("echo"),
            Just("response_format"), Just("tools"), Just("tool_choice"), Just("parallel_tool_calls"), Just("input"), Just("encoding_format"), Just("dimensions"),
            Just("user"), Just("bogus"),
        ];
        prop::collection::vec((key, field_value()), 0..10)
            .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
    }

    proptest! {
        #[test]
        fn request_bodies_parse_and_validate_without_panicking(raw in body(), vocab in 1usize..200_000) {
            if let Ok(req) = dispatch::parse_body::<ChatRequest>(&raw) {
                let _ = chat_messages(&req.messages);
                if let Ok(Some(t)) = crate::service::structured::Tools::parse(req.tools.as_ref(), req.tool_choice.as_ref(), req.parallel_tool_calls.as_ref()) {
                    let _ = t.grammar(crate::service::structured::ToolFormat::Tagged);
                    let _ = t.lazy_grammar(crate::service::structured::ToolFormat::Tagged);
                }
                let _ = crate::service::structured::response_format(req.common.response_format.as_ref());
                if let Ok(r) = request_over(&req.common, req.top_logprobs, vocab, SamplingParams::server_default(), None, Vec::new()) {
                    prop_assert!((1..=16).contains(&r.n));
                    prop_assert!(r.max_tokens.is_none_or(|m| m >= 1));
                }
            }
            if let Ok(req) = dispatch::parse_body::<CompletionRequest>(&raw) {
                let _ = request_over(&req.common, req.logprobs, vocab, SamplingParams::server_default(), None, Vec::new());
            }
            if let Ok(req) = dispatch::parse_body::<crate::http::embeddings::EmbeddingsRequest>(&raw) {
                let _ = crate::http::embeddings::parse_input(&req.input);
            }
        }
    }
}
