//! Engines: how recorded events reach every replica, and where live connection state lives.
//!
//! The outbox hands each recorded event to this replica's delivery directly and to the engine
//! for every other replica. The in-process engine (the single-replica default) has no other
//! replica to reach; the Redis engine publishes to all of them.

mod memory;

use async_trait::async_trait;

use crate::domain::AgentId;
use crate::store::{DeliveryPosition, PushNotice};

pub use memory::MemoryEngine;

/// What an engine could not do.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The backing service (Redis) failed or is unreachable.
    #[error("engine unavailable: {0}")]
    Unavailable(String),
}

/// Where events for this replica's agent streams go.
pub trait LocalDelivery: Send + Sync + 'static {
    /// Hands events to the local streams that want them; never blocks on a slow agent.
    fn deliver(&self, notices: &[PushNotice]);
}

/// A `LocalDelivery` for a server with no agent streams (and for tests of the intake alone).
pub struct NoDelivery;

impl LocalDelivery for NoDelivery {
    fn deliver(&self, _: &[PushNotice]) {}
}

/// Fan-out across replicas.
#[async_trait]
pub trait Engine: Send + Sync + 'static {
    /// Short name for logs and `/readyz` (`memory`, `redis`).
    fn name(&self) -> &'static str;
    /// Makes recorded events reach every other replica's local delivery.
    async fn broadcast(&self, notices: &[PushNotice]) -> Result<(), EngineError>;
    /// Whether the backing service answers.
    async fn ping(&self) -> Result<(), EngineError>;
    /// Saves how far an agent's notifications got, where every replica can read it.
    async fn save_position(
        &self,
        agent: AgentId,
        position: DeliveryPosition,
    ) -> Result<(), EngineError>;
    /// Reads an agent's delivery position.
    async fn load_position(&self, agent: AgentId) -> Result<Option<DeliveryPosition>, EngineError>;
}
