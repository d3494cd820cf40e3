//! A test agent that calls kas as agentk does: bearer token, gzip, one HTTP/2 connection.

use std::net::SocketAddr;
use std::time::Duration;

use kas::proto::flux::rpc::git_lab_flux_client::GitLabFluxClient;
use kas::proto::flux::rpc::{Project, ReconcileProjectsRequest, ReconcileProjectsResponse};
use tonic::codec::{CompressionEncoding, Streaming};
use tonic::transport::{Channel, Endpoint};

/// An agent connection.
pub struct TestAgent {
    pub token: String,
    pub channel: Channel,
}

impl TestAgent {
    /// Connects to the agent listener at `addr` with its own HTTP/2 connection.
    pub async fn connect(addr: SocketAddr, token: &str) -> TestAgent {
        let channel = Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        TestAgent { token: token.to_owned(), channel }
    }

    /// Connects with a tiny HTTP/2 stream window, so an agent that does not read blocks the
    /// server's sends after a few messages.
    pub async fn connect_slow(addr: SocketAddr, token: &str) -> TestAgent {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .initial_stream_window_size(Some(256))
            .initial_connection_window_size(Some(65_535))
            .connect()
            .await
            .unwrap();
        TestAgent { token: token.to_owned(), channel }
    }

    /// Opens ReconcileProjects for `projects`.
    pub async fn open(&self, projects: &[&str]) -> Result<Streaming<ReconcileProjectsResponse>, tonic::Status> {
        let mut client = GitLabFluxClient::new(self.channel.clone()).send_compressed(CompressionEncoding::Gzip);
        let mut request = tonic::Request::new(ReconcileProjectsRequest {
            project: projects.iter().map(|p| Project { id: (*p).to_owned() }).collect(),
        });
        request.metadata_mut().insert("authorization", format!("Bearer {}", self.token).parse().unwrap());
        client.reconcile_projects(request).await.map(|r| r.into_inner())
    }
}

/// The next notified project within `within`; `None` on timeout; panics on a stream error.
pub async fn next_project(stream: &mut Streaming<ReconcileProjectsResponse>, within: Duration) -> Option<String> {
    match tokio::time::timeout(within, stream.message()).await {
        Err(_) => None,
        Ok(Ok(Some(r))) => {
            let id = r.project.expect("project is always set").id;
            assert!(!id.is_empty(), "never an empty id");
            Some(id)
        }
        Ok(Ok(None)) => panic!("stream ended"),
        Ok(Err(status)) => panic!("stream failed: {status:?}"),
    }
}

/// Every project notified until `quiet` passes without one.
pub async fn drain(stream: &mut Streaming<ReconcileProjectsResponse>, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    while let Some(p) = next_project(stream, quiet).await {
        got.push(p);
    }
    got
}
