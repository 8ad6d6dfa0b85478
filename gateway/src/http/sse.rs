//! The one SSE encoder of the OpenAI endpoints: typed chunks (`http::openai`) as the engine
//! decodes, a final usage chunk on request, then `data: [DONE]`.

use crate::http::openai::{
    ChatChunkChoice, ChatLogprobs, CompletionChunk, Delta, FunctionDelta, TextChunkChoice, TextLogprobs, ToolCallDelta,
};
use crate::service::completions::ToolOutput;
use crate::service::structured::{self, Piece, ToolParser};
use crate::service::auth::Principal;
use crate::service::completions::Events;
use crate::service::usage::Usage;
use actix_web::web::Bytes;
use actix_web::HttpResponse;
use futures::stream::{self, Stream, StreamExt};
use ragway_engine::generate::{GenEvent, GenerateHandle, TokenLogprob};
use serde::Serialize;
use serde_json::Value;
use std::pin::Pin;
use std::sync::Arc;

/// The stream's choice shape: chat deltas or text pieces.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum ChoiceFormat {
    Chat,
    Text,
}

const DONE: &[u8] = b"data: [DONE]\n\n";

/// One server-sent event carrying `v` as JSON.
pub(crate) fn event<T: Serialize>(v: &T) -> Bytes {
    // The chunk types hold only strings, numbers and JSON values: serializing cannot fail.
    Bytes::from(format!("data: {}\n\n", serde_json::to_string(v).unwrap_or_default()))
}

/// Builds the chunks of one response: its id, model, creation time and shape are fixed.
#[derive(Clone)]
pub(crate) struct Encoder {
    h: GenerateHandle,
    format: ChoiceFormat,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    /// Chat with tools: each choice's text goes through a [`ToolParser`].
    tools: Option<ToolOutput>,
}

impl Encoder {
    pub(crate) fn new(h: GenerateHandle, format: ChoiceFormat, id: String, model: String, include_usage: bool) -> Self {
        Self { h, format, id, model, created: crate::service::now(), include_usage, tools: None }
    }

    /// Reads tool calls out of the choices' text.
    pub(crate) fn with_tools(mut self, tools: Option<ToolOutput>) -> Self {
        self.tools = tools;
        self
    }

    fn chunk<C: Serialize>(&self, choices: Vec<C>) -> CompletionChunk<C> {
        CompletionChunk {
            id: self.id.clone(),
            object: match self.format {
                ChoiceFormat::Chat => "chat.completion.chunk",
                ChoiceFormat::Text => "text_completion",
            },
            created: self.created,
            model: self.model.clone(),
            system_fingerprint: None,
            choices,
            usage: self.include_usage.then_some(None),
            rag: None,
        }
    }

    /// One choice's chunk. `text` is the chat delta's content or the text choice's text
    /// (`None`: a chat delta without content, an empty text).
    fn choice(
        &self,
        index: usize,
        role: Option<&'static str>,
        text: Option<String>,
        lp: Option<&TokenLogprob>,
        finish: Option<&'static str>,
    ) -> Bytes {
        let tok = self.h.tokenizer();
        match self.format {
            ChoiceFormat::Chat => event(&self.chunk(vec![ChatChunkChoice {
                index,
                delta: Delta { role, content: text, tool_calls: None },
                logprobs: lp.map(|lp| ChatLogprobs::of(tok, std::slice::from_ref(lp))),
                finish_reason: finish,
            }])),
            ChoiceFormat::Text => event(&self.chunk(vec![TextChunkChoice {
                index,
                text: text.unwrap_or_default(),
                logprobs: lp.map(|lp| TextLogprobs::of(tok, std::slice::from_ref(lp))),
                finish_reason: finish,
            }])),
        }
    }

    /// A chat choice's first chunk: the role, as OpenAI's streams begin.
    pub(crate) fn role(&self, index: usize) -> Bytes {
        self.choice(index, Some("assistant"), Some(String::new()), None, None)
    }

    /// Decoded text (and its token's logprobs, when asked for).
    pub(crate) fn text(&self, index: usize, text: String, lp: Option<&TokenLogprob>) -> Bytes {
        self.choice(index, None, Some(text), lp, None)
    }

    /// Part of a choice's text as read by its tool-call parser: content, or a call's start
    /// or arguments in OpenAI's `tool_calls` delta format.
    pub(crate) fn piece(&self, index: usize, piece: Piece) -> Bytes {
        let call = |i: usize, id: Option<String>, name: Option<String>, arguments: String| {
            event(&self.chunk(vec![ChatChunkChoice {
                index,
                delta: Delta {
                    role: None,
                    content: None,
                    tool_calls: Some(vec![ToolCallDelta {
                        index: i,
                        kind: id.as_ref().map(|_| "function"),
                        id,
                        function: FunctionDelta { name, arguments },
                    }]),
                },
                logprobs: None,
                finish_reason: None,
            }]))
        };
        match piece {
            Piece::Content(text) => self.text(index, text, None),
            Piece::CallStart { index: i, id, name } => call(i, Some(id), Some(name), String::new()),
            Piece::Arguments { index: i, text } => call(i, None, None, text),
        }
    }

    /// A choice's last chunk.
    pub(crate) fn finish(&self, index: usize, reason: &'static str) -> Bytes {
        self.choice(index, None, None, None, Some(reason))
    }

    /// The chunk after the choices that carries a RAG answer's citations.
    pub(crate) fn rag(&self, extra: Value) -> Bytes {
        let mut c = self.chunk::<ChatChunkChoice>(Vec::new());
        c.rag = Some(extra);
        event(&c)
    }

    /// The usage chunk (sent only with `stream_options.include_usage`), then `[DONE]`.
    pub(crate) fn end(&self, usage: Usage) -> Bytes {
        let mut out = Vec::new();
        if self.include_usage {
            let mut c = self.chunk::<ChatChunkChoice>(Vec::new());
            c.usage = Some(Some(usage));
            out.extend_from_slice(&event(&c));
        }
        out.extend_from_slice(DONE);
        Bytes::from(out)
    }
}

/// Work run on a finished stream's text (choice 0), whose value rides in an extra final
/// chunk (`choices: []`, `rag: {...}`): how chat completions with `rag` return citations.
pub(crate) type Tail = Box<dyn FnOnce(String) -> Pin<Box<dyn std::future::Future<Output = Value>>>>;

/// The SSE body of `choices` sequences: chunks as the engine decodes, then the usage chunk
/// (charged to `caller`) and `[DONE]`. `prompt_tokens` is the request's whole prompt count.
pub(crate) fn body(
    enc: Encoder,
    events: Events,
    choices: usize,
    prompt_tokens: usize,
    caller: Option<Arc<Principal>>,
    tail: Option<Tail>,
) -> impl Stream<Item = Result<Bytes, actix_web::Error>> {
    struct St {
        events: Events,
        done: usize,
        completion_tokens: usize,
        finished: bool,
        started: Vec<bool>,
        tail: Option<Tail>,
        text: String,
        parsers: Vec<ToolParser>,
    }
    let parsers = match enc.tools {
        Some(t) => (0..choices).map(|_| ToolParser::new(t.format, t.forced)).collect(),
        None => Vec::new(),
    };
    let st = St {
        events,
        done: 0,
        completion_tokens: 0,
        finished: false,
        started: vec![false; choices],
        tail,
        text: String::new(),
        parsers,
    };
    stream::unfold(st, move |mut st| {
        let enc = enc.clone();
        let caller = caller.clone();
        async move {
            if st.finished {
                return None;
            }
            let open = |started: &mut Vec<bool>, index: usize, out: &mut Vec<u8>| {
                if enc.format == ChoiceFormat::Chat && !std::mem::replace(&mut started[index], true) {
                    out.extend_from_slice(&enc.role(index));
                }
            };
            let mut out: Vec<u8> = Vec::new();
            loop {
                let Some((_, ev)) = st.events.next().await else {
                    st.finished = true;
                    out.extend_from_slice(DONE);
                    break;
                };
                match ev {
                    GenEvent::Token { index, text, logprob, .. } => {
                        open(&mut st.started, index, &mut out);
                        if st.tail.is_some() && index == 0 {
                            st.text.push_str(&text);
                        }
                        if let Some(p) = st.parsers.get_mut(index) {
                            let pieces = p.push(&text);
                            if pieces.is_empty() {
                                continue;
                            }
                            // Logprobs describe content: they ride on the token's content piece.
                            let mut lp = logprob;
                            for piece in pieces {
                                match piece {
                                    Piece::Content(t) => out.extend_from_slice(&enc.text(index, t, lp.take().as_ref())),
                                    call => out.extend_from_slice(&enc.piece(index, call)),
                                }
                            }
                            break;
                        }
                        if text.is_empty() && logprob.is_none() {
                            continue;
                        }
                        out.extend_from_slice(&enc.text(index, text, logprob.as_ref()));
                        break;
                    }
                    GenEvent::Text { index, text } => {
                        open(&mut st.started, index, &mut out);
                        if st.tail.is_some() && index == 0 {
                            st.text.push_str(&text);
                        }
                        if let Some(p) = st.parsers.get_mut(index) {
                            for piece in p.push(&text) {
                                out.extend_from_slice(&enc.piece(index, piece));
                            }
                            break;
                        }
                        out.extend_from_slice(&enc.text(index, text, None));
                        break;
                    }
                    GenEvent::Done { index, finish_reason, completion_tokens, .. } => {
                        open(&mut st.started, index, &mut out);
                        st.completion_tokens = st.completion_tokens.saturating_add(completion_tokens);
                        let mut reason = finish_reason.as_str();
                        if let Some(p) = st.parsers.get_mut(index) {
                            for piece in p.finish() {
                                out.extend_from_slice(&enc.piece(index, piece));
                            }
                            reason = structured::finish_reason(reason, p.calls());
                        }
                        out.extend_from_slice(&enc.finish(index, reason));
                        st.done += 1;
                        if st.done == choices {
                            let usage = Usage::charged(prompt_tokens, st.completion_tokens, caller.as_deref());
                            if let Some(tail) = st.tail.take() {
                                let extra = tail(std::mem::take(&mut st.text)).await;
                                out.extend_from_slice(&enc.rag(extra));
                            }
                            out.extend_from_slice(&enc.end(usage));
                            st.finished = true;
                        }
                        break;
                    }
                    GenEvent::Error { message } => {
                        // The status line is gone: report the failure in the stream itself.
                        let err = crate::service::error::ServiceError::internal(message).body();
                        out.extend_from_slice(&event(&err));
                        st.finished = true;
                        break;
                    }
                }
            }
            Some((Ok::<_, actix_web::Error>(Bytes::from(out)), st))
        }
    })
}

/// The HTTP response of an SSE body.
pub(crate) fn response(body: impl Stream<Item = Result<Bytes, actix_web::Error>> + 'static) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}
