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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use hmac::{Hmac, Mac};
use redis::aio::{MultiplexedConnection, PubSub};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{AsyncConnectionConfig, Client, FromRedisValue, Pipeline, RedisConnectionInfo};
use serde::{Deserialize, Serialize};

use super::{
    ConnectionRecord, Engine, EngineContext, EngineError, MAX_DIRECT_MESSAGE, OnceClaim, PodFilter, PodRecord,
    TooManyPods, TunnelCount,
};
use crate::config::Secret;
use crate::domain::AgentId;
use crate::metrics::Metrics;
use crate::store::{DeliveryPosition, PushNotice, now_ms};

/// Longest wait for any one Redis operation.
const OP_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed connection attempt, operations fail at once for this long instead of each
/// waiting for its own attempt.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// How often the subscription is checked with a PING.
const SUBSCRIPTION_PING: Duration = Duration::from_secs(2);
/// How often a replica refreshes its entry in the connection state.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// A replica silent this long is considered gone; its connection table expires with it.
const REPLICA_TTL: Duration = Duration::from_secs(20);
/// Heartbeats between full rewrites of the replica's connection table.
const FULL_REWRITE_EVERY: u32 = 12;
/// Catch-up reaches this far before the moment the subscription was found lost.
const CATCH_UP_OVERLAP_MS: i64 = 30_000;
/// Events read from the log per catch-up query.
const CATCH_UP_PAGE: i64 = 5000;
/// Messages waiting on the channel are gathered into one lookup until it holds this many
/// sequence numbers (a message is never split or cut: the lookup reads in chunks).
const MAX_SEQS_PER_LOOKUP: usize = 5000;
/// A message larger than this is not one a replica published (a batch of a few thousand numbers
/// is tens of KiB); it is ignored before it is parsed.
const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// Where Redis is, from `KAS_REDIS_URL`.
pub enum RedisTarget {
    /// `redis://…`, `rediss://…` or `unix://…`: one server.
    Single(Client),
    /// `redis+sentinel://[user:password@]host:port[,host:port…]/master[/db]`: the master that
    /// Sentinel names, asked again after every lost connection (so failovers are followed).
    Sentinel(tokio::sync::Mutex<SentinelClient>),
    /// `redis+cluster://[user:password@]host:port[,host:port…]`: a Redis Cluster.
    Cluster {
        /// Client for commands.
        client: ClusterClient,
        /// Seed nodes, for the subscription.
        nodes: Vec<String>,
    },
}

impl RedisTarget {
    /// Parses one of the URL forms above.
    pub fn parse(url: &str) -> Result<Self, String> {
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (user, password, rest) = split_userinfo(rest);
            let (hosts, path) =
                rest.split_once('/').ok_or("expected redis+sentinel://host:port[,…]/master_name[/db]")?;
            let mut segments = path.split('/');
            let master = segments.next().filter(|m| !m.is_empty()).ok_or("the Sentinel master name is missing")?;
            let db = match segments.next().filter(|d| !d.is_empty()) {
                Some(d) => d.parse::<i64>().map_err(|_| format!("database {d:?} is not a number"))?,
                None => 0,
            };
            let mut info = RedisConnectionInfo::default().set_db(db);
            if let Some(u) = user {
                info = info.set_username(u);
            }
            if let Some(p) = password {
                info = info.set_password(p);
            }
            let sentinels: Vec<String> =
                hosts.split(',').filter(|h| !h.is_empty()).map(|h| format!("redis://{h}")).collect();
            if sentinels.is_empty() {
                return Err("no Sentinel address".into());
            }
            let node = SentinelNodeConnectionInfo::default().set_redis_connection_info(info);
            let client = SentinelClient::build(sentinels, master, Some(node), SentinelServerType::Master)
                .map_err(|e| e.to_string())?;
            Ok(Self::Sentinel(tokio::sync::Mutex::new(client)))
        } else if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let (user, password, hosts) = split_userinfo(rest);
            let auth = match (user, password) {
                (None, None) => String::new(),
                (u, p) => format!("{}:{}@", u.unwrap_or_default(), p.unwrap_or_default()),
            };
            let nodes: Vec<String> = hosts
                .trim_end_matches('/')
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("redis://{auth}{h}"))
                .collect();
            if nodes.is_empty() {
                return Err("no cluster node address".into());
            }
            let client = ClusterClient::builder(nodes.clone())
                .connection_timeout(OP_TIMEOUT)
                .response_timeout(OP_TIMEOUT)
                .build()
                .map_err(|e| e.to_string())?;
            Ok(Self::Cluster { client, nodes })
        } else {
            Client::open(url).map(Self::Single).map_err(|e| e.to_string())
        }
    }

    fn config() -> AsyncConnectionConfig {
        AsyncConnectionConfig::new().set_connection_timeout(Some(OP_TIMEOUT)).set_response_timeout(Some(OP_TIMEOUT))
    }

    async fn connect(&self) -> redis::RedisResult<Conn> {
        match self {
            Self::Single(client) => {
                Ok(Conn::Single(client.get_multiplexed_async_connection_with_config(&Self::config()).await?))
            }
            Self::Sentinel(sentinel) => {
                let client = sentinel.lock().await.async_get_client().await?;
                Ok(Conn::Single(client.get_multiplexed_async_connection_with_config(&Self::config()).await?))
            }
            Self::Cluster { client, .. } => Ok(Conn::Cluster(client.get_async_connection().await?)),
        }
    }

    async fn pubsub(&self) -> redis::RedisResult<PubSub> {
        match self {
            Self::Single(client) => client.get_async_pubsub().await,
            Self::Sentinel(sentinel) => {
                let client = sentinel.lock().await.async_get_client().await?;
                client.get_async_pubsub().await
            }
            Self::Cluster { nodes, .. } => {
                let mut last = None;
                for node in nodes {
                    match Client::open(node.as_str()) {
                        Ok(client) => match client.get_async_pubsub().await {
                            Ok(pubsub) => return Ok(pubsub),
                            Err(e) => last = Some(e),
                        },
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.expect("at least one node"))
            }
        }
    }
}

/// Splits `user:password@rest` (the userinfo ends at the last `@` before the first `/`).
fn split_userinfo(s: &str) -> (Option<&str>, Option<&str>, &str) {
    let authority_end = s.find('/').unwrap_or(s.len());
    match s[..authority_end].rfind('@') {
        Some(at) => {
            let (userinfo, rest) = (&s[..at], &s[at + 1..]);
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (Some(u).filter(|u| !u.is_empty()), Some(p).filter(|p| !p.is_empty())),
                None => (Some(userinfo).filter(|u| !u.is_empty()), None),
            };
            (user, password, rest)
        }
        None => (None, None, s),
    }
}

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
    fn pod_agents(&self) -> String {
        format!("{}:pods:agents", self.prefix)
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
}

/// A message from one replica to another: signed, so whoever can publish to Redis cannot make a
/// replica act (a relayed call reaches a cluster), and dated, so an old one cannot be replayed
/// after a minute.
#[derive(Serialize, Deserialize)]
struct DirectEnvelope {
    /// Recipient instance.
    t: String,
    /// Unix milliseconds when sent.
    a: i64,
    /// The body.
    b: String,
    /// HMAC of the above.
    m: String,
}

/// How old a direct message may be when it arrives.
const DIRECT_MAX_AGE_MS: i64 = 60_000;

/// What travels on the channel: which events were recorded, nothing about them. Receivers
/// read the events from the database, so a forged message can make a replica look up numbers,
/// never deliver what the log does not hold or decide who may see it.
#[derive(Serialize, Deserialize)]
struct Envelope {
    /// Publishing replica instance (unique per process, even when two replicas share a name).
    r: String,
    /// Sequence numbers of the recorded events.
    #[serde(default)]
    s: Vec<i64>,
}

/// HMAC-SHA256 under the engine key of `parts`, hex.
fn sign(key: &[u8], parts: &[&str]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p.as_bytes());
        mac.update(b"\0");
    }
    crate::domain::agent::hex(&mac.finalize().into_bytes())
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
    ) -> Self {
        let mut suffix = [0u8; 4];
        getrandom::fill(&mut suffix).expect("system randomness");
        Self {
            target,
            conn: tokio::sync::Mutex::new(None),
            last_connect_failure: Mutex::new(None),
            keys: Keys::new(prefix),
            replica: format!("{replica}#{}", crate::domain::agent::hex(&suffix)),
            key,
            // Positions outlive the window they serve, then expire on their own.
            position_ttl: (replay_window * 2).max(Duration::from_secs(3600)),
            local_connections: Mutex::default(),
            local_pods: Mutex::default(),
            subscribed: AtomicBool::new(false),
            healthy: AtomicBool::new(true),
            rewrite_connections: AtomicBool::new(true),
            metrics,
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

    /// The sequence numbers a message announces, unless this replica published it.
    fn announced(&self, payload: &[u8], into: &mut Vec<i64>) {
        if payload.len() > MAX_MESSAGE_BYTES {
            tracing::warn!(bytes = payload.len(), "ignoring an oversized message on the events channel");
            self.metrics.engine_forgeries.inc();
            return;
        }
        let envelope: Envelope = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a malformed message on the events channel");
                return;
            }
        };
        if envelope.r == self.replica {
            return; // delivered locally when it was recorded
        }
        into.extend(envelope.s.into_iter().filter(|s| *s > 0));
    }

    /// Reads the announced events from the log and hands them to local delivery. A number the
    /// log does not hold is dropped here: the database, not the message, says what happened.
    /// False when the database could not be read: the caller treats that as a gap to catch up.
    async fn deliver_announced(&self, ctx: &EngineContext, mut seqs: Vec<i64>) -> bool {
        seqs.sort_unstable();
        seqs.dedup();
        if seqs.is_empty() {
            return true;
        }
        let mut backoff = Duration::from_millis(50);
        let notices = loop {
            match ctx.store.pushes_by_seq(&seqs).await {
                Ok(n) => break n,
                // The event is in the log (it was published after its commit); a database hiccup
                // delays it, and the catch-up after any gap would find it too.
                Err(e) if backoff < Duration::from_secs(2) && !ctx.shutdown.is_cancelled() => {
                    tracing::debug!(error = %e, "cannot read announced events yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = seqs.len(), "cannot read announced events from the log; will catch up");
                    self.metrics.engine_errors.inc();
                    return false;
                }
            }
        };
        if notices.len() < seqs.len() {
            ctx.metrics.events_unknown_announced.inc_by((seqs.len() - notices.len()) as u64);
        }
        ctx.metrics.events_received_remote.inc_by(notices.len() as u64);
        ctx.local.deliver(&notices);
        true
    }

    /// Delivers what was recorded since `since` (less an overlap) from the event log; false when
    /// the log could not be read (the gap stays open).
    async fn catch_up(&self, ctx: &EngineContext, since: i64) -> bool {
        let not_before = now_ms() - ctx.replay_window.as_millis() as i64;
        let mut overlap_from = since - CATCH_UP_OVERLAP_MS;
        let mut after = i64::MAX;
        let mut total = 0usize;
        loop {
            let page = match ctx.store.pushes_since(after, overlap_from, not_before, &[], CATCH_UP_PAGE).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot catch up from the event log; will try again");
                    return false;
                }
            };
            total += page.len();
            ctx.local.deliver(&page);
            match page.last() {
                Some(last) if page.len() as i64 == CATCH_UP_PAGE => {
                    after = last.seq;
                    overlap_from = i64::MAX;
                }
                _ => break,
            }
        }
        tracing::info!(events = total, "caught up from the event log after a gap in the Redis subscription");
        true
    }

    async fn subscribe_loop(self: Arc<Self>, ctx: EngineContext) {
        let mut gap_since: Option<i64> = None;
        let mut backoff = Duration::from_millis(100);
        let mut warned = false;
        while !ctx.shutdown.is_cancelled() {
            let subscribed = async {
                let pubsub =
                    tokio::time::timeout(OP_TIMEOUT, self.target.pubsub()).await.map_err(|_| "timed out".to_owned())?;
                let (mut sink, stream) = pubsub.map_err(|e| e.to_string())?.split();
                tokio::time::timeout(OP_TIMEOUT, sink.subscribe(&self.keys.channel))
                    .await
                    .map_err(|_| "timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((sink, stream))
            }
            .await;
            let (mut sink, mut stream) = match subscribed {
                Ok(pair) => pair,
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "cannot subscribe to Redis; local agents keep being served, retrying");
                        warned = true;
                    }
                    self.metrics.engine_errors.inc();
                    gap_since.get_or_insert_with(now_ms);
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            self.subscribed.store(true, Ordering::Release);
            backoff = Duration::from_millis(100);
            warned = false;
            tracing::info!(channel = %self.keys.channel, "subscribed to the Redis events channel");
            if let Some(since) = gap_since {
                if !self.catch_up(&ctx, since).await {
                    // Subscribed but behind: try again shortly, keeping the gap's start.
                    self.subscribed.store(false, Ordering::Release);
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
                gap_since = None;
            }
            let mut ping = tokio::time::interval(SUBSCRIPTION_PING);
            loop {
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    message = stream.next() => match message {
                        Some(m) => {
                            // Everything already waiting goes into one database lookup.
                            let received = now_ms();
                            let mut seqs = Vec::new();
                            self.announced(m.get_payload_bytes(), &mut seqs);
                            let mut ended = false;
                            while seqs.len() < MAX_SEQS_PER_LOOKUP {
                                match stream.next().now_or_never() {
                                    Some(Some(m)) => self.announced(m.get_payload_bytes(), &mut seqs),
                                    Some(None) => { ended = true; break; }
                                    None => break,
                                }
                            }
                            if !self.deliver_announced(&ctx, seqs).await {
                                // Announced but unread: the catch-up from the log covers it.
                                gap_since = Some(received);
                                break;
                            }
                            if ended {
                                break;
                            }
                        }
                        None => break,
                    },
                    _ = ping.tick() => {
                        let alive = tokio::time::timeout(OP_TIMEOUT, sink.ping::<redis::Value>()).await;
                        if !matches!(alive, Ok(Ok(_))) {
                            break;
                        }
                    }
                }
            }
            self.subscribed.store(false, Ordering::Release);
            let lost_at = now_ms();
            gap_since = Some(gap_since.map_or(lost_at, |g| g.min(lost_at)));
            self.metrics.engine_errors.inc();
            tracing::warn!("lost the Redis subscription; will catch up from the event log once it is back");
        }
    }

    async fn heartbeat_loop(self: Arc<Self>, ctx: EngineContext) {
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
    async fn heartbeat(&self, full: bool, repair: bool) -> Result<(), EngineError> {
        let now = now_ms();
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

    fn write_pod(&self, pipe: &mut Pipeline, pod: &PodRecord) {
        let ttl = ((pod.expires_at - now_ms()) / 1000).max(1);
        let json = serde_json::to_string(pod).expect("serializable");
        let agent_key = self.keys.agent_pods(pod.agent_id);
        pipe.cmd("HSET").arg(&agent_key).arg(pod.pod_id).arg(json).ignore();
        pipe.cmd("EXPIRE").arg(&agent_key).arg(ttl).ignore();
        for set in [self.keys.project_agents(pod.project_id), self.keys.pod_agents()] {
            pipe.cmd("SADD").arg(&set).arg(pod.agent_id).ignore();
            pipe.cmd("EXPIRE").arg(&set).arg(ttl).ignore();
        }
    }

    /// Fails fast while Redis is known to be failing (see `healthy`).
    fn available(&self) -> Result<(), EngineError> {
        if self.healthy.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(EngineError::Unavailable("Redis is failing; skipped".into()))
        }
    }

    fn publishable(&self, notices: &[PushNotice]) -> Vec<u8> {
        let envelope = Envelope { r: self.replica.clone(), s: notices.iter().map(|n| n.seq).collect() };
        serde_json::to_vec(&envelope).expect("serializable")
    }
}

#[async_trait]
impl Engine for RedisEngine {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn start(self: Arc<Self>, ctx: EngineContext) {
        let heartbeat_ctx = EngineContext {
            local: ctx.local.clone(),
            store: ctx.store.clone(),
            metrics: ctx.metrics.clone(),
            replay_window: ctx.replay_window,
            shutdown: ctx.shutdown.clone(),
            tasks: ctx.tasks.clone(),
        };
        let tasks = ctx.tasks.clone();
        if let Some(sink) = self.direct.get().cloned() {
            tasks.spawn(self.clone().direct_loop(sink, ctx.shutdown.clone()));
        }
        tasks.spawn(self.clone().subscribe_loop(ctx));
        tasks.spawn(self.heartbeat_loop(heartbeat_ctx));
    }

    async fn broadcast(&self, notices: &[PushNotice]) -> Result<(), EngineError> {
        if notices.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH").arg(&self.keys.channel).arg(self.publishable(notices)).ignore();
        self.run::<()>(&pipe).await
    }

    async fn ping(&self) -> Result<(), EngineError> {
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        let _: (String,) = self.run(&pipe).await?;
        if !self.subscribed.load(Ordering::Acquire) {
            return Err(EngineError::Unavailable("not subscribed to the events channel".into()));
        }
        Ok(())
    }

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
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGEBYSCORE").arg(&self.keys.replicas).arg(now_ms() - REPLICA_TTL.as_millis() as i64).arg("+inf");
        let (replicas,): (Vec<String>,) = self.run(&pipe).await?;
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
        let now = now_ms();
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

    async fn remember_refusal(&self, key: &str, ttl: Duration) {
        if self.available().is_err() {
            return;
        }
        let mut pipe = redis::pipe();
        let tag = sign(self.key.expose(), &["refused", key]);
        pipe.cmd("SET").arg(self.keys.refusal(key)).arg(tag).arg("EX").arg(ttl.as_secs().max(1)).ignore();
        let _ = self.run::<()>(&pipe).await;
    }

    async fn was_refused(&self, key: &str) -> bool {
        if self.available().is_err() {
            return false;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("GET").arg(self.keys.refusal(key));
        match self.run::<(Option<String>,)>(&pipe).await {
            Ok((Some(tag),)) => {
                let genuine = verify(self.key.expose(), &["refused", key], &tag);
                if !genuine {
                    self.metrics.engine_forgeries.inc();
                }
                genuine
            }
            _ => false,
        }
    }

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

    async fn send_direct(&self, to: &str, body: String) -> Result<(), EngineError> {
        let at = now_ms();
        let m = sign(self.key.expose(), &["direct", to, &at.to_string(), &body]);
        let envelope = DirectEnvelope { t: to.to_owned(), a: at, b: body, m };
        let payload = serde_json::to_vec(&envelope).expect("serializable");
        if payload.len() > MAX_DIRECT_MESSAGE {
            return Err(EngineError::Unavailable(format!("direct message of {} bytes is too large", payload.len())));
        }
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH").arg(self.keys.direct(to)).arg(payload);
        let (receivers,): (i64,) = self.run(&pipe).await?;
        if receivers == 0 {
            return Err(EngineError::Unavailable(format!("replica {to} is not listening")));
        }
        Ok(())
    }

    fn on_direct(&self, sink: tokio::sync::mpsc::Sender<String>) {
        let _ = self.direct.set(sink);
    }
}

impl RedisEngine {
    /// Replicas whose heartbeat is recent.
    async fn live_replicas(&self) -> Result<Vec<String>, EngineError> {
        let mut pipe = redis::pipe();
        pipe.cmd("ZRANGEBYSCORE").arg(&self.keys.replicas).arg(now_ms() - REPLICA_TTL.as_millis() as i64).arg("+inf");
        let (replicas,): (Vec<String>,) = self.run(&pipe).await?;
        Ok(replicas)
    }

    /// The body of a direct message addressed to this replica, if kas signed it within the last
    /// minute.
    fn direct_body(&self, payload: &[u8]) -> Option<String> {
        if payload.len() > MAX_DIRECT_MESSAGE {
            self.metrics.engine_forgeries.inc();
            return None;
        }
        let e: DirectEnvelope = serde_json::from_slice(payload).ok()?;
        let fresh = (now_ms() - e.a).abs() <= DIRECT_MAX_AGE_MS;
        let genuine = verify(self.key.expose(), &["direct", &e.t, &e.a.to_string(), &e.b], &e.m);
        if !genuine || e.t != self.replica {
            tracing::warn!("ignoring a direct message in Redis that kas did not sign for this replica");
            self.metrics.engine_forgeries.inc();
            return None;
        }
        if !fresh {
            tracing::warn!(age_ms = now_ms() - e.a, "ignoring a stale direct message");
            return None;
        }
        Some(e.b)
    }

    /// Receives this replica's direct messages until shutdown, resubscribing after any loss
    /// (what is published meanwhile is lost: senders wait with a deadline and fail).
    async fn direct_loop(
        self: Arc<Self>,
        sink: tokio::sync::mpsc::Sender<String>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let channel = self.keys.direct(&self.replica);
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let subscribed = async {
                let pubsub =
                    tokio::time::timeout(OP_TIMEOUT, self.target.pubsub()).await.map_err(|_| "timed out".to_owned())?;
                let (mut sink, stream) = pubsub.map_err(|e| e.to_string())?.split();
                tokio::time::timeout(OP_TIMEOUT, sink.subscribe(&channel))
                    .await
                    .map_err(|_| "timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((sink, stream))
            }
            .await;
            let (mut ping_sink, mut stream) = match subscribed {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot subscribe to the direct channel; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let mut ping = tokio::time::interval(SUBSCRIPTION_PING);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    message = stream.next() => match message {
                        Some(m) => {
                            if let Some(body) = self.direct_body(m.get_payload_bytes())
                                && sink.try_send(body).is_err()
                            {
                                tracing::warn!("direct message dropped: the queue is full");
                            }
                        }
                        None => break,
                    },
                    _ = ping.tick() => {
                        let alive = tokio::time::timeout(OP_TIMEOUT, ping_sink.ping::<redis::Value>()).await;
                        if !matches!(alive, Ok(Ok(_))) {
                            break;
                        }
                    }
                }
            }
        }
    }
}

impl RedisEngine {
    /// `seq:at:hmac` of a position, bound to the agent.
    fn signed_position(&self, agent: AgentId, p: DeliveryPosition) -> String {
        let (seq, at) = (p.seq.to_string(), p.at.to_string());
        let tag = sign(self.key.expose(), &["position", &agent.to_string(), &seq, &at]);
        format!("{seq}:{at}:{tag}")
    }

    /// The position in `value` if this deployment signed it for this agent.
    fn verified_position(&self, agent: AgentId, value: &str) -> Option<DeliveryPosition> {
        let mut parts = value.splitn(3, ':');
        let (seq, at, tag) = (parts.next()?, parts.next()?, parts.next()?);
        if !verify(self.key.expose(), &["position", &agent.to_string(), seq, at], tag) {
            return None;
        }
        Some(DeliveryPosition { seq: seq.parse().ok()?, at: at.parse().ok()? })
    }

    async fn pods_of(&self, agents: &[String]) -> Result<Vec<PodRecord>, EngineError> {
        if agents.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for a in agents {
            pipe.cmd("HVALS").arg(format!("{}:pods:agent:{a}", self.keys.prefix));
        }
        let tables: Vec<Vec<String>> = self.run(&pipe).await?;
        let now = now_ms();
        Ok(tables
            .into_iter()
            .flatten()
            .filter_map(|json| serde_json::from_str::<PodRecord>(&json).ok())
            .filter(|p| p.expires_at > now)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        assert!(matches!(RedisTarget::parse("redis://127.0.0.1:6379/2").unwrap(), RedisTarget::Single(_)));
        assert!(matches!(
            RedisTarget::parse("redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/mymaster/1").unwrap(),
            RedisTarget::Sentinel(_)
        ));
        match RedisTarget::parse("redis+cluster://u:pw@a:7000,b:7001/").unwrap() {
            RedisTarget::Cluster { nodes, .. } => {
                assert_eq!(nodes, ["redis://u:pw@a:7000", "redis://u:pw@b:7001"])
            }
            _ => panic!("cluster"),
        }
        for bad in [
            "redis+sentinel://h:1",
            "redis+sentinel://h:1/",
            "redis+sentinel://h:1/m/x",
            "redis+cluster://",
            "nonsense://x",
        ] {
            assert!(RedisTarget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn userinfo() {
        assert_eq!(split_userinfo("u:p@h:1,h:2/m"), (Some("u"), Some("p"), "h:1,h:2/m"));
        assert_eq!(split_userinfo(":p@h:1/m"), (None, Some("p"), "h:1/m"));
        assert_eq!(split_userinfo("h:1/m@x"), (None, None, "h:1/m@x"));
    }

    #[test]
    fn keys_share_one_hash_tag() {
        let k = Keys::new("kas");
        for key in [k.channel.clone(), k.replicas.clone(), k.position(7), k.connections("r1")] {
            assert!(key.starts_with("{kas}:"), "{key}");
        }
    }
}
