//! The one place HTTP statuses are chosen: every refusal the HTTP listener answers is an
//! [`HttpError`], built from the library's errors here, with the short label its handler counts
//! it under. Bodies are `{"error": "..."}`; what a caller may not learn (database errors, secrets)
//! stays in the log.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::engine::EngineError;
use crate::intake::IntakeError;
use crate::store::StoreError;
use crate::tunnel::TunnelError;

/// A refusal: status, what the caller is told, and the metric label of the outcome.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    label: &'static str,
    message: String,
}

impl HttpError {
    fn new(status: StatusCode, label: &'static str, message: impl Into<String>) -> Self {
        Self { status, label, message: message.into() }
    }

    /// 400: the request is malformed.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401: no or a wrong credential.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    /// 403: the credential may not do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// 409: the request names several things.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    /// 413: the body is over `limit` bytes.
    pub fn too_large(limit: usize) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("body larger than {limit} bytes"))
    }

    /// 415: a media type the endpoint does not take.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "bad_request", message)
    }

    /// 503: kas cannot do it now; the caller should retry.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// The outcome's metric label.
    pub fn label(&self) -> &'static str {
        self.label
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

impl From<IntakeError> for HttpError {
    fn from(e: IntakeError) -> Self {
        match e {
            IntakeError::KeyTooLong => Self::bad_request(e.to_string()),
            // The sender learns to retry, not why: the reason goes to the log.
            IntakeError::Unavailable(_) | IntakeError::Timeout | IntakeError::ShuttingDown => {
                Self::unavailable("cannot record the push now; retry")
            }
        }
    }
}

impl From<StoreError> for HttpError {
    fn from(_: StoreError) -> Self {
        Self::unavailable("storage is unavailable now; retry")
    }
}

impl From<EngineError> for HttpError {
    fn from(e: EngineError) -> Self {
        Self::unavailable(e.to_string())
    }
}

/// A call into a cluster that got no answer from it (an answer, even a 403, is passed through).
impl From<TunnelError> for HttpError {
    fn from(e: TunnelError) -> Self {
        let status = match &e {
            TunnelError::NotOptedIn { .. } => StatusCode::FORBIDDEN,
            TunnelError::Refused(_) => StatusCode::BAD_REQUEST,
            TunnelError::RequestTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            TunnelError::NoTunnel { .. } | TunnelError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            TunnelError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            TunnelError::ResponseTooLarge(_)
            | TunnelError::Lost(_)
            | TunnelError::Agent { .. }
            | TunnelError::Protocol(_)
            | TunnelError::Config(_) => StatusCode::BAD_GATEWAY,
        };
        Self::new(status, e.outcome(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_and_label_go_together() {
        let cases: [(HttpError, StatusCode, &str); 5] = [
            (IntakeError::KeyTooLong.into(), StatusCode::BAD_REQUEST, "bad_request"),
            (IntakeError::Timeout.into(), StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            (HttpError::too_large(10), StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
            (TunnelError::NoTunnel { agent: 1, waited_ms: 5 }.into(), StatusCode::GATEWAY_TIMEOUT, "no_tunnel"),
            (TunnelError::NotOptedIn { agent: 1, switch: "x".into() }.into(), StatusCode::FORBIDDEN, "not_opted_in"),
        ];
        for (e, status, label) in cases {
            assert_eq!((e.status(), e.label()), (status, label));
        }
    }

    #[test]
    fn internal_reasons_stay_in_the_log() {
        let e = HttpError::from(StoreError::Corrupt("row 7 has a secret-looking value".into()));
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(!e.message.contains("row 7"), "{}", e.message);
    }
}
