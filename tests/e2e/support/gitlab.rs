//! A stand-in GitLab: an HTTP server implementing exactly the calls kas makes (design section
//! 9), verifying the KAS JWT and the agent token as GitLab does. Tests change its state (agents,
//! projects, files, slow or down) and read the calls it received.

// The gates return the HTTP response to send as their error, as axum handlers do.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

/// An agent GitLab knows.
#[derive(Clone)]
pub struct Agent {
    pub id: i64,
    pub name: String,
    pub project_id: i64,
    pub project_path: String,
    pub revoked: bool,
}

/// A project and who may read its repository.
#[derive(Clone)]
pub struct Project {
    pub id: i64,
    pub visibility: &'static str,
    pub repository_for_everyone: bool,
}

/// How the stand-in answers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    Slow(Duration),
    Down,
}

#[derive(Default)]
pub struct World {
    pub agents: HashMap<String, Agent>,
    pub projects: HashMap<String, Project>,
    /// (project id, branch) → head commit.
    pub heads: HashMap<(i64, String), String>,
    /// (project id, commit, path) → content.
    pub files: HashMap<(i64, String, String), String>,
}

pub struct StandIn {
    secret: Vec<u8>,
    api_token: String,
    pub world: Mutex<World>,
    pub mode: Mutex<Option<Mode>>,
    /// (call, agent token if any, when).
    pub calls: Mutex<Vec<(String, Option<String>, Instant)>>,
}

/// A running stand-in.
pub struct StandInGitLab {
    pub addr: SocketAddr,
    pub state: Arc<StandIn>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandInGitLab {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandInGitLab {
    /// Starts on a random loopback port.
    pub async fn start(secret: &[u8], api_token: &str) -> StandInGitLab {
        let state = Arc::new(StandIn {
            secret: secret.to_vec(),
            api_token: api_token.into(),
            world: Mutex::default(),
            mode: Mutex::new(Some(Mode::Normal)),
            calls: Mutex::default(),
        });
        let app = Router::new()
            .route("/api/v4/internal/kubernetes/agent_info", get(agent_info))
            .route("/api/v4/internal/kubernetes/verify_project_access", get(verify_project_access))
            .route("/api/v4/projects/{id}/repository/branches/{branch}", get(branch))
            .route("/api/v4/projects/{id}/repository/files/{path}/raw", get(file))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        StandInGitLab { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = Some(mode);
    }

    /// Calls of `call` made with `token`.
    pub fn calls_with(&self, call: &str, token: &str) -> Vec<Instant> {
        self.state
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, t, _)| c == call && t.as_deref() == Some(token))
            .map(|(_, _, at)| *at)
            .collect()
    }

    /// Calls of `call`, whatever the token.
    pub fn calls(&self, call: &str) -> usize {
        self.state.calls.lock().unwrap().iter().filter(|(c, _, _)| c == call).count()
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers.get("authorization")?.to_str().ok()?.strip_prefix("Bearer ").map(str::to_owned)
}

/// What GitLab does before any internal call: mode, then the KAS JWT.
async fn gate(s: &StandIn, headers: &HeaderMap, call: &str) -> Result<(), Response> {
    s.calls.lock().unwrap().push((call.into(), bearer(headers), Instant::now()));
    let mode = s.mode.lock().unwrap().unwrap_or(Mode::Normal);
    match mode {
        Mode::Down => return Err(StatusCode::SERVICE_UNAVAILABLE.into_response()),
        Mode::Slow(d) => tokio::time::sleep(d).await,
        Mode::Normal => {}
    }
    let jwt = headers.get("gitlab-kas-api-request").and_then(|v| v.to_str().ok()).unwrap_or("");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_audience(&["gitlab"]);
    validation.set_issuer(&["gitlab-kas"]);
    if jsonwebtoken::decode::<serde_json::Value>(jwt, &jsonwebtoken::DecodingKey::from_secret(&s.secret), &validation)
        .is_err()
    {
        return Err(
            (StatusCode::UNAUTHORIZED, Json(json!({"message": "KAS JWT authentication invalid"}))).into_response()
        );
    }
    Ok(())
}

fn agent_of(s: &StandIn, headers: &HeaderMap) -> Result<Agent, Response> {
    let token = bearer(headers).unwrap_or_default();
    match s.world.lock().unwrap().agents.get(&token) {
        Some(a) if !a.revoked => Ok(a.clone()),
        _ => Err((StatusCode::UNAUTHORIZED, Json(json!({"message": "401 Unauthorized"}))).into_response()),
    }
}

async fn agent_info(State(s): State<Arc<StandIn>>, headers: HeaderMap) -> Response {
    if let Err(r) = gate(&s, &headers, "agent_info").await {
        return r;
    }
    match agent_of(&s, &headers) {
        Ok(a) => Json(json!({
            "project_id": a.project_id,
            "agent_id": a.id,
            "agent_name": a.name,
            "default_branch": "main",
            "gitaly_info": {"address": "unix:/gitaly.socket", "token": "", "features": {}},
            "gitaly_repository": {"storage_name": "default", "relative_path": "x.git", "gl_repository": format!("project-{}", a.project_id), "gl_project_path": a.project_path}
        }))
        .into_response(),
        Err(r) => r,
    }
}

async fn verify_project_access(
    State(s): State<Arc<StandIn>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = gate(&s, &headers, "verify_project_access").await {
        return r;
    }
    let agent = match agent_of(&s, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let id = q.get("id").cloned().unwrap_or_default();
    let world = s.world.lock().unwrap();
    let Some(project) = world.projects.get(&id) else { return StatusCode::NOT_FOUND.into_response() };
    if project.visibility == "broken" {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let allowed = id == agent.project_path || (project.visibility == "public" && project.repository_for_everyone);
    if allowed { StatusCode::NO_CONTENT.into_response() } else { StatusCode::FORBIDDEN.into_response() }
}

fn rest_gate(s: &StandIn, headers: &HeaderMap, call: &str) -> Result<(), Response> {
    s.calls.lock().unwrap().push((call.into(), None, Instant::now()));
    if s.mode.lock().unwrap().unwrap_or(Mode::Normal) == Mode::Down {
        return Err(StatusCode::SERVICE_UNAVAILABLE.into_response());
    }
    if headers.get("private-token").and_then(|v| v.to_str().ok()) != Some(s.api_token.as_str()) {
        return Err(StatusCode::UNAUTHORIZED.into_response());
    }
    Ok(())
}

async fn branch(
    State(s): State<Arc<StandIn>>,
    headers: HeaderMap,
    Path((id, branch)): Path<(i64, String)>,
) -> Response {
    if let Err(r) = rest_gate(&s, &headers, "branch") {
        return r;
    }
    match s.world.lock().unwrap().heads.get(&(id, branch.clone())) {
        Some(head) => Json(json!({"name": branch, "commit": {"id": head}})).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn file(
    State(s): State<Arc<StandIn>>,
    headers: HeaderMap,
    Path((id, path)): Path<(i64, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = rest_gate(&s, &headers, "file") {
        return r;
    }
    let git_ref = q.get("ref").cloned().unwrap_or_default();
    match s.world.lock().unwrap().files.get(&(id, git_ref, path)) {
        Some(content) => content.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
