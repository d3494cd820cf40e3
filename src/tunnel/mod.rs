//! Calling an agent's cluster through agentk's own reverse tunnel.
//!
//! agentk keeps idle `ReverseTunnel/Connect` streams open; `registry` knows them per agent on
//! this replica (each carries one request, then agentk opens another). `call` speaks the wire:
//! one `KubernetesApi/MakeRequest` through one tunnel, as agentk's own service account. `Tunnels`
//! is the library API: it checks that the agent opted in (the `kas:` section of its
//! configuration file), uses a tunnel on this replica, or `relay`s the call through the engine to
//! a replica that holds one, and waits (bounded) when there is none yet. `run_once` runs an action
//! for an agent exactly once across replicas, on one that holds a tunnel.

mod call;
pub mod registry;
mod relay;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agentcfg::source::{ConfigSource, ConfigSourceError};
use crate::agentcfg::{AgentConfigFile, KasSection};
use crate::domain::AgentId;
use crate::engine::{Engine, OnceClaim};
use crate::identity::AgentIdentity;
use crate::metrics::Metrics;

pub use registry::{Served, TunnelIo, TunnelRegistry};

/// Limits of calls through tunnels.
#[derive(Debug, Clone)]
pub struct TunnelConfig {
    /// How long a call waits for an idle tunnel of its agent.
    pub wait: Duration,
    /// Longest a call may take once it has a tunnel, the response body included.
    pub call_timeout: Duration,
    /// Largest request body sent into a cluster.
    pub max_request_body: usize,
    /// Largest response body read from a cluster.
    pub max_response_body: usize,
    /// How long a once-only action is remembered as done (the replay window).
    pub once_keep: Duration,
}

/// Why kas acts in a cluster; each purpose needs its switch in the agent's `kas:` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    /// `kas cluster get` (`kas.cluster_read`): GET only.
    ClusterRead,
    /// Reconciling OCIRepository objects (`kas.oci.enabled`): GET and PATCH.
    Oci,
    /// Reading Flux results for commit statuses (`kas.sync_status.enabled`): GET only.
    SyncStatus,
}

impl Purpose {
    /// The switch in the `kas:` section.
    pub fn switch(self) -> &'static str {
        match self {
            Self::ClusterRead => "kas.cluster_read",
            Self::Oci => "kas.oci.enabled",
            Self::SyncStatus => "kas.sync_status.enabled",
        }
    }

    fn allowed_by(self, kas: &KasSection) -> bool {
        match self {
            Self::ClusterRead => kas.cluster_read,
            Self::Oci => kas.oci.enabled,
            Self::SyncStatus => kas.sync_status.enabled,
        }
    }

    /// Whether the purpose may use `method`: reading is read-only.
    fn allows_method(self, method: &str) -> bool {
        match self {
            Self::ClusterRead | Self::SyncStatus => method == "GET",
            Self::Oci => matches!(method, "GET" | "PATCH"),
        }
    }
}

/// A request to an agent's Kubernetes API server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeRequest {
    /// HTTP method, upper case.
    pub method: String,
    /// Absolute path, e.g. `/version`.
    pub path: String,
    /// Query parameters, in order.
    #[serde(default)]
    pub query: Vec<(String, String)>,
    /// Headers; credentials and hop-by-hop headers are never forwarded (see `call`).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// Body.
    #[serde(default, with = "base64_bytes")]
    pub body: Vec<u8>,
}

impl KubeRequest {
    /// A GET of `path` (which may carry a `?query`).
    pub fn get(path_and_query: &str) -> Self {
        let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
        let query = query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        Self { method: "GET".into(), path: path.into(), query, ..Default::default() }
    }
}

/// `%XX` and `+` decoding of one query component; invalid escapes are kept as written.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A Kubernetes API answer: status and headers now, the body as it streams.
pub struct KubeResponse {
    /// HTTP status code.
    pub status: u16,
    /// Status line text (`200 OK`).
    pub reason: String,
    /// Headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: ResponseBody,
}

/// A response body as it arrives through the tunnel; bounded by `max_response_body`.
pub struct ResponseBody {
    rx: mpsc::Receiver<Result<bytes::Bytes, TunnelError>>,
}

impl ResponseBody {
    /// A body already complete.
    fn full(data: Vec<u8>) -> Self {
        let (tx, rx) = mpsc::channel(1);
        let _ = tx.try_send(Ok(bytes::Bytes::from(data)));
        Self { rx }
    }

    /// The next chunk; `None` at the end.
    pub async fn next(&mut self) -> Option<Result<bytes::Bytes, TunnelError>> {
        self.rx.recv().await
    }

    /// The whole body, refused past `limit` bytes.
    pub async fn collect(mut self, limit: usize) -> Result<Vec<u8>, TunnelError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.next().await {
            let chunk = chunk?;
            if out.len() + chunk.len() > limit {
                return Err(TunnelError::ResponseTooLarge(limit));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

/// Why a call through a tunnel did not get an answer from the cluster.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum TunnelError {
    /// The agent's configuration file does not turn on what the call is for.
    #[error("agent {agent} has not opted in: its configuration file does not set {switch}: true")]
    NotOptedIn {
        /// The agent.
        agent: AgentId,
        /// The missing switch.
        switch: String,
    },
    /// The request is not one kas sends for this purpose.
    #[error("refused: {0}")]
    Refused(String),
    /// No tunnel of the agent appeared on any replica in time.
    #[error("no tunnel of agent {agent} on any replica within {waited_ms} ms (is its agentk connected?)")]
    NoTunnel {
        /// The agent.
        agent: AgentId,
        /// How long the call waited.
        waited_ms: u64,
    },
    /// The request body is over the limit.
    #[error("request body over {0} bytes")]
    RequestTooLarge(usize),
    /// The response body is over the limit.
    #[error("response body over {0} bytes")]
    ResponseTooLarge(usize),
    /// A step did not finish before the call's deadline.
    #[error("timed out {0}")]
    Timeout(String),
    /// The tunnel ended before the answer was complete (agent gone, token revoked, shutdown).
    #[error("tunnel lost: {0}")]
    Lost(String),
    /// agentk could not make the call (it answered a gRPC error).
    #[error("agentk answered gRPC code {code}: {message}")]
    Agent {
        /// gRPC status code.
        code: i32,
        /// Its message.
        message: String,
    },
    /// agentk's side did not follow the protocol.
    #[error("agentk broke the tunnel protocol: {0}")]
    Protocol(String),
    /// The agent's configuration could not be read.
    #[error("cannot read the agent configuration: {0}")]
    Config(String),
    /// The engine could not relay the call.
    #[error("{0}")]
    Unavailable(String),
}

impl TunnelError {
    /// Short outcome name for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::NotOptedIn { .. } => "not_opted_in",
            Self::Refused(_) => "refused",
            Self::NoTunnel { .. } => "no_tunnel",
            Self::RequestTooLarge(_) | Self::ResponseTooLarge(_) => "too_large",
            Self::Timeout(_) => "timeout",
            Self::Lost(_) => "lost",
            Self::Agent { .. } => "agent_error",
            Self::Protocol(_) => "protocol_error",
            Self::Config(_) => "config_error",
            Self::Unavailable(_) => "unavailable",
        }
    }
}

/// The result of `run_once`.
#[derive(Debug, PartialEq, Eq)]
pub enum Once<T> {
    /// This replica ran the action.
    Ran(T),
    /// Another replica ran it (or is running it).
    Elsewhere,
}

/// The library API: calls into agents' clusters from any replica.
pub struct Tunnels {
    registry: Arc<TunnelRegistry>,
    engine: Arc<dyn Engine>,
    configs: Arc<dyn ConfigSource>,
    metrics: Arc<Metrics>,
    config: TunnelConfig,
    relay: relay::Relay,
}

/// How often a waiting call looks for tunnels on other replicas.
const REMOTE_POLL: Duration = Duration::from_millis(250);
/// How often a replica waiting to run a once-only action asks whether another one did it (a
/// tunnel arriving here wakes it at once).
const ONCE_POLL: Duration = Duration::from_secs(1);
/// Longest wait for an agent's configuration file when checking its opt-in.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(10);

impl Tunnels {
    /// Tunnels of this replica, relayed through `engine` to and from the others.
    pub fn new(
        engine: Arc<dyn Engine>,
        configs: Arc<dyn ConfigSource>,
        metrics: Arc<Metrics>,
        config: TunnelConfig,
    ) -> Arc<Self> {
        let registry = TunnelRegistry::new(metrics.clone());
        Arc::new(Self { registry, engine, configs, metrics, config, relay: relay::Relay::default() })
    }

    /// The registry the tunnel streams join.
    pub fn registry(&self) -> &Arc<TunnelRegistry> {
        &self.registry
    }

    /// Starts publishing tunnel presence and serving relayed calls; stops with `stop`. Call
    /// before the engine starts (it routes direct messages here).
    pub fn start(self: &Arc<Self>, stop: CancellationToken, tasks: &TaskTracker) {
        let (tx, mut rx) = mpsc::channel::<String>(256);
        self.engine.on_direct(tx);
        let tunnels = self.clone();
        let stop_relay = stop.clone();
        let relay_tasks = tasks.clone();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop_relay.cancelled() => return,
                    message = rx.recv() => match message {
                        Some(body) => tunnels.clone().on_direct(body, &relay_tasks),
                        None => return,
                    },
                }
            }
        });
        let tunnels = self.clone();
        tasks.spawn(async move { tunnels.registry.publish_presence(tunnels.engine.clone(), stop).await });
    }

    /// Calls agent `agent`'s Kubernetes API for `purpose`: on this replica when it holds one of
    /// the agent's tunnels, else relayed to a replica that does, waiting at most the configured
    /// time for one to appear anywhere.
    pub async fn call(
        &self,
        agent: AgentId,
        purpose: Purpose,
        request: KubeRequest,
    ) -> Result<KubeResponse, TunnelError> {
        let started = Instant::now();
        let result = self.call_anywhere(agent, purpose, request.clone(), started).await;
        self.observe(agent, &request, started, &result);
        result
    }

    async fn call_anywhere(
        &self,
        agent: AgentId,
        purpose: Purpose,
        request: KubeRequest,
        started: Instant,
    ) -> Result<KubeResponse, TunnelError> {
        check_request(purpose, &request, &self.config)?;
        let deadline = started + self.config.wait;
        let me = self.engine.instance();
        loop {
            let arrived = self.registry.arrivals();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.registry.holds(agent) {
                return self.call_local(agent, purpose, request, deadline).await;
            }
            let holders = self.engine.tunnel_holders(agent).await.unwrap_or_default();
            if let Some(holder) = holders.iter().filter(|h| h.replica != me).max_by_key(|h| h.idle) {
                tracing::debug!(agent, replica = %holder.replica, "relaying a cluster call to the replica holding a tunnel");
                let remaining = deadline.saturating_duration_since(Instant::now());
                return self
                    .relay
                    .call(&*self.engine, &me, &holder.replica, agent, purpose, request, remaining, &self.config)
                    .await;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TunnelError::NoTunnel { agent, waited_ms: (now - started).as_millis() as u64 });
            }
            let _ = tokio::time::timeout_at(deadline.min(now + REMOTE_POLL), arrived).await;
        }
    }

    /// A call through one of this replica's tunnels, waiting until `deadline` for one.
    async fn call_local(
        &self,
        agent: AgentId,
        purpose: Purpose,
        request: KubeRequest,
        deadline: Instant,
    ) -> Result<KubeResponse, TunnelError> {
        check_request(purpose, &request, &self.config)?;
        let started = Instant::now();
        let identity = self.registry.wait_identity(agent, deadline).await.ok_or(TunnelError::NoTunnel {
            agent,
            waited_ms: Instant::now().saturating_duration_since(started).as_millis() as u64,
        })?;
        self.check_opt_in(&identity, purpose).await?;
        let (io, busy) = self.registry.claim(agent, deadline).await.ok_or_else(|| TunnelError::NoTunnel {
            agent,
            waited_ms: Instant::now().saturating_duration_since(started).as_millis() as u64,
        })?;
        let call_deadline = Instant::now() + self.config.call_timeout;
        call::run(io, busy, &request, &self.config, call_deadline).await
    }

    /// Whether the agent's configuration file turns on `purpose`.
    async fn check_opt_in(&self, agent: &AgentIdentity, purpose: Purpose) -> Result<(), TunnelError> {
        let snapshot = match tokio::time::timeout(CONFIG_TIMEOUT, self.configs.load(agent)).await {
            Ok(Ok(s)) => s,
            Ok(Err(ConfigSourceError::NotFound(m))) => return Err(TunnelError::Config(m)),
            Ok(Err(e)) => return Err(TunnelError::Config(e.to_string())),
            Err(_) => return Err(TunnelError::Config("no answer in time".into())),
        };
        let file = AgentConfigFile::parse(&snapshot.text).map_err(|e| TunnelError::Config(e.to_string()))?;
        if purpose.allowed_by(&file.kas_section()) {
            Ok(())
        } else {
            Err(TunnelError::NotOptedIn { agent: agent.id, switch: purpose.switch().into() })
        }
    }

    /// Runs `action` once for the triggering event `key` across all replicas, on a replica that
    /// holds a tunnel of `agent`, waiting at most `wait` for one. Every replica that sees the
    /// event calls this; one runs the action, the others get `Elsewhere`. A replica that dies
    /// while acting leaves a claim that expires after the call timeout, and a replica still
    /// waiting takes it over.
    pub async fn run_once<F, Fut, T>(
        &self,
        agent: AgentId,
        key: &str,
        wait: Duration,
        action: F,
    ) -> Result<Once<T>, TunnelError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let started = Instant::now();
        let deadline = started + wait;
        // Longer than one call may take, so a live actor never loses its claim.
        let claim_ttl = self.config.call_timeout * 2 + self.config.wait;
        let unavailable = |e: crate::engine::EngineError| TunnelError::Unavailable(e.to_string());
        loop {
            let arrived = self.registry.arrivals();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            if self.registry.holds(agent) {
                match self.engine.claim_once(key, claim_ttl).await.map_err(unavailable)? {
                    OnceClaim::Won => {
                        let result = action().await;
                        if let Err(e) = self.engine.finish_once(key, self.config.once_keep).await {
                            tracing::warn!(error = %e, key, "cannot mark a once-only action done");
                        }
                        return Ok(Once::Ran(result));
                    }
                    OnceClaim::Done => return Ok(Once::Elsewhere),
                    OnceClaim::Running => {}
                }
            } else if self.engine.once_done(key).await.map_err(unavailable)? {
                return Ok(Once::Elsewhere);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(TunnelError::NoTunnel { agent, waited_ms: (now - started).as_millis() as u64 });
            }
            let _ = tokio::time::timeout_at(deadline.min(now + ONCE_POLL), arrived).await;
        }
    }

    fn observe(
        &self,
        agent: AgentId,
        request: &KubeRequest,
        started: Instant,
        result: &Result<KubeResponse, TunnelError>,
    ) {
        let elapsed = started.elapsed();
        self.metrics.tunnel_call_seconds.observe(elapsed.as_secs_f64());
        // Never the body, the query or header values: they may carry data of the cluster.
        match result {
            Ok(r) => {
                let outcome = match r.status {
                    401 | 403 => "forbidden",
                    s if s >= 400 => "http_error",
                    _ => "ok",
                };
                self.metrics.tunnel_call(outcome);
                if outcome == "forbidden" {
                    tracing::warn!(
                        agent, method = %request.method, path = %request.path, status = r.status,
                        "the cluster refused kas's call (agentk's service account lacks the permission)"
                    );
                } else {
                    tracing::info!(agent, method = %request.method, path = %request.path, status = r.status, ms = elapsed.as_millis() as u64, "cluster call");
                }
            }
            Err(e) => {
                self.metrics.tunnel_call(e.outcome());
                tracing::warn!(agent, method = %request.method, path = %request.path, error = %e, "cluster call failed");
            }
        }
    }

    /// A message another replica sent this one.
    fn on_direct(self: Arc<Self>, body: String, tasks: &TaskTracker) {
        let Some(call) = self.relay.receive(&body) else { return };
        tasks.spawn(async move {
            let relay::Incoming { id, from, agent, purpose, request, wait_ms } = call;
            let deadline = Instant::now() + Duration::from_millis(wait_ms).min(self.config.wait);
            let started = Instant::now();
            // Only this replica's tunnels: a relayed call is never relayed again.
            let result = self.call_local(agent, purpose, request.clone(), deadline).await;
            let answer = match result {
                Ok(response) => {
                    let (status, reason, headers) =
                        (response.status, response.reason.clone(), response.headers.clone());
                    match response.body.collect(self.config.max_response_body).await {
                        Ok(body) => Ok(relay::Answered { status, reason, headers, body }),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            match &answer {
                Ok(a) => tracing::info!(agent, path = %request.path, status = a.status, ms = started.elapsed().as_millis() as u64, "relayed cluster call made here"),
                Err(e) => tracing::info!(agent, path = %request.path, error = %e, "relayed cluster call failed here"),
            }
            self.relay.answer(&*self.engine, &from, id, answer).await;
        });
    }
}

/// Refuses what a purpose never sends and what is over the limits.
fn check_request(purpose: Purpose, request: &KubeRequest, config: &TunnelConfig) -> Result<(), TunnelError> {
    if !purpose.allows_method(&request.method) {
        return Err(TunnelError::Refused(format!("{} is not allowed for {:?}", request.method, purpose)));
    }
    if !request.path.starts_with('/') || request.path.contains(['\r', '\n', '#', '?']) {
        return Err(TunnelError::Refused(format!("{:?} is not an absolute path", request.path)));
    }
    if request.body.len() > config.max_request_body {
        return Err(TunnelError::RequestTooLarge(config.max_request_body));
    }
    Ok(())
}

/// Bytes as base64 in JSON (relayed requests and answers).
mod base64_bytes {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_splits_and_decodes_the_query() {
        let r = KubeRequest::get("/api/v1/pods?labelSelector=app%3Dweb&limit=5&watch");
        assert_eq!(r.path, "/api/v1/pods");
        assert_eq!(
            r.query,
            [("labelSelector".into(), "app=web".into()), ("limit".into(), "5".into()), ("watch".into(), String::new())]
        );
        assert_eq!(KubeRequest::get("/version").query, []);
        assert_eq!(percent_decode("a%zzb%4"), "a%zzb%4");
    }

    #[test]
    fn purposes_limit_methods_and_paths() {
        let config = TunnelConfig {
            wait: Duration::ZERO,
            call_timeout: Duration::ZERO,
            max_request_body: 4,
            max_response_body: 4,
            once_keep: Duration::ZERO,
        };
        assert!(check_request(Purpose::ClusterRead, &KubeRequest::get("/version"), &config).is_ok());
        let patch = KubeRequest { method: "PATCH".into(), path: "/apis/x".into(), ..Default::default() };
        assert!(matches!(check_request(Purpose::ClusterRead, &patch, &config), Err(TunnelError::Refused(_))));
        assert!(check_request(Purpose::Oci, &patch, &config).is_ok());
        let delete = KubeRequest { method: "DELETE".into(), ..patch.clone() };
        assert!(check_request(Purpose::Oci, &delete, &config).is_err());
        let relative = KubeRequest::get("version");
        assert!(check_request(Purpose::ClusterRead, &relative, &config).is_err());
        let big = KubeRequest { body: vec![0; 5], ..patch };
        assert_eq!(check_request(Purpose::Oci, &big, &config), Err(TunnelError::RequestTooLarge(4)));
    }
}
