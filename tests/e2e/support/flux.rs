//! A stand-in Kubernetes API with Flux's OCIRepository objects: lists them across namespaces
//! (under `v1`, or only `v1beta2` like a Flux older than 2.6), records every merge patch, and
//! can answer 403 like an agentk whose service account may not touch them.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde_json::json;

/// One OCIRepository: namespace, name, spec.url, spec.ref.
#[derive(Debug, Clone)]
pub struct Repo {
    pub namespace: &'static str,
    pub name: &'static str,
    pub url: String,
    pub reference: serde_json::Value,
}

/// How the stand-in behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// `source.toolkit.fluxcd.io/v1`.
    V1,
    /// Only `v1beta2` (404 under `v1`).
    V1Beta2Only,
    /// 403 for everything: agentk's service account lacks the permission.
    Forbidden,
}

/// A patch the stand-in received.
#[derive(Debug, Clone)]
pub struct Patch {
    pub path: String,
    pub content_type: String,
    pub body: serde_json::Value,
}

struct Inner {
    served: Served,
    repos: Vec<Repo>,
    patches: Vec<Patch>,
}

/// A running stand-in.
pub struct FluxCluster {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl FluxCluster {
    /// Starts on a random loopback port with `repos`.
    pub async fn start(served: Served, repos: Vec<Repo>) -> FluxCluster {
        let inner = Arc::new(Mutex::new(Inner { served, repos, patches: Vec::new() }));
        let app = Router::new().fallback(serve).with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FluxCluster { addr, inner, task }
    }

    /// `http://addr`.
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Patches received so far.
    pub fn patches(&self) -> Vec<Patch> {
        self.inner.lock().unwrap().patches.clone()
    }
}

impl Drop for FluxCluster {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(State(inner): State<Arc<Mutex<Inner>>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let served = inner.lock().unwrap().served;
    if served == Served::Forbidden {
        let status = json!({"kind": "Status", "status": "Failure", "reason": "Forbidden", "code": 403});
        return (StatusCode::FORBIDDEN, axum::Json(status)).into_response();
    }
    let version = match path.strip_prefix("/apis/source.toolkit.fluxcd.io/").and_then(|p| p.split('/').next()) {
        Some("v1") if served == Served::V1 => "v1",
        Some("v1beta2") => "v1beta2",
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    if parts.method == http::Method::GET && path == format!("/apis/source.toolkit.fluxcd.io/{version}/ocirepositories")
    {
        let items: Vec<serde_json::Value> = inner
            .lock()
            .unwrap()
            .repos
            .iter()
            .map(|r| {
                json!({
                    "apiVersion": format!("source.toolkit.fluxcd.io/{version}"),
                    "kind": "OCIRepository",
                    "metadata": {"name": r.name, "namespace": r.namespace},
                    "spec": {"url": r.url, "ref": r.reference, "interval": "10m"},
                })
            })
            .collect();
        return axum::Json(json!({"kind": "OCIRepositoryList", "items": items})).into_response();
    }
    if parts.method == http::Method::PATCH {
        let content_type =
            parts.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        let bytes = body.collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        inner.lock().unwrap().patches.push(Patch { path: path.clone(), content_type, body: body.clone() });
        return axum::Json(json!({"kind": "OCIRepository", "metadata": body["metadata"]})).into_response();
    }
    StatusCode::NOT_FOUND.into_response()
}
