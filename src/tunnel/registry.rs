//! This replica's idle tunnels, per agent. A tunnel stream that sent its descriptor waits here
//! (its task in `grpc/tunnel.rs` watches the agent, revocation and shutdown) until a call claims
//! it; the claim hands the stream's two halves to the caller, which uses it for one request.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::delivery::EndSignal;
use crate::domain::AgentId;
use crate::engine::{Engine, TunnelCount};
use crate::identity::AgentIdentity;
use crate::metrics::Metrics;
use crate::proto::reverse_tunnel::rpc::{AgentDescriptor, ConnectRequest, ConnectResponse};

/// The service kas calls through tunnels.
pub const KUBERNETES_API: &str = "gitlab.agent.kubernetes_api.rpc.KubernetesApi";
/// Its method.
pub const MAKE_REQUEST: &str = "MakeRequest";
/// Methods kept per descriptor (agentk lists a handful).
const MAX_METHODS: usize = 64;
/// Longest service/method name kept.
const MAX_NAME: usize = 256;
/// How long a claimed tunnel's task has to hand the stream over.
const HANDOVER: Duration = Duration::from_secs(2);
/// How often tunnel presence is written to the engine when it changed.
const PRESENCE_EVERY: Duration = Duration::from_secs(1);
/// Presence writes between full rewrites (which also repair what a Redis outage lost).
const PRESENCE_FULL_EVERY: u32 = 10;

/// What a tunnel serves, from its descriptor: `service/method` names, bounded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Served {
    /// `service/method`.
    pub methods: Vec<String>,
}

impl Served {
    /// Reads a descriptor, keeping at most `MAX_METHODS` names of at most `MAX_NAME` bytes.
    pub fn from_descriptor(d: Option<&AgentDescriptor>) -> Self {
        let mut methods = Vec::new();
        for service in d.map(|d| d.services.as_slice()).unwrap_or_default() {
            for method in &service.methods {
                let name = format!("{}/{}", service.name, method.name);
                if methods.len() < MAX_METHODS && name.len() <= MAX_NAME {
                    methods.push(name);
                }
            }
        }
        Self { methods }
    }

    /// Whether the Kubernetes API can be called through it.
    pub fn kubernetes_api(&self) -> bool {
        self.methods.iter().any(|m| m.split_once('/') == Some((KUBERNETES_API, MAKE_REQUEST)))
    }
}

/// The agent's side of a tunnel stream (what agentk sends).
pub type Inbound = Pin<Box<dyn Stream<Item = Result<ConnectRequest, tonic::Status>> + Send>>;

/// A claimed tunnel: both halves of the stream and what ends it.
pub struct TunnelIo {
    /// The agent it belongs to.
    pub agent: AgentIdentity,
    /// What agentk sends.
    pub inbound: Inbound,
    /// What kas sends; dropping it ends the stream with OK, sending an error ends it with that.
    pub outbound: mpsc::Sender<Result<ConnectResponse, tonic::Status>>,
    /// Ends when the agent's token is revoked.
    pub revoked: Arc<EndSignal>,
    /// Cancelled at shutdown or the connection's maximum age.
    pub closing: CancellationToken,
    /// What the stream holds while it lives (its credential watch, its gauge).
    pub hold: Box<dyn Send + Sync>,
}

/// A tunnel's way to be claimed: the caller sends where the stream should go.
pub type ClaimSender = oneshot::Sender<oneshot::Sender<TunnelIo>>;

struct Idle {
    id: u64,
    served: Arc<Served>,
    claim: ClaimSender,
}

struct AgentTunnels {
    identity: AgentIdentity,
    /// What the latest tunnel serves, for the listing.
    served: Arc<Served>,
    idle: Vec<Idle>,
    busy: usize,
}

/// Idle and busy tunnels per agent on this replica.
pub struct TunnelRegistry {
    agents: Mutex<HashMap<AgentId, AgentTunnels>>,
    /// Woken whenever a tunnel arrives, for calls waiting for one.
    arrived: Notify,
    /// Agents whose counts changed since presence was last written.
    dirty: Mutex<HashSet<AgentId>>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
}

/// An idle tunnel's place in the registry; dropping it (the stream ended) removes it.
pub struct IdleRegistration {
    registry: Arc<TunnelRegistry>,
    agent: AgentId,
    id: u64,
}

impl Drop for IdleRegistration {
    fn drop(&mut self) {
        self.registry.remove_idle(self.agent, self.id);
    }
}

/// Counts a claimed tunnel as busy until dropped.
pub struct BusyGuard {
    registry: Arc<TunnelRegistry>,
    agent: AgentId,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        let mut agents = self.registry.agents.lock().expect("tunnels lock");
        if let Some(a) = agents.get_mut(&self.agent) {
            a.busy = a.busy.saturating_sub(1);
            if a.busy == 0 && a.idle.is_empty() {
                agents.remove(&self.agent);
            }
        }
        self.registry.metrics.tunnels("busy").dec();
        self.registry.mark(self.agent);
    }
}

impl TunnelRegistry {
    /// An empty registry.
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            agents: Mutex::default(),
            arrived: Notify::new(),
            dirty: Mutex::default(),
            next_id: AtomicU64::new(1),
            metrics,
        })
    }

    fn mark(&self, agent: AgentId) {
        self.dirty.lock().expect("dirty lock").insert(agent);
    }

    /// Adds an idle tunnel of `agent` serving `served`; the returned receiver gets the claim.
    pub fn add(
        self: &Arc<Self>,
        agent: &AgentIdentity,
        served: Served,
    ) -> (IdleRegistration, oneshot::Receiver<oneshot::Sender<TunnelIo>>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (claim, claimed) = oneshot::channel();
        {
            let mut agents = self.agents.lock().expect("tunnels lock");
            let entry = agents.entry(agent.id).or_insert_with(|| AgentTunnels {
                identity: agent.clone(),
                served: Arc::default(),
                idle: Vec::new(),
                busy: 0,
            });
            entry.identity = agent.clone();
            // Tunnels of one agent usually serve the same: share one copy.
            if *entry.served != served {
                entry.served = Arc::new(served);
            }
            entry.idle.push(Idle { id, served: entry.served.clone(), claim });
        }
        self.metrics.tunnels("idle").inc();
        self.mark(agent.id);
        self.arrived.notify_waiters();
        (IdleRegistration { registry: self.clone(), agent: agent.id, id }, claimed)
    }

    fn remove_idle(&self, agent: AgentId, id: u64) {
        let mut agents = self.agents.lock().expect("tunnels lock");
        let Some(a) = agents.get_mut(&agent) else { return };
        let before = a.idle.len();
        a.idle.retain(|t| t.id != id);
        if a.idle.len() < before {
            self.metrics.tunnels("idle").dec();
            self.mark(agent);
        }
        if a.idle.is_empty() && a.busy == 0 {
            agents.remove(&agent);
        }
    }

    /// Completes when a tunnel arrives (for any agent); create it before checking, then await.
    pub fn arrivals(&self) -> tokio::sync::futures::Notified<'_> {
        self.arrived.notified()
    }

    /// Whether this replica holds a tunnel of `agent` that serves the Kubernetes API.
    pub fn holds(&self, agent: AgentId) -> bool {
        let agents = self.agents.lock().expect("tunnels lock");
        agents.get(&agent).is_some_and(|a| a.idle.iter().any(|t| t.served.kubernetes_api()) || a.busy > 0)
    }

    /// The agents this replica holds a Kubernetes API tunnel of, as they authenticated.
    pub fn agents(&self) -> Vec<AgentIdentity> {
        let agents = self.agents.lock().expect("tunnels lock");
        agents
            .values()
            .filter(|a| a.idle.iter().any(|t| t.served.kubernetes_api()) || a.busy > 0)
            .map(|a| a.identity.clone())
            .collect()
    }

    /// The agent as its latest tunnel authenticated, waiting until `deadline` for one.
    pub async fn wait_identity(&self, agent: AgentId, deadline: Instant) -> Option<AgentIdentity> {
        loop {
            let arrived = self.arrivals();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if let Some(a) = self.agents.lock().expect("tunnels lock").get(&agent) {
                return Some(a.identity.clone());
            }
            tokio::time::timeout_at(deadline, arrived).await.ok()?;
        }
    }

    /// Takes an idle tunnel of `agent` that serves the Kubernetes API, waiting until `deadline`
    /// for one. `None` when none came in time.
    pub async fn claim(self: &Arc<Self>, agent: AgentId, deadline: Instant) -> Option<(TunnelIo, BusyGuard)> {
        loop {
            let arrived = self.arrivals();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            match self.take(agent) {
                Some((claim, busy)) => {
                    let (reply, handed) = oneshot::channel();
                    // The stream may have ended a moment ago: then try the next one.
                    if claim.send(reply).is_ok()
                        && let Ok(Ok(io)) = tokio::time::timeout(HANDOVER, handed).await
                    {
                        return Some((io, busy));
                    }
                }
                None => {
                    tokio::time::timeout_at(deadline, arrived).await.ok()?;
                }
            }
        }
    }

    fn take(self: &Arc<Self>, agent: AgentId) -> Option<(ClaimSender, BusyGuard)> {
        let mut agents = self.agents.lock().expect("tunnels lock");
        let a = agents.get_mut(&agent)?;
        // The newest first: the oldest are the likeliest to be cut by the connection's age.
        let at = a.idle.iter().rposition(|t| t.served.kubernetes_api())?;
        let idle = a.idle.remove(at);
        a.busy += 1;
        drop(agents);
        self.metrics.tunnels("idle").dec();
        self.metrics.tunnels("busy").inc();
        self.mark(agent);
        Some((idle.claim, BusyGuard { registry: self.clone(), agent }))
    }

    /// This replica's counts for `agents` (zero for an agent with none left).
    fn counts(&self, agents: impl IntoIterator<Item = AgentId>) -> Vec<TunnelCount> {
        let table = self.agents.lock().expect("tunnels lock");
        agents
            .into_iter()
            .map(|id| match table.get(&id) {
                Some(a) => TunnelCount {
                    agent_id: id,
                    agent_name: a.identity.name.clone(),
                    replica: String::new(),
                    idle: a.idle.len(),
                    busy: a.busy,
                    methods: a.served.methods.clone(),
                },
                None => TunnelCount {
                    agent_id: id,
                    agent_name: String::new(),
                    replica: String::new(),
                    idle: 0,
                    busy: 0,
                    methods: Vec::new(),
                },
            })
            .collect()
    }

    /// Writes changed counts to the engine every second, and the whole table every few, until
    /// `stop`; then removes this replica's table.
    pub async fn publish_presence(&self, engine: Arc<dyn Engine>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(PRESENCE_EVERY);
        let mut beats = 0u32;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            beats = beats.wrapping_add(1);
            if beats % PRESENCE_FULL_EVERY == 1 {
                self.dirty.lock().expect("dirty lock").clear();
                let all: Vec<AgentId> = self.agents.lock().expect("tunnels lock").keys().copied().collect();
                engine.publish_tunnels(&self.counts(all), true).await;
            } else {
                let dirty: Vec<AgentId> = self.dirty.lock().expect("dirty lock").drain().collect();
                engine.publish_tunnels(&self.counts(dirty), false).await;
            }
        }
        engine.publish_tunnels(&[], true).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::reverse_tunnel::rpc::{Method, Service};

    fn identity(id: AgentId) -> AgentIdentity {
        AgentIdentity {
            id,
            name: format!("a{id}"),
            config_project: "g/p".into(),
            config_project_id: None,
            default_branch: None,
            credential: id,
        }
    }

    fn kubernetes() -> Served {
        let d = AgentDescriptor {
            services: vec![Service {
                name: KUBERNETES_API.into(),
                methods: vec![Method { name: MAKE_REQUEST.into() }],
            }],
        };
        Served::from_descriptor(Some(&d))
    }

    #[test]
    fn descriptors_are_read_and_bounded() {
        assert!(kubernetes().kubernetes_api());
        assert!(!Served::from_descriptor(None).kubernetes_api());
        let many = AgentDescriptor {
            services: vec![Service {
                name: "s".into(),
                methods: (0..1000).map(|i| Method { name: format!("m{i}") }).collect(),
            }],
        };
        assert_eq!(Served::from_descriptor(Some(&many)).methods.len(), MAX_METHODS);
    }

    #[tokio::test]
    async fn a_tunnel_is_claimed_once_and_removed_when_its_stream_ends() {
        let registry = TunnelRegistry::new(Arc::new(Metrics::new()));
        let (first, mut first_claims) = registry.add(&identity(1), kubernetes());
        let (_other, _) = registry.add(&identity(2), Served::default());
        assert!(registry.holds(1));
        assert!(!registry.holds(2), "a tunnel that does not serve the Kubernetes API is not used");
        let (claim, busy) = registry.take(1).unwrap();
        assert!(registry.take(1).is_none(), "one request per tunnel");
        assert!(registry.holds(1), "busy still counts as held");
        assert_eq!((registry.counts([1])[0].idle, registry.counts([1])[0].busy), (0, 1));
        drop(busy);
        assert!(!registry.holds(1));
        let (reply, _) = oneshot::channel();
        assert!(claim.send(reply).is_ok());
        assert!(first_claims.try_recv().is_ok());
        drop(first);

        let (gone, _) = registry.add(&identity(3), kubernetes());
        drop(gone);
        assert!(!registry.holds(3), "removed at once when the stream ends");
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(registry.claim(3, soon).await.is_none(), "no tunnel: the wait is bounded");
    }
}
