//! Delivery positions in Redis, each signed for its agent so whoever can write to Redis but
//! not read the database cannot move an agent's position.

use async_trait::async_trait;

use super::{RedisEngine, sign, verify};
use crate::domain::{AgentId, DeliveryPosition};
use crate::engine::{EngineError, PositionCache};

#[async_trait]
impl PositionCache for RedisEngine {
    async fn save_position(&self, agent: AgentId, position: DeliveryPosition) -> Result<(), EngineError> {
        self.available()?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(self.keys.position(agent))
            .arg(self.signed_position(agent, position))
            .arg("EX")
            .arg(self.position_ttl.as_secs())
            .ignore();
        self.run::<()>(&pipe).await
    }

    async fn load_position(&self, agent: AgentId) -> Result<Option<DeliveryPosition>, EngineError> {
        self.available()?;
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.keys.position(agent));
        let (value,): (Option<String>,) = self.run(&pipe).await?;
        let Some(value) = value else { return Ok(None) };
        match self.verified_position(agent, &value) {
            Some(p) => Ok(Some(p)),
            None => {
                // Someone who can write to Redis wrote it: ignore it, and the database copy rules.
                tracing::warn!(agent, "ignoring a delivery position in Redis that kas did not sign");
                self.metrics.engine_forgeries.inc();
                Ok(None)
            }
        }
    }
}

impl RedisEngine {
    /// `seq:at:hmac` of a position, bound to the agent.
    pub(super) fn signed_position(&self, agent: AgentId, p: DeliveryPosition) -> String {
        let (seq, at) = (p.seq.to_string(), p.at.to_string());
        let tag = sign(self.key.expose(), &["position", &agent.to_string(), &seq, &at]);
        format!("{seq}:{at}:{tag}")
    }

    /// The position in `value` if this deployment signed it for this agent.
    pub(super) fn verified_position(&self, agent: AgentId, value: &str) -> Option<DeliveryPosition> {
        let mut parts = value.splitn(3, ':');
        let (seq, at, tag) = (parts.next()?, parts.next()?, parts.next()?);
        if !verify(self.key.expose(), &["position", &agent.to_string(), seq, at], tag) {
            return None;
        }
        Some(DeliveryPosition { seq: seq.parse().ok()?, at: at.parse().ok()? })
    }
}
