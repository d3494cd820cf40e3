//! The accept loop shared by all three listeners: optional TLS, HTTP/1.1 and HTTP/2 on the
//! same port, graceful drain at shutdown and, for agent connections, a maximum age after
//! which the connection is asked to go away so agents spread over the replicas again.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::{Service, ServiceExt};

/// How long a client may take to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Gap between GOAWAY and ending the connection's long streams, so the client learns not to
/// open new streams here before it sees its streams end.
const GOAWAY_HEAD_START: Duration = Duration::from_millis(200);

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
        .max_concurrent_streams(1000);
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    let make_service = Arc::new(make_service);
    let inner_tracker = tracker.clone();
    tracker.spawn(async move {
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
            let _ = stream.set_nodelay(true);
            let closing = shutdown.child_token();
            let max_age_at = settings.max_age.map(|age| tokio::time::Instant::now() + jitter(age));
            let info = ConnectionInfo { remote, closing: closing.clone(), max_age_at };
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

/// Adds the connection's `ConnectionInfo` to every request.
fn with_info<S: ConnectionService<B>, B>(
    service: S,
    info: ConnectionInfo,
) -> TowerToHyperService<impl ConnectionService<B>> {
    TowerToHyperService::new(tower::service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(info.clone());
        service.clone().oneshot(req)
    }))
}

async fn serve_plain<S, B>(
    stream: TcpStream,
    info: ConnectionInfo,
    settings: ListenerSettings,
    builder: auto::Builder<TokioExecutor>,
    service: S,
) where
    S: ConnectionService<B>,
    B: ResponseBody,
{
    let service = with_info(service, info.clone());
    drive(builder.serve_connection_with_upgrades(TokioIo::new(stream), service), &info, &settings).await
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
    let tls = match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            tracing::debug!(listener = settings.name, remote = %info.remote, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(listener = settings.name, remote = %info.remote, "TLS handshake timed out");
            return;
        }
    };
    let service = with_info(service, info.clone());
    drive(builder.serve_connection_with_upgrades(TokioIo::new(tls), service), &info, &settings).await
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
