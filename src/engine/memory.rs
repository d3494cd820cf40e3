//! The in-process engine: a single replica, so there is nobody else to tell.

use async_trait::async_trait;

use super::{Engine, EngineError};
use crate::store::PushNotice;

/// Engine for one replica without Redis.
#[derive(Default)]
pub struct MemoryEngine;

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
}
