//! Service errors as HTTP responses: OpenAI's error shape on REST, GraphQL's on `/graphql`,
//! and JSON bodies that do not parse as 400/413/415 in the same shape.

use crate::service::error::{ServiceError, StatusCode};
use actix_web::{HttpResponse, ResponseError};

impl ResponseError for ServiceError {
    fn status_code(&self) -> actix_web::http::StatusCode {
        actix_web::http::StatusCode::from_u16(self.status.as_u16()).unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR)
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        if let Some(s) = self.retry_after {
            resp.insert_header(("Retry-After", s.to_string()));
        }
        resp.json(self.body())
    }
}

/// The error response in the API's own shape: GraphQL errors on `/graphql`, OpenAI's
/// elsewhere.
pub fn error_response(path: &str, err: &ServiceError) -> HttpResponse {
    if path.starts_with("/graphql") {
        let mut resp = HttpResponse::build(err.status_code());
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

/// JSON bodies that do not parse become OpenAI-shaped 400s naming what was wrong.
pub fn json_error(err: actix_web::error::JsonPayloadError, _req: &actix_web::HttpRequest) -> actix_web::Error {
    use actix_web::error::JsonPayloadError as J;
    let api = match &err {
        J::OverflowKnownLength { length, limit } => ServiceError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            ..ServiceError::invalid("body", format!("request body of {length} bytes exceeds the limit of {limit} bytes"))
        },
        J::Overflow { limit } => ServiceError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            ..ServiceError::invalid("body", format!("request body exceeds the limit of {limit} bytes"))
        },
        J::ContentType => ServiceError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ..ServiceError::invalid("body", "expected Content-Type: application/json")
        },
        J::Deserialize(e) => ServiceError::invalid("body", format!("invalid JSON body: {e}")),
        other => ServiceError::invalid("body", format!("invalid request body: {other}")),
    };
    api.into()
}
