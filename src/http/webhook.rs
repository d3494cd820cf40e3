//! `POST /webhooks/gitlab`: header check → body (bounded) → parse → record → status.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::HttpError;
use crate::app::App;
use crate::domain::PushEvent;
use crate::domain::{EventSource, RecordOutcome};
use crate::intake::webhook::{self, Hook};
use crate::secrets::HookScope;

/// Handles one webhook delivery; every outcome is counted under `kas_webhooks_total{result}`.
pub async fn receive(State(app): State<Arc<App>>, request: Request) -> Response {
    match handle(&app, request).await {
        Ok(accepted) => accepted,
        Err(refused) => {
            app.metrics.webhook(refused.label());
            refused.into_response()
        }
    }
}

async fn handle(app: &App, request: Request) -> Result<Response, HttpError> {
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    // The token is checked before a byte of the body is read.
    let token = headers.get("x-gitlab-token").map(|v| v.as_bytes()).unwrap_or_default();
    let Some(scope) = app.secrets.webhook_scope(token) else {
        app.metrics.auth_failure("webhook");
        tracing::warn!(present = !token.is_empty(), "webhook with a missing or wrong X-Gitlab-Token");
        return Err(HttpError::unauthorized("missing or invalid X-Gitlab-Token"));
    };
    let body = super::read_body(headers, body, app.config.webhook_body_limit).await?;
    let event = headers.get("x-gitlab-event").and_then(|v| v.to_str().ok());
    let push = match webhook::parse(event, &body) {
        Ok(Hook::Push(push)) => push,
        Ok(Hook::Ignored(reason)) => {
            app.metrics.webhook("ignored");
            tracing::debug!(%reason, "webhook ignored");
            return Ok(reply(StatusCode::OK, json!({"status": "ignored", "reason": reason})));
        }
        Err(e) => {
            tracing::info!(error = %e, "webhook refused");
            return Err(HttpError::bad_request(e.to_string()));
        }
    };
    within_scope(app, scope, &push).await?;
    let project = push.project_path.clone();
    match app.intake.record(push, idempotency_key(headers), EventSource::Webhook).await {
        Ok(RecordOutcome::Recorded(notice)) => {
            app.metrics.webhook("accepted");
            tracing::debug!(seq = notice.seq, project = %project, "push recorded");
            Ok(reply(StatusCode::ACCEPTED, json!({"status": "accepted", "seq": notice.seq})))
        }
        Ok(RecordOutcome::Duplicate) => {
            app.metrics.webhook("duplicate");
            tracing::debug!(project = %project, "redelivered push acknowledged");
            Ok(reply(StatusCode::OK, json!({"status": "duplicate"})))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot record a webhook push");
            Err(e.into())
        }
    }
}

/// A namespace-scoped secret speaks only for projects under its namespace: by the payload's
/// path, and, for a project id the registry knows, by the path it has there (so a forged id
/// cannot rewrite another namespace's project).
async fn within_scope(app: &App, scope: &HookScope, push: &PushEvent) -> Result<(), HttpError> {
    let HookScope::Namespace(ns) = scope else { return Ok(()) };
    let forbidden = |path: &str| {
        app.metrics.auth_failure("webhook");
        tracing::warn!(namespace = %ns, project = %path, "webhook secret used outside its namespace");
        Err(HttpError::forbidden(format!("this webhook secret may only submit pushes for projects under {ns}")))
    };
    if !scope.allows(push.project_path.as_str()) {
        return forbidden(push.project_path.as_str());
    }
    match app.store.project_by_id(push.project_id).await {
        Ok(Some(known)) if !scope.allows(known.path.as_str()) => forbidden(known.path.as_str()),
        Ok(_) => Ok(()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot check a scoped webhook's project");
            Err(HttpError::unavailable("cannot check the project now; retry"))
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
