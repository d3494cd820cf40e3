//! The in-process engine: a single replica, so there is nobody else to tell; positions live
//! in memory (the database keeps a copy that survives a restart).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Engine, EngineError};
use crate::domain::AgentId;
use crate::store::{DeliveryPosition, PushNotice};

/// Engine for one replica without Redis.
#[derive(Default)]
pub struct MemoryEngine {
    positions: Mutex<HashMap<AgentId, DeliveryPosition>>,
}

#[async_trait]
impl Engine for MemoryEngine {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn broadcast(&self, _: &[PushNotice]) -> Result<(), EngineError> {
        Ok(())
    }

    async fn ping(&self) -> Result<(), EngineError> {
        Ok(())
    }

    async fn save_position(
        &self,
        agent: AgentId,
        position: DeliveryPosition,
    ) -> Result<(), EngineError> {
        self.positions
            .lock()
            .expect("positions lock")
            .insert(agent, position);
        Ok(())
    }

    async fn load_position(&self, agent: AgentId) -> Result<Option<DeliveryPosition>, EngineError> {
        Ok(self
            .positions
            .lock()
            .expect("positions lock")
            .get(&agent)
            .copied())
    }
}
