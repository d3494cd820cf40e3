//! A client that calls kas as an unmodified agentk does: one connection (plain gRPC, or gRPC
//! through a WebSocket with agentk's percent-encoded `:authority`), gzip, bearer token.

use std::net::SocketAddr;
use std::sync::Arc;

use kas::websocket::authority::{RewriteWrites, set_authority};
use kas::websocket::io::WsIo;
use kas::websocket::{SUBPROTOCOL, websocket_config};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tonic::transport::{Channel, Endpoint, Uri};

/// The `:authority` agentk sends on every RPC through `wss://gitlab.example.com/-/kubernetes-agent/`.
pub const AGENTK_AUTHORITY: &str = "wss:%2F%2Fgitlab.example.com%2F-%2Fkubernetes-agent%2F";

/// How the client reaches kas.
pub enum Transport {
    /// `grpc://`
    Plain,
    /// `ws://`
    WebSocket,
    /// `wss://` trusting this CA (PEM); agentk offers no ALPN here.
    WebSocketTls(String),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What the WebSocket handshake answered.
#[derive(Debug, Clone, Default)]
pub struct Handshake {
    pub subprotocol: Option<String>,
    pub extensions: Option<String>,
}

/// One connection to the agent listener at `addr`.
pub async fn connect(addr: SocketAddr, transport: Transport) -> (Channel, Arc<std::sync::Mutex<Handshake>>) {
    let seen = Arc::new(std::sync::Mutex::new(Handshake::default()));
    match transport {
        Transport::Plain => (Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap(), seen),
        Transport::WebSocket | Transport::WebSocketTls(_) => {
            let tls = match &transport {
                Transport::WebSocketTls(ca) => Some(client_tls(ca)),
                _ => None,
            };
            let record = seen.clone();
            let connector = tower::service_fn(move |_: Uri| {
                let tls = tls.clone();
                let record = record.clone();
                async move {
                    let tcp = tokio::net::TcpStream::connect(addr).await?;
                    let (stream, scheme): (Box<dyn Io>, _) = match tls {
                        Some(config) => {
                            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                            (Box::new(tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?), "wss")
                        }
                        None => (Box::new(tcp), "ws"),
                    };
                    // GitLab's nginx strips /-/kubernetes-agent/; any path must work.
                    let mut request =
                        format!("{scheme}://gitlab.example.com/-/kubernetes-agent/").into_client_request()?;
                    request.headers_mut().insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse().unwrap());
                    let (ws, response) =
                        tokio_tungstenite::client_async_with_config(request, stream, Some(websocket_config())).await?;
                    let header = |n: &str| response.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
                    *record.lock().unwrap() = Handshake {
                        subprotocol: header("sec-websocket-protocol"),
                        extensions: header("sec-websocket-extensions"),
                    };
                    let io = RewriteWrites::new(WsIo::new(ws), set_authority(AGENTK_AUTHORITY.into()));
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper_util::rt::TokioIo::new(io))
                }
            });
            let channel = Endpoint::from_static("http://kas.invalid").connect_with_connector(connector).await.unwrap();
            (channel, seen)
        }
    }
}

/// Plain gRPC, but with agentk's WebSocket authority forced onto every request: the control
/// experiment showing what `h2` does with it when nothing rewrites it.
pub async fn plain_with_agentk_authority(addr: SocketAddr) -> Channel {
    let connector = tower::service_fn(move |_: Uri| async move {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let io = RewriteWrites::new(tcp, set_authority(AGENTK_AUTHORITY.into()));
        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(io))
    });
    Endpoint::from_static("http://kas.invalid").connect_with_connector(connector).await.unwrap()
}

fn client_tls(ca_pem: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(rustls::pki_types::CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap()).unwrap();
    // No ALPN, as agentk's WebSocket dialer: the upgrade arrives over HTTP/1.1.
    Arc::new(rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}

/// Adds agentk's metadata to a request.
pub fn as_agent<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}
