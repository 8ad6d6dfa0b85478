//! The one middleware every request goes through: a request id and tracing span, API-key
//! authentication with scopes and per-key rate limits (the rules are `auth::access_for`),
//! and the request metrics.

use crate::auth::{access_for, bearer, Access, Principal};
use crate::error::ApiError;
use crate::state::AppState;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpResponse, ResponseError};
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

/// The error response in the API's own shape: GraphQL errors on `/graphql`, OpenAI's
/// elsewhere.
pub fn error_response(path: &str, err: &ApiError) -> HttpResponse {
    if path.starts_with("/graphql") {
        let mut resp = HttpResponse::build(err.status);
        if let Some(s) = err.retry_after {
            resp.insert_header(("Retry-After", s.to_string()));
        }
        return resp.json(serde_json::json!({
            "data": null,
            "errors": [{"message": err.message, "extensions": err.graphql_extensions()}],
        }));
    }
    err.error_response()
}

/// Authenticates a request; `Ok(None)` for open routes.
fn authenticate(state: &AppState, req: &ServiceRequest) -> Result<Option<Arc<Principal>>, ApiError> {
    let access = access_for(req.method().as_str(), req.path(), state.settings.open_probes);
    if access == Access::Open {
        return Ok(None);
    }
    let principal = if state.keys.enabled() {
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let Some(key) = bearer(header("authorization"), header("api-key")) else {
            return Err(ApiError::unauthenticated(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>`.",
            ));
        };
        state.keys.lookup(&key).ok_or_else(|| ApiError::unauthenticated("Incorrect API key provided."))?
    } else {
        Principal::anonymous()
    };
    if let Access::Scoped(needed) = access {
        if !principal.allows(needed) {
            return Err(ApiError::forbidden(&principal.name, needed));
        }
    }
    if let Err(wait) = principal.admit() {
        return Err(ApiError::rate_limited(&principal.name, wait));
    }
    Ok(Some(principal))
}

/// See the module docs.
pub async fn gate(req: ServiceRequest, next: Next<impl MessageBody + 'static>) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let state = req.app_data::<web::Data<AppState>>().cloned().expect("AppState is registered");
    let started = Instant::now();
    let request_id = client_request_id(&req).unwrap_or_else(new_request_id);
    let method = req.method().as_str().to_string();
    // Route patterns, not raw paths, keep the metrics' label sets bounded.
    let route = req.match_pattern().unwrap_or_else(|| "unmatched".into());
    let span =
        tracing::info_span!("request", id = %request_id, method = %method, route = %route, key = tracing::field::Empty);
    let header_value = HeaderValue::from_str(&request_id).ok();

    let mut res = match authenticate(&state, &req) {
        Ok(principal) => {
            if let Some(p) = &principal {
                span.record("key", p.name.as_str());
                req.extensions_mut().insert(p.clone());
            }
            match next.call(req).instrument(span.clone()).await {
                Ok(res) => res.map_into_boxed_body(),
                Err(e) => return Err(e),
            }
        }
        Err(err) => {
            let path = req.path().to_string();
            span.in_scope(|| tracing::info!(status = err.status.as_u16(), "refused: {}", err.message));
            if let Some(why) = err.rejection() {
                state.requests.reject(why);
            }
            req.into_response(error_response(&path, &err)).map_into_boxed_body()
        }
    };
    let status = res.status().as_u16();
    if let Some(why) = res.response().error().and_then(|e| e.as_error::<ApiError>()).and_then(ApiError::rejection) {
        state.requests.reject(why);
    }
    state.requests.observe(&route, &method, status, started.elapsed().as_secs_f64());
    if let Some(v) = header_value {
        res.headers_mut().insert(REQUEST_ID, v);
    }
    Ok(res)
}

/// The caller of the current request as [`gate`] established it (None on open routes).
pub fn principal(req: &actix_web::HttpRequest) -> Option<Arc<Principal>> {
    req.extensions().get::<Arc<Principal>>().cloned()
}
