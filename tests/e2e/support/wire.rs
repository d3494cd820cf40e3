//! The messages agentk and GitLab Rails of each version send and read, declared here from the
//! facts of the wire (design brief §2, §8, §11) independently of kas's own `proto/`, and a client
//! that calls any method by its path. Presumed field numbers are the brief's (proto/README.md).

use std::collections::HashMap;

use prost::Message;
use tonic::codec::{CompressionEncoding, Streaming};
use tonic::transport::Channel;
use tonic::{Request, Status};

pub const GET_CONFIGURATION: &str = "/gitlab.agent.agent_configuration.rpc.AgentConfiguration/GetConfiguration";
pub const REGISTER: &str = "/gitlab.agent.agent_registrar.rpc.AgentRegistrar/Register";
pub const UNREGISTER: &str = "/gitlab.agent.agent_registrar.rpc.AgentRegistrar/Unregister";
pub const GET_CONNECTED_AGENTS: &str = "/gitlab.agent.agent_tracker.rpc.AgentTracker/GetConnectedAgents";
/// The by-ids method under each name GitLab has used: 16.7, 16.9–18.x, 18.x.
pub const BY_AGENT_IDS: [&str; 3] = [
    "/gitlab.agent.agent_tracker.rpc.AgentTracker/GetConnectedAgentsByAgentIds",
    "/gitlab.agent.agent_tracker.rpc.AgentTracker/GetConnectedAgentsByAgentIDs",
    "/gitlab.agent.agent_tracker.rpc.AgentTracker/GetConnectedAgentksByAgentIDs",
];
pub const GET_SERVER_INFO: &str = "/gitlab.agent.server_info.rpc.ServerInfo/GetServerInfo";
pub const LIST_AGENT_CONFIG_FILES: &str =
    "/gitlab.agent.configuration_project.rpc.ConfigurationProject/ListAgentConfigFiles";

// ---- agentk ----

#[derive(Clone, PartialEq, Message)]
pub struct KubernetesVersion {
    #[prost(string, tag = "1")]
    pub major: String,
    #[prost(string, tag = "2")]
    pub minor: String,
    #[prost(string, tag = "3")]
    pub git_version: String,
    #[prost(string, tag = "4")]
    pub platform: String,
}

/// `AgentMeta` as agentk 16 sends it.
#[derive(Clone, PartialEq, Message)]
pub struct AgentMeta16 {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub commit_id: String,
    #[prost(string, tag = "3")]
    pub pod_namespace: String,
    #[prost(string, tag = "4")]
    pub pod_name: String,
    #[prost(message, optional, tag = "5")]
    pub kubernetes_version: Option<KubernetesVersion>,
}

/// `AgentMeta` as agentk 18 sends it, with a field from a version newer still (`later`, 15),
/// which nobody has declared: kas must keep it as well.
#[derive(Clone, PartialEq, Message)]
pub struct AgentMeta18 {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub commit_id: String,
    #[prost(string, tag = "3")]
    pub pod_namespace: String,
    #[prost(string, tag = "4")]
    pub pod_name: String,
    #[prost(message, optional, tag = "5")]
    pub kubernetes_version: Option<KubernetesVersion>,
    #[prost(string, tag = "6")]
    pub git_ref: String,
    #[prost(map = "string, string", tag = "7")]
    pub extra_telemetry_data: HashMap<String, String>,
    #[prost(string, tag = "15")]
    pub later: String,
}

/// agentk ≤ 17.0: commit id, agent metadata, and whether it registers itself.
#[derive(Clone, PartialEq, Message)]
pub struct ConfigurationRequest16 {
    #[prost(string, tag = "1")]
    pub commit_id: String,
    #[prost(message, optional, tag = "2")]
    pub agent_meta: Option<AgentMeta16>,
    #[prost(bool, tag = "3")]
    pub skip_register: bool,
}

/// agentk 17.1+: the commit id only.
#[derive(Clone, PartialEq, Message)]
pub struct ConfigurationRequest17 {
    #[prost(string, tag = "1")]
    pub commit_id: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct FluxCf {
    #[prost(string, tag = "1")]
    pub webhook_receiver_url: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct LoggingCf {
    /// info 0, debug 1, warn 2, error 3.
    #[prost(int32, tag = "1")]
    pub level: i32,
}

#[derive(Clone, PartialEq, Message)]
pub struct ObservabilityCf {
    #[prost(message, optional, tag = "1")]
    pub logging: Option<LoggingCf>,
}

/// What agentk reads of its configuration (the parts kas sends).
#[derive(Clone, PartialEq, Message)]
pub struct AgentConfiguration {
    #[prost(message, optional, tag = "2")]
    pub observability: Option<ObservabilityCf>,
    #[prost(int64, tag = "4")]
    pub agent_id: i64,
    #[prost(int64, tag = "5")]
    pub project_id: i64,
    #[prost(string, tag = "8")]
    pub project_path: String,
    #[prost(message, optional, tag = "10")]
    pub flux: Option<FluxCf>,
    #[prost(string, tag = "11")]
    pub gitlab_external_url: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ConfigurationResponse {
    #[prost(message, optional, tag = "1")]
    pub configuration: Option<AgentConfiguration>,
    #[prost(string, tag = "2")]
    pub commit_id: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct RegisterRequest16 {
    #[prost(message, optional, tag = "1")]
    pub agent_meta: Option<AgentMeta16>,
    #[prost(int64, tag = "2")]
    pub pod_id: i64,
}

/// `RegisterRequest` and `UnregisterRequest` (17.4+) of agentk 18.
#[derive(Clone, PartialEq, Message)]
pub struct RegisterRequest18 {
    #[prost(message, optional, tag = "1")]
    pub agent_meta: Option<AgentMeta18>,
    #[prost(int64, tag = "2")]
    pub pod_id: i64,
}

/// Any empty message.
#[derive(Clone, PartialEq, Message)]
pub struct Empty {}

// ---- GitLab Rails ----

/// `ConnectedAgentInfo` as GitLab 16 reads it.
#[derive(Clone, PartialEq, Message)]
pub struct ConnectedAgentInfo16 {
    #[prost(message, optional, tag = "1")]
    pub agent_meta: Option<AgentMeta16>,
    #[prost(message, optional, tag = "2")]
    pub connected_at: Option<prost_types::Timestamp>,
    #[prost(int64, tag = "3")]
    pub connection_id: i64,
    #[prost(int64, tag = "4")]
    pub agent_id: i64,
    #[prost(int64, tag = "5")]
    pub project_id: i64,
}

#[derive(Clone, PartialEq, ::prost::Oneof)]
pub enum By {
    #[prost(int64, tag = "1")]
    ProjectId(i64),
    #[prost(int64, tag = "2")]
    AgentId(i64),
}

#[derive(Clone, PartialEq, Message)]
pub struct GetConnectedAgentsRequest16 {
    #[prost(oneof = "By", tags = "1, 2")]
    pub request: Option<By>,
}

#[derive(Clone, PartialEq, Message)]
pub struct GetConnectedAgentsResponse16 {
    #[prost(message, repeated, tag = "1")]
    pub agents: Vec<ConnectedAgentInfo16>,
}

/// `ConnectedAgentInfo` as GitLab 18 reads it (agent metadata with the 18 fields; `warnings`
/// at 6, which kas never sends).
#[derive(Clone, PartialEq, Message)]
pub struct ConnectedAgentInfo18 {
    #[prost(message, optional, tag = "1")]
    pub agent_meta: Option<AgentMeta18>,
    #[prost(message, optional, tag = "2")]
    pub connected_at: Option<prost_types::Timestamp>,
    #[prost(int64, tag = "3")]
    pub connection_id: i64,
    #[prost(int64, tag = "4")]
    pub agent_id: i64,
    #[prost(int64, tag = "5")]
    pub project_id: i64,
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub warnings: Vec<Vec<u8>>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ByAgentIdsRequest {
    #[prost(int64, repeated, tag = "1")]
    pub agent_ids: Vec<i64>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ByAgentIdsResponse {
    #[prost(message, repeated, tag = "1")]
    pub agents: Vec<ConnectedAgentInfo18>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ServerInfo {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub git_ref: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct GetServerInfoResponse {
    #[prost(message, optional, tag = "1")]
    pub current_server_info: Option<ServerInfo>,
}

/// Gitaly's `Repository`, as Rails fills it for a project.
#[derive(Clone, PartialEq, Message)]
pub struct GitalyRepository {
    #[prost(string, tag = "2")]
    pub storage_name: String,
    #[prost(string, tag = "3")]
    pub relative_path: String,
    #[prost(string, tag = "4")]
    pub git_object_directory: String,
    #[prost(string, repeated, tag = "5")]
    pub git_alternate_object_directories: Vec<String>,
    #[prost(string, tag = "6")]
    pub gl_repository: String,
    #[prost(string, tag = "8")]
    pub gl_project_path: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct GitalyInfo {
    #[prost(string, tag = "1")]
    pub address: String,
    #[prost(string, tag = "2")]
    pub token: String,
    #[prost(map = "string, string", tag = "3")]
    pub features: HashMap<String, String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ListAgentConfigFilesRequest {
    #[prost(message, optional, tag = "1")]
    pub repository: Option<GitalyRepository>,
    #[prost(message, optional, tag = "2")]
    pub gitaly_info: Option<GitalyInfo>,
}

#[derive(Clone, PartialEq, Message)]
pub struct AgentConfigFile {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub agent_name: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct ListAgentConfigFilesResponse {
    #[prost(message, repeated, tag = "1")]
    pub config_files: Vec<AgentConfigFile>,
}

/// What Rails sends for a project's repository when it lists configuration files.
pub fn list_config_files_request(project_id: i64, path: &str) -> ListAgentConfigFilesRequest {
    ListAgentConfigFilesRequest {
        repository: Some(GitalyRepository {
            storage_name: "default".into(),
            relative_path: format!("@hashed/{project_id}.git"),
            gl_repository: format!("project-{project_id}"),
            gl_project_path: path.into(),
            ..Default::default()
        }),
        gitaly_info: Some(GitalyInfo { address: "unix:/gitaly.socket".into(), ..Default::default() }),
    }
}

// ---- calls ----

/// A request with GitLab Rails' metadata: its JWT (Rails writes the scheme in lower case) and
/// the `kas-feature-*` flags it adds to every call.
pub fn as_rails<T>(jwt: &str, message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert("authorization", format!("bearer {jwt}").parse().unwrap());
    r.metadata_mut().insert("kas-feature-some_rollout", "true".parse().unwrap());
    r.metadata_mut().insert("kas-feature-other_rollout", "false".parse().unwrap());
    r
}

fn grpc(channel: Channel, gzip: bool) -> tonic::client::Grpc<Channel> {
    let grpc = tonic::client::Grpc::new(channel);
    if gzip { grpc.send_compressed(CompressionEncoding::Gzip) } else { grpc }
}

/// A unary call of `path` (agentk compresses with gzip; Rails does not).
pub async fn unary<Req, Resp>(
    channel: &Channel,
    path: &'static str,
    request: Request<Req>,
    gzip: bool,
) -> Result<Resp, Status>
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Default + Send + Sync + 'static,
{
    let mut grpc = grpc(channel.clone(), gzip);
    grpc.ready().await.map_err(|e| Status::unknown(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.unary(request, path, tonic_prost::ProstCodec::default()).await.map(|r| r.into_inner())
}

/// A server-streaming call of `path`, as agentk (gzip).
pub async fn server_streaming<Req, Resp>(
    channel: &Channel,
    path: &'static str,
    request: Request<Req>,
) -> Result<Streaming<Resp>, Status>
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Default + Send + Sync + 'static,
{
    let mut grpc = grpc(channel.clone(), true);
    grpc.ready().await.map_err(|e| Status::unknown(e.to_string()))?;
    let path = http::uri::PathAndQuery::from_static(path);
    grpc.server_streaming(request, path, tonic_prost::ProstCodec::default()).await.map(|r| r.into_inner())
}
