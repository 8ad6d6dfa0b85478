//! The one error type of the service operations: what went wrong (OpenAI's `type`, `code`
//! and `param`), with the HTTP status it maps to and a retry hint. REST writes it in OpenAI's
//! shape `{"error": {"message", "type", "param", "code"}}` (`http::error`), GraphQL as an
//! error with `extensions.code` (`graphql`). Nothing here depends on either transport.

use crate::service::auth::{Denied, Scope};
use crate::telemetry::Rejection;
pub use http::StatusCode;
use ragway_engine::EngineError;
use ragway_index::IndexError;
use ragway_prompts::PromptError;
use serde::Serialize;

/// An API error (see the module docs).
#[derive(Debug, Clone)]
pub struct ServiceError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds a client should wait before retrying (429, 503).
    pub retry_after: Option<u32>,
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

impl ServiceError {
    /// 400 `invalid_request_error` about one parameter.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: None,
            retry_after: None,
        }
    }

    /// 404 for a model id that is not served.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("The model `{model}` does not exist or you do not have access to it."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after: None,
        }
    }

    /// 503 while models are still loading.
    pub fn not_ready(what: &str) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("{what} is still loading; retry shortly"),
            kind: "server_error",
            param: None,
            code: Some("model_not_ready"),
            retry_after: Some(1),
        }
    }

    /// 404 for an unknown route.
    pub fn not_found(path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: format!("Unknown request URL: {path}"),
            kind: "invalid_request_error",
            param: None,
            code: Some("unknown_url"),
            retry_after: None,
        }
    }

    /// 401: no key, or a key that is not configured.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some("invalid_api_key"),
            retry_after: None,
        }
    }

    /// 403: the key lacks the scope the request needs.
    pub fn forbidden(key: &str, needed: Scope) -> Self {
        Self {
            status: StatusCode::FORBIDDEN,
            message: format!("the API key `{key}` lacks the `{}` scope this request needs", needed.as_str()),
            kind: "permission_error",
            param: None,
            code: Some("insufficient_scope"),
            retry_after: None,
        }
    }

    /// 429: the key's requests or tokens per minute are spent.
    pub fn rate_limited(key: &str, retry_after: u32) -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("rate limit of the API key `{key}` reached; retry in {retry_after} s"),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
            retry_after: Some(retry_after),
        }
    }

    /// The reason a refused request is counted under in `/metrics` (None for server faults).
    pub fn rejection(&self) -> Option<Rejection> {
        Some(match self.status.as_u16() {
            401 => Rejection::Unauthenticated,
            403 => Rejection::Forbidden,
            413 => Rejection::BodyTooLarge,
            429 if self.code == Some("queue_full") => Rejection::QueueFull,
            429 => Rejection::RateLimited,
            503 => Rejection::NotReady,
            400..=499 => Rejection::InvalidRequest,
            _ => return None,
        })
    }

    /// GraphQL `extensions` of this error: the REST `code` (or `type` when it has none),
    /// `type`, HTTP `status`, `param` and `retryAfter`.
    pub fn graphql_extensions(&self) -> serde_json::Value {
        let mut ext = serde_json::json!({
            "code": self.code.unwrap_or(self.kind),
            "type": self.kind,
            "status": self.status.as_u16(),
        });
        if let Some(p) = &self.param {
            ext["param"] = p.as_str().into();
        }
        if let Some(s) = self.retry_after {
            ext["retryAfter"] = s.into();
        }
        ext
    }

    /// 413: a request body over the limit.
    pub fn too_large(limit: usize) -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: Some("body_too_large"),
            ..Self::invalid("body", format!("request body exceeds the limit of {limit} bytes"))
        }
    }

    /// 409: the request conflicts with the current state (a name taken, a version in use).
    pub fn conflict(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self { status: StatusCode::CONFLICT, code: Some("conflict"), ..Self::invalid(param, message) }
    }

    /// 502: the upstream servers of a model version failed (504 when one timed out).
    pub fn upstream(e: &crate::models::upstream::UpstreamError) -> Self {
        let status = match e {
            crate::models::upstream::UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        Self {
            status,
            message: e.to_string(),
            kind: "server_error",
            param: None,
            code: Some("upstream_error"),
            retry_after: None,
        }
    }

    /// 500 for failures that are ragway's fault.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
            retry_after: None,
        }
    }

    /// Engine errors: user errors are 400 on `param`, a full queue is 429, the rest 5xx.
    pub fn from_engine(e: EngineError, param: &str) -> Self {
        match &e {
            EngineError::QueueFull { .. } => Self {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: e.to_string(),
                kind: "rate_limit_error",
                param: None,
                code: Some("queue_full"),
                retry_after: Some(1),
            },
            EngineError::WorkerStopped { .. } => {
                Self { status: StatusCode::SERVICE_UNAVAILABLE, retry_after: Some(5), ..Self::internal(e.to_string()) }
            }
            EngineError::ContextLengthExceeded { .. } => {
                Self { code: Some("context_length_exceeded"), ..Self::invalid(param, e.to_string()) }
            }
            EngineError::InvalidRequest { param: Some(p), message } => Self::invalid(p.clone(), message.clone()),
            _ if e.is_user_error() => Self::invalid(param, e.to_string()),
            _ => Self::internal(e.to_string()),
        }
    }
}

impl From<IndexError> for ServiceError {
    /// Index errors: 400 naming the parameter, 404 for unknown collections, documents and
    /// jobs, 409 for a name taken, 403 for refused paths, 429 when the embedder is busy, 503
    /// with `Retry-After` when the storage engine (PostgreSQL) cannot be reached.
    fn from(e: IndexError) -> Self {
        let status = |status: StatusCode, code: &'static str, param: Option<&str>| ServiceError {
            status,
            message: e.to_string(),
            kind: "invalid_request_error",
            param: param.map(str::to_string),
            code: Some(code),
            retry_after: None,
        };
        match &e {
            IndexError::InvalidRequest { param, message } => {
                ServiceError::invalid(param.clone().unwrap_or_else(|| "body".into()), message.clone())
            }
            IndexError::CollectionNotFound(_) => status(StatusCode::NOT_FOUND, "collection_not_found", Some("name")),
            IndexError::CollectionExists(_) => status(StatusCode::CONFLICT, "collection_exists", Some("name")),
            IndexError::DocumentNotFound { .. } => status(StatusCode::NOT_FOUND, "document_not_found", Some("id")),
            IndexError::JobNotFound(_) => status(StatusCode::NOT_FOUND, "job_not_found", Some("id")),
            IndexError::Forbidden(_) => {
                ServiceError { kind: "permission_error", ..status(StatusCode::FORBIDDEN, "forbidden", Some("path")) }
            }
            IndexError::Busy => ServiceError {
                kind: "rate_limit_error",
                retry_after: Some(1),
                ..status(StatusCode::TOO_MANY_REQUESTS, "queue_full", None)
            },
            IndexError::Unavailable(_) => ServiceError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "server_error",
                retry_after: Some(2),
                ..status(StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable", None)
            },
            IndexError::Locked { .. } => ServiceError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                retry_after: Some(5),
                ..ServiceError::internal(e.to_string())
            },
            _ => ServiceError::internal(e.to_string()),
        }
    }
}

impl From<PromptError> for ServiceError {
    /// Template and RAG errors: 400 naming the field (and the template line), 404 for an
    /// unknown template, version or label, 409 for an immutable version or a file-defined
    /// template; index and engine errors as those map.
    fn from(e: PromptError) -> Self {
        match e {
            PromptError::Invalid { param, message, line } => {
                let message = match line {
                    Some(l) if !message.contains("line ") => format!("{message} (line {l})"),
                    _ => message,
                };
                ServiceError::invalid(param, message)
            }
            PromptError::NotFound(message) => ServiceError {
                status: StatusCode::NOT_FOUND,
                message,
                kind: "invalid_request_error",
                param: Some("template".into()),
                code: Some("template_not_found"),
                retry_after: None,
            },
            PromptError::Conflict(message) => ServiceError {
                status: StatusCode::CONFLICT,
                message,
                kind: "invalid_request_error",
                param: None,
                code: Some("conflict"),
                retry_after: None,
            },
            PromptError::Index(e) => ServiceError::from(e),
            PromptError::Engine(e) => ServiceError::from_engine(e, "messages"),
            PromptError::Io(m) => ServiceError::internal(m),
        }
    }
}

impl ServiceError {
    /// The JSON body, `{"error": {"message", "type", "param", "code"}}` (also what streams
    /// send when they fail after the response head).
    pub fn body(&self) -> serde_json::Value {
        serde_json::to_value(Body {
            error: Inner { message: &self.message, kind: self.kind, param: self.param.as_deref(), code: self.code },
        })
        .expect("error bodies serialize")
    }
}

impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for ServiceError {}

impl From<Denied> for ServiceError {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Unauthenticated(message) => ServiceError::unauthenticated(message),
            Denied::Forbidden { key, needed } => ServiceError::forbidden(&key, needed),
            Denied::RateLimited { key, retry_after } => ServiceError::rate_limited(&key, retry_after),
        }
    }
}
