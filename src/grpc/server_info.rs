//! `ServerInfo/GetServerInfo` (GitLab-facing, JWT): GitLab Rails 17/18 asks the agent server for
//! its version and the git ref it was built from.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::App;
use crate::proto::server_info::rpc::server_info_server::ServerInfo;
use crate::proto::server_info::rpc::{CurrentServerInfo, GetServerInfoRequest, GetServerInfoResponse};

/// kas's version (the crate's).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git ref kas was built from (set by `build.rs`; "unknown" outside a git checkout).
pub const GIT_REF: &str = env!("KAS_GIT_REF");

/// The ServerInfo service.
pub struct ServerInfoService {
    app: Arc<App>,
}

impl ServerInfoService {
    /// Serves with the shared state.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl ServerInfo for ServerInfoService {
    async fn get_server_info(
        &self,
        request: Request<GetServerInfoRequest>,
    ) -> Result<Response<GetServerInfoResponse>, Status> {
        super::authorize_gitlab(&self.app, request.metadata())?;
        // GitLab puts this version into its "Connect a cluster" install command as agentk's image
        // tag, so operators set KAS_SERVER_VERSION to their GitLab's version.
        let version = self.app.config.server_version.clone().unwrap_or_else(|| VERSION.into());
        let current_server_info = CurrentServerInfo { version, git_ref: GIT_REF.into() };
        Ok(Response::new(GetServerInfoResponse { current_server_info: Some(current_server_info) }))
    }
}
