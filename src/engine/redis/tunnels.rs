//! Tunnel presence: which replica holds which agents' tunnels, a table per replica that expires
//! with it.

use async_trait::async_trait;

use super::RedisEngine;
use super::presence::REPLICA_TTL;
use crate::domain::AgentId;
use crate::engine::{EngineError, TunnelCount, TunnelPresence};

#[async_trait]
impl TunnelPresence for RedisEngine {
    fn instance(&self) -> String {
        self.replica.clone()
    }

    async fn publish_tunnels(&self, counts: &[TunnelCount], full: bool) {
        if self.available().is_err() && !full {
            return;
        }
        let key = self.keys.tunnels(&self.replica);
        let mut pipe = redis::pipe();
        let record = |c: &TunnelCount| {
            let c = TunnelCount { replica: self.replica.clone(), ..c.clone() };
            (c.agent_id, serde_json::to_string(&c).expect("serializable"))
        };
        let live: Vec<(AgentId, String)> = counts.iter().filter(|c| c.idle + c.busy > 0).map(record).collect();
        if full {
            if live.is_empty() {
                pipe.cmd("DEL").arg(&key).ignore();
            } else {
                // Written aside and renamed, so a reader never sees a half-written table.
                let staging = format!("{key}:staging");
                pipe.cmd("DEL").arg(&staging).ignore();
                pipe.cmd("HSET").arg(&staging).arg(&live).ignore();
                pipe.cmd("RENAME").arg(&staging).arg(&key).ignore();
            }
        } else {
            let gone: Vec<AgentId> = counts.iter().filter(|c| c.idle + c.busy == 0).map(|c| c.agent_id).collect();
            if !live.is_empty() {
                pipe.cmd("HSET").arg(&key).arg(&live).ignore();
            }
            if !gone.is_empty() {
                pipe.cmd("HDEL").arg(&key).arg(&gone).ignore();
            }
        }
        pipe.cmd("EXPIRE").arg(&key).arg(REPLICA_TTL.as_secs()).ignore();
        if let Err(e) = self.run::<()>(&pipe).await {
            tracing::debug!(error = %e, "cannot publish tunnel presence");
        }
    }

    async fn tunnels(&self) -> Result<Vec<TunnelCount>, EngineError> {
        let replicas = self.live_replicas().await?;
        if replicas.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in &replicas {
            pipe.cmd("HVALS").arg(self.keys.tunnels(r));
        }
        let tables: Vec<Vec<String>> = self.run(&pipe).await?;
        let mut all: Vec<TunnelCount> =
            tables.into_iter().flatten().filter_map(|json| serde_json::from_str(&json).ok()).collect();
        all.sort_by(|a, b| (a.agent_id, &a.replica).cmp(&(b.agent_id, &b.replica)));
        Ok(all)
    }

    async fn tunnel_holders(&self, agent: AgentId) -> Result<Vec<TunnelCount>, EngineError> {
        let replicas = self.live_replicas().await?;
        if replicas.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in &replicas {
            pipe.cmd("HGET").arg(self.keys.tunnels(r)).arg(agent);
        }
        let found: Vec<Option<String>> = self.run(&pipe).await?;
        Ok(found
            .into_iter()
            .zip(replicas)
            .filter_map(|(json, replica)| {
                let c: TunnelCount = serde_json::from_str(&json?).ok()?;
                // The table's name, not the record, says which replica holds them.
                (c.agent_id == agent && c.idle + c.busy > 0).then_some(TunnelCount { replica, ..c })
            })
            .collect())
    }
}

impl RedisEngine {
    /// Replicas whose heartbeat is recent.
    pub(super) async fn live_replicas(&self) -> Result<Vec<String>, EngineError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGEBYSCORE")
            .arg(&self.keys.replicas)
            .arg(self.clock.now_ms() - REPLICA_TTL.as_millis() as i64)
            .arg("+inf");
        let (replicas,): (Vec<String>,) = self.run(&pipe).await?;
        Ok(replicas)
    }
}
