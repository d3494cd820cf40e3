//! The in-process engine: a single replica, so there is nobody else to tell; positions and
//! connections live in memory (the database keeps a copy of positions that survives a restart).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{ConnectionRecord, Engine, EngineContext, EngineError};
use crate::domain::AgentId;
use crate::store::{DeliveryPosition, PushNotice};

/// Engine for one replica without Redis.
#[derive(Default)]
pub struct MemoryEngine {
    positions: Mutex<HashMap<AgentId, DeliveryPosition>>,
    connections: Mutex<HashMap<String, ConnectionRecord>>,
}

#[async_trait]
impl Engine for MemoryEngine {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn start(self: Arc<Self>, _: EngineContext) {}

    async fn broadcast(&self, _: &[PushNotice]) -> Result<(), EngineError> {
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
}
