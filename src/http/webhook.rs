//! `POST /webhooks/gitlab`: header check → body (bounded) → parse → record → status.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, Limited};
use serde_json::json;

use crate::app::App;
use crate::domain::PushEvent;
use crate::domain::{EventSource, RecordOutcome};
use crate::intake::IntakeError;
use crate::intake::webhook::{self, Hook};
use crate::secrets::HookScope;

/// Handles one webhook delivery; every outcome is counted under `kas_webhooks_total{result}`.
pub async fn receive(State(app): State<Arc<App>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    // The token is checked before a byte of the body is read.
    let token = headers.get("x-gitlab-token").map(|v| v.as_bytes()).unwrap_or_default();
    let Some(scope) = app.secrets.webhook_scope(token) else {
        app.metrics.webhook("unauthorized");
        app.metrics.auth_failure("webhook");
        tracing::warn!(present = !token.is_empty(), "webhook with a missing or wrong X-Gitlab-Token");
        return reply(StatusCode::UNAUTHORIZED, json!({"error": "missing or invalid X-Gitlab-Token"}));
    };
    let limit = app.config.webhook_body_limit;
    let too_large =
        || reply(StatusCode::PAYLOAD_TOO_LARGE, json!({"error": format!("body larger than {limit} bytes")}));
    let declared = headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        app.metrics.webhook("too_large");
        return too_large();
    }
    let body = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            app.metrics.webhook("too_large");
            return too_large();
        }
        Err(e) => {
            app.metrics.webhook("bad_request");
            return reply(StatusCode::BAD_REQUEST, json!({"error": format!("cannot read body: {e}")}));
        }
    };
    let event = headers.get("x-gitlab-event").and_then(|v| v.to_str().ok());
    let push = match webhook::parse(event, &body) {
        Ok(Hook::Push(push)) => push,
        Ok(Hook::Ignored(reason)) => {
            app.metrics.webhook("ignored");
            tracing::debug!(%reason, "webhook ignored");
            return reply(StatusCode::OK, json!({"status": "ignored", "reason": reason}));
        }
        Err(e) => {
            app.metrics.webhook("bad_request");
            tracing::info!(error = %e, "webhook refused");
            return reply(StatusCode::BAD_REQUEST, json!({"error": e.to_string()}));
        }
    };
    if let Err(refusal) = within_scope(&app, scope, &push).await {
        return *refusal;
    }
    let project = push.project_path.clone();
    match app.intake.record(push, idempotency_key(headers), EventSource::Webhook).await {
        Ok(RecordOutcome::Recorded(notice)) => {
            app.metrics.webhook("accepted");
            tracing::debug!(seq = notice.seq, project = %project, "push recorded");
            reply(StatusCode::ACCEPTED, json!({"status": "accepted", "seq": notice.seq}))
        }
        Ok(RecordOutcome::Duplicate) => {
            app.metrics.webhook("duplicate");
            tracing::debug!(project = %project, "redelivered push acknowledged");
            reply(StatusCode::OK, json!({"status": "duplicate"}))
        }
        Err(IntakeError::KeyTooLong) => {
            app.metrics.webhook("bad_request");
            reply(StatusCode::BAD_REQUEST, json!({"error": IntakeError::KeyTooLong.to_string()}))
        }
        Err(e) => {
            app.metrics.webhook("unavailable");
            // The sender learns to retry, not why: the reason (database errors) goes to the log.
            tracing::warn!(error = %e, "cannot record a webhook push");
            reply(StatusCode::SERVICE_UNAVAILABLE, json!({"error": "cannot record the push now; retry"}))
        }
    }
}

/// A namespace-scoped secret speaks only for projects under its namespace: by the payload's
/// path, and, for a project id the registry knows, by the path it has there (so a forged id
/// cannot rewrite another namespace's project).
async fn within_scope(app: &App, scope: &HookScope, push: &PushEvent) -> Result<(), Box<Response>> {
    let HookScope::Namespace(ns) = scope else { return Ok(()) };
    let forbidden = |path: &str| {
        app.metrics.webhook("forbidden");
        app.metrics.auth_failure("webhook");
        tracing::warn!(namespace = %ns, project = %path, "webhook secret used outside its namespace");
        Err(Box::new(reply(
            StatusCode::FORBIDDEN,
            json!({"error": format!("this webhook secret may only submit pushes for projects under {ns}")}),
        )))
    };
    if !scope.allows(push.project_path.as_str()) {
        return forbidden(push.project_path.as_str());
    }
    match app.store.project_by_id(push.project_id).await {
        Ok(Some(known)) if !scope.allows(known.path.as_str()) => forbidden(known.path.as_str()),
        Ok(_) => Ok(()),
        Err(e) => {
            app.metrics.webhook("unavailable");
            tracing::warn!(error = %e, "cannot check a scoped webhook's project");
            Err(Box::new(reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"error": "cannot check the project now; retry"}),
            )))
        }
    }
}

/// `Idempotency-Key` (GitLab 17.4+, the same on every resend), else `X-Gitlab-Event-UUID`.
fn idempotency_key(headers: &HeaderMap) -> Option<&str> {
    ["idempotency-key", "x-gitlab-event-uuid"]
        .iter()
        .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()).filter(|v| !v.is_empty()))
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}
