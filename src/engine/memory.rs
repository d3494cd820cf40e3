//! The in-process engine: a single replica, so there is nobody else to tell; positions and
//! connections live in memory (the database keeps a copy of positions that survives a restart).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{
    Broadcast, ConnectionRecord, DirectMessages, EngineContext, EngineError, OnceActions, OnceClaim, PodFilter,
    PodRecord, PositionCache, Presence, RefusalCache, TooManyPods, TunnelCount, TunnelPresence,
};
use crate::clock::Clock;
use crate::domain::{AgentId, DeliveryPosition, EventNotice};

/// Engine for one replica without Redis.
#[derive(Default)]
pub struct MemoryEngine {
    positions: Mutex<HashMap<AgentId, DeliveryPosition>>,
    connections: Mutex<HashMap<String, ConnectionRecord>>,
    pods: Mutex<HashMap<(AgentId, i64), PodRecord>>,
    /// Refused credential digests and until when (Unix milliseconds).
    refusals: Mutex<HashMap<String, i64>>,
    tunnels: Mutex<HashMap<AgentId, TunnelCount>>,
    /// Once-only claims: key → (done, until).
    once: Mutex<HashMap<String, (bool, std::time::Instant)>>,
    direct: std::sync::OnceLock<tokio::sync::mpsc::Sender<String>>,
    /// Registrations and refusals expire by this clock.
    clock: Clock,
}

impl MemoryEngine {
    /// An engine whose registrations and refusals expire by `clock`.
    pub fn with_clock(clock: Clock) -> Self {
        Self { clock, ..Self::default() }
    }
}

/// The instance name of the only replica.
const LOCAL: &str = "local";

#[async_trait]
impl Broadcast for MemoryEngine {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn start(self: Arc<Self>, _: EngineContext) {}

    async fn broadcast(&self, _: &[EventNotice]) -> Result<(), EngineError> {
        Ok(())
    }

    async fn ping(&self) -> Result<(), EngineError> {
        Ok(())
    }
}

#[async_trait]
impl PositionCache for MemoryEngine {
    async fn save_position(&self, agent: AgentId, position: DeliveryPosition) -> Result<(), EngineError> {
        self.positions.lock().expect("positions lock").insert(agent, position);
        Ok(())
    }

    async fn load_position(&self, agent: AgentId) -> Result<Option<DeliveryPosition>, EngineError> {
        Ok(self.positions.lock().expect("positions lock").get(&agent).copied())
    }
}

#[async_trait]
impl Presence for MemoryEngine {
    async fn connection_opened(&self, record: ConnectionRecord) {
        self.connections.lock().expect("connections lock").insert(record.id.clone(), record);
    }

    async fn connection_closed(&self, id: &str) {
        self.connections.lock().expect("connections lock").remove(id);
    }

    async fn connections(&self) -> Result<Vec<ConnectionRecord>, EngineError> {
        let mut all: Vec<_> = self.connections.lock().expect("connections lock").values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    async fn register_pod(&self, mut pod: PodRecord, max_per_agent: usize) -> Result<(), TooManyPods> {
        let mut pods = self.pods.lock().expect("pods lock");
        let now = self.clock.now_ms();
        pods.retain(|_, p| p.expires_at > now);
        if let Some(existing) = pods.get(&(pod.agent_id, pod.pod_id)) {
            pod.connected_at = existing.connected_at;
        } else if pods.keys().filter(|(agent, _)| *agent == pod.agent_id).count() >= max_per_agent {
            return Err(TooManyPods { agent: pod.agent_id, limit: max_per_agent });
        }
        pods.insert((pod.agent_id, pod.pod_id), pod);
        Ok(())
    }

    async fn unregister_pod(&self, agent: AgentId, pod_id: i64) {
        self.pods.lock().expect("pods lock").remove(&(agent, pod_id));
    }

    async fn pods(&self, filter: PodFilter) -> Result<Vec<PodRecord>, EngineError> {
        let now = self.clock.now_ms();
        let mut all: Vec<_> = self
            .pods
            .lock()
            .expect("pods lock")
            .values()
            .filter(|p| p.expires_at > now && filter.matches(p))
            .cloned()
            .collect();
        all.sort_by_key(|p| (p.agent_id, p.pod_id));
        Ok(all)
    }
}

#[async_trait]
impl RefusalCache for MemoryEngine {
    async fn remember_refusal(&self, key: &str, ttl: std::time::Duration) {
        let mut refusals = self.refusals.lock().expect("refusals lock");
        let now = self.clock.now_ms();
        refusals.retain(|_, until| *until > now);
        refusals.insert(key.to_owned(), now + ttl.as_millis() as i64);
    }

    async fn was_refused(&self, key: &str) -> bool {
        self.refusals.lock().expect("refusals lock").get(key).is_some_and(|until| *until > self.clock.now_ms())
    }
}

#[async_trait]
impl TunnelPresence for MemoryEngine {
    fn instance(&self) -> String {
        LOCAL.into()
    }

    async fn publish_tunnels(&self, counts: &[TunnelCount], full: bool) {
        let mut tunnels = self.tunnels.lock().expect("tunnels lock");
        if full {
            tunnels.clear();
        }
        for c in counts {
            if c.idle + c.busy == 0 {
                tunnels.remove(&c.agent_id);
            } else {
                tunnels.insert(c.agent_id, TunnelCount { replica: LOCAL.into(), ..c.clone() });
            }
        }
    }

    async fn tunnels(&self) -> Result<Vec<TunnelCount>, EngineError> {
        let mut all: Vec<_> = self.tunnels.lock().expect("tunnels lock").values().cloned().collect();
        all.sort_by_key(|t| t.agent_id);
        Ok(all)
    }

    async fn tunnel_holders(&self, agent: AgentId) -> Result<Vec<TunnelCount>, EngineError> {
        Ok(self.tunnels.lock().expect("tunnels lock").get(&agent).cloned().into_iter().collect())
    }
}

#[async_trait]
impl OnceActions for MemoryEngine {
    async fn claim_once(&self, key: &str, ttl: std::time::Duration) -> Result<OnceClaim, EngineError> {
        let mut once = self.once.lock().expect("once lock");
        let now = std::time::Instant::now();
        once.retain(|_, (_, until)| *until > now);
        match once.get(key) {
            Some((true, _)) => Ok(OnceClaim::Done),
            Some((false, _)) => Ok(OnceClaim::Running),
            None => {
                once.insert(key.to_owned(), (false, now + ttl));
                Ok(OnceClaim::Won)
            }
        }
    }

    async fn once_done(&self, key: &str) -> Result<bool, EngineError> {
        let now = std::time::Instant::now();
        Ok(self.once.lock().expect("once lock").get(key).is_some_and(|(done, until)| *done && *until > now))
    }

    async fn finish_once(&self, key: &str, keep: std::time::Duration) -> Result<(), EngineError> {
        self.once.lock().expect("once lock").insert(key.to_owned(), (true, std::time::Instant::now() + keep));
        Ok(())
    }
}

#[async_trait]
impl DirectMessages for MemoryEngine {
    async fn send_direct(&self, to: &str, body: String) -> Result<(), EngineError> {
        // One replica: a message can only be for itself.
        match self.direct.get() {
            Some(sink) if to == LOCAL => {
                sink.try_send(body).map_err(|_| EngineError::Unavailable("direct messages queue full".into()))
            }
            _ => Err(EngineError::Unavailable(format!("no replica {to}"))),
        }
    }

    fn on_direct(&self, sink: tokio::sync::mpsc::Sender<String>) {
        let _ = self.direct.set(sink);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::engine::AgentMetaRecord;

    fn pod(agent: AgentId, pod_id: i64, expires_at: i64) -> PodRecord {
        PodRecord {
            agent_id: agent,
            project_id: 1,
            pod_id,
            meta: AgentMetaRecord::default(),
            connected_at: 0,
            replica: "r".into(),
            expires_at,
        }
    }

    #[tokio::test]
    async fn registrations_and_refusals_expire_by_the_engine_clock() {
        let clock = Clock::manual(1_000_000);
        let engine = MemoryEngine::with_clock(clock.clone());
        engine.register_pod(pod(7, 1, 1_000_000 + 60_000), 1).await.unwrap();
        engine.remember_refusal("digest", Duration::from_secs(30)).await;
        assert_eq!(engine.pods(PodFilter::Agent(7)).await.unwrap().len(), 1);
        assert!(engine.register_pod(pod(7, 2, 1_000_000 + 60_000), 1).await.is_err(), "one pod allowed");
        assert!(engine.was_refused("digest").await);

        clock.advance(Duration::from_secs(31));
        assert!(!engine.was_refused("digest").await, "the refusal outlived its ttl");
        assert_eq!(engine.pods(PodFilter::Agent(7)).await.unwrap().len(), 1);

        clock.advance(Duration::from_secs(30));
        assert!(engine.pods(PodFilter::Agent(7)).await.unwrap().is_empty(), "the registration outlived its expiry");
        engine.register_pod(pod(7, 2, clock.now_ms() + 60_000), 1).await.expect("the expired pod no longer counts");
    }
}
