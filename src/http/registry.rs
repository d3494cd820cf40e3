//! `POST /webhooks/registry`: the container registry's notifications. Secret → media type →
//! body (bounded) → parse → map each manifest push to its project → record → 200.
//!
//! The registry retries an envelope until it gets a 2xx, so 200 is answered only once every
//! push of it is durably in the event log; a retry after a partial failure finds the recorded
//! ones by their event id and records only the rest.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::HttpError;
use crate::app::App;
use crate::domain::{EventKind, ImagePush, ImageRef, ProjectPath, PushEvent, RecordOutcome};
use crate::intake::registry::{self, RegistryEvent};

/// Media types the registry sends (distribution v2 and v3), and plain JSON.
const MEDIA_TYPES: [&str; 3] = [
    "application/vnd.docker.distribution.events.v1+json",
    "application/vnd.docker.distribution.events.v2+json",
    "application/json",
];

/// Handles one notification envelope; every outcome is counted under
/// `kas_registry_events_total{result}`.
pub async fn receive(State(app): State<Arc<App>>, request: Request) -> Response {
    match handle(&app, request).await {
        Ok(answer) => answer,
        Err(refused) => {
            app.metrics.registry_event(refused.label());
            refused.into_response()
        }
    }
}

async fn handle(app: &App, request: Request) -> Result<Response, HttpError> {
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    if !authorized(app, headers) {
        app.metrics.auth_failure("registry");
        tracing::warn!("registry notification with a missing or wrong Authorization");
        return Err(HttpError::unauthorized("missing or invalid Authorization"));
    }
    if let Some(media) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        let essence = media.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        if !MEDIA_TYPES.contains(&essence.as_str()) {
            return Err(HttpError::unsupported_media_type(format!("expected {}", MEDIA_TYPES.join(" or "))));
        }
    }
    let body = super::read_body(headers, body, app.config.webhook_body_limit).await?;
    let events = registry::parse(&body).map_err(|e| {
        tracing::info!(error = %e, "registry notification refused");
        HttpError::bad_request(e.to_string())
    })?;
    let (mut accepted, mut duplicates, mut ignored, mut unknown) = (0u64, 0u64, 0u64, 0u64);
    for event in events {
        let push = match event {
            RegistryEvent::Push(push) => push,
            RegistryEvent::Ignored(reason) => {
                app.metrics.registry_event("ignored");
                tracing::debug!(%reason, "registry event ignored");
                ignored += 1;
                continue;
            }
        };
        let (id, project) = match project_of(app, &push).await.map_err(unavailable)? {
            Some(found) => found,
            None => {
                // Recorded all the same (the log shows what the registry said), under the
                // repository path and no project id: no agent's access rule matches it unless
                // it is an agent's own configuration project.
                app.metrics.registry_event("unknown_project");
                tracing::info!(repository = %push.repository, "registry push for a repository of no known project");
                unknown += 1;
                (0, push.repository.clone())
            }
        };
        let event_id = push.event_id.clone();
        let (event, image) = recordable(push, id, project);
        match app.intake.record_image(event, image, &event_id).await.map_err(unavailable)? {
            RecordOutcome::Recorded(notice) => {
                app.metrics.registry_event("accepted");
                tracing::debug!(seq = notice.seq, project = %notice.project_path, "registry push recorded");
                accepted += 1;
            }
            RecordOutcome::Duplicate => {
                app.metrics.registry_event("duplicate");
                duplicates += 1;
            }
        }
    }
    Ok((
        StatusCode::OK,
        Json(json!({"accepted": accepted, "duplicates": duplicates, "ignored": ignored, "unknown_project": unknown})),
    )
        .into_response())
}

/// `Authorization: <secret>` as the registry's endpoint config sends it, or `Bearer <secret>`.
fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let value = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("").trim();
    let secret = crate::secrets::bearer_credential(value).unwrap_or(value);
    app.secrets.registry_matches(secret.as_bytes())
}

/// The project a repository belongs to, as GitLab maps it: the longest known project path that
/// is a prefix of the repository path.
async fn project_of(app: &App, push: &ImagePush) -> Result<Option<(i64, ProjectPath)>, crate::store::StoreError> {
    for candidate in push.project_candidates() {
        if let Some(project) = app.store.project_by_path(&candidate).await? {
            return Ok(Some((project.id, project.path)));
        }
    }
    Ok(None)
}

/// The event-log form of an image push: kind `ImagePush` under its project; the registry says
/// nothing about visibility, so none is carried.
fn recordable(push: ImagePush, project_id: i64, project_path: ProjectPath) -> (PushEvent, ImageRef) {
    let event = PushEvent {
        project_id,
        project_path,
        kind: EventKind::ImagePush,
        // Stored where a Git push keeps its ref and new commit, so the log reads alike.
        git_ref: push.tag.clone(),
        before: None,
        after: push.digest.clone(),
        visibility: None,
    };
    let image =
        ImageRef { repository: push.repository.to_string(), tag: push.tag, digest: push.digest, host: push.host };
    (event, image)
}

/// The registry retries; the reason (database errors) goes to the log only.
fn unavailable(e: impl std::fmt::Display) -> HttpError {
    tracing::warn!(error = %e, "cannot record a registry notification");
    HttpError::unavailable("cannot record the notification now; retry")
}
