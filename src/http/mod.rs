//! The HTTP listener (axum): webhooks, liveness, readiness and metrics. The only place that
//! knows HTTP status codes.

mod webhook;

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
        .route("/agents", get(agents))
        .with_state(app)
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 when the database answers, the listeners accept and shutdown has not begun; otherwise
/// 503 naming each failing part.
async fn readyz(State(app): State<Arc<App>>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ready = true;
    let database = match tokio::time::timeout(Duration::from_secs(2), app.store.ping()).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => format!("failing: {e}"),
        Err(_) => "failing: no answer within 2s".to_owned(),
    };
    ready &= database == "ok";
    checks.insert("database".into(), database.into());
    let listeners = if app.readiness.shutting_down() {
        "failing: shutting down"
    } else if app.readiness.listeners_up() {
        "ok"
    } else {
        "failing: not accepting yet"
    };
    ready &= listeners == "ok";
    checks.insert("listeners".into(), listeners.into());
    if app.engine.name() == "redis" {
        let redis = match tokio::time::timeout(Duration::from_secs(3), app.engine.ping()).await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(e)) => format!("failing: {e}"),
            Err(_) => "failing: no answer within 3s".to_owned(),
        };
        ready &= redis == "ok";
        checks.insert("redis".into(), redis.into());
    }
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    if !ready {
        tracing::debug!(?checks, "not ready");
    }
    (status, Json(json!({ "status": if ready { "ready" } else { "not ready" }, "checks": checks }))).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], app.metrics.encode())
        .into_response()
}

/// `GET /agents`: open agent streams on every replica. Guarded by the webhook secret as a
/// bearer token, since it names agents.
async fn agents(State(app): State<Arc<App>>, headers: axum::http::HeaderMap) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::secrets::bearer_credential)
        .map(str::as_bytes)
        .unwrap_or_default();
    if !app.secrets.webhook_token_matches(presented) {
        app.metrics.auth_failure("admin");
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "Authorization: Bearer <webhook secret> required"})))
            .into_response();
    }
    let listed = async {
        Ok::<_, crate::engine::EngineError>((app.engine.connections().await?, app.engine.pods(PodFilter::All).await?))
    };
    match listed.await {
        Ok((connections, pods)) => Json(json!({ "connections": connections, "pods": pods })).into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": e.to_string()}))).into_response(),
    }
}
