//! The gRPC edges (tonic): the agent-facing services and the GitLab-facing ones. Domain and
//! storage errors become gRPC status codes here and nowhere else.

pub mod codec;
mod configuration;
mod configuration_project;
mod flux;
mod notifications;
mod registrar;
pub mod server_info;
mod status;
mod tracker;
mod tunnel;

use std::sync::Arc;

use tonic::Status;
use tonic::codec::CompressionEncoding;
use tonic::metadata::MetadataMap;
use tonic::service::Routes;

use crate::app::App;
use crate::domain::AgentToken;
use crate::identity::AgentIdentity;
use crate::proto::agent_configuration::rpc::agent_configuration_server::AgentConfigurationServer;
use crate::proto::agent_registrar::rpc::agent_registrar_server::AgentRegistrarServer;
use crate::proto::agent_tracker::rpc::agent_tracker_server::AgentTrackerServer;
use crate::proto::configuration_project::rpc::configuration_project_server::ConfigurationProjectServer;
use crate::proto::flux::rpc::git_lab_flux_server::GitLabFluxServer;
use crate::proto::gitlab_access::rpc::gitlab_access_server::GitlabAccessServer;
use crate::proto::notifications::rpc::notifications_server::NotificationsServer;
use crate::proto::reverse_tunnel::rpc::reverse_tunnel_server::ReverseTunnelServer;
use crate::proto::server_info::rpc::server_info_server::ServerInfoServer;

/// Largest tunnel or GitlabAccess message accepted from an agent.
const MAX_MESSAGE: usize = 1 << 20;
/// Largest message of the small calls (configuration, registration, everything GitLab calls).
/// Messages are decoded before the handler checks any credential, and a repeated field can
/// decode to many times its wire size (an empty project is 2 bytes on the wire, 24 in memory),
/// so every limit is as small as the call allows.
const MAX_SMALL_MESSAGE: usize = 64 << 10;

/// Services on the agent listener.
pub fn agent_routes(app: Arc<App>) -> axum::Router {
    // Bounded by the setting before decoding (tonic refuses a larger message with OUT_OF_RANGE,
    // before any credential is checked); `flux::validate` checks the rest.
    let flux = GitLabFluxServer::new(flux::FluxService::new(app.clone()))
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(app.config.max_reconcile_request);
    let configuration = AgentConfigurationServer::new(configuration::ConfigurationService::new(app.clone()))
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_SMALL_MESSAGE);
    let registrar = AgentRegistrarServer::new(registrar::RegistrarService::new(app.clone()))
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_SMALL_MESSAGE);
    let tunnel = ReverseTunnelServer::new(tunnel::TunnelService::new(app.clone()))
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_MESSAGE);
    let access = GitlabAccessServer::new(tunnel::TunnelService::new(app))
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_MESSAGE);
    Routes::new(flux)
        .add_service(configuration)
        .add_service(registrar)
        .add_service(tunnel)
        .add_service(access)
        .prepare()
        .into_axum_router()
}

/// Authenticates the agent token in `authorization: Bearer …`, before anything is sent. The
/// peer's address (from the connection) lets the directory limit lookups of unknown tokens per
/// peer.
pub(crate) async fn authenticate_agent(
    app: &App,
    metadata: &MetadataMap,
    extensions: &http::Extensions,
) -> Result<AgentIdentity, Status> {
    let peer = extensions.get::<crate::listener::ConnectionInfo>().map(|c| c.remote.ip());
    let result = match bearer(metadata).map(AgentToken::from_presented) {
        Ok(Some(token)) => app.directory.authenticate(&token, peer).await.map_err(Status::from),
        Ok(None) => Err(Status::unauthenticated("empty agent token")),
        Err(status) => Err(status),
    };
    if let Err(status) = &result
        && status.code() == tonic::Code::Unauthenticated
    {
        app.metrics.auth_failure("agent");
        tracing::info!(reason = status.message(), "agent call refused");
    }
    result
}

/// Services on the GitLab-facing listener.
pub fn api_routes(app: Arc<App>) -> axum::Router {
    let notifications = NotificationsServer::new(notifications::NotificationsService::new(app.clone()))
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_SMALL_MESSAGE);
    let tracker = AgentTrackerServer::new(tracker::TrackerService::new(app.clone()))
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_SMALL_MESSAGE);
    // What GitLab Rails 17/18 also calls on its agent server (`gitlab_kas` internal URL).
    let server_info = ServerInfoServer::new(server_info::ServerInfoService::new(app.clone()))
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_SMALL_MESSAGE);
    let configuration_project =
        ConfigurationProjectServer::new(configuration_project::ConfigurationProjectService::new(app))
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(MAX_SMALL_MESSAGE);
    Routes::new(notifications)
        .add_service(tracker)
        .add_service(server_info)
        .add_service(configuration_project)
        .prepare()
        .into_axum_router()
}

/// The credential of `authorization: Bearer <credential>` (scheme case-insensitive).
pub(crate) fn bearer(metadata: &MetadataMap) -> Result<&str, Status> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing authorization metadata"))?
        .to_str()
        .map_err(|_| Status::unauthenticated("malformed authorization metadata"))?;
    crate::secrets::bearer_credential(value)
        .ok_or_else(|| Status::unauthenticated("authorization must be 'Bearer <token>'"))
}

/// Checks the JWT GitLab sends on the GitLab-facing listener.
pub(crate) fn authorize_gitlab(app: &App, metadata: &MetadataMap) -> Result<(), Status> {
    let Some(jwt) = &app.gitlab_jwt else {
        app.metrics.auth_failure("api");
        return Err(Status::unauthenticated("kas has no GitLab shared secret configured (KAS_GITLAB_SECRET_FILE)"));
    };
    let result = bearer(metadata)
        .and_then(|token| jwt.verify_from_gitlab(token).map_err(|e| Status::unauthenticated(e.to_string())));
    if let Err(status) = &result {
        app.metrics.auth_failure("api");
        tracing::warn!(reason = status.message(), "GitLab-facing call refused");
    }
    result
}

/// Keeps an open-streams gauge right however a stream ends.
pub(crate) struct OpenGauge(prometheus_client::metrics::gauge::Gauge);

impl OpenGauge {
    pub(crate) fn new(g: prometheus_client::metrics::gauge::Gauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The token that ends a long stream cleanly: the connection's (shutdown or maximum age), or
/// the server's when the request did not come through a listener.
pub(crate) fn closing(app: &App, extensions: &http::Extensions) -> tokio_util::sync::CancellationToken {
    extensions
        .get::<crate::listener::ConnectionInfo>()
        .map(|c| c.closing.clone())
        .unwrap_or_else(|| app.shutdown.child_token())
}

/// The request checks the handlers run, public for the fuzz targets (`fuzz/`).
pub mod validate {
    pub use super::flux::validate as reconcile_projects;
    pub use super::notifications::validate as git_push_event;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_required() {
        let mut m = MetadataMap::new();
        assert!(bearer(&m).is_err());
        for (value, ok) in [
            ("Bearer abc", true),
            ("bearer abc", true),
            ("BEARER  abc ", true),
            ("Basic abc", false),
            ("Bearer", false),
            ("Bearer  ", false),
        ] {
            m.insert("authorization", value.parse().unwrap());
            assert_eq!(bearer(&m).is_ok(), ok, "{value:?}");
            if ok {
                assert_eq!(bearer(&m).unwrap(), "abc");
            }
        }
    }
}
