//! A stand-in GitLab: an HTTP(S) server implementing exactly the calls kas makes (design brief
//! §9, §11), verifying the KAS JWT and reading the agent token where the GitLab version it plays
//! reads it. Tests change its state (version, agents, projects, files, slow or down) and read the
//! calls it received.

// The gates return the HTTP response to send as their error, as axum handlers do.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt;
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

/// Which GitLab the stand-in plays: where `agent_info` lives and where the agent token is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// ≤ 17.1: `/internal/kubernetes/agent_info` only; the token in `Authorization: Bearer` only.
    V16,
    /// ~17.2: `/internal/kubernetes/agent_info` only; `Authorization`, else `Gitlab-Agentk-Api-Request`.
    V17,
    /// 18.x: both paths; `Gitlab-Agentk-Api-Request`, else `Gitlab-Agent-Api-Request`;
    /// `Authorization` ignored, and refused on `/internal/agents/agentk/` (parsed as OAuth).
    V18,
    /// The newest: `/internal/agents/agentk/agent_info` only; `Gitlab-Agent-Api-Request` only.
    Newest,
}

/// The two `agent_info` paths.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Kubernetes,
    Agentk,
}

impl Version {
    fn serves_agent_info(self, route: Route) -> bool {
        match self {
            Self::V16 | Self::V17 => route == Route::Kubernetes,
            Self::V18 => true,
            Self::Newest => route == Route::Agentk,
        }
    }

    /// The token this version reads, or the refusal it answers.
    fn token(self, headers: &HeaderMap, route: Route) -> Result<Option<String>, Response> {
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let bearer = header("authorization").and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned));
        if matches!(self, Self::V18 | Self::Newest) && route == Route::Agentk && header("authorization").is_some() {
            return Err((StatusCode::UNAUTHORIZED, Json(json!({"error": "invalid_token"}))).into_response());
        }
        Ok(match self {
            Self::V16 => bearer,
            Self::V17 => bearer.or_else(|| header("gitlab-agentk-api-request")),
            Self::V18 => header("gitlab-agentk-api-request").or_else(|| header("gitlab-agent-api-request")),
            Self::Newest => header("gitlab-agent-api-request"),
        })
    }
}

#[derive(Default)]
pub struct World {
    pub agents: HashMap<String, Agent>,
    pub projects: HashMap<String, Project>,
    /// (project id, branch) → head commit.
    pub heads: HashMap<(i64, String), String>,
    /// (project id, commit, path) → content.
    pub files: HashMap<(i64, String, String), String>,
    /// (project id, commit, path) → a file of this many bytes, streamed in 16 KiB chunks (with a
    /// `Content-Length` when the flag is set); what was produced is counted in `streamed`.
    pub huge_files: HashMap<(i64, String, String), (usize, bool)>,
}

/// One request the stand-in received.
pub struct Call {
    pub name: String,
    pub path: String,
    /// The agent token as this GitLab version read it.
    pub token: Option<String>,
    pub at: Instant,
}

pub struct StandIn {
    secret: Vec<u8>,
    api_token: String,
    pub world: Mutex<World>,
    pub mode: Mutex<Option<Mode>>,
    pub version: Mutex<Version>,
    pub calls: Mutex<Vec<Call>>,
    /// Bytes of huge files the server produced for sending (see `World::huge_files`).
    pub streamed: Arc<std::sync::atomic::AtomicUsize>,
}

/// A running stand-in.
pub struct StandInGitLab {
    pub addr: SocketAddr,
    pub state: Arc<StandIn>,
    tls: bool,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandInGitLab {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandInGitLab {
    /// Starts GitLab 18 on a random loopback port.
    pub async fn start(secret: &[u8], api_token: &str) -> StandInGitLab {
        Self::start_version(secret, api_token, Version::V18).await
    }

    /// Starts the given GitLab version on a random loopback port.
    pub async fn start_version(secret: &[u8], api_token: &str, version: Version) -> StandInGitLab {
        let (state, app) = Self::app(secret, api_token, version);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        StandInGitLab { addr, state, tls: false, task }
    }

    /// Starts GitLab 18 over TLS with this certificate chain and key (PEM), as `https://localhost:<port>`.
    pub async fn start_tls(secret: &[u8], api_token: &str, cert_pem: &str, key_pem: &str) -> StandInGitLab {
        use rustls::pki_types::pem::PemObject;
        crate::support::init();
        let (state, app) = Self::app(secret, api_token, Version::V18);
        let certs =
            rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes()).map(Result::unwrap).collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key).unwrap();
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let listener = TlsListener { tcp, acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)) };
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        StandInGitLab { addr, state, tls: true, task }
    }

    fn app(secret: &[u8], api_token: &str, version: Version) -> (Arc<StandIn>, Router) {
        let state = Arc::new(StandIn {
            secret: secret.to_vec(),
            api_token: api_token.into(),
            world: Mutex::default(),
            mode: Mutex::new(Some(Mode::Normal)),
            version: Mutex::new(version),
            calls: Mutex::default(),
            streamed: Arc::default(),
        });
        let app = Router::new()
            .route("/api/v4/internal/kubernetes/agent_info", get(agent_info_kubernetes))
            .route("/api/v4/internal/agents/agentk/agent_info", get(agent_info_agentk))
            .route("/api/v4/internal/kubernetes/verify_project_access", get(verify_project_access))
            .route("/api/v4/projects/{id}/repository/branches/{branch}", get(branch))
            .route("/api/v4/projects/{id}/repository/files/{path}/raw", get(file))
            .route("/api/v4/projects/{id}/repository/tree", get(tree))
            .with_state(state.clone());
        (state, app)
    }

    pub fn url(&self) -> String {
        if self.tls { format!("https://localhost:{}", self.addr.port()) } else { format!("http://{}", self.addr) }
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.state.mode.lock().unwrap() = Some(mode);
    }

    /// Plays another GitLab version from now on (an upgrade or a downgrade).
    pub fn set_version(&self, version: Version) {
        *self.state.version.lock().unwrap() = version;
    }

    /// Calls of `call` in which this GitLab read `token`.
    pub fn calls_with(&self, call: &str, token: &str) -> Vec<Instant> {
        self.state
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.name == call && c.token.as_deref() == Some(token))
            .map(|c| c.at)
            .collect()
    }

    /// Calls of `call`, whatever the token.
    pub fn calls(&self, call: &str) -> usize {
        self.state.calls.lock().unwrap().iter().filter(|c| c.name == call).count()
    }

    /// The request paths of the calls of `call`, in order.
    pub fn paths(&self, call: &str) -> Vec<String> {
        self.state.calls.lock().unwrap().iter().filter(|c| c.name == call).map(|c| c.path.clone()).collect()
    }
}

/// Accepts TLS connections for `axum::serve`; a failed handshake is skipped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else { continue };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// What GitLab does before any internal call: mode, then the KAS JWT. Records the call.
async fn gate(s: &StandIn, headers: &HeaderMap, uri: &Uri, call: &str, token: Option<String>) -> Result<(), Response> {
    s.calls.lock().unwrap().push(Call { name: call.into(), path: uri.path().into(), token, at: Instant::now() });
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

/// The agent of the token this version reads on `route`, after the gate.
async fn agent_of(s: &StandIn, headers: &HeaderMap, uri: &Uri, call: &str, route: Route) -> Result<Agent, Response> {
    let version = *s.version.lock().unwrap();
    let token = version.token(headers, route);
    gate(s, headers, uri, call, token.as_ref().ok().cloned().flatten()).await?;
    let token = token?.unwrap_or_default();
    match s.world.lock().unwrap().agents.get(&token) {
        Some(a) if !a.revoked => Ok(a.clone()),
        _ => Err((StatusCode::UNAUTHORIZED, Json(json!({"message": "401 Unauthorized"}))).into_response()),
    }
}

async fn agent_info_kubernetes(State(s): State<Arc<StandIn>>, headers: HeaderMap, uri: Uri) -> Response {
    agent_info(&s, &headers, &uri, Route::Kubernetes).await
}

async fn agent_info_agentk(State(s): State<Arc<StandIn>>, headers: HeaderMap, uri: Uri) -> Response {
    agent_info(&s, &headers, &uri, Route::Agentk).await
}

async fn agent_info(s: &StandIn, headers: &HeaderMap, uri: &Uri, route: Route) -> Response {
    let version = *s.version.lock().unwrap();
    if !version.serves_agent_info(route) {
        s.calls.lock().unwrap().push(Call {
            name: "agent_info".into(),
            path: uri.path().into(),
            token: None,
            at: Instant::now(),
        });
        return (StatusCode::NOT_FOUND, Json(json!({"error": "404 Not Found"}))).into_response();
    }
    match agent_of(s, headers, uri, "agent_info", route).await {
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
    uri: Uri,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let agent = match agent_of(&s, &headers, &uri, "verify_project_access", Route::Kubernetes).await {
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

fn rest_gate(s: &StandIn, headers: &HeaderMap, uri: &Uri, call: &str) -> Result<(), Response> {
    s.calls.lock().unwrap().push(Call { name: call.into(), path: uri.path().into(), token: None, at: Instant::now() });
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
    uri: Uri,
    Path((id, branch)): Path<(i64, String)>,
) -> Response {
    if let Err(r) = rest_gate(&s, &headers, &uri, "branch") {
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
    uri: Uri,
    Path((id, path)): Path<(i64, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = rest_gate(&s, &headers, &uri, "file") {
        return r;
    }
    let git_ref = q.get("ref").cloned().unwrap_or_default();
    let key = (id, git_ref, path);
    let huge = s.world.lock().unwrap().huge_files.get(&key).copied();
    if let Some((size, with_length)) = huge {
        return huge_body(s.streamed.clone(), size, with_length);
    }
    match s.world.lock().unwrap().files.get(&key) {
        Some(content) => content.clone().into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `size` bytes of YAML comments, produced 16 KiB at a time as the client's connection takes
/// them, each chunk counted into `streamed`.
fn huge_body(streamed: Arc<std::sync::atomic::AtomicUsize>, size: usize, with_length: bool) -> Response {
    const CHUNK: usize = 16 * 1024;
    let chunks = futures::stream::iter((0..size).step_by(CHUNK)).map(move |at| {
        let n = CHUNK.min(size - at);
        streamed.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        let mut chunk = vec![b'#'; n];
        chunk[n - 1] = b'\n';
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(chunk))
    });
    let mut response = axum::body::Body::from_stream(chunks).into_response();
    if with_length {
        response.headers_mut().insert(axum::http::header::CONTENT_LENGTH, size.into());
    }
    response
}

/// The repository tree at the default branch's head, as GitLab pages it: the project by id or
/// by (URL-encoded) full path, `path` and `recursive` honoured, `per_page` at most 100.
async fn tree(
    State(s): State<Arc<StandIn>>,
    headers: HeaderMap,
    uri: Uri,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = rest_gate(&s, &headers, &uri, "tree") {
        return r;
    }
    let world = s.world.lock().unwrap();
    let project_id = match id.parse::<i64>() {
        Ok(n) => Some(n),
        Err(_) => world.projects.get(&id).map(|p| p.id),
    };
    let Some(head) = project_id.and_then(|p| world.heads.get(&(p, "main".to_owned()))) else {
        return (StatusCode::NOT_FOUND, Json(json!({"message": "404 Project Not Found"}))).into_response();
    };
    let base = q.get("path").map(|p| format!("{}/", p.trim_end_matches('/'))).unwrap_or_default();
    let recursive = q.get("recursive").is_some_and(|r| r == "true");
    let mut entries: Vec<(String, &str)> = Vec::new();
    for (pid, commit, path) in world.files.keys() {
        if Some(*pid) != project_id || commit != head {
            continue;
        }
        let Some(rest) = path.strip_prefix(&base) else { continue };
        let parts: Vec<&str> = rest.split('/').collect();
        // Every directory on the way, then the file itself.
        for depth in 1..parts.len() {
            entries.push((format!("{base}{}", parts[..depth].join("/")), "tree"));
        }
        entries.push((path.clone(), "blob"));
    }
    entries.sort();
    entries.dedup();
    if !recursive {
        entries.retain(|(p, _)| !p[base.len()..].contains('/'));
    }
    if entries.is_empty() {
        return (StatusCode::NOT_FOUND, Json(json!({"message": "404 Tree Not Found"}))).into_response();
    }
    let per_page = q.get("per_page").and_then(|p| p.parse::<usize>().ok()).unwrap_or(20).min(100);
    let page = q.get("page").and_then(|p| p.parse::<usize>().ok()).unwrap_or(1).max(1);
    let body: Vec<_> = entries
        .iter()
        .skip((page - 1) * per_page)
        .take(per_page)
        .map(|(path, kind)| {
            let name = path.rsplit('/').next().unwrap();
            json!({"id": "0000", "name": name, "type": kind, "path": path, "mode": if *kind == "tree" { "040000" } else { "100644" }})
        })
        .collect();
    Json(body).into_response()
}
