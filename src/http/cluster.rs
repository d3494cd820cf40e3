//! `GET /cluster?agent=AGENT&path=PATH`: what `kas cluster get` calls. Admin secret; read-only;
//! only for agents whose configuration file sets `kas.cluster_read: true` (checked on the replica
//! that makes the call). The cluster's answer is passed through with `Kas-Cluster-Status`; kas's
//! own refusals are JSON `{"error": …}` without that header.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::HttpError;
use crate::app::App;
use crate::domain::AgentId;
use crate::tunnel::{KubeRequest, Purpose};

/// Marks an answer that came from the cluster (its status is the cluster's).
pub const CLUSTER_STATUS: &str = "kas-cluster-status";
/// Answer headers passed through to the operator.
const PASSED: [&str; 2] = ["content-type", "warning"];

/// The query of `GET /cluster`.
#[derive(serde::Deserialize)]
pub struct ClusterQuery {
    /// Agent id or name.
    agent: String,
    /// Path, with an optional `?query`.
    path: String,
}

/// Handles `GET /cluster`.
pub async fn get(State(app): State<Arc<App>>, headers: HeaderMap, Query(q): Query<ClusterQuery>) -> Response {
    if let Some(refused) = super::refuse_non_admin(&app, &headers) {
        return refused;
    }
    let agent = match resolve(&app, &q.agent).await {
        Ok(id) => id,
        Err(refused) => return refused.into_response(),
    };
    tracing::info!(agent, path = %q.path.split('?').next().unwrap_or_default(), "operator reads the cluster (kas cluster get)");
    match app.tunnels.call(agent, Purpose::ClusterRead, KubeRequest::get(&q.path)).await {
        Ok(answer) => {
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut response = Response::builder().status(status);
            for (name, value) in &answer.headers {
                if PASSED.contains(&name.to_ascii_lowercase().as_str())
                    && let (Ok(n), Ok(v)) = (HeaderName::try_from(name.as_str()), HeaderValue::try_from(value.as_str()))
                {
                    response = response.header(n, v);
                }
            }
            // Read whole (bounded) before answering, so a tunnel lost mid-answer is a clear 502
            // rather than a cut connection.
            match answer.body.collect(app.config.tunnel_max_response_body).await {
                Ok(body) => response
                    .header(CLUSTER_STATUS, answer.status)
                    .body(Body::from(body))
                    .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()),
                Err(e) => HttpError::from(e).into_response(),
            }
        }
        Err(e) => HttpError::from(e).into_response(),
    }
}

/// The agent an operator named: an id as given, a name when exactly one agent has it (among
/// those with tunnels anywhere, then kas's registry).
async fn resolve(app: &App, named: &str) -> Result<AgentId, HttpError> {
    if let Ok(id) = named.parse::<AgentId>() {
        return Ok(id);
    }
    let mut ids: Vec<AgentId> = match app.engine.tunnels().await {
        Ok(t) => t.into_iter().filter(|t| t.agent_name == named).map(|t| t.agent_id).collect(),
        Err(e) => return Err(e.into()),
    };
    if ids.is_empty()
        && let Ok(name) = crate::domain::AgentName::parse(named)
        && let Ok(agents) = app.store.agents_named(&name).await
    {
        ids = agents.into_iter().map(|a| a.id).collect();
    }
    ids.sort_unstable();
    ids.dedup();
    match ids[..] {
        [id] => Ok(id),
        [] => Err(HttpError::not_found(format!("no agent named {named:?} is known or connected; give its id"))),
        _ => Err(HttpError::conflict(format!("several agents are named {named:?} (ids {ids:?}): give the id"))),
    }
}
