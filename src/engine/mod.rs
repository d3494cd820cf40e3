//! Engines: how recorded events reach every replica, and where live connection state and
//! delivery positions live.
//!
//! The outbox hands each recorded event to this replica's delivery directly and to the engine
//! for every other replica. The in-process engine (the single-replica default) has no other
//! replica to reach; the Redis engine publishes to all of them and feeds what the others
//! publish into this replica's delivery.

mod memory;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::domain::AgentId;
use crate::domain::{DeliveryPosition, EventNotice};
use crate::metrics::Metrics;
use crate::store::EventLog;

pub use memory::MemoryEngine;
pub use redis::{RedisEngine, RedisTarget};

/// What an engine could not do.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The backing service (Redis) failed or is unreachable.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
}

/// Where events for this replica's agent streams go.
pub trait LocalDelivery: Send + Sync + 'static {
    /// Hands events to the local streams that want them; never blocks on a slow agent, and
    /// ignores an event it was already given.
    fn deliver(&self, notices: &[EventNotice]);
}

/// Hands every event to each of several local deliveries.
pub struct DeliverToAll(pub Vec<Arc<dyn LocalDelivery>>);

impl LocalDelivery for DeliverToAll {
    fn deliver(&self, notices: &[EventNotice]) {
        for d in &self.0 {
            d.deliver(notices);
        }
    }
}

/// One open agent stream, as the connection state lists it across replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// Unique id: `<replica>/<stream>`.
    pub id: String,
    /// Replica serving it.
    pub replica: String,
    /// Agent id.
    pub agent_id: AgentId,
    /// Agent name.
    pub agent_name: String,
    /// RPC (`reconcile_projects`, …).
    pub rpc: String,
    /// Unix milliseconds.
    pub connected_at: i64,
    /// Number of projects the stream asked for.
    pub projects: usize,
}

/// How long a registration lives without being refreshed: agentk registers every 5 minutes,
/// so a pod that is gone disappears about two periods later.
pub const REGISTRATION_TTL: Duration = Duration::from_secs(11 * 60);

/// What an agent pod says about itself (`AgentMeta`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMetaRecord {
    /// agentk version.
    pub version: String,
    /// agentk commit.
    pub commit_id: String,
    /// Pod namespace.
    pub pod_namespace: String,
    /// Pod name.
    pub pod_name: String,
    /// Kubernetes version: major, minor, git version, platform.
    pub kubernetes_version: Option<[String; 4]>,
    /// The `AgentMeta` message exactly as the pod sent it (base64), fields kas does not know
    /// included; what GitLab gets back. Empty in records written before kas kept it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub raw: String,
}

/// A registered agent pod (`AgentRegistrar/Register`, or a configuration stream that asked to
/// be registered). Registrations expire on their own after `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    /// Agent id.
    pub agent_id: AgentId,
    /// Configuration project id (0 when unknown).
    pub project_id: i64,
    /// The pod's connection id.
    pub pod_id: i64,
    /// What the pod says about itself.
    pub meta: AgentMetaRecord,
    /// Unix milliseconds of the first registration.
    pub connected_at: i64,
    /// Replica that took the registration.
    pub replica: String,
    /// Unix milliseconds after which the registration is gone.
    pub expires_at: i64,
}

/// An agent already has as many live pod registrations as it may.
#[derive(Debug, thiserror::Error)]
#[error("agent {agent} already has {limit} pods registered")]
pub struct TooManyPods {
    /// The agent.
    pub agent: AgentId,
    /// The limit it reached.
    pub limit: usize,
}

/// Which registrations to list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodFilter {
    /// One agent's pods.
    Agent(AgentId),
    /// Pods of the agents of one configuration project.
    Project(i64),
    /// Every pod.
    All,
}

impl PodFilter {
    /// Whether `pod` is selected.
    pub fn matches(&self, pod: &PodRecord) -> bool {
        match *self {
            Self::Agent(id) => pod.agent_id == id,
            Self::Project(id) => pod.project_id == id,
            Self::All => true,
        }
    }
}

/// This replica's tunnels for one agent, as the tunnel presence lists them across replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelCount {
    /// Agent id.
    pub agent_id: AgentId,
    /// Agent name.
    pub agent_name: String,
    /// The replica instance holding them (filled in by the engine; what direct messages address).
    #[serde(default)]
    pub replica: String,
    /// Tunnels waiting for a request.
    pub idle: usize,
    /// Tunnels carrying a request now.
    pub busy: usize,
    /// What the agent's latest tunnel serves (`service/method`, from its descriptor).
    #[serde(default)]
    pub methods: Vec<String>,
}

/// What a claim of a once-only action found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnceClaim {
    /// This replica holds the claim: it acts, then calls `finish_once`.
    Won,
    /// Another replica holds the claim and has not finished (it expires if that replica dies).
    Running,
    /// The action was done.
    Done,
}

/// Largest direct message between replicas (signed envelope included): kept well under Redis's
/// default output buffer limit for pub/sub clients (32 MiB), past which Redis drops the subscriber.
pub const MAX_DIRECT_MESSAGE: usize = 24 << 20;

/// What an engine's background tasks need.
pub struct EngineContext {
    /// This replica's delivery, fed with other replicas' events.
    pub local: Arc<dyn LocalDelivery>,
    /// The event log, to catch up after missing published events.
    pub log: Arc<dyn EventLog>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// How far back a catch-up may reach.
    pub replay_window: Duration,
    /// Cancelled at shutdown.
    pub shutdown: CancellationToken,
    /// The server's background tasks, which shutdown waits for.
    pub tasks: tokio_util::task::TaskTracker,
}

/// How recorded events reach every replica.
#[async_trait]
pub trait Broadcast: Send + Sync + 'static {
    /// Short name for logs and `/readyz` (`memory`, `redis`).
    fn name(&self) -> &'static str;
    /// Starts background work (subscriptions, heartbeats) on the server's task tracker; returns
    /// at once.
    fn start(self: Arc<Self>, ctx: EngineContext);
    /// Makes recorded events reach every other replica's local delivery.
    async fn broadcast(&self, notices: &[EventNotice]) -> Result<(), EngineError>;
    /// Whether the backing service answers and this replica receives what others publish.
    async fn ping(&self) -> Result<(), EngineError>;
}

/// Delivery positions every replica can read: the fast copy; the database keeps the durable one.
#[async_trait]
pub trait PositionCache: Send + Sync + 'static {
    /// Saves how far an agent's notifications got, where every replica can read it.
    async fn save_position(&self, agent: AgentId, position: DeliveryPosition) -> Result<(), EngineError>;
    /// Reads an agent's delivery position.
    async fn load_position(&self, agent: AgentId) -> Result<Option<DeliveryPosition>, EngineError>;
}

/// Who is connected where: open streams and pod registrations, across replicas.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Records an open stream (best effort: a failure is repaired by the next heartbeat).
    async fn connection_opened(&self, record: ConnectionRecord);
    /// Forgets a closed stream (best effort).
    async fn connection_closed(&self, id: &str);
    /// Every open stream on every live replica.
    async fn connections(&self) -> Result<Vec<ConnectionRecord>, EngineError>;
    /// Records (or refreshes) a pod registration, keeping the first `connected_at`; best effort:
    /// a registration that cannot reach Redis is written by the next heartbeat. A new pod of an
    /// agent that already has `max_per_agent` live registrations is refused (a refresh never is).
    async fn register_pod(&self, pod: PodRecord, max_per_agent: usize) -> Result<(), TooManyPods>;
    /// Forgets a registration.
    async fn unregister_pod(&self, agent: AgentId, pod_id: i64);
    /// Live registrations.
    async fn pods(&self, filter: PodFilter) -> Result<Vec<PodRecord>, EngineError>;
}

/// Credentials refused recently, remembered across replicas so a stranger's retries cost
/// GitLab nothing.
#[async_trait]
pub trait RefusalCache: Send + Sync + 'static {
    /// Remembers for `ttl`, on every replica, that a credential (by digest) was refused.
    async fn remember_refusal(&self, key: &str, ttl: Duration);
    /// Whether a credential was refused recently, on any replica.
    async fn was_refused(&self, key: &str) -> bool;
}

/// Which replica holds which agents' tunnels.
#[async_trait]
pub trait TunnelPresence: Send + Sync + 'static {
    /// This process among the replicas: what tunnel presence names and direct messages address.
    fn instance(&self) -> String;
    /// Publishes this replica's tunnel counts for the agents in `counts` (a zero count removes
    /// the agent); `full` replaces the replica's whole table. Best effort.
    async fn publish_tunnels(&self, counts: &[TunnelCount], full: bool);
    /// Tunnel counts on every live replica.
    async fn tunnels(&self) -> Result<Vec<TunnelCount>, EngineError>;
    /// The live replicas holding tunnels of `agent`, with their counts.
    async fn tunnel_holders(&self, agent: AgentId) -> Result<Vec<TunnelCount>, EngineError>;
}

/// Actions that must run once across replicas (a short lock, then a done mark).
#[async_trait]
pub trait OnceActions: Send + Sync + 'static {
    /// Claims the once-only action `key` for `ttl` (SET NX PX): a claim that is not finished
    /// expires, so another replica may act if this one dies.
    async fn claim_once(&self, key: &str, ttl: Duration) -> Result<OnceClaim, EngineError>;
    /// Whether the once-only action `key` was marked done (by any replica).
    async fn once_done(&self, key: &str) -> Result<bool, EngineError>;
    /// Marks the once-only action `key` done, remembered for `keep`.
    async fn finish_once(&self, key: &str, keep: Duration) -> Result<(), EngineError>;
}

/// Signed messages from one replica to another (tunnel calls relayed to the replica holding
/// the tunnel, and their answers).
#[async_trait]
pub trait DirectMessages: Send + Sync + 'static {
    /// Sends `body` to the replica instance `to`, signed; it arrives on that replica's direct
    /// sink (`on_direct`) or not at all.
    async fn send_direct(&self, to: &str, body: String) -> Result<(), EngineError>;
    /// Where this replica's direct messages go; set once, before `start`.
    fn on_direct(&self, sink: tokio::sync::mpsc::Sender<String>);
}

/// Every role an engine plays; consumers take the one role they need.
pub trait Engine:
    Broadcast + PositionCache + Presence + RefusalCache + TunnelPresence + OnceActions + DirectMessages
{
}

impl<T> Engine for T where
    T: Broadcast + PositionCache + Presence + RefusalCache + TunnelPresence + OnceActions + DirectMessages
{
}
