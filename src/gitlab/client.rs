//! Calls to GitLab: its internal API for agent servers (JWT-signed, with the agent's token) and
//! the REST API for configuration files. Every call has a timeout, waits for one of a bounded
//! number of slots and for the client-side rate limit, never follows a redirect, and never logs
//! a token.

use std::sync::Arc;
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

/// A client of one GitLab instance.
pub struct GitLabClient {
    http: reqwest::Client,
    base: reqwest::Url,
    jwt: GitLabJwt,
    api_token: Option<Secret<String>>,
    slots: Semaphore,
    rate: std::sync::Mutex<RateLimit>,
    metrics: Arc<Metrics>,
}

impl GitLabClient {
    /// A client for GitLab at `base` (its internal URL).
    pub fn new(
        base: &str,
        jwt: GitLabJwt,
        api_token: Option<Secret<String>>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(CALL_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("kas/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        let base = reqwest::Url::parse(&format!("{}/", base.trim_end_matches('/'))).map_err(|e| e.to_string())?;
        Ok(Self {
            http,
            base,
            jwt,
            api_token,
            slots: Semaphore::new(CONCURRENCY),
            rate: std::sync::Mutex::new(RateLimit { tokens: BURST, at: Instant::now() }),
            metrics,
        })
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

    fn internal(&self, segments: &[&str], agent_token: &str) -> reqwest::RequestBuilder {
        self.http
            .get(self.url(segments))
            .header("Gitlab-Kas-Api-Request", self.jwt.sign_for_gitlab())
            .bearer_auth(agent_token)
    }

    /// `GET /api/v4/internal/kubernetes/agent_info` with the agent's token.
    pub async fn agent_info(&self, agent_token: &str) -> Result<AgentInfo, GitLabError> {
        let request = self.internal(&["api", "v4", "internal", "kubernetes", "agent_info"], agent_token);
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
        let mut request = self.internal(&["api", "v4", "internal", "kubernetes", "verify_project_access"], agent_token);
        request = request.query(&[("id", project)]);
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
