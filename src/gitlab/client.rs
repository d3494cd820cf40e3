//! Calls to GitLab: its internal API for agent servers (JWT-signed, with the agent's token) and
//! the REST API for configuration files. Every call has a timeout, waits at most
//! `CallLimits::queue_deadline` for one of a bounded number of slots and for the client-side
//! rate limit (and fails with `Overloaded` after it, or at once when too many calls wait),
//! reads at most a bounded answer, never follows a redirect, and never logs a token.
//!
//! Calls come in two lanes. Lookups of tokens kas does not know yet (`Lane::Unknown`: anyone can
//! make them by presenting random tokens) get a small share of the slots and of the rate, and a
//! token bucket per peer address; when any of those is used up they fail at once instead of
//! queueing. Everything else (`Lane::Known`: re-checks and access checks of connected agents,
//! configuration, Rails' calls) is never behind more than that share of strangers.
//!
//! Which header carries the agent's token depends on GitLab's version: ≤ 17.1 reads
//! `Authorization: Bearer`, ~17.2 `Authorization` else `Gitlab-Agentk-Api-Request`, 18.x
//! `Gitlab-Agentk-Api-Request` else `Gitlab-Agent-Api-Request` (ignoring `Authorization`), the
//! newest only `Gitlab-Agent-Api-Request`. `agent_info` moved to `/internal/agents/agentk/`,
//! where `Authorization` must not be sent (Rails would parse it as an OAuth token); older GitLab
//! answers 404 there. So kas asks the path that worked last, falls back to the other on 404, and
//! sends every header the path allows: any version reads the one it knows.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::config::Secret;
use crate::gitlab::jwt::GitLabJwt;
use crate::metrics::Metrics;

/// Longest wait for one call, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the TCP/TLS connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest JSON answer read from GitLab (a tree page of 100 entries is about 20 KiB).
const MAX_JSON_ANSWER: usize = 1 << 20;

/// How much of GitLab kas may use, and how fast a call that cannot get its share fails.
#[derive(Debug, Clone)]
pub struct CallLimits {
    /// Calls in flight at once.
    pub slots: usize,
    /// Of those, at most this many lookups of unknown tokens.
    pub unknown_slots: usize,
    /// Calls per second, sustained.
    pub rate: f64,
    /// Calls allowed at once above the sustained rate.
    pub burst: f64,
    /// Lookups of unknown tokens per second (part of `rate`), sustained.
    pub unknown_rate: f64,
    /// Lookups of unknown tokens allowed at once above `unknown_rate`.
    pub unknown_burst: f64,
    /// Lookups of unknown tokens per second from one peer address (IPv6: one /64), sustained.
    pub peer_rate: f64,
    /// Lookups of unknown tokens allowed at once from one peer above `peer_rate`.
    pub peer_burst: f64,
    /// Peer addresses tracked at once; an untracked peer is refused while the table is full.
    pub max_peers: usize,
    /// Calls waiting for a slot or the rate limit at once; more fail at once.
    pub max_waiting: usize,
    /// Longest wait for a slot and the rate limit.
    pub queue_deadline: Duration,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            slots: 32,
            unknown_slots: 8,
            rate: 100.0,
            burst: 200.0,
            unknown_rate: 30.0,
            unknown_burst: 60.0,
            peer_rate: 10.0,
            peer_burst: 20.0,
            max_peers: 4096,
            max_waiting: 256,
            queue_deadline: Duration::from_secs(2),
        }
    }
}

/// Whose call it is, which decides the share of GitLab it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// For a credential kas already knows, or for GitLab Rails itself.
    Known,
    /// A lookup of a token kas does not know yet, presented from this peer (when known).
    Unknown(Option<IpAddr>),
}

/// What a call could not do.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GitLabError {
    /// GitLab answered with this status.
    #[error("GitLab answered {0}")]
    Status(u16),
    /// GitLab could not be reached or did not answer in time. The error is kept without its URL
    /// (`reqwest::Error::without_url`), so the message names no host path; shared (`Arc`) because
    /// one answer is handed to every caller waiting for the same lookup.
    #[error("GitLab unavailable: {0}")]
    Transport(#[source] Arc<reqwest::Error>),
    /// GitLab answered 200 with a body kas cannot read.
    #[error("GitLab unavailable: unexpected {what} answer: {source}")]
    Unexpected {
        /// The call (`agent_info`, `branch`, `tree`).
        what: &'static str,
        /// Why the body does not parse.
        #[source]
        source: Arc<serde_json::Error>,
    },
    /// GitLab cannot be used for this call (a missing setting, an answer without a needed field).
    #[error("GitLab unavailable: {0}")]
    Unavailable(String),
    /// The call did not get its share of GitLab in time (kas's own limit; GitLab was not asked).
    #[error("too many calls to GitLab: {0}; try again later")]
    Overloaded(&'static str),
    /// GitLab's answer is larger than kas reads.
    #[error("GitLab's answer is larger than {0} bytes")]
    TooLarge(usize),
}

impl GitLabError {
    fn transport(e: reqwest::Error) -> Self {
        Self::Transport(Arc::new(e.without_url()))
    }

    fn unexpected(what: &'static str, e: serde_json::Error) -> Self {
        Self::Unexpected { what, source: Arc::new(e) }
    }
}

/// What `agent_info` tells about a token's agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Agent id.
    pub agent_id: i64,
    /// Agent name.
    pub agent_name: String,
    /// Configuration project id.
    pub project_id: i64,
    /// Configuration project full path.
    pub project_path: String,
    /// The configuration project's default branch.
    pub default_branch: Option<String>,
}

#[derive(Deserialize)]
struct AgentInfoBody {
    agent_id: i64,
    agent_name: String,
    project_id: i64,
    #[serde(default)]
    default_branch: Option<String>,
    #[serde(default)]
    gitaly_repository: Option<GitalyRepository>,
}

#[derive(Deserialize)]
struct GitalyRepository {
    #[serde(default)]
    gl_project_path: Option<String>,
}

/// A token bucket; its rate and burst are the caller's.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64) -> Self {
        Self { tokens: burst, at: Instant::now() }
    }

    /// Refills for the time passed; then takes a token, or says how long until one is there.
    fn take(&mut self, rate: f64, burst: f64) -> Result<(), Duration> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
        }
    }

    /// Whether it would be full by now (it holds nothing worth keeping).
    fn is_full(&self, rate: f64, burst: f64) -> bool {
        self.tokens + self.at.elapsed().as_secs_f64() * rate >= burst
    }
}

/// The per-peer key: the address, or its /64 for IPv6 (one host usually holds a whole /64).
fn peer_key(peer: Option<IpAddr>) -> IpAddr {
    match peer {
        None => IpAddr::from([0u8; 4]),
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        Some(v4) => v4,
    }
}

/// Counts a waiting call for as long as it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(counter: &'a AtomicUsize, max: usize) -> Option<Self> {
        if counter.fetch_add(1, Ordering::AcqRel) >= max {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(counter))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The slots a call holds while it runs.
struct Admission<'a> {
    _slot: SemaphorePermit<'a>,
    _unknown: Option<SemaphorePermit<'a>>,
}

/// The header GitLab 18 reads the agent's token from.
const AGENT_TOKEN_HEADER: &str = "Gitlab-Agent-Api-Request";
/// The header GitLab ~17.2 to 18.x reads the agent's token from (before the one above).
const AGENTK_TOKEN_HEADER: &str = "Gitlab-Agentk-Api-Request";

/// Where `agent_info` is asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentInfoPath {
    /// `/api/v4/internal/agents/agentk/agent_info` (GitLab 18), without `Authorization`.
    Agentk,
    /// `/api/v4/internal/kubernetes/agent_info` (GitLab ≤ 17, still served by 18).
    Kubernetes,
}

impl AgentInfoPath {
    fn segments(self) -> &'static [&'static str] {
        match self {
            Self::Agentk => &["api", "v4", "internal", "agents", "agentk", "agent_info"],
            Self::Kubernetes => &["api", "v4", "internal", "kubernetes", "agent_info"],
        }
    }

    fn other(self) -> Self {
        match self {
            Self::Agentk => Self::Kubernetes,
            Self::Kubernetes => Self::Agentk,
        }
    }
}

/// A client of one GitLab instance.
pub struct GitLabClient {
    http: reqwest::Client,
    base: reqwest::Url,
    jwt: GitLabJwt,
    api_token: Option<Secret<String>>,
    limits: CallLimits,
    /// Every call holds one while it runs.
    slots: Semaphore,
    /// Lookups of unknown tokens also hold one of these, so they never hold more than their share.
    unknown_slots: Semaphore,
    /// Calls waiting for a slot or the rate limit.
    waiting: AtomicUsize,
    rate: std::sync::Mutex<Bucket>,
    unknown_rate: std::sync::Mutex<Bucket>,
    /// Per peer address, for lookups of unknown tokens; at most `limits.max_peers`.
    peers: std::sync::Mutex<HashMap<IpAddr, Bucket>>,
    metrics: Arc<Metrics>,
    /// Whether this GitLab answered `agent_info` on the legacy path last time (remembered so
    /// an older GitLab costs one 404 per replica, not one per call).
    legacy_agent_info: AtomicBool,
}

impl GitLabClient {
    /// A client for GitLab at `base` (its internal URL), trusting `extra_roots` (PEM
    /// certificates of a private CA) besides the public roots. A `user:password` in `base` is
    /// not sent: GitLab's internal API authenticates kas by its JWT, and `Authorization` carries
    /// the agent's token for older GitLab.
    pub fn new(
        base: &str,
        jwt: GitLabJwt,
        api_token: Option<Secret<String>>,
        extra_roots: Vec<reqwest::Certificate>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        Self::with_limits(base, jwt, api_token, extra_roots, metrics, CallLimits::default())
    }

    /// As `new`, with other limits (tests use small ones).
    pub fn with_limits(
        base: &str,
        jwt: GitLabJwt,
        api_token: Option<Secret<String>>,
        extra_roots: Vec<reqwest::Certificate>,
        metrics: Arc<Metrics>,
        limits: CallLimits,
    ) -> Result<Self, String> {
        let http = http_client(extra_roots)?;
        let base = api_base(base)?;
        Ok(Self {
            http,
            base,
            jwt,
            api_token,
            slots: Semaphore::new(limits.slots),
            unknown_slots: Semaphore::new(limits.unknown_slots.min(limits.slots)),
            waiting: AtomicUsize::new(0),
            rate: std::sync::Mutex::new(Bucket::full(limits.burst)),
            unknown_rate: std::sync::Mutex::new(Bucket::full(limits.unknown_burst)),
            peers: std::sync::Mutex::default(),
            limits,
            metrics,
            legacy_agent_info: AtomicBool::new(false),
        })
    }

    /// GitLab's URL as kas calls it (never with a user or password): for logs.
    pub fn base_url(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// Where `agent_info` is asked first.
    pub fn agent_info_path(&self) -> AgentInfoPath {
        if self.legacy_agent_info.load(Ordering::Relaxed) { AgentInfoPath::Kubernetes } else { AgentInfoPath::Agentk }
    }

    /// The metrics the client counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether configuration files can be read (an API token is configured).
    pub fn can_read_files(&self) -> bool {
        self.api_token.is_some()
    }

    async fn wait_for_rate(&self) {
        loop {
            let taken = self.rate.lock().expect("rate lock").take(self.limits.rate, self.limits.burst);
            match taken {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// A lookup of an unknown token from `peer`: its peer's bucket, then the share of all such
    /// lookups; nothing waits here, a lookup over either fails at once.
    fn admit_unknown(&self, peer: Option<IpAddr>) -> Result<SemaphorePermit<'_>, GitLabError> {
        let l = &self.limits;
        {
            let mut peers = self.peers.lock().expect("peers lock");
            let key = peer_key(peer);
            if !peers.contains_key(&key) && peers.len() >= l.max_peers {
                // Peers whose bucket has refilled hold nothing worth keeping.
                peers.retain(|_, b| !b.is_full(l.peer_rate, l.peer_burst));
                self.metrics.gitlab_cache("peers").set(peers.len() as i64);
                if peers.len() >= l.max_peers {
                    return Err(GitLabError::Overloaded("too many peers presenting unknown tokens"));
                }
            }
            let bucket = peers.entry(key).or_insert_with(|| Bucket::full(l.peer_burst));
            bucket
                .take(l.peer_rate, l.peer_burst)
                .map_err(|_| GitLabError::Overloaded("too many unknown agent tokens from this address"))?;
            self.metrics.gitlab_cache("peers").set(peers.len() as i64);
        }
        self.unknown_rate
            .lock()
            .expect("unknown rate lock")
            .take(l.unknown_rate, l.unknown_burst)
            .map_err(|_| GitLabError::Overloaded("too many unknown agent tokens"))?;
        self.unknown_slots.try_acquire().map_err(|_| GitLabError::Overloaded("too many unknown agent tokens in flight"))
    }

    /// Waits (boundedly) for a slot and the rate limit.
    async fn admit(&self, lane: Lane) -> Result<Admission<'_>, GitLabError> {
        let unknown = match lane {
            Lane::Known => None,
            Lane::Unknown(peer) => Some(self.admit_unknown(peer)?),
        };
        let _waiting = Waiting::enter(&self.waiting, self.limits.max_waiting)
            .ok_or(GitLabError::Overloaded("too many calls waiting"))?;
        let slot = tokio::time::timeout(self.limits.queue_deadline, async {
            let slot = self.slots.acquire().await.expect("semaphore is never closed");
            self.wait_for_rate().await;
            slot
        })
        .await
        .map_err(|_| GitLabError::Overloaded("no room within the queue deadline"))?;
        Ok(Admission { _slot: slot, _unknown: unknown })
    }

    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("http(s) base").pop_if_empty().extend(segments);
        url
    }

    /// Sends `request` within the limits of `lane`; returns the status and at most `max_body`
    /// bytes of body (a larger answer is `TooLarge`, and no more of it is read).
    async fn call(
        &self,
        name: &'static str,
        lane: Lane,
        request: reqwest::RequestBuilder,
        max_body: usize,
    ) -> Result<(u16, bytes::Bytes), GitLabError> {
        let admission = match self.admit(lane).await {
            Ok(a) => a,
            Err(e) => {
                self.metrics.gitlab_call(name, "shed");
                return Err(e);
            }
        };
        let result = async {
            let response = request.send().await.map_err(GitLabError::transport)?;
            let status = response.status().as_u16();
            let body = read_at_most(response, max_body).await?;
            Ok((status, body))
        }
        .await;
        drop(admission);
        let outcome = match &result {
            Ok((status, _)) if *status < 300 => "ok",
            Ok((status, _)) if *status < 500 => "refused",
            Err(GitLabError::TooLarge(_)) => "too_large",
            _ => "error",
        };
        self.metrics.gitlab_call(name, outcome);
        result
    }

    /// A call to GitLab's internal API with the agent's token in both custom headers, and in
    /// `Authorization` where the path allows it (everything under `/internal/kubernetes/`).
    fn internal(&self, segments: &[&str], agent_token: &str, with_authorization: bool) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .get(self.url(segments))
            .header("Gitlab-Kas-Api-Request", self.jwt.sign_for_gitlab())
            .header(AGENT_TOKEN_HEADER, sensitive(agent_token))
            .header(AGENTK_TOKEN_HEADER, sensitive(agent_token));
        if with_authorization {
            request = request.header(reqwest::header::AUTHORIZATION, sensitive(&format!("Bearer {agent_token}")));
        }
        request
    }

    /// `agent_info` with the agent's token: on the path that worked last, then on the other
    /// one if that path does not exist (404), remembering the one that answered.
    pub async fn agent_info(&self, agent_token: &str, lane: Lane) -> Result<AgentInfo, GitLabError> {
        let first = self.agent_info_path();
        match self.agent_info_at(first, agent_token, lane).await {
            Err(GitLabError::Status(404)) => {
                let other = first.other();
                let result = self.agent_info_at(other, agent_token, lane).await;
                // Only an answer from an existing route says which one this GitLab serves.
                if matches!(result, Ok(_) | Err(GitLabError::Status(401 | 403))) {
                    self.legacy_agent_info.store(other == AgentInfoPath::Kubernetes, Ordering::Relaxed);
                    tracing::info!(path = ?other, "GitLab answers agent_info on this path; remembered");
                }
                result
            }
            result => result,
        }
    }

    async fn agent_info_at(
        &self,
        path: AgentInfoPath,
        agent_token: &str,
        lane: Lane,
    ) -> Result<AgentInfo, GitLabError> {
        let request = self.internal(path.segments(), agent_token, path == AgentInfoPath::Kubernetes);
        match self.call("agent_info", lane, request, MAX_JSON_ANSWER).await? {
            (200, body) => {
                let b: AgentInfoBody =
                    serde_json::from_slice(&body).map_err(|e| GitLabError::unexpected("agent_info", e))?;
                let project_path = b.gitaly_repository.and_then(|r| r.gl_project_path).ok_or_else(|| {
                    GitLabError::Unavailable("agent_info without gitaly_repository.gl_project_path".into())
                })?;
                Ok(AgentInfo {
                    agent_id: b.agent_id,
                    agent_name: b.agent_name,
                    project_id: b.project_id,
                    project_path,
                    default_branch: b.default_branch,
                })
            }
            (status, _) => Err(GitLabError::Status(status)),
        }
    }

    /// `GET /api/v4/internal/kubernetes/verify_project_access?id=<full path>`: whether the agent
    /// may see the project. 401/403/404 are "no"; anything else that is not success is an error.
    pub async fn verify_project_access(&self, agent_token: &str, project: &str) -> Result<bool, GitLabError> {
        let segments = ["api", "v4", "internal", "kubernetes", "verify_project_access"];
        let request = self.internal(&segments, agent_token, true).query(&[("id", project)]);
        match self.call("verify_project_access", Lane::Known, request, MAX_JSON_ANSWER).await? {
            (200 | 204, _) => Ok(true),
            (401 | 403 | 404, _) => Ok(false),
            (status, _) => Err(GitLabError::Status(status)),
        }
    }

    fn rest(&self, segments: &[&str]) -> Result<reqwest::RequestBuilder, GitLabError> {
        let token =
            self.api_token.as_ref().ok_or_else(|| GitLabError::Unavailable("no KAS_GITLAB_API_TOKEN_FILE".into()))?;
        Ok(self.http.get(self.url(segments)).header("PRIVATE-TOKEN", token.expose().as_str()))
    }

    /// The head commit of `branch` in project `project_id`; `None` when there is no such branch.
    pub async fn branch_head(&self, project_id: i64, branch: &str) -> Result<Option<String>, GitLabError> {
        #[derive(Deserialize)]
        struct Branch {
            commit: Commit,
        }
        #[derive(Deserialize)]
        struct Commit {
            id: String,
        }
        let id = project_id.to_string();
        let request = self.rest(&["api", "v4", "projects", &id, "repository", "branches", branch])?;
        match self.call("branch", Lane::Known, request, MAX_JSON_ANSWER).await? {
            (200, body) => serde_json::from_slice::<Branch>(&body)
                .map(|b| Some(b.commit.id))
                .map_err(|e| GitLabError::unexpected("branch", e)),
            (404, _) => Ok(None),
            (status, _) => Err(GitLabError::Status(status)),
        }
    }

    /// The agents with a configuration file (`.gitlab/agents/<name>/config.yaml`) on the default
    /// branch of `project` (full path), from the repository tree. A project without
    /// `.gitlab/agents` has none.
    pub async fn agent_config_files(&self, project: &str) -> Result<Vec<String>, GitLabError> {
        /// Tree pages read at most (100 entries each).
        const MAX_PAGES: u32 = 20;
        #[derive(Deserialize)]
        struct Entry {
            path: String,
            #[serde(rename = "type")]
            kind: String,
        }
        let mut names = Vec::new();
        for page in 1..=MAX_PAGES {
            let request = self.rest(&["api", "v4", "projects", project, "repository", "tree"])?.query(&[
                ("path", ".gitlab/agents"),
                ("recursive", "true"),
                ("per_page", "100"),
                ("page", &page.to_string()),
            ]);
            let entries: Vec<Entry> = match self.call("tree", Lane::Known, request, MAX_JSON_ANSWER).await? {
                (200, body) => serde_json::from_slice(&body).map_err(|e| GitLabError::unexpected("tree", e))?,
                (404, _) => break,
                (status, _) => return Err(GitLabError::Status(status)),
            };
            let last = entries.len() < 100;
            names.extend(entries.into_iter().filter(|e| e.kind == "blob").filter_map(|e| {
                let name = e.path.strip_prefix(".gitlab/agents/")?.strip_suffix("/config.yaml")?;
                (!name.contains('/')).then(|| name.to_owned())
            }));
            if last {
                break;
            }
        }
        Ok(names)
    }

    /// A file's content at `git_ref`; `None` when it does not exist.
    pub async fn file(&self, project_id: i64, path: &str, git_ref: &str) -> Result<Option<String>, GitLabError> {
        let id = project_id.to_string();
        let request =
            self.rest(&["api", "v4", "projects", &id, "repository", "files", path, "raw"])?.query(&[("ref", git_ref)]);
        // Agent configuration files are at most 128 KiB: a larger one is refused unread.
        match self.call("file", Lane::Known, request, crate::agentcfg::MAX_CONFIG_BYTES).await? {
            (200, body) => String::from_utf8(body.to_vec())
                .map(Some)
                .map_err(|_| GitLabError::Unavailable(format!("{path} is not UTF-8 text"))),
            (404, _) => Ok(None),
            (status, _) => Err(GitLabError::Status(status)),
        }
    }
}

/// The body of `response`, refused as soon as it is known to exceed `max` bytes: by its
/// `Content-Length`, or while it streams in (dropping the response closes the connection, so
/// nothing more is read).
pub(crate) async fn read_at_most(mut response: reqwest::Response, max: usize) -> Result<bytes::Bytes, GitLabError> {
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Err(GitLabError::TooLarge(max));
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(GitLabError::transport)? {
        if body.len() + chunk.len() > max {
            return Err(GitLabError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// A header value that HTTP tooling must not log.
fn sensitive(value: &str) -> reqwest::header::HeaderValue {
    // Tokens come from HTTP/2 metadata, so they are valid header values; an invalid one
    // becomes an empty value, which GitLab refuses like any unknown token.
    let mut v =
        reqwest::header::HeaderValue::from_str(value).unwrap_or_else(|_| reqwest::header::HeaderValue::from_static(""));
    v.set_sensitive(true);
    v
}

/// `url` with any `user:password` replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// The HTTP client kas calls GitLab with: no redirects (a redirect could carry the token
/// elsewhere), deadlines, kas's user agent, and the extra CA certificates.
pub(crate) fn http_client(extra_roots: Vec<reqwest::Certificate>) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(CALL_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("kas/", env!("CARGO_PKG_VERSION")))
        .tls_certs_merge(extra_roots)
        .build()
        .map_err(|e| e.to_string())
}

/// GitLab's URL as kas joins API paths onto it: with a trailing slash and never a user or
/// password (the errors name it redacted).
pub(crate) fn api_base(base: &str) -> Result<reqwest::Url, String> {
    let mut url = reqwest::Url::parse(&format!("{}/", base.trim_end_matches('/')))
        .map_err(|e| format!("{}: {e}", redact_url(base)))?;
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_credentials() {
        assert_eq!(redact_url("https://kas:s3cret@gitlab.example.com/x?a=b"), "https://***@gitlab.example.com/x?a=b");
        assert_eq!(redact_url("http://token@gitlab:8080"), "http://***@gitlab:8080");
        assert_eq!(redact_url("http://gitlab:8080/a@b"), "http://gitlab:8080/a@b");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    /// A GitLab that refuses every token after `delay_ms`, counting the calls it got.
    async fn refusing_gitlab(delay_ms: Arc<std::sync::atomic::AtomicU64>, calls: Arc<AtomicUsize>) -> String {
        let app = axum::Router::new().route(
            "/api/v4/internal/agents/agentk/agent_info",
            axum::routing::get(move || {
                let (delay_ms, calls) = (delay_ms.clone(), calls.clone());
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(delay_ms.load(Ordering::SeqCst))).await;
                    http::StatusCode::UNAUTHORIZED
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://{addr}")
    }

    fn client(url: &str, limits: CallLimits) -> Arc<GitLabClient> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let jwt = GitLabJwt::new(&[7u8; 32]);
        Arc::new(GitLabClient::with_limits(url, jwt, None, Vec::new(), Arc::new(Metrics::new()), limits).unwrap())
    }

    fn peer(last: u8) -> Lane {
        Lane::Unknown(Some(IpAddr::from([10, 0, 0, last])))
    }

    #[test]
    fn peers_are_keyed_by_address_or_ipv6_slash_64() {
        let v6 = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(peer_key(v6("2001:db8::1")), peer_key(v6("2001:db8::ffff:1")));
        assert_ne!(peer_key(v6("2001:db8::1")), peer_key(v6("2001:db8:0:1::1")));
        assert_eq!(peer_key(v6("::ffff:10.0.0.1")), peer_key(v6("10.0.0.1")));
    }

    /// Lookups of unknown tokens: a per-peer budget and a share of the slots, both failing at
    /// once when used up; the known lane still gets GitLab meanwhile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unknown_tokens_get_a_bounded_share_and_fail_fast() {
        let delay = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let url = refusing_gitlab(delay.clone(), calls.clone()).await;
        let limits =
            CallLimits { slots: 4, unknown_slots: 2, peer_rate: 0.5, peer_burst: 2.0, ..CallLimits::default() };
        let c = client(&url, limits);
        assert!(matches!(c.agent_info("t1", peer(1)).await, Err(GitLabError::Status(401))));
        assert!(matches!(c.agent_info("t2", peer(1)).await, Err(GitLabError::Status(401))));
        let started = Instant::now();
        assert!(matches!(c.agent_info("t3", peer(1)).await, Err(GitLabError::Overloaded(_))));
        assert!(started.elapsed() < Duration::from_millis(100), "refused at once, not queued");
        assert_eq!(calls.load(Ordering::SeqCst), 2, "GitLab was not asked over the peer's budget");
        assert!(matches!(c.agent_info("t4", peer(2)).await, Err(GitLabError::Status(401))), "another peer has its own");

        // A slow GitLab: strangers hold at most their two slots; a third fails at once, and the
        // known lane still has room.
        delay.store(800, Ordering::SeqCst);
        let slow: Vec<_> = (3..5)
            .map(|p| {
                let c = c.clone();
                tokio::spawn(async move { c.agent_info("slow", peer(p)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(matches!(c.agent_info("t5", peer(9)).await, Err(GitLabError::Overloaded(_))));
        let started = Instant::now();
        assert!(matches!(c.agent_info("known", Lane::Known).await, Err(GitLabError::Status(401))));
        assert!(started.elapsed() < Duration::from_millis(1500), "no wait behind the strangers");
        for t in slow {
            assert!(matches!(t.await.unwrap(), Err(GitLabError::Status(401))));
        }
        assert_eq!(c.metrics.gitlab_cache("peers").get(), 5);
    }

    /// Every wait for a slot has a deadline, and the number of waiting calls is bounded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waits_are_bounded_in_time_and_number() {
        let delay = Arc::new(std::sync::atomic::AtomicU64::new(1500));
        let calls = Arc::new(AtomicUsize::new(0));
        let url = refusing_gitlab(delay, calls).await;
        let limits = CallLimits {
            slots: 1,
            unknown_slots: 1,
            max_waiting: 1,
            queue_deadline: Duration::from_millis(300),
            ..CallLimits::default()
        };
        let c = client(&url, limits);
        let busy = {
            let c = c.clone();
            tokio::spawn(async move { c.agent_info("holder", Lane::Known).await })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        let waiter = {
            let c = c.clone();
            tokio::spawn(async move {
                let started = Instant::now();
                (c.agent_info("waiter", Lane::Known).await, started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The one waiting place is taken: refused at once.
        assert!(matches!(c.agent_info("third", Lane::Known).await, Err(GitLabError::Overloaded(_))));
        let (result, waited) = waiter.await.unwrap();
        assert!(matches!(result, Err(GitLabError::Overloaded(_))), "{result:?}");
        assert!(waited < Duration::from_millis(1200), "failed at the deadline, not after the slow call: {waited:?}");
        assert!(matches!(busy.await.unwrap(), Err(GitLabError::Status(401))));
    }
}
