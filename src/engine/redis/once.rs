//! Once-only actions across replicas: `SET NX PX` claims and done marks, signed so a forged
//! value can make kas act twice at worst, never skip an action.

use std::time::Duration;

use async_trait::async_trait;

use super::{RedisEngine, sign, verify};
use crate::engine::{EngineError, OnceActions, OnceClaim};

#[async_trait]
impl OnceActions for RedisEngine {
    async fn claim_once(&self, key: &str, ttl: Duration) -> Result<OnceClaim, EngineError> {
        let redis_key = self.keys.once(key);
        let running = format!("running:{}", sign(self.key.expose(), &["once", key, "running"]));
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(&redis_key).arg(&running).arg("NX").arg("PX").arg(ttl_ms);
        pipe.cmd("GET").arg(&redis_key);
        let (set, value): (Option<String>, Option<String>) = self.run(&pipe).await?;
        if set.is_some() {
            return Ok(OnceClaim::Won);
        }
        let Some(value) = value else { return Ok(OnceClaim::Running) };
        let (state, tag) = value.split_once(':').unwrap_or(("", ""));
        if matches!(state, "running" | "done") && verify(self.key.expose(), &["once", key, state], tag) {
            return Ok(if state == "done" { OnceClaim::Done } else { OnceClaim::Running });
        }
        // Someone who can write to Redis wrote it: acting twice is better than never acting.
        tracing::warn!(key, "ignoring a once-only claim in Redis that kas did not sign");
        self.metrics.engine_forgeries.inc();
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(&redis_key).arg(&running).arg("PX").arg(ttl_ms).ignore();
        self.run::<()>(&pipe).await?;
        Ok(OnceClaim::Won)
    }

    async fn once_done(&self, key: &str) -> Result<bool, EngineError> {
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.keys.once(key));
        let (value,): (Option<String>,) = self.run(&pipe).await?;
        Ok(value.and_then(|v| v.strip_prefix("done:").map(str::to_owned)).is_some_and(|tag| {
            let genuine = verify(self.key.expose(), &["once", key, "done"], &tag);
            if !genuine {
                self.metrics.engine_forgeries.inc();
            }
            genuine
        }))
    }

    async fn finish_once(&self, key: &str, keep: Duration) -> Result<(), EngineError> {
        let done = format!("done:{}", sign(self.key.expose(), &["once", key, "done"]));
        let mut pipe = redis::pipe();
        pipe.cmd("SET").arg(self.keys.once(key)).arg(done).arg("PX").arg(keep.as_millis().max(1) as u64).ignore();
        self.run::<()>(&pipe).await
    }
}
