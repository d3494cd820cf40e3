//! `AgentTracker` (GitLab-facing, JWT): the registered pods of agents, across replicas, as GitLab
//! shows them. GitLab 16 asks by configuration project or agent id (`GetConnectedAgents`); later
//! versions ask for several agent ids at once under three method names, served by one function.

use std::sync::Arc;

use base64::Engine as _;
use prost::Message as _;
use tonic::{Request, Response, Status};

use crate::app::App;
use crate::engine::{PodFilter, PodRecord};
use crate::proto::agent_tracker::ConnectedAgentInfo;
use crate::proto::agent_tracker::rpc::agent_tracker_server::AgentTracker;
use crate::proto::agent_tracker::rpc::get_connected_agents_request::Request as By;
use crate::proto::agent_tracker::rpc::{
    GetConnectedAgentsByAgentIDsRequest, GetConnectedAgentsByAgentIDsResponse, GetConnectedAgentsRequest,
    GetConnectedAgentsResponse,
};
use crate::proto::entity::{AgentMeta, KubernetesVersion};

/// Most agent ids one call may ask about (GitLab asks for one page of agents).
const MAX_AGENT_IDS: usize = 1000;

/// The AgentTracker service.
pub struct TrackerService {
    app: Arc<App>,
}

impl TrackerService {
    /// Serves with the shared state.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }

    async fn by_agent_ids(
        &self,
        request: Request<GetConnectedAgentsByAgentIDsRequest>,
    ) -> Result<Response<GetConnectedAgentsByAgentIDsResponse>, Status> {
        super::authorize_gitlab(&self.app, request.metadata())?;
        let mut ids = request.into_inner().agent_ids;
        ids.sort_unstable();
        ids.dedup();
        if ids.len() > MAX_AGENT_IDS {
            return Err(Status::invalid_argument(format!("at most {MAX_AGENT_IDS} agent_ids per call")));
        }
        let lists =
            futures::future::try_join_all(ids.into_iter().map(|id| self.app.engine.pods(PodFilter::Agent(id)))).await?;
        let agents = lists.into_iter().flatten().map(connected_agent).collect();
        Ok(Response::new(GetConnectedAgentsByAgentIDsResponse { agents }))
    }
}

/// What GitLab is told about a pod: its `AgentMeta` exactly as the pod sent it.
fn connected_agent(p: PodRecord) -> ConnectedAgentInfo {
    let raw = base64::engine::general_purpose::STANDARD.decode(&p.meta.raw).ok().filter(|raw| !raw.is_empty());
    // Records written before kas kept the bytes: rebuilt from what was kept.
    let agent_meta = raw.unwrap_or_else(|| {
        AgentMeta {
            version: p.meta.version,
            commit_id: p.meta.commit_id,
            pod_namespace: p.meta.pod_namespace,
            pod_name: p.meta.pod_name,
            kubernetes_version: p
                .meta
                .kubernetes_version
                .map(|[major, minor, git_version, platform]| KubernetesVersion { major, minor, git_version, platform }),
            ..Default::default()
        }
        .encode_to_vec()
    });
    ConnectedAgentInfo {
        agent_meta,
        connected_at: Some(prost_types::Timestamp {
            seconds: p.connected_at.div_euclid(1000),
            nanos: (p.connected_at.rem_euclid(1000) * 1_000_000) as i32,
        }),
        connection_id: p.pod_id,
        agent_id: p.agent_id,
        project_id: p.project_id,
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
        let pods = self.app.engine.pods(filter).await?;
        let agents = pods.into_iter().map(connected_agent).collect();
        Ok(Response::new(GetConnectedAgentsResponse { agents }))
    }

    async fn get_connected_agents_by_agent_ids(
        &self,
        request: Request<GetConnectedAgentsByAgentIDsRequest>,
    ) -> Result<Response<GetConnectedAgentsByAgentIDsResponse>, Status> {
        self.by_agent_ids(request).await
    }

    async fn get_connected_agents_by_agent_i_ds(
        &self,
        request: Request<GetConnectedAgentsByAgentIDsRequest>,
    ) -> Result<Response<GetConnectedAgentsByAgentIDsResponse>, Status> {
        self.by_agent_ids(request).await
    }

    async fn get_connected_agentks_by_agent_i_ds(
        &self,
        request: Request<GetConnectedAgentsByAgentIDsRequest>,
    ) -> Result<Response<GetConnectedAgentsByAgentIDsResponse>, Status> {
        self.by_agent_ids(request).await
    }
}
