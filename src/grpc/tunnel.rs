//! `ReverseTunnel/Connect` and `GitlabAccess/MakeRequest`: kas offers no tunnelled services and
//! no GitLab access, but answers both so that an unmodified agentk runs without error loops.
//! Connect reads the agent's descriptor and holds the stream until shutdown, the connection's
//! maximum age, revocation or the agent closing it; MakeRequest answers HTTP 404.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::OpenGauge;
use crate::app::App;
use crate::proto::gitlab_access::rpc::gitlab_access_server::GitlabAccess;
use crate::proto::gitlab_access::rpc::{self as access, HttpRequest, HttpResponse};
use crate::proto::reverse_tunnel::rpc::connect_request::Msg;
use crate::proto::reverse_tunnel::rpc::reverse_tunnel_server::ReverseTunnel;
use crate::proto::reverse_tunnel::rpc::{ConnectRequest, ConnectResponse};

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

#[tonic::async_trait]
impl ReverseTunnel for TunnelService {
    type ConnectStream = ConnectStream;

    async fn connect(&self, request: Request<Streaming<ConnectRequest>>) -> Result<Response<ConnectStream>, Status> {
        let app = &self.app;
        let agent = super::authenticate_agent(app, request.metadata(), request.extensions()).await?;
        let closing = super::closing(app, request.extensions());
        let mut inbound = request.into_inner();
        match inbound.message().await? {
            Some(ConnectRequest { msg: Some(Msg::Descriptor(d)) }) => {
                let services = d.agent_descriptor.map(|a| a.services.len()).unwrap_or(0);
                tracing::debug!(agent = agent.id, services, "reverse tunnel held open (kas routes nothing through it)");
            }
            Some(_) => return Err(Status::invalid_argument("the first message must be the agent descriptor")),
            None => return Ok(Response::new(Box::pin(futures::stream::empty()))),
        }
        let credential = app.hub.watch_credential(&agent).map_err(super::too_many)?;
        let gauge = OpenGauge::new(app.metrics.streams("reverse_tunnel"));
        // One future that ends the stream: OK when the connection closes or the agent hangs
        // up, UNAUTHENTICATED when the token is revoked.
        let held = futures::stream::once(async move {
            let _open = gauge;
            loop {
                tokio::select! {
                    _ = closing.cancelled() => return None,
                    end = credential.revoked.ended() => return Some(Err(super::stream_end_status(end))),
                    message = inbound.message() => match message {
                        Ok(Some(_)) => continue,
                        Ok(None) | Err(_) => return None,
                    },
                }
            }
        })
        .filter_map(futures::future::ready);
        Ok(Response::new(Box::pin(held)))
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
