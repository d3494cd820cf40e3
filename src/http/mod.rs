//! The HTTP listener (axum): webhooks, liveness, readiness and metrics. The only place that
//! knows HTTP status codes.

mod cluster;
pub mod error;
mod registry;
mod webhook;

pub use cluster::CLUSTER_STATUS;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::app::App;
use crate::engine::PodFilter;

/// The axum router of the HTTP listener.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/webhooks/gitlab", post(webhook::receive))
        .route("/webhooks/registry", post(registry::receive))
        .route("/agents", get(agents))
        .route("/cluster", get(cluster::get))
        .with_state(app)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 when the database answers, the listeners accept and shutdown has not begun; otherwise
/// 503 naming each failing part. Callers are unauthenticated, so they learn which part fails,
/// never why: the reason goes to the log.
async fn readyz(State(app): State<Arc<App>>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    let mut check = |name: &'static str, failure: Option<String>| {
        if let Some(reason) = &failure {
            tracing::warn!(check = name, %reason, "not ready");
        }
        ready &= failure.is_none();
        checks.insert(name.into(), if failure.is_some() { "failing" } else { "ok" }.into());
    };
    let database = match tokio::time::timeout(Duration::from_secs(2), app.store.ping()).await {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e.to_string()),
        Err(_) => Some("no answer within 2s".to_owned()),
    };
    check("database", database);
    let listeners = if app.readiness.shutting_down() {
        Some("shutting down".to_owned())
    } else if app.readiness.listeners_up() {
        None
    } else {
        Some("not accepting yet".to_owned())
    };
    check("listeners", listeners);
    if app.engine.name() == "redis" {
        let redis = match tokio::time::timeout(Duration::from_secs(3), app.engine.ping()).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some("no answer within 3s".to_owned()),
        };
        check("redis", redis);
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "status": if ready { "ready" } else { "not ready" }, "checks": checks }))).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], app.metrics.encode())
        .into_response()
}

/// The 401 for a request without the admin secret as its bearer token; `None` when it has it.
/// A request body, refused past `limit` bytes (declared or sent) without reading more.
async fn read_body(
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
    limit: usize,
) -> Result<bytes::Bytes, error::HttpError> {
    use http_body_util::{BodyExt, Limited};
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(error::HttpError::too_large(limit));
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error::HttpError::too_large(limit)),
        Err(e) => Err(error::HttpError::bad_request(format!("cannot read body: {e}"))),
    }
}

fn refuse_non_admin(app: &App, headers: &axum::http::HeaderMap) -> Option<Response> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::secrets::bearer_credential)
        .map(str::as_bytes)
        .unwrap_or_default();
    if app.secrets.admin_matches(presented) {
        return None;
    }
    app.metrics.auth_failure("admin");
    Some(error::HttpError::unauthorized("Authorization: Bearer <admin secret> required").into_response())
}

/// `GET /agents`: open agent streams on every replica. Guarded by the admin secret as a bearer
/// token, since it names agents (the webhook secrets open no operator endpoint).
async fn agents(State(app): State<Arc<App>>, headers: axum::http::HeaderMap) -> Response {
    if let Some(refused) = refuse_non_admin(&app, &headers) {
        return refused;
    }
    let listed = async {
        Ok::<_, crate::engine::EngineError>((
            app.engine.connections().await?,
            app.engine.pods(PodFilter::All).await?,
            app.engine.tunnels().await?,
        ))
    };
    // What kas last did in clusters (OCI reconciles), newest first.
    let actions = match app.store.recent_actions(200).await {
        Ok(actions) => actions,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list cluster actions");
            return error::HttpError::from(e).into_response();
        }
    };
    // The last state Flux reported per agent and Kustomization (sync status).
    let sync = match app.store.kustomizations(1000).await {
        Ok(sync) => sync,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list Flux sync states");
            return error::HttpError::from(e).into_response();
        }
    };
    match listed.await {
        Ok((connections, pods, tunnels)) => Json(json!({
            "connections": connections, "pods": pods, "tunnels": tunnels, "cluster_actions": actions, "sync": sync,
        }))
        .into_response(),
        Err(e) => error::HttpError::from(e).into_response(),
    }
}
