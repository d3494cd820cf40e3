//! A stand-in Kubernetes API server: `/version`, the Flux source paths the next issues use, a
//! path agentk's service account may not read (403 with a Kubernetes `Status`), and a record of
//! every request's headers.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// What the stand-in saw.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Header names (lower case) and values.
    pub headers: Vec<(String, String)>,
}

/// A running stand-in.
pub struct KubeApi {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

pub const OCI_REPOSITORIES: &str = "/apis/source.toolkit.fluxcd.io/v1/namespaces/flux-system/ocirepositories";
pub const GIT_REPOSITORIES: &str = "/apis/source.toolkit.fluxcd.io/v1/namespaces/flux-system/gitrepositories";
/// A list the service account may not read.
pub const FORBIDDEN: &str = "/api/v1/secrets";
/// A body larger than the default response limit (4 MiB).
pub const HUGE: &str = "/apis/huge";

impl KubeApi {
    /// Starts on a random loopback port.
    pub async fn start() -> KubeApi {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new().fallback(serve).with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        KubeApi { addr, seen, task }
    }

    /// `http://addr`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests seen so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn list(kind: &str, names: &[&str]) -> serde_json::Value {
    json!({
        "apiVersion": "source.toolkit.fluxcd.io/v1",
        "kind": format!("{kind}List"),
        "items": names.iter().map(|n| json!({
            "apiVersion": "source.toolkit.fluxcd.io/v1",
            "kind": kind,
            "metadata": {"name": n, "namespace": "flux-system"},
        })).collect::<Vec<_>>(),
    })
}

async fn serve(State(seen): State<Arc<Mutex<Vec<Seen>>>>, request: Request) -> Response {
    let uri = request.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let headers = request
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or_default().to_owned()))
        .collect();
    seen.lock().unwrap().push(Seen { method: request.method().to_string(), uri: uri.clone(), headers });
    let path = request.uri().path();
    let json_answer = |status: StatusCode, body: serde_json::Value| {
        (status, [("content-type", "application/json")], body.to_string()).into_response()
    };
    match path {
        "/version" => json_answer(StatusCode::OK, json!({"major": "1", "minor": "31", "gitVersion": "v1.31.2"})),
        OCI_REPOSITORIES => json_answer(StatusCode::OK, list("OCIRepository", &["app", "podinfo"])),
        GIT_REPOSITORIES => json_answer(StatusCode::OK, list("GitRepository", &["flux-system"])),
        FORBIDDEN => json_answer(
            StatusCode::FORBIDDEN,
            json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Forbidden", "code": 403,
                "message": "secrets is forbidden: User \"system:serviceaccount:gitlab-agent:gitlab-agent\" cannot list resource \"secrets\" in API group \"\" at the cluster scope",
            }),
        ),
        HUGE => (StatusCode::OK, vec![b'x'; 5 << 20]).into_response(),
        _ => json_answer(StatusCode::NOT_FOUND, json!({"kind": "Status", "code": 404, "message": "not found"})),
    }
}
