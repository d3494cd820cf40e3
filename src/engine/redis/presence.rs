//! Presence: which streams are open on which replica and which pods are registered, kept in
//! Redis by this replica and rewritten by its heartbeat after any failure.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use redis::Pipeline;

use super::RedisEngine;
use crate::domain::AgentId;
use crate::engine::{ConnectionRecord, EngineContext, EngineError, PodFilter, PodRecord, Presence, TooManyPods};

/// How often a replica refreshes its entry in the connection state.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// A replica silent this long is considered gone; its connection table expires with it.
pub(super) const REPLICA_TTL: Duration = Duration::from_secs(20);
/// Heartbeats between full rewrites of the replica's connection table.
const FULL_REWRITE_EVERY: u32 = 12;

impl RedisEngine {
    pub(super) async fn heartbeat_loop(self: Arc<Self>, ctx: EngineContext) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        let mut beats = 0u32;
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            beats += 1;
            let repair = self.rewrite_connections.swap(false, Ordering::Relaxed);
            let full = beats.is_multiple_of(FULL_REWRITE_EVERY) || repair;
            if let Err(e) = self.heartbeat(full, repair).await {
                tracing::debug!(error = %e, "heartbeat failed");
                self.rewrite_connections.store(true, Ordering::Relaxed);
            }
        }
        // Leaving: forget this replica at once rather than after its TTL.
        let key = self.keys.connections(&self.replica);
        let mut pipe = redis::pipe();
        pipe.cmd("DEL").arg(&key).ignore().cmd("ZREM").arg(&self.keys.replicas).arg(&self.replica).ignore();
        pipe.cmd("DEL").arg(self.keys.tunnels(&self.replica)).ignore();
        let _ = self.run::<()>(&pipe).await;
    }

    /// Refreshes this replica's entry; `full` rewrites its connection table, `repair` also
    /// rewrites its pod registrations (only after a failed write: a periodic rewrite would bring
    /// back a pod that unregistered through another replica).
    pub(super) async fn heartbeat(&self, full: bool, repair: bool) -> Result<(), EngineError> {
        let now = self.clock.now_ms();
        let key = self.keys.connections(&self.replica);
        let ttl = REPLICA_TTL.as_secs();
        let mut pipe = redis::pipe();
        pipe.cmd("ZADD").arg(&self.keys.replicas).arg(now).arg(&self.replica).ignore();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&self.keys.replicas)
            .arg("-inf")
            .arg(now - 3 * REPLICA_TTL.as_millis() as i64)
            .ignore();
        if full {
            let fields: Vec<(String, String)> = self
                .local_connections
                .lock()
                .expect("connections lock")
                .values()
                .map(|r| (r.id.clone(), serde_json::to_string(r).expect("serializable")))
                .collect();
            if fields.is_empty() {
                pipe.cmd("DEL").arg(&key).ignore();
            } else {
                // Written aside and renamed, so a reader never sees a half-written table.
                let staging = format!("{key}:staging");
                pipe.cmd("DEL").arg(&staging).ignore();
                pipe.cmd("HSET").arg(&staging).arg(&fields).ignore();
                pipe.cmd("RENAME").arg(&staging).arg(&key).ignore();
                pipe.cmd("EXPIRE").arg(&key).arg(ttl).ignore();
            }
        } else {
            pipe.cmd("EXPIRE").arg(&key).arg(ttl).ignore();
        }
        if repair {
            let pods: Vec<PodRecord> = {
                let mut local = self.local_pods.lock().expect("pods lock");
                local.retain(|_, p| p.expires_at > now);
                local.values().cloned().collect()
            };
            for pod in &pods {
                self.write_pod(&mut pipe, pod);
            }
        }
        self.run::<()>(&pipe).await
    }

    pub(super) fn write_pod(&self, pipe: &mut Pipeline, pod: &PodRecord) {
        let ttl = ((pod.expires_at - self.clock.now_ms()) / 1000).max(1);
        let json = serde_json::to_string(pod).expect("serializable");
        let agent_key = self.keys.agent_pods(pod.agent_id);
        pipe.cmd("HSET").arg(&agent_key).arg(pod.pod_id).arg(json).ignore();
        pipe.cmd("EXPIRE").arg(&agent_key).arg(ttl).ignore();
        for set in [self.keys.project_agents(pod.project_id), self.keys.pod_agents()] {
            pipe.cmd("SADD").arg(&set).arg(pod.agent_id).ignore();
            pipe.cmd("EXPIRE").arg(&set).arg(ttl).ignore();
        }
    }

    pub(super) async fn pods_of(&self, agents: &[String]) -> Result<Vec<PodRecord>, EngineError> {
        if agents.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for a in agents {
            pipe.cmd("HVALS").arg(format!("{}:pods:agent:{a}", self.keys.prefix));
        }
        let tables: Vec<Vec<String>> = self.run(&pipe).await?;
        let now = self.clock.now_ms();
        Ok(tables
            .into_iter()
            .flatten()
            .filter_map(|json| serde_json::from_str::<PodRecord>(&json).ok())
            .filter(|p| p.expires_at > now)
            .collect())
    }
}

#[async_trait]
impl Presence for RedisEngine {
    async fn connection_opened(&self, record: ConnectionRecord) {
        let json = serde_json::to_string(&record).expect("serializable");
        let id = record.id.clone();
        self.local_connections.lock().expect("connections lock").insert(id.clone(), record);
        if self.available().is_err() {
            self.rewrite_connections.store(true, Ordering::Relaxed);
            return;
        }
        let key = self.keys.connections(&self.replica);
        let mut pipe = redis::pipe();
        pipe.cmd("HSET").arg(&key).arg(&id).arg(json).ignore();
        pipe.cmd("EXPIRE").arg(&key).arg(REPLICA_TTL.as_secs()).ignore();
        if self.run::<()>(&pipe).await.is_err() {
            self.rewrite_connections.store(true, Ordering::Relaxed);
        }
    }

    async fn connection_closed(&self, id: &str) {
        self.local_connections.lock().expect("connections lock").remove(id);
        if self.available().is_err() {
            self.rewrite_connections.store(true, Ordering::Relaxed);
            return;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL").arg(self.keys.connections(&self.replica)).arg(id).ignore();
        if self.run::<()>(&pipe).await.is_err() {
            self.rewrite_connections.store(true, Ordering::Relaxed);
        }
    }

    async fn connections(&self) -> Result<Vec<ConnectionRecord>, EngineError> {
        let replicas = self.live_replicas().await?;
        if replicas.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in &replicas {
            pipe.cmd("HVALS").arg(self.keys.connections(r));
        }
        let tables: Vec<Vec<String>> = self.run(&pipe).await?;
        let mut all: Vec<ConnectionRecord> =
            tables.into_iter().flatten().filter_map(|json| serde_json::from_str(&json).ok()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    async fn register_pod(&self, mut pod: PodRecord, max_per_agent: usize) -> Result<(), TooManyPods> {
        let key = self.keys.agent_pods(pod.agent_id);
        let now = self.clock.now_ms();
        // The agent's registrations on every replica: the live ones count against the limit,
        // the expired ones are removed (the table's own TTL is renewed by every registration,
        // so a pod that stopped without unregistering would otherwise stay in it).
        let mut refresh = false;
        let mut others_in_redis = None;
        let mut expired = Vec::new();
        if self.available().is_ok() {
            let mut pipe = redis::pipe();
            pipe.cmd("HGETALL").arg(&key);
            if let Ok((table,)) = self.run::<(HashMap<i64, String>,)>(&pipe).await {
                let mut others = 0;
                for (pod_id, json) in table {
                    match serde_json::from_str::<PodRecord>(&json) {
                        Ok(p) if p.expires_at > now && pod_id == pod.pod_id => {
                            pod.connected_at = p.connected_at;
                            refresh = true;
                        }
                        Ok(p) if p.expires_at > now => others += 1,
                        _ => expired.push(pod_id),
                    }
                }
                others_in_redis = Some(others);
            }
        }
        {
            let mut local = self.local_pods.lock().expect("pods lock");
            local.retain(|_, p| p.expires_at > now);
            if let Some(existing) = local.get(&(pod.agent_id, pod.pod_id)) {
                pod.connected_at = pod.connected_at.min(existing.connected_at);
                refresh = true;
            }
            // Without Redis, this replica's own registrations are what it knows.
            let others =
                others_in_redis.unwrap_or_else(|| local.keys().filter(|(agent, _)| *agent == pod.agent_id).count());
            if !refresh && others >= max_per_agent {
                return Err(TooManyPods { agent: pod.agent_id, limit: max_per_agent });
            }
            local.insert((pod.agent_id, pod.pod_id), pod.clone());
        }
        let mut pipe = redis::pipe();
        if !expired.is_empty() {
            pipe.cmd("HDEL").arg(&key).arg(&expired).ignore();
        }
        self.write_pod(&mut pipe, &pod);
        if self.available().is_err() || self.run::<()>(&pipe).await.is_err() {
            self.rewrite_connections.store(true, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn unregister_pod(&self, agent: AgentId, pod_id: i64) {
        self.local_pods.lock().expect("pods lock").remove(&(agent, pod_id));
        let mut pipe = redis::pipe();
        pipe.cmd("HDEL").arg(self.keys.agent_pods(agent)).arg(pod_id).ignore();
        let _ = self.run::<()>(&pipe).await;
    }

    async fn pods(&self, filter: PodFilter) -> Result<Vec<PodRecord>, EngineError> {
        let agents: Vec<String> = match filter {
            PodFilter::Agent(id) => vec![id.to_string()],
            PodFilter::Project(id) => {
                let mut pipe = redis::pipe();
                pipe.cmd("SMEMBERS").arg(self.keys.project_agents(id));
                self.run::<(Vec<String>,)>(&pipe).await?.0
            }
            PodFilter::All => {
                let mut pipe = redis::pipe();
                pipe.cmd("SMEMBERS").arg(self.keys.pod_agents());
                self.run::<(Vec<String>,)>(&pipe).await?.0
            }
        };
        let mut pods: Vec<PodRecord> = self.pods_of(&agents).await?.into_iter().filter(|p| filter.matches(p)).collect();
        pods.sort_by_key(|p| (p.agent_id, p.pod_id));
        Ok(pods)
    }
}
