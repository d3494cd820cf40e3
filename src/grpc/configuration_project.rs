//! `ConfigurationProject/ListAgentConfigFiles` (GitLab-facing, JWT): the agent configuration
//! files a project holds, which GitLab lists on its "Connect a cluster" page. The answer comes
//! from the configuration source: the registry's agents of that project, or in GitLab mode the
//! repository tree read through the REST API.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::App;
use crate::domain::ProjectPath;
use crate::proto::configuration_project::rpc::configuration_project_server::ConfigurationProject;
use crate::proto::configuration_project::rpc::{
    AgentConfigFile, ListAgentConfigFilesRequest, ListAgentConfigFilesResponse,
};

/// The ConfigurationProject service.
pub struct ConfigurationProjectService {
    app: Arc<App>,
}

impl ConfigurationProjectService {
    /// Serves with the shared state.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl ConfigurationProject for ConfigurationProjectService {
    async fn list_agent_config_files(
        &self,
        request: Request<ListAgentConfigFilesRequest>,
    ) -> Result<Response<ListAgentConfigFilesResponse>, Status> {
        super::authorize_gitlab(&self.app, request.metadata())?;
        let repository =
            request.into_inner().repository.ok_or_else(|| Status::invalid_argument("repository is required"))?;
        let project = ProjectPath::parse(&repository.gl_project_path)
            .map_err(|e| Status::invalid_argument(format!("repository.gl_project_path: {e}")))?;
        let names = self.app.config_watch.source().config_files(&project).await?;
        let config_files = names
            .into_iter()
            .map(|n| AgentConfigFile {
                name: crate::agentcfg::file_path(n.as_str()),
                agent_name: n.as_str().to_owned(),
            })
            .collect();
        Ok(Response::new(ListAgentConfigFilesResponse { config_files }))
    }
}
