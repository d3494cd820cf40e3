//! The accept loop shared by all three listeners: a cap on open connections, a handshake
//! deadline, optional TLS, HTTP/1.1 and HTTP/2 on the same port, graceful drain at shutdown
//! and, for agent connections, a maximum age after which the connection is asked to go away so
//! agents spread over the replicas again.
//!
//! Every limit that protects kas from a client that has not authenticated lives here (or, for
//! gRPC over WebSocket, in `websocket`): a connection over its listener's cap is closed at once;
//! one that has not completed its handshake (TLS, a request head or the HTTP/2 preface and
//! SETTINGS, and for WebSocket the upgrade and the first HTTP/2 frame) by the handshake deadline
//! is closed; request heads and HTTP/2 header lists and frames are bounded.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceExt};

use crate::handshake::{self, Expect, Rewound};
use crate::metrics::ListenerMetrics;

/// Gap between GOAWAY and ending the connection's long streams, so the client learns not to
/// open new streams here before it sees its streams end.
const GOAWAY_HEAD_START: Duration = Duration::from_millis(200);
/// Largest decoded HTTP/2 header list (RFC 7541 sizes: name + value + 32 per field), on every
/// listener and through WebSocket: h2's own default, far above what gRPC sends.
pub const HTTP2_MAX_HEADER_LIST: usize = 16 << 10;
/// Largest HTTP/2 frame accepted: the protocol's default, which we never raise.
pub const HTTP2_MAX_FRAME: usize = handshake::MAX_FRAME_SIZE;
/// At most one "connection limit reached" warning per listener this often.
const REFUSAL_WARNING_EVERY: Duration = Duration::from_secs(10);

/// What a listener serves: requests in, responses out, errors mapped to responses already.
pub trait ConnectionService<B>:
    Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<T, B> ConnectionService<B> for T where
    T: Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible, Future: Send + 'static>
        + Clone
        + Send
        + 'static
{
}

/// The body of a response a listener can send.
pub trait ResponseBody:
    http_body::Body<Data = bytes::Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static
{
}

impl<T> ResponseBody for T where
    T: http_body::Body<Data = bytes::Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>> + Send + 'static
{
}

/// Facts about the connection a request arrived on, placed in every request's extensions.
#[derive(Clone, Debug)]
pub struct ConnectionInfo {
    /// The peer's address.
    pub remote: SocketAddr,
    /// Cancelled when the connection is being closed (shutdown or max age): long streams end
    /// with OK so the agent reopens them at once on another connection.
    pub closing: CancellationToken,
    /// When the connection reaches its maximum age (jitter applied); `None` for no limit.
    /// Connections upgraded to WebSocket outlive the HTTP/1.1 exchange and honour it themselves.
    pub max_age_at: Option<tokio::time::Instant>,
    /// By when what follows this request must have completed its handshake: for a WebSocket
    /// upgrade, the first HTTP/2 frame through it. On the connection's first request this is
    /// the connection's own deadline (accepted + handshake timeout); on later ones it is
    /// counted from the request.
    pub handshake_deadline: Instant,
    /// Tasks that serve the connection beyond hyper's (a WebSocket after its upgrade) join
    /// this tracker, so shutdown waits for them.
    pub(crate) tracker: TaskTracker,
    /// The connection's place under its listener's cap; freed when the last holder (the
    /// connection's task, an upgraded WebSocket's task) drops it.
    pub(crate) slot: Arc<Slot>,
}

/// One connection counted against its listener's cap and in its open-connections gauge.
#[derive(Debug)]
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: ListenerMetrics,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, metrics: ListenerMetrics) -> Self {
        metrics.open.inc();
        Self { _permit: permit, metrics }
    }

    /// Counts a connection closed before its handshake completed.
    pub(crate) fn handshake_failed(&self) {
        self.metrics.handshakes_failed.inc();
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.open.dec();
    }
}

/// How one listener treats its connections.
#[derive(Clone)]
pub struct ListenerSettings {
    /// Name for logs and metrics (`http`, `agent`, `api`).
    pub name: &'static str,
    /// TLS, when configured.
    pub tls: Option<TlsAcceptor>,
    /// Maximum connection age before jitter; `None` for no limit.
    pub max_age: Option<Duration>,
    /// Most connections open at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// Time from accept to a completed handshake.
    pub handshake_timeout: Duration,
    /// Idle HTTP/1.1 keep-alive connections (and slow request heads after the first) are
    /// closed after this.
    pub http1_idle_timeout: Duration,
    /// This listener's connection metrics.
    pub metrics: ListenerMetrics,
}

/// Loads a PEM certificate chain and key into an acceptor that offers h2 and http/1.1.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("TLS certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("TLS certificate {}: no certificate found", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("TLS key {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate and key do not match: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections until `shutdown` is cancelled, serving each with a service built by
/// `make_service`; every connection task is tracked by `tracker` so shutdown can wait for them.
pub fn spawn<M, S, B>(
    listener: TcpListener,
    settings: ListenerSettings,
    make_service: M,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) where
    M: Fn(ConnectionInfo) -> S + Send + Sync + 'static,
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http2()
        .timer(TokioTimer::new())
        // Detects dead peers; agents ping every 55 s themselves and h2 never refuses pings.
        .keep_alive_interval(Duration::from_secs(60))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_concurrent_streams(1000)
        .max_header_list_size(HTTP2_MAX_HEADER_LIST as u32)
        .max_frame_size(HTTP2_MAX_FRAME as u32);
    // The first request head was read before hyper saw the connection (see `handshake`); this
    // bounds the wait for every later one, which is also how long an idle keep-alive
    // connection stays open.
    builder.http1().timer(TokioTimer::new()).header_read_timeout(settings.http1_idle_timeout);
    let make_service = Arc::new(make_service);
    let inner_tracker = tracker.clone();
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    tracker.spawn(async move {
        let mut last_warning: Option<Instant> = None;
        loop {
            let (stream, remote) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Typically EMFILE: back off instead of spinning.
                        tracing::warn!(listener = settings.name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                // Closing at once (rather than leaving the connection in the accept queue)
                // frees the descriptor and tells the client to go elsewhere.
                settings.metrics.refused.inc();
                drop(stream);
                if last_warning.is_none_or(|t| t.elapsed() >= REFUSAL_WARNING_EVERY) {
                    last_warning = Some(Instant::now());
                    tracing::warn!(
                        listener = settings.name,
                        max = settings.max_connections,
                        "connection limit reached: closing new connections"
                    );
                }
                continue;
            };
            let _ = stream.set_nodelay(true);
            let closing = shutdown.child_token();
            let now = Instant::now();
            let info = ConnectionInfo {
                remote,
                closing: closing.clone(),
                max_age_at: settings.max_age.map(|age| now + jitter(age)),
                handshake_deadline: now + settings.handshake_timeout,
                tracker: inner_tracker.clone(),
                slot: Arc::new(Slot::new(permit, settings.metrics.clone())),
            };
            let service = make_service(info.clone());
            let builder = builder.clone();
            let settings = settings.clone();
            // Plain and TLS connections are different futures: a task is as large as its future,
            // so plain connections must not carry room for a TLS handshake and TLS state.
            match settings.tls.clone() {
                Some(acceptor) => inner_tracker.spawn(serve_tls(stream, acceptor, info, settings, builder, service)),
                None => inner_tracker.spawn(serve_plain(stream, info, settings, builder, service)),
            };
        }
        tracing::debug!(listener = settings.name, "stopped accepting");
    });
}

/// Reads the connection's first request head or HTTP/2 preface by its handshake deadline;
/// `None` (after counting and logging why) when it did not come.
async fn hello<I: AsyncRead + Unpin>(
    io: &mut I,
    info: &ConnectionInfo,
    settings: &ListenerSettings,
) -> Option<bytes::Bytes> {
    let why = match tokio::time::timeout_at(info.handshake_deadline, handshake::read_hello(io, Expect::Any)).await {
        Ok(Ok(prefix)) => return Some(prefix),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "handshake timed out".to_owned(),
    };
    settings.metrics.handshakes_failed.inc();
    tracing::debug!(listener = settings.name, remote = %info.remote, error = %why, "closing connection before its handshake completed");
    None
}

/// Adds the connection's `ConnectionInfo` to every request.
fn with_info<S: ConnectionService<B>, B>(
    service: S,
    info: ConnectionInfo,
    handshake_timeout: Duration,
) -> TowerToHyperService<impl ConnectionService<B>> {
    let later = Arc::new(AtomicBool::new(false));
    TowerToHyperService::new(tower::service_fn(move |mut req: http::Request<Incoming>| {
        let mut info = info.clone();
        if later.swap(true, Ordering::Relaxed) {
            info.handshake_deadline = Instant::now() + handshake_timeout;
        }
        req.extensions_mut().insert(info);
        service.clone().oneshot(req)
    }))
}

async fn serve_plain<S, B>(
    mut stream: TcpStream,
    info: ConnectionInfo,
    settings: ListenerSettings,
    builder: auto::Builder<TokioExecutor>,
    service: S,
) where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let Some(prefix) = hello(&mut stream, &info, &settings).await else { return };
    serve_http(Rewound::new(prefix, stream), info, settings, builder, service).await
}

async fn serve_tls<S, B>(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    info: ConnectionInfo,
    settings: ListenerSettings,
    builder: auto::Builder<TokioExecutor>,
    service: S,
) where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let mut tls = match tokio::time::timeout_at(info.handshake_deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            settings.metrics.handshakes_failed.inc();
            tracing::debug!(listener = settings.name, remote = %info.remote, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            settings.metrics.handshakes_failed.inc();
            tracing::debug!(listener = settings.name, remote = %info.remote, "TLS handshake timed out");
            return;
        }
    };
    let Some(prefix) = hello(&mut tls, &info, &settings).await else { return };
    serve_http(Rewound::new(prefix, tls), info, settings, builder, service).await
}

/// Serves HTTP/1.1 or HTTP/2 (hyper tells which from the bytes `hello` read) on a connection.
async fn serve_http<I, S, B>(
    io: I,
    info: ConnectionInfo,
    settings: ListenerSettings,
    builder: auto::Builder<TokioExecutor>,
    service: S,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let service = with_info(service, info.clone(), settings.handshake_timeout);
    drive(builder.serve_connection_with_upgrades(TokioIo::new(io), service), &info, &settings).await
}

async fn drive<I, S, B>(
    conn: auto::UpgradeableConnection<'_, I, S, TokioExecutor>,
    info: &ConnectionInfo,
    settings: &ListenerSettings,
) where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Future: 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    TokioExecutor: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    tokio::pin!(conn);
    hold_open(conn, info, settings.name, |c| c.graceful_shutdown()).await;
}

/// Drives a connection until it ends, or until shutdown or its maximum age: then it is asked to
/// go away (`graceful`, which sends GOAWAY) and, shortly after, its long streams are told to end
/// with OK, and it is driven until it finishes.
pub(crate) async fn hold_open<F, O, E>(
    mut conn: Pin<&mut F>,
    info: &ConnectionInfo,
    name: &'static str,
    graceful: impl FnOnce(Pin<&mut F>),
) where
    F: Future<Output = Result<O, E>>,
    E: std::fmt::Display,
{
    let max_age = async {
        match info.max_age_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    let reason = tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(listener = name, remote = %info.remote, error = %e, "connection ended with an error");
            }
            return;
        }
        _ = info.closing.cancelled() => "shutdown",
        _ = max_age => "max connection age",
    };
    tracing::debug!(listener = name, remote = %info.remote, reason, "closing connection");
    graceful(conn.as_mut());
    let closing = info.closing.clone();
    let end_streams = async move {
        tokio::time::sleep(GOAWAY_HEAD_START).await;
        closing.cancel();
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = end_streams => {}
    }
}

/// Descriptors kas needs besides its connections: database and Redis pools, files, spare.
const OTHER_FILES: u64 = 1024;

/// Raises the soft open-file limit to the hard one, since every connection costs a descriptor
/// and distributions default the soft limit to 1024, and logs both. Warns when even that leaves
/// no room for `connections` (the listeners' caps together) and kas's other files.
#[cfg(unix)]
pub fn raise_open_file_limit(connections: usize) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_owned(), |v| v.to_string());
    let before = getrlimit(Resource::Nofile);
    if before.current != before.maximum {
        let raised = rustix::process::Rlimit { current: before.maximum, maximum: before.maximum };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(soft = %show(before.current), hard = %show(before.maximum), error = %e, "cannot raise the open-file limit");
        }
    }
    let now = getrlimit(Resource::Nofile);
    tracing::info!(soft = %show(now.current), hard = %show(now.maximum), was = %show(before.current), "open-file limit");
    let needed = connections as u64 + OTHER_FILES;
    if now.current.is_some_and(|soft| soft < needed) {
        tracing::warn!(
            soft = %show(now.current),
            needed,
            "the open-file limit is below the listeners' connection caps: raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower KAS_MAX_CONNECTIONS_*"
        );
    }
}

/// Raises the soft open-file limit to the hard one (nothing to do on this platform).
#[cfg(not(unix))]
pub fn raise_open_file_limit(_connections: usize) {}

/// ±10% so that connections opened together do not all expire together.
fn jitter(age: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let unit = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX); // 0..=1
    age.mul_f64(0.9 + 0.2 * unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_ten_percent() {
        let age = Duration::from_secs(1800);
        for _ in 0..1000 {
            let j = jitter(age);
            assert!(j >= Duration::from_secs(1620) && j <= Duration::from_secs(1980), "{j:?}");
        }
    }
}
