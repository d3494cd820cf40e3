//! Agent streams as agentk opens them, one HTTP/2 connection each, built directly on `h2` so
//! that 10,000 of them stay cheap for the load generator.

use std::net::SocketAddr;

use bytes::{Buf, Bytes, BytesMut};
use kas::proto::flux::rpc::{Project, ReconcileProjectsRequest, ReconcileProjectsResponse};
use prost::Message;

/// An open ReconcileProjects stream.
pub struct AgentStream {
    body: h2::RecvStream,
    buf: BytesMut,
}

/// An HTTP/2 connection to the agent listener, before any stream (a clone opens another
/// stream on the same connection).
#[derive(Clone)]
pub struct AgentConnection(h2::client::SendRequest<Bytes>);

/// Connects and completes the HTTP/2 handshake.
pub async fn connect(addr: SocketAddr) -> Result<AgentConnection, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (client, connection) =
        h2::client::Builder::new().handshake(tcp).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let client = client.ready().await.map_err(|e| format!("ready: {e}"))?;
    Ok(AgentConnection(client))
}

/// Opens ReconcileProjects for `projects` with `token` on `connection`.
pub async fn open(
    connection: AgentConnection,
    addr: SocketAddr,
    token: &str,
    projects: &[String],
) -> Result<AgentStream, String> {
    let mut client = connection.0.ready().await.map_err(|e| format!("open ready: {e}"))?;
    let request = http::Request::post(format!("http://{addr}/gitlab.agent.flux.rpc.GitLabFlux/ReconcileProjects"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {token}"))
        .body(())
        .map_err(|e| e.to_string())?;
    let (response, mut send) = client.send_request(request, false).map_err(|e| e.to_string())?;
    let message = ReconcileProjectsRequest { project: projects.iter().map(|p| Project { id: p.clone() }).collect() }
        .encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + message.len());
    frame.extend_from_slice(&[0]);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    send.send_data(frame.freeze(), true).map_err(|e| e.to_string())?;
    let response = response.await.map_err(|e| format!("response: {e:?}"))?;
    if let Some(status) = response.headers().get("grpc-status") {
        return Err(format!("refused: grpc-status {status:?}"));
    }
    Ok(AgentStream { body: response.into_body(), buf: BytesMut::new() })
}

/// The gRPC code of a refusal `open` returned (`refused: grpc-status "16"` → `UNAUTHENTICATED`).
pub fn refusal_code(error: &str) -> Option<&'static str> {
    let code = error.strip_prefix("refused: grpc-status ")?.trim_matches('"');
    Some(match code {
        "8" => "RESOURCE_EXHAUSTED",
        "14" => "UNAVAILABLE",
        "16" => "UNAUTHENTICATED",
        "7" => "PERMISSION_DENIED",
        _ => "other refusal",
    })
}

impl AgentStream {
    /// The next notified project; `None` when the stream ends.
    pub async fn next(&mut self) -> Option<String> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if self.buf.len() >= 5 + len {
                    self.buf.advance(5);
                    let message: Bytes = self.buf.split_to(len).freeze();
                    let response = ReconcileProjectsResponse::decode(message).ok()?;
                    return response.project.map(|p| p.id);
                }
            }
            let chunk = self.body.data().await?.ok()?;
            let _ = self.body.flow_control().release_capacity(chunk.len());
            self.buf.extend_from_slice(&chunk);
        }
    }
}
