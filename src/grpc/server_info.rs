//! `ServerInfo/GetServerInfo` (GitLab-facing, JWT): GitLab Rails 17/18 asks the agent server for
//! its version and the git ref it was built from. The version is `KAS_SERVER_VERSION` when set.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::App;
use crate::proto::server_info::rpc::server_info_server::ServerInfo;
use crate::proto::server_info::rpc::{CurrentServerInfo, GetServerInfoRequest, GetServerInfoResponse};

/// kas's version (the crate's), answered when `KAS_SERVER_VERSION` is not set.
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
        // GitLab uses the version as agentk's image tag in its install instructions, so admins
        // set it to GitLab's own (KAS_SERVER_VERSION); kas's crate version names no agentk image.
        let version = self.app.config.server_version.as_deref().unwrap_or(VERSION);
        let current_server_info = CurrentServerInfo { version: version.into(), git_ref: GIT_REF.into() };
        Ok(Response::new(GetServerInfoResponse { current_server_info: Some(current_server_info) }))
    }
}
