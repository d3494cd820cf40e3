//! `gitlab.agent.flux.rpc.GitLabFlux/ReconcileProjects`: the stream an agent keeps open with
//! its whole project set; one response per project to reconcile.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::OpenGauge;
use crate::app::App;
use crate::delivery::{ReconcileStream, StreamEnd};
use crate::proto::flux::rpc::git_lab_flux_server::GitLabFlux;
use crate::proto::flux::rpc::{Project, ReconcileProjectsRequest, ReconcileProjectsResponse};

/// Most projects one stream may ask for; bounds a stream's memory.
const MAX_PROJECTS: usize = 10_000;

/// The GitLabFlux service.
pub struct FluxService {
    app: Arc<App>,
}

impl FluxService {
    /// Serves with the shared state.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ReconcileProjectsResponse, Status>> + Send>>;

/// Validates as agentk's server does: every project id must be non-empty. Ids are matched
/// exactly against pushed full paths; one that is not a valid path simply never matches.
pub fn validate(request: &ReconcileProjectsRequest) -> Result<Vec<String>, Status> {
    if request.project.len() > MAX_PROJECTS {
        return Err(Status::invalid_argument(format!("at most {MAX_PROJECTS} projects per stream")));
    }
    request
        .project
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if p.id.is_empty() {
                Err(Status::invalid_argument(format!("project[{i}].id must not be empty")))
            } else {
                Ok(p.id.clone())
            }
        })
        .collect()
}

#[tonic::async_trait]
impl GitLabFlux for FluxService {
    type ReconcileProjectsStream = ResponseStream;

    async fn reconcile_projects(
        &self,
        request: Request<ReconcileProjectsRequest>,
    ) -> Result<Response<ResponseStream>, Status> {
        let app = &self.app;
        let agent = super::authenticate_agent(app, request.metadata()).await?;
        let projects = validate(request.get_ref())?;
        let closing = super::closing(app, request.extensions());
        tracing::info!(agent = agent.id, name = %agent.name, projects = projects.len(), "ReconcileProjects stream opened");
        let stream = app.hub.open(agent, projects, closing).await;
        let gauge = OpenGauge::new(app.metrics.streams("reconcile_projects"));
        Ok(Response::new(Box::pin(futures::stream::unfold((stream, gauge), next_response))))
    }
}

async fn next_response(
    (mut stream, gauge): (ReconcileStream, OpenGauge),
) -> Option<(Result<ReconcileProjectsResponse, Status>, (ReconcileStream, OpenGauge))> {
    match stream.next().await {
        Some(Ok(path)) => {
            let response = ReconcileProjectsResponse { project: Some(Project { id: path.to_string() }) };
            Some((Ok(response), (stream, gauge)))
        }
        Some(Err(StreamEnd::Revoked)) => {
            tracing::info!(agent = stream.agent().id, "ReconcileProjects stream closed: token revoked");
            Some((Err(Status::unauthenticated("agent token revoked")), (stream, gauge)))
        }
        None => {
            tracing::debug!(agent = stream.agent().id, "ReconcileProjects stream ended");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let req = |ids: &[&str]| ReconcileProjectsRequest {
            project: ids.iter().map(|i| Project { id: (*i).into() }).collect(),
        };
        assert_eq!(validate(&req(&["g/a", "g/b"])).unwrap(), vec!["g/a", "g/b"]);
        assert!(validate(&req(&[])).unwrap().is_empty());
        assert_eq!(validate(&req(&["g/a", ""])).unwrap_err().code(), tonic::Code::InvalidArgument);
        let many: Vec<String> = (0..=MAX_PROJECTS).map(|i| format!("g/{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(validate(&req(&many)).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
