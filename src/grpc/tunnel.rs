//! `ReverseTunnel/Connect` and `GitlabAccess/MakeRequest`. Connect reads the agent's descriptor
//! and offers the stream to the tunnel registry (`crate::tunnel`) as an idle tunnel until a call
//! claims it, the agent closes it, its token is revoked, or the connection closes (shutdown,
//! maximum age). kas offers no GitLab access: MakeRequest answers HTTP 404.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::OpenGauge;
use crate::app::App;
use crate::proto::gitlab_access::rpc::gitlab_access_server::GitlabAccess;
use crate::proto::gitlab_access::rpc::{self as access, HttpRequest, HttpResponse};
use crate::proto::reverse_tunnel::rpc::connect_request::Msg;
use crate::proto::reverse_tunnel::rpc::reverse_tunnel_server::ReverseTunnel;
use crate::proto::reverse_tunnel::rpc::{ConnectRequest, ConnectResponse};
use crate::tunnel::{Served, TunnelIo};

/// The ReverseTunnel and GitlabAccess services.
pub struct TunnelService {
    app: Arc<App>,
}

impl TunnelService {
    /// Serves with the shared state.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

type ConnectStream = Pin<Box<dyn Stream<Item = Result<ConnectResponse, Status>> + Send>>;
type AccessStream = Pin<Box<dyn Stream<Item = Result<HttpResponse, Status>> + Send>>;

/// How an idle tunnel's wait ended.
enum IdleEnd {
    /// Ended here: the status to end the stream with (`None`: OK).
    Ended(Option<Status>),
    /// A call claimed it: hand the stream over.
    Claimed(tokio::sync::oneshot::Sender<TunnelIo>),
}

#[tonic::async_trait]
impl ReverseTunnel for TunnelService {
    type ConnectStream = ConnectStream;

    async fn connect(&self, request: Request<Streaming<ConnectRequest>>) -> Result<Response<ConnectStream>, Status> {
        let app = self.app.clone();
        let agent = super::authenticate_agent(&app, request.metadata(), request.extensions()).await?;
        let closing = super::closing(&app, request.extensions());
        let mut inbound = request.into_inner();
        let served = match inbound.message().await? {
            Some(ConnectRequest { msg: Some(Msg::Descriptor(d)) }) => {
                Served::from_descriptor(d.agent_descriptor.as_ref())
            }
            Some(_) => return Err(Status::invalid_argument("the first message must be the agent descriptor")),
            None => return Ok(Response::new(Box::pin(futures::stream::empty()))),
        };
        let credential = app.hub.watch_credential(&agent).map_err(Status::from)?;
        let gauge = OpenGauge::new(app.metrics.streams("reverse_tunnel"));
        tracing::debug!(agent = agent.id, methods = served.methods.len(), "reverse tunnel idle");
        let (registration, claims) = app.tunnels.registry().add(&agent, served);
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let revoked = credential.revoked.clone();
            let end = tokio::select! {
                _ = closing.cancelled() => IdleEnd::Ended(None),
                end = revoked.ended() => IdleEnd::Ended(Some(Status::from(end))),
                _ = tx.closed() => IdleEnd::Ended(None),
                // agentk sends nothing while idle: anything, or its end, ends the tunnel.
                message = inbound.message() => IdleEnd::Ended(match message {
                    Ok(Some(_)) => Some(Status::invalid_argument("a tunnel sends nothing before its request")),
                    Ok(None) | Err(_) => None,
                }),
                claim = claims => match claim {
                    Ok(reply) => IdleEnd::Claimed(reply),
                    Err(_) => IdleEnd::Ended(None),
                },
            };
            // Out of the registry at once, before anything else can pick it.
            drop(registration);
            match end {
                IdleEnd::Ended(None) => {}
                IdleEnd::Ended(Some(status)) => {
                    let _ = tx.try_send(Err(status));
                }
                IdleEnd::Claimed(reply) => {
                    let io = TunnelIo {
                        agent,
                        inbound: Box::pin(inbound),
                        outbound: tx,
                        revoked,
                        closing,
                        hold: Box::new((credential, gauge)),
                    };
                    // A caller that gave up drops the stream: it ends with OK and agentk reopens.
                    let _ = reply.send(io);
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tonic::async_trait]
impl GitlabAccess for TunnelService {
    type MakeRequestStream = AccessStream;

    async fn make_request(&self, request: Request<Streaming<HttpRequest>>) -> Result<Response<AccessStream>, Status> {
        super::authenticate_agent(&self.app, request.metadata(), request.extensions()).await?;
        let mut inbound = request.into_inner();
        // The request's header comes first; what it asks for does not matter.
        let _ = inbound.message().await?;
        let header = HttpResponse {
            message: Some(access::http_response::Message::Header(access::http_response::Header {
                response: Some(access::Response {
                    status_code: 404,
                    status: "404 Not Found".into(),
                    header: Default::default(),
                }),
            })),
        };
        let trailer =
            HttpResponse { message: Some(access::http_response::Message::Trailer(access::http_response::Trailer {})) };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(header), Ok(trailer)]))))
    }
}
