//! Stand-ins for Flux sync status: a Kubernetes API serving Kustomization, GitRepository and
//! OCIRepository lists whose states a test changes, and GitLab's commit-status REST endpoint
//! (token check, GitLab's refusal of a transition it cannot make, 500s on demand).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

#[derive(Default)]
struct Objects {
    requests: usize,
    kustomizations: Vec<Value>,
    git: Vec<Value>,
    oci: Vec<Value>,
}

/// A cluster with Flux objects.
pub struct FluxSync {
    pub addr: SocketAddr,
    objects: Arc<Mutex<Objects>>,
    task: tokio::task::JoinHandle<()>,
}

/// A Kustomization named `name` in flux-system following `source` (kind, name).
pub fn kustomization(name: &str, source: (&str, &str), status: Value) -> Value {
    json!({
        "apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
        "metadata": {"name": name, "namespace": "flux-system"},
        "spec": {"interval": "1m", "path": "./", "sourceRef": {"kind": source.0, "name": source.1}},
        "status": status,
    })
}

/// Status of a Kustomization reconciling `revision`.
pub fn reconciling(revision: &str) -> Value {
    json!({"conditions": [
        {"type": "Reconciling", "status": "True", "reason": "Progressing", "message": "Reconciliation in progress"},
        {"type": "Ready", "status": "Unknown", "reason": "Progressing", "message": "Reconciliation in progress"}],
        "lastAttemptedRevision": revision})
}

/// Status of a Kustomization that applied `revision`.
pub fn ready(revision: &str) -> Value {
    json!({"conditions": [{"type": "Ready", "status": "True", "reason": "ReconciliationSucceeded",
        "message": format!("Applied revision: {revision}")}],
        "lastAppliedRevision": revision, "lastAttemptedRevision": revision})
}

/// Status of a Kustomization that failed `revision` after applying `applied`.
pub fn failed(applied: &str, revision: &str, message: &str) -> Value {
    json!({"conditions": [{"type": "Ready", "status": "False", "reason": "BuildFailed", "message": message}],
        "lastAppliedRevision": applied, "lastAttemptedRevision": revision})
}

/// A GitRepository `name` in flux-system at `url` whose artifact is `revision`.
pub fn git_repository(name: &str, url: &str, revision: &str) -> Value {
    json!({"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "GitRepository",
        "metadata": {"name": name, "namespace": "flux-system"},
        "spec": {"url": url, "ref": {"branch": "main"}},
        "status": {"artifact": {"revision": revision}}})
}

/// An OCIRepository `name` whose artifact `revision` was pushed from `source` at `commit`.
pub fn oci_repository(name: &str, revision: &str, source: &str, commit: &str) -> Value {
    json!({"apiVersion": "source.toolkit.fluxcd.io/v1", "kind": "OCIRepository",
        "metadata": {"name": name, "namespace": "flux-system"},
        "spec": {"url": "oci://registry.example.com/group/app/manifests", "ref": {"tag": "latest"}},
        "status": {"artifact": {"revision": revision, "metadata": {
            "org.opencontainers.image.source": source, "org.opencontainers.image.revision": commit}}}})
}

impl FluxSync {
    /// Starts on a random loopback port with nothing in it.
    pub async fn start() -> FluxSync {
        let objects = Arc::new(Mutex::new(Objects::default()));
        let app = Router::new().fallback(serve_flux).with_state(objects.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FluxSync { addr, objects, task }
    }

    /// `http://addr`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the GitRepositories and OCIRepositories.
    pub fn set_sources(&self, git: Vec<Value>, oci: Vec<Value>) {
        let mut o = self.objects.lock().unwrap();
        o.git = git;
        o.oci = oci;
    }

    /// Requests served so far.
    pub fn requests(&self) -> usize {
        self.objects.lock().unwrap().requests
    }

    /// Adds or replaces (by name) a Kustomization.
    pub fn put(&self, k: Value) {
        let mut o = self.objects.lock().unwrap();
        o.kustomizations.retain(|x| x["metadata"]["name"] != k["metadata"]["name"]);
        o.kustomizations.push(k);
    }
}

impl Drop for FluxSync {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_flux(State(objects): State<Arc<Mutex<Objects>>>, request: Request) -> Response {
    let mut o = objects.lock().unwrap();
    o.requests += 1;
    let (kind, items) = match request.uri().path() {
        "/apis/kustomize.toolkit.fluxcd.io/v1/kustomizations" => ("KustomizationList", &o.kustomizations),
        "/apis/source.toolkit.fluxcd.io/v1/gitrepositories" => ("GitRepositoryList", &o.git),
        "/apis/source.toolkit.fluxcd.io/v1/ocirepositories" => ("OCIRepositoryList", &o.oci),
        _ => return (StatusCode::NOT_FOUND, axum::Json(json!({"kind": "Status", "code": 404}))).into_response(),
    };
    axum::Json(json!({"kind": kind, "items": items})).into_response()
}

/// A status GitLab took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub project: String,
    pub sha: String,
    pub state: String,
    pub name: String,
    pub description: String,
    pub git_ref: Option<String>,
}

#[derive(Default)]
struct Gitlab {
    token: String,
    fail_next: usize,
    taken: Vec<Status>,
    refused: usize,
    current: HashMap<(String, String, String), String>,
}

/// GitLab's commit-status endpoint.
pub struct StatusGitLab {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Gitlab>>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusGitLab {
    /// Starts on a random loopback port accepting `token`.
    pub async fn start(token: &str) -> StatusGitLab {
        let inner = Arc::new(Mutex::new(Gitlab { token: token.into(), ..Default::default() }));
        let app =
            Router::new().route("/api/v4/projects/{id}/statuses/{sha}", post(serve_status)).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        StatusGitLab { addr, inner, task }
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Answers the next `n` posts with 500.
    pub fn fail_next(&self, n: usize) {
        self.inner.lock().unwrap().fail_next = n;
    }

    /// Statuses taken so far, in order.
    pub fn taken(&self) -> Vec<Status> {
        self.inner.lock().unwrap().taken.clone()
    }

    /// Posts refused as a transition GitLab cannot make.
    pub fn refused(&self) -> usize {
        self.inner.lock().unwrap().refused
    }
}

impl Drop for StatusGitLab {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_status(
    State(inner): State<Arc<Mutex<Gitlab>>>,
    Path((project, sha)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::Json<Value>,
) -> Response {
    let mut g = inner.lock().unwrap();
    if headers.get("private-token").and_then(|v| v.to_str().ok()) != Some(g.token.as_str()) {
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({"message": "401 Unauthorized"}))).into_response();
    }
    if g.fail_next > 0 {
        g.fail_next -= 1;
        return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response();
    }
    let text = |k: &str| body[k].as_str().unwrap_or_default().to_owned();
    let status = Status {
        project,
        sha,
        state: text("state"),
        name: text("name"),
        description: text("description"),
        git_ref: body["ref"].as_str().map(str::to_owned),
    };
    let key = (status.project.clone(), status.sha.clone(), status.name.clone());
    // GitLab's state machine: no repeat of the state it has, nothing back to running once done.
    let refused = match g.current.get(&key).map(String::as_str) {
        Some(current) if current == status.state => true,
        Some("success" | "failed") if status.state == "running" => true,
        _ => false,
    };
    if refused {
        g.refused += 1;
        let message = format!(
            "Cannot transition status via :run from :{} (Reason(s): Status cannot transition via \"run\")",
            g.current[&key]
        );
        return (StatusCode::BAD_REQUEST, axum::Json(json!({"message": message}))).into_response();
    }
    g.current.insert(key, status.state.clone());
    g.taken.push(status.clone());
    (StatusCode::CREATED, axum::Json(json!({"id": g.taken.len(), "status": status.state}))).into_response()
}
