//! `AgentRegistrar`: agentk registers each pod every 5 minutes (the registration is kept in the
//! connection state and expires on its own when the pod stops renewing it) and, since 17.4,
//! unregisters a pod when it stops.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use prost::Message as _;

use crate::app::App;
use crate::engine::{AgentMetaRecord, PodRecord, REGISTRATION_TTL};
use crate::identity::AgentIdentity;
use crate::proto::agent_registrar::rpc::agent_registrar_server::AgentRegistrar;
use crate::proto::agent_registrar::rpc::{RegisterRequest, RegisterResponse, UnregisterRequest, UnregisterResponse};
use crate::proto::entity::AgentMeta;

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
        let meta = meta_record(&raw, app.config.max_agent_meta)?;
        let pod_name = meta.pod_name.clone();
        let pod = pod_record(app, &agent, request.pod_id, meta);
        app.engine.register_pod(pod, app.config.max_pods_per_agent).await?;
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

/// Reads agentk's `AgentMeta` (sent as bytes, see proto/README.md) for the connection state,
/// keeping the bytes themselves so fields kas does not know reach GitLab unchanged. At most
/// `max_bytes` are kept per pod: the record lives in memory and in Redis for every replica.
pub(crate) fn meta_record(raw: &[u8], max_bytes: usize) -> Result<AgentMetaRecord, Status> {
    use base64::Engine as _;
    if raw.len() > max_bytes {
        return Err(Status::invalid_argument(format!(
            "agent_meta is {} bytes; at most {max_bytes} are accepted",
            raw.len()
        )));
    }
    let meta = AgentMeta::decode(raw).map_err(|e| Status::invalid_argument(format!("agent_meta: {e}")))?;
    Ok(AgentMetaRecord {
        version: meta.version,
        commit_id: meta.commit_id,
        pod_namespace: meta.pod_namespace,
        pod_name: meta.pod_name,
        kubernetes_version: meta.kubernetes_version.map(|k| [k.major, k.minor, k.git_version, k.platform]),
        raw: base64::engine::general_purpose::STANDARD.encode(raw),
    })
}

/// A registration record for `agent`'s pod.
pub(crate) fn pod_record(app: &App, agent: &AgentIdentity, pod_id: i64, meta: AgentMetaRecord) -> PodRecord {
    let now = app.clock.now_ms();
    PodRecord {
        agent_id: agent.id,
        project_id: agent.config_project_id.unwrap_or(0),
        pod_id,
        meta,
        connected_at: now,
        replica: app.config.replica_name.clone(),
        expires_at: now + REGISTRATION_TTL.as_millis() as i64,
    }
}
