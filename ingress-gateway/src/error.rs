//! Everything that ends a request without storing it, and its one
//! answer: a JSON `{"error": reason}` with the status (and Retry-After on
//! 429 and 503).

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::verify::Failure;

/// Everything that ends a request without storing it.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No route for the path.
    #[error("not found")]
    NotFound,
    /// Method not accepted.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// Verification failed.
    #[error("unauthorized: {0}")]
    Unauthorized(Failure),
    /// A handshake's verify token did not match.
    #[error("forbidden")]
    Forbidden,
    /// Body over the endpoint's limit.
    #[error("payload too large")]
    PayloadTooLarge,
    /// The body did not arrive in time.
    #[error("request timeout")]
    RequestTimeout,
    /// The body could not be read (malformed framing, client went away).
    #[error("bad request")]
    BadRequest,
    /// The client address has its share of request slots in use.
    #[error("client busy")]
    ClientBusy {
        /// Seconds to wait.
        retry_after: u64,
    },
    /// Token bucket empty.
    #[error("rate limited")]
    RateLimited {
        /// Seconds until a token is available.
        retry_after: u64,
    },
    /// Not storing right now (suspended, secrets not loaded, JetStream
    /// unavailable); the provider should retry.
    #[error("unavailable: {reason}")]
    Unavailable {
        /// Short machine-readable reason.
        reason: &'static str,
        /// Seconds to wait.
        retry_after: u64,
    },
    /// Anything else; answered without detail.
    #[error("internal error")]
    Internal,
}

fn json_error(status: StatusCode, reason: &str) -> Response {
    (status, Json(serde_json::json!({ "error": reason }))).into_response()
}

fn with_retry_after(mut r: Response, secs: u64) -> Response {
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    r
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::NotFound => StatusCode::NOT_FOUND.into_response(),
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED.into_response(),
            ApiError::Unauthorized(f) => json_error(StatusCode::UNAUTHORIZED, f.reason()),
            ApiError::Forbidden => json_error(StatusCode::FORBIDDEN, "bad_verify_token"),
            ApiError::PayloadTooLarge => {
                json_error(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large")
            }
            ApiError::RequestTimeout => json_error(StatusCode::REQUEST_TIMEOUT, "timeout"),
            ApiError::BadRequest => json_error(StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::ClientBusy { retry_after } => with_retry_after(
                json_error(StatusCode::TOO_MANY_REQUESTS, "client_busy"),
                retry_after,
            ),
            ApiError::RateLimited { retry_after } => with_retry_after(
                json_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
                retry_after,
            ),
            ApiError::Unavailable {
                reason,
                retry_after,
            } => with_retry_after(
                json_error(StatusCode::SERVICE_UNAVAILABLE, reason),
                retry_after,
            ),
            ApiError::Internal => json_error(StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}
