//! The one middleware every request goes through: a request id and tracing span, the caller
//! identified from the request's key (a [`Caller`] in the request's extensions — deciding
//! what it may do is the service operation's job, see `service::auth::Operation`), and the
//! request metrics.

use crate::service::auth::{bearer, Caller, Operation, Principal};
use crate::service::error::ServiceError;
use crate::app::AppState;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tracing::Instrument;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

fn new_request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros()).unwrap_or(0);
    format!("{:x}-{n:x}", t as u64)
}

/// A client's own `x-request-id` is kept when it is short and printable.
fn client_request_id(req: &ServiceRequest) -> Option<String> {
    let v = req.headers().get(&REQUEST_ID)?.to_str().ok()?;
    (!v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic())).then(|| v.to_string())
}

/// The caller of a request, from its `Authorization: Bearer` or `api-key` header.
fn identify(state: &AppState, req: &ServiceRequest) -> Caller {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    Caller::identify(&state.keys, bearer(header("authorization"), header("api-key")).as_deref())
}

/// The method as a metrics label: one of a fixed set, so that requests with invented method
/// names cannot grow `/metrics`.
fn method_label(method: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// See the module docs.
pub async fn gate(req: ServiceRequest, next: Next<impl MessageBody + 'static>) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let state = req.app_data::<web::Data<AppState>>().cloned().expect("AppState is registered");
    let started = Instant::now();
    let request_id = client_request_id(&req).unwrap_or_else(new_request_id);
    let method = method_label(req.method());
    // Route patterns, not raw paths, keep the metrics' label sets bounded.
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
    let span =
        tracing::info_span!("request", id = %request_id, method = %method, route = %route, key = tracing::field::Empty);
    let header_value = HeaderValue::from_str(&request_id).ok();

    let caller = identify(&state, &req);
    if let Some(name) = caller.name() {
        span.record("key", name);
    }
    req.extensions_mut().insert(caller);
    let mut res = next.call(req).instrument(span.clone()).await?.map_into_boxed_body();
    let status = res.status().as_u16();
    if let Some(why) = res.response().error().and_then(|e| e.as_error::<ServiceError>()).and_then(ServiceError::rejection) {
        state.requests.reject(why);
    }
    state.requests.observe(&route, method, status, started.elapsed().as_secs_f64());
    if let Some(v) = header_value {
        res.headers_mut().insert(REQUEST_ID, v);
    }
    Ok(res)
}

/// The caller of the current request as [`gate`] identified it.
pub fn caller(req: &actix_web::HttpRequest) -> Caller {
    req.extensions().get::<Caller>().cloned().unwrap_or(Caller::Missing)
}

/// The principal of the current request when it was authenticated (for charging tokens and
/// sticky routing; access is decided by [`authorize`]).
pub fn principal(req: &actix_web::HttpRequest) -> Option<Arc<Principal>> {
    match caller(req) {
        Caller::Known(p) => Some(p),
        _ => None,
    }
}

/// Authorizes `op` for the caller of `req`. Handlers take [`Authorized`] instead; this
/// serves it and [`authorize_unless`].
pub fn authorize(req: &actix_web::HttpRequest, op: Operation) -> Result<Arc<Principal>, ServiceError> {
    caller(req).authorize(op).map_err(ServiceError::from)
}

/// Like [`authorize`], for the views a deployment may leave open (`--open-probes`,
/// `--open-metrics`, `--open-docs`): `open` lets any caller through.
pub fn authorize_unless(req: &actix_web::HttpRequest, op: Operation, open: bool) -> Result<(), ServiceError> {
    if !open {
        authorize(req, op)?;
    }
    Ok(())
}

/// An operation as a type, for [`Authorized`].
pub trait Op {
    const OP: Operation;
}

/// One marker type per [`Operation`] (`op::Search`, `op::CreateCollection`, ...).
pub mod op {
    use super::{Op, Operation};
    macro_rules! markers {
        ($($name:ident),* $(,)?) => {$(
            #[doc = concat!("[`Operation::", stringify!($name), "`].")]
            pub struct $name;
            impl Op for $name {
                const OP: Operation = Operation::$name;
            }
        )*};
    }
    markers!(
        ListModels, GetModel, Chat, Completions, Embeddings, Tokenize, Detokenize, Rag, ListCollections, GetCollection,
        CreateCollection, DeleteCollection, UpsertDocuments, GetDocument, DeleteDocuments, Search, Ingest, ListJobs, GetJob,
        Snapshot, Restore, Compact, DriftReport, SetDriftReference, ResetDriftReference, ListPrompts, GetPrompt,
        RenderPrompt, CreatePromptVersion, DeletePrompt, SetPromptLabel, DeletePromptLabel, StartEval, ListEvals, GetEval,
        ListModelVersions, GetModelVersions, RegisterModelVersion, SetModelRouting, RetireModelVersion,
    );
}

/// The caller, authorized for the operation `O`. As a REST handler's first argument it is
/// extracted before anything else of the request, the body included: a caller without the
/// scope is refused before its body is read or parsed.
pub struct Authorized<O: Op> {
    pub principal: Arc<Principal>,
    _op: std::marker::PhantomData<O>,
}

impl<O: Op> actix_web::FromRequest for Authorized<O> {
    type Error = ServiceError;
    type Future = std::future::Ready<Result<Self, ServiceError>>;

    fn from_request(req: &actix_web::HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        std::future::ready(authorize(req, O::OP).map(|principal| Authorized { principal, _op: std::marker::PhantomData }))
    }
}
