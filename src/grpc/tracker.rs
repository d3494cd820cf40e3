//! `AgentTracker/GetConnectedAgents` (GitLab-facing, JWT): the registered pods of an agent or
//! of a configuration project, as GitLab shows them.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::App;
use crate::engine::PodFilter;
use crate::proto::agent_tracker::ConnectedAgentInfo;
use crate::proto::agent_tracker::rpc::agent_tracker_server::AgentTracker;
use crate::proto::agent_tracker::rpc::get_connected_agents_request::Request as By;
use crate::proto::agent_tracker::rpc::{GetConnectedAgentsRequest, GetConnectedAgentsResponse};
use crate::proto::entity::{AgentMeta, KubernetesVersion};

/// The AgentTracker service.
pub struct TrackerService {
    app: Arc<App>,
}

impl TrackerService {
    /// Serves with the shared state.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl AgentTracker for TrackerService {
    async fn get_connected_agents(
        &self,
        request: Request<GetConnectedAgentsRequest>,
    ) -> Result<Response<GetConnectedAgentsResponse>, Status> {
        super::authorize_gitlab(&self.app, request.metadata())?;
        let filter = match request.into_inner().request {
            Some(By::ProjectId(id)) => PodFilter::Project(id),
            Some(By::AgentId(id)) => PodFilter::Agent(id),
            None => return Err(Status::invalid_argument("project_id or agent_id is required")),
        };
        let pods = self.app.engine.pods(filter).await.map_err(|e| Status::unavailable(e.to_string()))?;
        let agents = pods
            .into_iter()
            .map(|p| ConnectedAgentInfo {
                agent_meta: Some(AgentMeta {
                    version: p.meta.version,
                    commit_id: p.meta.commit_id,
                    pod_namespace: p.meta.pod_namespace,
                    pod_name: p.meta.pod_name,
                    kubernetes_version: p.meta.kubernetes_version.map(|[major, minor, git_version, platform]| {
                        KubernetesVersion { major, minor, git_version, platform }
                    }),
                }),
                connected_at: Some(prost_types::Timestamp {
                    seconds: p.connected_at.div_euclid(1000),
                    nanos: (p.connected_at.rem_euclid(1000) * 1_000_000) as i32,
                }),
                connection_id: p.pod_id,
                agent_id: p.agent_id,
                project_id: p.project_id,
            })
            .collect();
        Ok(Response::new(GetConnectedAgentsResponse { agents }))
    }
}
