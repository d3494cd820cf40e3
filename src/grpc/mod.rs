//! The gRPC edges (tonic): the agent-facing services and the GitLab-facing ones. Domain and
//! storage errors become gRPC status codes here and nowhere else.

use std::sync::Arc;

use tonic::service::Routes;

use crate::app::App;

/// Services on the agent listener.
pub fn agent_routes(_app: Arc<App>) -> axum::Router {
    Routes::default().prepare().into_axum_router()
}

/// Services on the GitLab-facing listener.
pub fn api_routes(_app: Arc<App>) -> axum::Router {
    Routes::default().prepare().into_axum_router()
}
