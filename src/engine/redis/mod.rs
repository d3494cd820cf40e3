//! The Redis engine: several replicas behind one load balancer act as one service.
//!
//! - Fan-out: every replica publishes its recorded events on one channel and subscribes to it;
//!   an event from any replica reaches the streams of every replica. Classic pub/sub is used on
//!   every topology: on a Redis Cluster a PUBLISH reaches subscribers on every node, so the
//!   subscription may sit on any node.
//! - Gaps: pub/sub keeps nothing for a subscriber that is away. Whenever the subscription is
//!   lost (Redis down, a failover, a dead connection caught by the liveness ping), the replica
//!   catches up from the event log once it is subscribed again, so nothing recorded meanwhile is
//!   missed (the hub ignores events it already has).
//! - State: delivery positions and the connection state (which agents are connected to which
//!   replica, refreshed by a heartbeat and expiring with a dead replica) are Redis keys. Every key
//!   and the channel start with the hash tag `{<prefix>}`, so on a cluster they share one slot
//!   and multi-key commands (RENAME of the connection table) stay legal.
//! - Redis down never refuses an agent: positions fall back to the database, connection state
//!   is rewritten by the next heartbeat, and the outbox keeps unpublished events in the log.
//! - Redis is not trusted with what matters (docs/security.md): a message on the channel
//!   carries only sequence numbers, and each replica reads those events, their paths and the
//!   project's visibility from the database; a number that is not in the log delivers nothing.
//!   Delivery positions and refusals left in Redis carry an HMAC under a key that lives in the
//!   database, so whoever can write to Redis but not read the database cannot forge them.
//!
//! One file per role: `fanout` (publish, subscribe, catch up), `presence` (connection table, pod
//! registrations, heartbeat), `positions`, `refusals`; `target` parses the URL forms.

mod direct;
mod fanout;
mod once;
mod positions;
mod presence;
mod refusals;
mod target;
mod tunnels;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{FromRedisValue, Pipeline};

use super::{ConnectionRecord, EngineError, PodRecord};
use crate::clock::Clock;
use crate::config::Secret;
use crate::domain::AgentId;
use crate::metrics::Metrics;

pub use target::RedisTarget;

/// Longest wait for any one Redis operation.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed connection attempt, operations fail at once for this long instead of each
/// waiting for its own attempt.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// A command connection: both kinds multiplex and are cheap to clone.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// Key names, all under one hash tag.
struct Keys {
    channel: String,
    replicas: String,
    prefix: String,
}

impl Keys {
    fn new(prefix: &str) -> Self {
        let tag = format!("{{{prefix}}}");
        Self { channel: format!("{tag}:events"), replicas: format!("{tag}:replicas"), prefix: tag }
    }
    fn position(&self, agent: AgentId) -> String {
        format!("{}:pos:{agent}", self.prefix)
    }
    fn connections(&self, replica: &str) -> String {
        format!("{}:conns:{replica}", self.prefix)
    }
    fn agent_pods(&self, agent: AgentId) -> String {
        format!("{}:pods:agent:{agent}", self.prefix)
    }
    fn project_agents(&self, project: i64) -> String {
        format!("{}:pods:project:{project}", self.prefix)
    }
    fn refusal(&self, key: &str) -> String {
        format!("{}:refused:{key}", self.prefix)
    }
    fn tunnels(&self, replica: &str) -> String {
        format!("{}:tunnels:{replica}", self.prefix)
    }
    fn once(&self, key: &str) -> String {
        format!("{}:once:{key}", self.prefix)
    }
    fn direct(&self, replica: &str) -> String {
        format!("{}:direct:{replica}", self.prefix)
    }
    fn pod_agents(&self) -> String {
        format!("{}:pods:agents", self.prefix)
    }
}

/// HMAC-SHA256 under the engine key of `parts`, hex.
fn sign(key: &[u8], parts: &[&str]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p.as_bytes());
        mac.update(b"\0");
    }
    crate::hex::encode(&mac.finalize().into_bytes())
}

/// Whether `tag` is the HMAC of `parts`, in constant time.
fn verify(key: &[u8], parts: &[&str], tag: &str) -> bool {
    use subtle::ConstantTimeEq;
    sign(key, parts).as_bytes().ct_eq(tag.as_bytes()).into()
}

/// The Redis engine.
pub struct RedisEngine {
    target: RedisTarget,
    conn: tokio::sync::Mutex<Option<Conn>>,
    last_connect_failure: Mutex<Option<Instant>>,
    keys: Keys,
    /// This process: the configured replica name and a random suffix, so two replicas given the
    /// same name neither drop each other's events nor share a connection table.
    replica: String,
    /// Signs what this engine leaves in Redis (positions, refusals); shared through the database.
    key: Secret<Vec<u8>>,
    position_ttl: Duration,
    local_connections: Mutex<HashMap<String, ConnectionRecord>>,
    /// Registrations taken by this replica, rewritten by the heartbeat after a Redis failure.
    local_pods: Mutex<HashMap<(AgentId, i64), PodRecord>>,
    subscribed: AtomicBool,
    /// False after a failed operation until the next success: hot paths (stream open, position
    /// load) skip Redis meanwhile instead of waiting on it; the heartbeat keeps probing.
    healthy: AtomicBool,
    rewrite_connections: AtomicBool,
    metrics: Arc<Metrics>,
    /// Registrations, heartbeats and catch-up windows are timed by it.
    clock: Clock,
    /// Where direct messages for this replica go (`on_direct`).
    direct: std::sync::OnceLock<tokio::sync::mpsc::Sender<String>>,
}

impl RedisEngine {
    /// An engine for `target`; nothing is contacted until it is used. `key` signs what the
    /// engine leaves in Redis: every replica must be given the same one (from the database).
    pub fn new(
        target: RedisTarget,
        prefix: &str,
        replica: &str,
        key: Secret<Vec<u8>>,
        replay_window: Duration,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> Self {
        let mut suffix = [0u8; 4];
        getrandom::fill(&mut suffix).expect("system randomness");
        Self {
            target,
            conn: tokio::sync::Mutex::new(None),
            last_connect_failure: Mutex::new(None),
            keys: Keys::new(prefix),
            replica: format!("{replica}#{}", crate::hex::encode(&suffix)),
            key,
            // Positions outlive the window they serve, then expire on their own.
            position_ttl: (replay_window * 2).max(Duration::from_secs(3600)),
            local_connections: Mutex::default(),
            local_pods: Mutex::default(),
            subscribed: AtomicBool::new(false),
            healthy: AtomicBool::new(true),
            rewrite_connections: AtomicBool::new(true),
            metrics,
            clock,
            direct: std::sync::OnceLock::new(),
        }
    }

    async fn connection(&self) -> Result<Conn, EngineError> {
        let mut guard = self.conn.lock().await;
        if let Some(conn) = guard.as_ref() {
            return Ok(conn.clone());
        }
        if let Some(at) = *self.last_connect_failure.lock().expect("lock")
            && at.elapsed() < RECONNECT_PAUSE
        {
            return Err(EngineError::Unavailable("Redis is unreachable".into()));
        }
        match tokio::time::timeout(OP_TIMEOUT, self.target.connect()).await {
            Ok(Ok(conn)) => {
                *self.last_connect_failure.lock().expect("lock") = None;
                *guard = Some(conn.clone());
                Ok(conn)
            }
            Ok(Err(e)) => {
                *self.last_connect_failure.lock().expect("lock") = Some(Instant::now());
                Err(EngineError::Unavailable(format!("cannot connect to Redis: {e}")))
            }
            Err(_) => {
                *self.last_connect_failure.lock().expect("lock") = Some(Instant::now());
                Err(EngineError::Unavailable("connecting to Redis timed out".into()))
            }
        }
    }

    /// Runs a pipeline; a failure drops the connection so the next call makes a new one.
    async fn run<T: FromRedisValue + Send>(&self, pipe: &Pipeline) -> Result<T, EngineError> {
        let conn = self.connection().await.inspect_err(|_| {
            self.metrics.engine_errors.inc();
        })?;
        let result = tokio::time::timeout(OP_TIMEOUT, async move {
            match conn {
                Conn::Single(mut c) => pipe.query_async::<T>(&mut c).await,
                Conn::Cluster(mut c) => pipe.query_async::<T>(&mut c).await,
            }
        })
        .await;
        let error = match result {
            Ok(Ok(value)) => {
                self.healthy.store(true, Ordering::Release);
                return Ok(value);
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "Redis did not answer in time".to_owned(),
        };
        self.metrics.engine_errors.inc();
        self.healthy.store(false, Ordering::Release);
        *self.conn.lock().await = None;
        self.rewrite_connections.store(true, Ordering::Relaxed);
        Err(EngineError::Unavailable(error))
    }

    /// Fails fast while Redis is known to be failing (see `healthy`).
    fn available(&self) -> Result<(), EngineError> {
        if self.healthy.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(EngineError::Unavailable("Redis is failing; skipped".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("kas");
        for key in [k.channel.clone(), k.replicas.clone(), k.position(7), k.connections("r1")] {
            assert!(key.starts_with("{kas}:"), "{key}");
        }
    }
}
