//! `POST /v1/rag`: retrieval-augmented answers with citations and a grounding check, and
//! the same pipeline behind `POST /v1/chat/completions` with an extra `rag` object (so
//! OpenAI clients reach it through `extra_body`). The pipeline itself lives in
//! `ragway_prompts::rag`, its requests and answers in `service::rag`; this module serves
//! the REST endpoint and its event stream.

use crate::app::AppState;
use crate::http::middleware::{op, Authorized};
#[allow(unused_imports)]
use crate::http::openapi::*;
use crate::http::sse;
use crate::service::completions::generator;
use crate::service::completions::new_id;
use crate::service::error::ServiceError;
use crate::service::rag::*;
use actix_web::web::Bytes;
use actix_web::{post, web, HttpResponse};
use futures::channel::mpsc;
use ragway_engine::generate::GenEvent;
use ragway_prompts::rag::{Pipeline, Prepared};
use serde_json::{json, Value};
use std::sync::Arc;

#[utoipa::path(
    post,
    path = "/v1/rag",
    tag = "rag",
    request_body = RagBody,
    responses((status = 200, description = "`rag.answer`: `answer`, `citations`, `uncited`, `grounding`, `template`, `usage`; with `stream`, SSE events `context`, `token`..., `final`, then `data: [DONE]`", body = RagResponse), ApiErrors)
)]
#[post("/v1/rag")]
pub async fn rag(who: Authorized<op::Rag>, state: web::Data<AppState>, body: web::Json<Value>) -> Result<HttpResponse, ServiceError> {
    let body = parse_body(&state, body.into_inner())?;
    let caller = Some(who.principal);
    if !body.common.stream.unwrap_or(false) {
        return Ok(HttpResponse::Ok().json(answer(&state, body, caller.as_deref()).await?));
    }
    // Streaming: everything up to the prompt happens before the response head, so bad
    // requests still get their status code.
    let h = generator(&state, &body.common.model)?.clone();
    if body.answer.is_some() {
        return Err(ServiceError::invalid("answer", "`answer` cannot be combined with `stream`"));
    }
    let (pipe, prepared) = start(&state, &h, &body.common, None, body.options, body.query, body.messages.as_ref()).await?;
    let gen = match &prepared.dont_know {
        Some(_) => None,
        None => Some(engine_request(&body.common, &h, &prepared, None)?),
    };
    let stream = match gen {
        Some(r) => Some(h.submit(r).map_err(|e| ServiceError::from_engine(e, "messages"))?),
        None => None,
    };
    let cited = wants_cited(&body.common);
    let (tx, rx) = mpsc::unbounded::<Result<Bytes, actix_web::Error>>();
    let state = state.into_inner();
    let id = new_id("rag");
    let model = h.model_id().to_string();
    actix_web::rt::spawn(async move {
        let send = |v: Value| tx.unbounded_send(Ok(sse::event(&v))).is_ok();
        let context = json!({"type": "context", "id": id, "question": prepared.question, "template": prepared.template,
            "passages": prepared.passages});
        if !send(context) {
            return;
        }
        let (cp, cc) = prepared.condense_tokens;
        let (text, finish_reason, pt, ct) = match (stream, &prepared.dont_know) {
            (None, dk) => {
                let dk = dk.clone().unwrap_or_default();
                if !send(json!({"type": "token", "text": dk})) {
                    return;
                }
                (dk, "stop", 0, 0)
            }
            (Some(mut s), _) => {
                let mut text = String::new();
                let mut end = None;
                while let Some(ev) = s.next().await {
                    match ev {
                        GenEvent::Token { text: t, .. } | GenEvent::Text { text: t, .. } => {
                            if t.is_empty() {
                                continue;
                            }
                            text.push_str(&t);
                            // A gone client drops the engine stream here, which cancels it.
                            if !send(json!({"type": "token", "text": t})) {
                                return;
                            }
                        }
                        GenEvent::Done { finish_reason, prompt_tokens, completion_tokens, .. } => {
                            end = Some((finish_reason.as_str(), prompt_tokens, completion_tokens));
                            break;
                        }
                        GenEvent::Error { message } => {
                            send(ServiceError::internal(message).body());
                            return;
                        }
                    }
                }
                let Some((f, p, c)) = end else { return };
                (text, f, p, c)
            }
        };
        match finish(&state, pipe, prepared, text, cited).await {
            Ok(ans) => {
                let mut v = serde_json::to_value(&ans).unwrap_or_default();
                v["type"] = json!("final");
                v["id"] = json!(id);
                v["model"] = json!(model);
                v["finish_reason"] = json!(finish_reason);
                v["usage"] = usage_json(cp + pt, cc + ct, caller.as_deref());
                send(v);
            }
            Err(e) => {
                send(e.body());
            }
        }
        let _ = tx.unbounded_send(Ok(Bytes::from_static(b"data: [DONE]\n\n")));
    });
    Ok(sse::response(rx))
}

/// The tail of a streamed chat completion with `rag`: cites and checks the finished text.
pub(crate) fn tail(state: Arc<AppState>, pipe: Pipeline, prepared: Prepared, cited: bool) -> crate::http::sse::Tail {
    Box::new(move |text: String| {
        Box::pin(async move {
            match finish(&state, pipe, prepared, text, cited).await {
                Ok(ans) => rag_extra(&ans),
                Err(e) => e.body(),
            }
        })
    })
}
