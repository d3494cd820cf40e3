//! Calls to GitLab: its internal API for agent servers (JWT-signed, with the agent's token) and
//! the REST API for configuration files. Every call has a timeout, waits for one of a bounded
//! number of slots and for the client-side rate limit, never follows a redirect, and never logs
//! a token.
//!
//! Which header carries the agent's token depends on GitLab's version: ≤ 17.1 reads
//! `Authorization: Bearer`, ~17.2 `Authorization` else `Gitlab-Agentk-Api-Request`, 18.x
//! `Gitlab-Agentk-Api-Request` else `Gitlab-Agent-Api-Request` (ignoring `Authorization`), the
//! newest only `Gitlab-Agent-Api-Request`. `agent_info` moved to `/internal/agents/agentk/`,
//! where `Authorization` must not be sent (Rails would parse it as an OAuth token); older GitLab
//! answers 404 there. So kas asks the path that worked last, falls back to the other on 404, and
//! sends every header the path allows: any version reads the one it knows.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::config::Secret;
use crate::gitlab_jwt::GitLabJwt;
use crate::metrics::Metrics;

/// Longest wait for one call, connection included.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the TCP/TLS connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Calls in flight at once.
const CONCURRENCY: usize = 32;
/// Sustained calls per second, and the burst allowed above it.
const RATE_PER_SECOND: f64 = 100.0;
const BURST: f64 = 200.0;

/// What a call could not do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GitLabError {
    /// GitLab answered with this status.
    #[error("GitLab answered {0}")]
    Status(u16),
    /// GitLab could not be reached or did not answer in time.
    #[error("GitLab unavailable: {0}")]
    Unavailable(String),
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

/// A token bucket: `RATE_PER_SECOND` sustained, `BURST` at once.
struct RateLimit {
    tokens: f64,
    at: Instant,
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
    slots: Semaphore,
    rate: std::sync::Mutex<RateLimit>,
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
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(CALL_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("kas/", env!("CARGO_PKG_VERSION")))
            .tls_certs_merge(extra_roots)
            .build()
            .map_err(|e| e.to_string())?;
        let mut base = reqwest::Url::parse(&format!("{}/", base.trim_end_matches('/')))
            .map_err(|e| format!("{}: {e}", redact_url(base)))?;
        let _ = base.set_username("");
        let _ = base.set_password(None);
        Ok(Self {
            http,
            base,
            jwt,
            api_token,
            slots: Semaphore::new(CONCURRENCY),
            rate: std::sync::Mutex::new(RateLimit { tokens: BURST, at: Instant::now() }),
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

    /// Whether configuration files can be read (an API token is configured).
    pub fn can_read_files(&self) -> bool {
        self.api_token.is_some()
    }

    async fn wait_for_rate(&self) {
        loop {
            let wait = {
                let mut r = self.rate.lock().expect("rate lock");
                let now = Instant::now();
                r.tokens = (r.tokens + now.duration_since(r.at).as_secs_f64() * RATE_PER_SECOND).min(BURST);
                r.at = now;
                if r.tokens >= 1.0 {
                    r.tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - r.tokens) / RATE_PER_SECOND)
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn url(&self, segments: &[&str]) -> reqwest::Url {
        let mut url = self.base.clone();
        url.path_segments_mut().expect("http(s) base").pop_if_empty().extend(segments);
        url
    }

    /// Sends `request` within the limits; returns the status and body.
    async fn call(
        &self,
        name: &'static str,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, bytes::Bytes), GitLabError> {
        let _slot = self.slots.acquire().await.expect("semaphore is never closed");
        self.wait_for_rate().await;
        let result = async {
            let response = request.send().await.map_err(|e| GitLabError::Unavailable(e.without_url().to_string()))?;
            let status = response.status().as_u16();
            let body = response.bytes().await.map_err(|e| GitLabError::Unavailable(e.without_url().to_string()))?;
            Ok((status, body))
        }
        .await;
        let outcome = match &result {
            Ok((status, _)) if *status < 300 => "ok",
            Ok((status, _)) if *status < 500 => "refused",
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
    pub async fn agent_info(&self, agent_token: &str) -> Result<AgentInfo, GitLabError> {
        let first = self.agent_info_path();
        match self.agent_info_at(first, agent_token).await {
            Err(GitLabError::Status(404)) => {
                let other = first.other();
                let result = self.agent_info_at(other, agent_token).await;
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

    async fn agent_info_at(&self, path: AgentInfoPath, agent_token: &str) -> Result<AgentInfo, GitLabError> {
        let request = self.internal(path.segments(), agent_token, path == AgentInfoPath::Kubernetes);
        match self.call("agent_info", request).await? {
            (200, body) => {
                let b: AgentInfoBody = serde_json::from_slice(&body)
                    .map_err(|e| GitLabError::Unavailable(format!("unexpected agent_info answer: {e}")))?;
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
        match self.call("verify_project_access", request).await? {
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
        match self.call("branch", request).await? {
            (200, body) => serde_json::from_slice::<Branch>(&body)
                .map(|b| Some(b.commit.id))
                .map_err(|e| GitLabError::Unavailable(format!("unexpected branch answer: {e}"))),
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
            let entries: Vec<Entry> = match self.call("tree", request).await? {
                (200, body) => serde_json::from_slice(&body)
                    .map_err(|e| GitLabError::Unavailable(format!("unexpected tree answer: {e}")))?,
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
        match self.call("file", request).await? {
            (200, body) => String::from_utf8(body.to_vec())
                .map(Some)
                .map_err(|_| GitLabError::Unavailable(format!("{path} is not UTF-8 text"))),
            (404, _) => Ok(None),
            (status, _) => Err(GitLabError::Status(status)),
        }
    }
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
}
