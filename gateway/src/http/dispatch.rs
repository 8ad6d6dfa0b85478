//! What the OpenAI endpoints share once the registry has picked a version: running the request
//! on a local engine or passing it to the version's upstream pool (streams chunk by chunk),
//! labelling the response with the version, recording the outcome, and mirroring the request
//! to a shadow version whose answer is discarded.

use crate::service::error::ServiceError;
use crate::http::middleware::principal;
use crate::models::routing::Role;
use crate::models::upstream::{Pool, SseRewriter};
use crate::models::{ModelKind, Outcome, Routed, Target};
use crate::app::AppState;
use actix_web::http::StatusCode;
use actix_web::web::Bytes;
use actix_web::{web, HttpRequest, HttpResponse};
use futures::StreamExt;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The OpenAI endpoints that route by model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
    Embeddings,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }

    fn kind(self) -> ModelKind {
        match self {
            Endpoint::Embeddings => ModelKind::Embedding,
            _ => ModelKind::Generation,
        }
    }
}

/// A parsed request of one of the routed endpoints (what a local engine runs; upstreams get
/// the JSON body as it came).
pub enum Request {
    Chat(crate::service::completions::ChatRequest),
    Completions(crate::service::completions::CompletionRequest),
    Embeddings(crate::http::embeddings::EmbeddingsRequest),
}

impl Request {
    fn parse(endpoint: Endpoint, raw: &Value) -> Result<Self, ServiceError> {
        Ok(match endpoint {
            Endpoint::Chat => Request::Chat(parse_body(raw)?),
            Endpoint::Completions => Request::Completions(parse_body(raw)?),
            Endpoint::Embeddings => Request::Embeddings(parse_body(raw)?),
        })
    }

    fn endpoint(&self) -> Endpoint {
        match self {
            Request::Chat(_) => Endpoint::Chat,
            Request::Completions(_) => Endpoint::Completions,
            Request::Embeddings(_) => Endpoint::Embeddings,
        }
    }
}

/// Parses a JSON body into a request type, with the error `web::Json` would give.
pub fn parse_body<T: serde::de::DeserializeOwned>(raw: &Value) -> Result<T, ServiceError> {
    T::deserialize(raw).map_err(|e| ServiceError::invalid("body", format!("invalid JSON body: {e}")))
}

/// Picks the version of `model` for this request: sticky by the body's `user`, else by the
/// API key (when keys are on); the canary header is read from the request.
pub fn route(state: &AppState, http: &HttpRequest, endpoint: Endpoint, model: &str, raw: &Value) -> Result<Routed, ServiceError> {
    let user = raw.get("user").and_then(Value::as_str);
    let key = principal(http).filter(|_| state.keys.enabled());
    let header = |name: &str| http.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    state.registry.route(model, endpoint.kind(), user, key.as_ref().map(|p| p.name.as_str()), &header)
}

/// Sends `raw` to an upstream pool as `model` (the upstream's name for it) and passes the
/// answer back with `model` set to `served_as`: JSON as a whole, SSE line by line as the
/// chunks arrive. Upstream 4xx answers come back unchanged.
pub async fn proxy(pool: &Arc<Pool>, endpoint: Endpoint, mut raw: Value, upstream_model: &str, served_as: &str) -> Result<HttpResponse, ServiceError> {
    raw["model"] = json!(upstream_model);
    let stream = raw.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let (resp, guard) = pool.post(endpoint.path(), &raw).await.map_err(|e| ServiceError::upstream(&e))?;
    let status = StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let is_sse = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if stream && status.is_success() && is_sse {
        let rewriter = SseRewriter::new(served_as);
        let body = futures::stream::unfold(
            (resp.bytes_stream(), rewriter, guard, false),
            |(mut upstream, mut rw, guard, done)| async move {
                if done {
                    return None;
                }
                match upstream.next().await {
                    Some(Ok(b)) => Some((Ok::<_, actix_web::Error>(Bytes::from(rw.feed(&b))), (upstream, rw, guard, false))),
                    Some(Err(e)) => {
                        tracing::warn!(endpoint = guard.endpoint(), "upstream stream broke: {e}");
                        let err = json!({"error": {"message": format!("upstream {} broke off the stream: {e}", guard.endpoint()),
                            "type": "server_error", "param": null, "code": "upstream_error"}});
                        Some((Ok(crate::http::sse::event(&err)), (upstream, rw, guard, true)))
                    }
                    None => {
                        let rest = rw.finish();
                        (!rest.is_empty()).then(|| (Ok(Bytes::from(rest)), (upstream, rw, guard, true)))
                    }
                }
            },
        );
        return Ok(crate::http::sse::response(body));
    }
    let timeout = Duration::from_secs_f64(pool.spec.timeout_s);
    let bytes = match tokio::time::timeout(timeout, resp.bytes()).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return Err(ServiceError::upstream(&crate::models::upstream::UpstreamError::Failed(format!(
                "upstream {} broke off its answer: {e}",
                guard.endpoint()
            ))))
        }
        Err(_) => {
            return Err(ServiceError::upstream(&crate::models::upstream::UpstreamError::Timeout(format!(
                "upstream {} did not finish its answer within {} s",
                guard.endpoint(),
                pool.spec.timeout_s
            ))))
        }
    };
    let mut v: Value = serde_json::from_slice(&bytes).map_err(|_| {
        ServiceError::upstream(&crate::models::upstream::UpstreamError::Failed(format!(
            "upstream {} answered {status} with a body that is not JSON",
            guard.endpoint()
        )))
    })?;
    if v.get("model").is_some() {
        v["model"] = json!(served_as);
    }
    Ok(HttpResponse::build(status).json(v))
}

/// The whole of an endpoint's request after parsing (`req` is `raw` parsed): route by
/// `model`, run on the chosen version (here or upstream), label, record, mirror.
pub async fn handle(state: &web::Data<AppState>, http: &HttpRequest, model: &str, raw: Value, req: Request) -> Result<HttpResponse, ServiceError> {
    let endpoint = req.endpoint();
    let routed = route(state, http, endpoint, model, &raw)?;
    let started = Instant::now();
    let result = run(&routed, &raw, req, principal(http)).await;
    finish(state, routed, endpoint, raw, started, result)
}

/// Runs a routed request: `raw` proxied to the version's upstream pool, or `req` on its local
/// engine, answered as `name@version`.
async fn run(routed: &Routed, raw: &Value, req: Request, caller: Option<Arc<crate::service::auth::Principal>>) -> Result<HttpResponse, ServiceError> {
    use crate::http::{completions as c, embeddings as e};
    let served_as = routed.served_as();
    match (&routed.target, req) {
        (Target::Upstream(pool), req) => {
            let upstream_model = pool.spec.model.clone().unwrap_or_else(|| routed.name.clone());
            proxy(pool, req.endpoint(), raw.clone(), &upstream_model, &served_as).await
        }
        (Target::Generate(h), Request::Chat(r)) => c::chat_local(caller, h.clone(), r, served_as).await,
        (Target::Generate(h), Request::Completions(r)) => c::completions_local(caller, h.clone(), r, served_as).await,
        (Target::Embed(h), Request::Embeddings(r)) => e::embed_local(caller, h.clone(), r, served_as).await,
        _ => Err(ServiceError::internal("the version's engine does not match the endpoint")),
    }
}

/// Labels the answer with its version, records its outcome and starts the shadow request.
pub fn finish(
    state: &web::Data<AppState>,
    routed: Routed,
    endpoint: Endpoint,
    raw: Value,
    started: Instant,
    result: Result<HttpResponse, ServiceError>,
) -> Result<HttpResponse, ServiceError> {
    let status = match &result {
        Ok(r) => r.status().as_u16(),
        Err(e) => e.status.as_u16(),
    };
    state.registry.record(&routed.name, &routed.version, routed.role, Outcome::from_status(status), started.elapsed().as_secs_f64());
    // RAG requests are not mirrored: the shadow would answer from the same retrieval anyway.
    if let Some((version, target)) = routed.shadow.clone().filter(|_| raw.get("rag").is_none_or(Value::is_null)) {
        shadow(state.clone(), routed.name.clone(), version, target, endpoint, raw);
    }
    let mut resp = result?;
    if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&routed.served_as()) {
        resp.headers_mut().insert(actix_web::http::header::HeaderName::from_static("x-ragway-model"), v);
    }
    if let Ok(v) = actix_web::http::header::HeaderValue::from_str(&routed.version) {
        resp.headers_mut().insert(actix_web::http::header::HeaderName::from_static("x-ragway-model-version"), v);
    }
    Ok(resp)
}

/// Mirrors a request to a shadow version in the background: unstreamed, uncharged, its answer
/// dropped; only its outcome and duration are recorded (role `shadow`).
fn shadow(state: web::Data<AppState>, name: String, version: String, target: Target, endpoint: Endpoint, mut raw: Value) {
    if let Some(m) = raw.as_object_mut() {
        m.insert("stream".into(), json!(false));
        m.remove("stream_options");
    }
    actix_web::rt::spawn(async move {
        let started = Instant::now();
        let routed = Routed { name: name.clone(), version: version.clone(), role: Role::Shadow, target, shadow: None };
        let result = match Request::parse(endpoint, &raw) {
            Ok(req) => run(&routed, &raw, req, None).await,
            Err(e) => Err(e),
        };
        let status = match &result {
            Ok(r) => r.status().as_u16(),
            Err(e) => e.status.as_u16(),
        };
        // Read the body to its end so the work is the same as a real request's.
        if let Ok(r) = result {
            let _ = actix_web::body::to_bytes(r.into_body()).await;
        }
        state.registry.record(&name, &version, Role::Shadow, Outcome::from_status(status), started.elapsed().as_secs_f64());
    });
}
