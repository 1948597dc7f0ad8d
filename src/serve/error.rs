//! The one error type of the HTTP layer, mapped to a status and an OpenAI error body here and
//! nowhere else.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::openai::{ErrorBody, ErrorDetail};

/// Everything a request can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 400 with the offending parameter.
    #[error("{message}")]
    BadRequest { message: String, param: Option<String> },
    /// 404: no base model or adapter of that name.
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    /// 400: the adapter's files cannot be loaded (its owner's to fix; not "overloaded", which
    /// clients would retry for ever).
    #[error("The adapter `{name}` cannot be loaded: {message} (fix its files: a request after {retry_secs} s reads them again; or reload it with /v1/load_lora_adapter)")]
    AdapterFailed { name: String, message: String, retry_secs: u64 },
    /// 401: missing or wrong `Authorization: Bearer`.
    #[error("Invalid API key (send `Authorization: Bearer <key>`, the key given to --api-key).")]
    Unauthorized,
    /// 413 and other body-level rejections, with their status.
    #[error("{message}")]
    Body { status: u16, message: String },
    /// 503 + `Retry-After`: the waiting queue is full.
    #[error("The server is overloaded: {waiting} requests are waiting (--max-waiting {limit}); retry later.")]
    Overloaded { waiting: usize, limit: usize },
    /// 429 + `Retry-After`: this tenant's share of the waiting queue is full (the others may
    /// still be served).
    #[error("Too many requests for tenant `{tenant}`: {waiting} are waiting (--max-waiting-per-model {limit}); retry later.")]
    TenantOverloaded { tenant: String, waiting: usize, limit: usize },
    /// 429 + `Retry-After: retry_after_s`: this tenant's token bucket
    /// (`--tenant-rate-limit`) cannot pay for the request yet (the others are not affected).
    #[error("Rate limit reached for tenant `{tenant}` on tokens per second: limit {rate}/s, burst {burst}, this request costs {cost} (prompt + max_tokens). Please try again in {retry_after_s}s.")]
    RateLimited { tenant: String, cost: f64, rate: f64, burst: f64, retry_after_s: u64 },
    /// 503: the server is shutting down or the engine stopped.
    #[error("{0}")]
    Unavailable(String),
    /// 500: the engine failed on this request.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn bad(param: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest { message: message.into(), param: Some(param.to_string()) }
    }

    /// HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } | ApiError::AdapterFailed { .. } => StatusCode::BAD_REQUEST,
            ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Body { status, .. } => StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_REQUEST),
            ApiError::Overloaded { .. } | ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::TenantOverloaded { .. } | ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn body(&self) -> ErrorBody {
        let (kind, code) = match self {
            ApiError::BadRequest { .. } | ApiError::Body { .. } => ("invalid_request_error", None),
            ApiError::ModelNotFound(_) => ("invalid_request_error", Some("model_not_found")),
            ApiError::AdapterFailed { .. } => ("invalid_request_error", Some("adapter_load_failed")),
            ApiError::Unauthorized => ("invalid_request_error", Some("invalid_api_key")),
            ApiError::Overloaded { .. } | ApiError::Unavailable(_) => ("server_error", Some("overloaded")),
            // OpenAI's shape for a request-rate limit.
            ApiError::TenantOverloaded { .. } => ("requests", Some("rate_limit_exceeded")),
            ApiError::RateLimited { .. } => ("tokens", Some("rate_limit_exceeded")),
            ApiError::Internal(_) => ("server_error", None),
        };
        let param = match self {
            ApiError::BadRequest { param, .. } => param.clone(),
            ApiError::ModelNotFound(_) | ApiError::AdapterFailed { .. } => Some("model".to_string()),
            _ => None,
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.public_message(),
                kind: kind.to_string(),
                param,
                code: code.map(String::from),
            },
        }
    }
}

impl ApiError {
    /// What the client sees. A 500 carries the cause's first line (at most 300 characters)
    /// and an id; the whole error, backtrace included, goes to the log under that id, so a
    /// response never shows module paths or source lines.
    fn public_message(&self) -> String {
        match self {
            ApiError::Internal(full) => {
                let id = format!("{:016x}", rand::random::<u64>());
                tracing::error!(error_id = %id, "internal error: {full}");
                let first: String = full.lines().next().unwrap_or_default().chars().take(300).collect();
                format!("{first} (error id {id}; details in the server log)")
            }
            other => other.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), Json(self.body())).into_response();
        let retry_after = match &self {
            ApiError::Overloaded { .. } | ApiError::TenantOverloaded { .. } => Some(1),
            ApiError::RateLimited { retry_after_s, .. } => Some(*retry_after_s),
            _ => None,
        };
        if let Some(secs) = retry_after {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> Self {
        ApiError::Body { status: r.status().as_u16(), message: r.body_text() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_500_shows_one_line_and_an_id_never_the_backtrace() {
        let e = ApiError::Internal(
            "engine step failed: boom\n   0: candle_core::error::Error::bt\n             at src/engine/model/mod.rs:12:5".into(),
        );
        let m = e.body().error.message;
        assert!(m.starts_with("engine step failed: boom (error id "), "{m}");
        assert!(!m.contains('\n') && !m.contains("candle_core") && !m.contains("src/"), "{m}");
        let long = ApiError::Internal("x".repeat(5000)).body().error.message;
        assert!(long.len() < 400, "{}", long.len());
    }
}
