//! gRPC over WebSocket on the agent listener, beside plain gRPC on the same port, as agentk's
//! `wss://` and `ws://` addresses use it: an HTTP/1.1 upgrade on any path (subprotocol
//! `ws-tunnel`, no extensions), then binary messages carrying a cleartext HTTP/2 connection
//! (prior knowledge) served by the same gRPC services. agentk's `:authority` on that connection
//! is not one `h2` accepts; see `authority`.
//!
//! Nobody has authenticated when the upgrade is answered (tokens travel inside the gRPC calls),
//! so everything here is bounded as on the plain listeners: incoming WebSocket messages of at
//! most [`io::MAX_INCOMING_MESSAGE`], the HTTP/2 preface and SETTINGS frame by the connection's
//! handshake deadline, and HTTP/2 frames, header blocks and decoded header lists by the
//! rewriter's [`authority::Limits`], which match hyper's on the plain listeners.

pub mod authority;
pub mod io;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tower::{Service, ServiceExt};

use crate::handshake::{self, Expect, Rewound};
use crate::listener::{ConnectionInfo, HTTP2_MAX_FRAME, HTTP2_MAX_HEADER_LIST, hold_open};

/// The subprotocol agentk offers.
pub const SUBPROTOCOL: &str = "ws-tunnel";
/// Authority given to requests whose own is unusable and whose upgrade named no valid host.
const FALLBACK_AUTHORITY: &str = "kas";

/// The agent listener's service: WebSocket upgrades are taken here, everything else goes to the
/// gRPC routes.
#[derive(Clone)]
pub struct WithWebSocket {
    routes: axum::Router,
}

impl WithWebSocket {
    /// Serves `routes` directly and through WebSocket.
    pub fn new(routes: axum::Router) -> Self {
        Self { routes }
    }
}

impl Service<Request<Incoming>> for WithWebSocket {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        let routes = self.routes.clone();
        Box::pin(async move {
            if is_upgrade(&request) { Ok(upgrade(request, routes)) } else { routes.oneshot(request).await }
        })
    }
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

fn is_upgrade(request: &Request<Incoming>) -> bool {
    request.version() <= http::Version::HTTP_11 && header_has(request.headers(), header::UPGRADE, "websocket")
}

fn refuse(status: StatusCode, why: &str) -> Response<Body> {
    Response::builder().status(status).body(Body::from(format!("{why}\n"))).expect("valid response")
}

/// Answers the handshake and, once the connection is upgraded, serves HTTP/2 over it.
fn upgrade(mut request: Request<Incoming>, routes: axum::Router) -> Response<Body> {
    let headers = request.headers();
    if request.method() != Method::GET || !header_has(headers, header::CONNECTION, "upgrade") {
        return refuse(StatusCode::BAD_REQUEST, "a WebSocket upgrade is a GET with Connection: Upgrade");
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Response::builder()
            .status(StatusCode::UPGRADE_REQUIRED)
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .body(Body::empty())
            .expect("valid response");
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return refuse(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key");
    };
    let accept = derive_accept_key(key.as_bytes());
    let offers_tunnel = header_has(headers, header::SEC_WEBSOCKET_PROTOCOL, SUBPROTOCOL);
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| http::uri::Authority::try_from(*h).is_ok())
        .unwrap_or(FALLBACK_AUTHORITY)
        .to_owned();
    let Some(info) = request.extensions().get::<ConnectionInfo>().cloned() else {
        return refuse(StatusCode::INTERNAL_SERVER_ERROR, "no connection information");
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    // Joins the listener's tracker: the connection outlives this request, and shutdown waits
    // for it as for any other connection.
    info.tracker.clone().spawn(serve_http2(on_upgrade, routes, info, host));
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    if offers_tunnel {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL));
    }
    // No Sec-WebSocket-Extensions: agentk asks for none and compression is not wanted here.
    response.body(Body::empty()).expect("valid response")
}

/// agentk's WebSocket settings, for clients: binary messages of at most 10 MiB.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(io::MAX_MESSAGE)).max_frame_size(Some(io::MAX_MESSAGE))
}

/// The server's WebSocket settings: incoming messages of at most [`io::MAX_INCOMING_MESSAGE`]
/// (tungstenite reserves a whole frame as soon as it has read the frame's length), and a read
/// buffer sized for the 16 KiB HTTP/2 frames that travel inside rather than the 128 KiB default.
fn server_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(io::MAX_INCOMING_MESSAGE))
        .max_frame_size(Some(io::MAX_INCOMING_MESSAGE))
        .read_buffer_size(io::READ_BUFFER)
}

/// Waits for the upgrade, then serves HTTP/2 over the WebSocket once the client preface and its
/// SETTINGS frame have come through it, by the handshake deadline.
async fn serve_http2(on_upgrade: hyper::upgrade::OnUpgrade, routes: axum::Router, info: ConnectionInfo, host: String) {
    let opened = async {
        let upgraded = on_upgrade.await.map_err(|e| format!("WebSocket upgrade failed: {e}"))?;
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(server_config())).await;
        let mut ws = io::WsIo::new(ws);
        let prefix = handshake::read_hello(&mut ws, Expect::Http2).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(Rewound::new(prefix, ws))
    };
    let ws = match tokio::time::timeout_at(info.handshake_deadline, opened).await {
        Ok(Ok(ws)) => ws,
        failed => {
            let why = failed.map_or_else(|_| "handshake timed out".to_owned(), |r| r.err().unwrap_or_default());
            info.slot.handshake_failed();
            tracing::debug!(listener = "agent", remote = %info.remote, error = %why, "closing WebSocket before its HTTP/2 preface");
            return;
        }
    };
    let bytes = authority::RewriteReads::new(ws, authority::fix_authority(host));
    let conn_info = info.clone();
    let service = tower::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(conn_info.clone());
        routes.clone().oneshot(request)
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(60))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(1000)
        .max_header_list_size(HTTP2_MAX_HEADER_LIST as u32)
        .max_frame_size(HTTP2_MAX_FRAME as u32)
        .serve_connection(TokioIo::new(bytes), TowerToHyperService::new(service));
    tokio::pin!(conn);
    hold_open(conn, &info, "agent (WebSocket)", |c| c.graceful_shutdown()).await;
}
