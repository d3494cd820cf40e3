//! `AgentRegistrar`: agentk registers each pod every 5 minutes (the registration is kept in the
//! connection state and expires on its own when the pod stops renewing it) and, since 17.4,
//! unregisters a pod when it stops.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::App;
use crate::proto::agent_registrar::rpc::agent_registrar_server::AgentRegistrar;
use crate::proto::agent_registrar::rpc::{RegisterRequest, RegisterResponse, UnregisterRequest, UnregisterResponse};

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
        let agent = super::authenticate_agent(app, request.metadata(), request.extensions()).await?;
        let request = request.into_inner();
        let raw = request.agent_meta.ok_or_else(|| Status::invalid_argument("agent_meta is required"))?;
        if request.pod_id == 0 {
            return Err(Status::invalid_argument("pod_id is required"));
        }
        let meta = super::configuration::meta_record(&raw, app.config.max_agent_meta)?;
        let pod_name = meta.pod_name.clone();
        let pod = super::configuration::pod_record(app, &agent, request.pod_id, meta);
        app.engine.register_pod(pod, app.config.max_pods_per_agent).await.map_err(super::too_many_pods)?;
        tracing::debug!(agent = agent.id, pod = request.pod_id, %pod_name, "agent pod registered");
        Ok(Response::new(RegisterResponse {}))
    }

    async fn unregister(&self, request: Request<UnregisterRequest>) -> Result<Response<UnregisterResponse>, Status> {
        let app = &self.app;
        let agent = super::authenticate_agent(app, request.metadata(), request.extensions()).await?;
        let request = request.into_inner();
        if request.pod_id == 0 {
            return Err(Status::invalid_argument("pod_id is required"));
        }
        // The agent's own pods only: the engine keys registrations by (agent, pod).
        app.engine.unregister_pod(agent.id, request.pod_id).await;
        tracing::debug!(agent = agent.id, pod = request.pod_id, "agent pod unregistered");
        Ok(Response::new(UnregisterResponse {}))
    }
}
