//! `AgentRegistrar/Register`: agentk registers each pod every 5 minutes; the registration is
//! kept in the connection state and expires on its own when the pod stops renewing it.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::App;
use crate::proto::agent_registrar::rpc::agent_registrar_server::AgentRegistrar;
use crate::proto::agent_registrar::rpc::{RegisterRequest, RegisterResponse};

/// The AgentRegistrar service.
pub struct RegistrarService {
    app: Arc<App>,
}

impl RegistrarService {
    /// Serves with the shared state.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

#[tonic::async_trait]
impl AgentRegistrar for RegistrarService {
    async fn register(&self, request: Request<RegisterRequest>) -> Result<Response<RegisterResponse>, Status> {
        let app = &self.app;
        let agent = super::authenticate_agent(app, request.metadata()).await?;
        let request = request.into_inner();
        let meta = request.agent_meta.ok_or_else(|| Status::invalid_argument("agent_meta is required"))?;
        if request.pod_id == 0 {
            return Err(Status::invalid_argument("pod_id is required"));
        }
        app.engine.register_pod(super::configuration::pod_record(app, &agent, request.pod_id, &meta)).await;
        tracing::debug!(agent = agent.id, pod = request.pod_id, pod_name = %meta.pod_name, "agent pod registered");
        Ok(Response::new(RegisterResponse {}))
    }
}
