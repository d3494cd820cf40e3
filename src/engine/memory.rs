//! The in-process engine: a single replica, so there is nobody else to tell; positions and
//! connections live in memory (the database keeps a copy of positions that survives a restart).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{ConnectionRecord, Engine, EngineContext, EngineError, PodFilter, PodRecord, TooManyPods};
use crate::clock::now_ms;
use crate::domain::AgentId;
use crate::domain::{DeliveryPosition, EventNotice};

/// Engine for one replica without Redis.
#[derive(Default)]
pub struct MemoryEngine {
    positions: Mutex<HashMap<AgentId, DeliveryPosition>>,
    connections: Mutex<HashMap<String, ConnectionRecord>>,
    pods: Mutex<HashMap<(AgentId, i64), PodRecord>>,
    refusals: Mutex<HashMap<String, std::time::Instant>>,
}

#[async_trait]
impl Engine for MemoryEngine {
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

    async fn save_position(&self, agent: AgentId, position: DeliveryPosition) -> Result<(), EngineError> {
        self.positions.lock().expect("positions lock").insert(agent, position);
        Ok(())
    }

    async fn load_position(&self, agent: AgentId) -> Result<Option<DeliveryPosition>, EngineError> {
        Ok(self.positions.lock().expect("positions lock").get(&agent).copied())
    }

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
        let now = now_ms();
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
        let now = now_ms();
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

    async fn remember_refusal(&self, key: &str, ttl: std::time::Duration) {
        let mut refusals = self.refusals.lock().expect("refusals lock");
        let now = std::time::Instant::now();
        refusals.retain(|_, until| *until > now);
        refusals.insert(key.to_owned(), now + ttl);
    }

    async fn was_refused(&self, key: &str) -> bool {
        self.refusals.lock().expect("refusals lock").get(key).is_some_and(|until| *until > std::time::Instant::now())
    }
}
