//! `gitlab.agent.flux.rpc.GitLabFlux/ReconcileProjects`: the stream an agent keeps open with
//! its whole project set; one response per project to reconcile.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status};

use super::OpenGauge;
use crate::app::App;
use crate::delivery::ReconcileStream;
use crate::proto::flux::rpc::git_lab_flux_server::GitLabFlux;
use crate::proto::flux::rpc::{Project, ReconcileProjectsRequest, ReconcileProjectsResponse};

/// Longest path segment GitLab allows.
const MAX_SEGMENT: usize = 255;
/// Longest project id accepted (GitLab: 255 per segment, about 20 levels).
const MAX_PATH: usize = 4096;

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

/// Validates as agentk's server does (every project id non-empty) and within this server's
/// bounds: at most `max_projects` ids, `max_bytes` for the whole request, GitLab's segment
/// length. Ids are matched exactly against pushed full paths; one that is not a valid path
/// simply never matches.
pub fn validate(
    request: &ReconcileProjectsRequest,
    max_projects: usize,
    max_bytes: usize,
) -> Result<Vec<String>, Status> {
    use prost::Message;
    let size = request.encoded_len();
    if size > max_bytes {
        return Err(Status::resource_exhausted(format!(
            "request of {size} bytes; at most {max_bytes} bytes of projects per stream"
        )));
    }
    if request.project.len() > max_projects {
        return Err(Status::resource_exhausted(format!("at most {max_projects} projects per stream")));
    }
    request
        .project
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if p.id.is_empty() {
                Err(Status::invalid_argument(format!("project[{i}].id must not be empty")))
            } else if p.id.len() > MAX_PATH || p.id.split('/').any(|segment| segment.len() > MAX_SEGMENT) {
                Err(Status::invalid_argument(format!(
                    "project[{i}].id is longer than GitLab allows ({MAX_SEGMENT} bytes per segment, {MAX_PATH} in all)"
                )))
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
        let agent = super::authenticate_agent(app, request.metadata(), request.extensions()).await?;
        let projects =
            validate(request.get_ref(), app.config.max_projects_per_stream, app.config.max_reconcile_request)?;
        let closing = super::closing(app, request.extensions());
        tracing::info!(agent = agent.id, name = %agent.name, projects = projects.len(), "ReconcileProjects stream opened");
        let stream = app.hub.open(agent, projects, closing).await.map_err(Status::from)?;
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
        Some(Err(end)) => {
            tracing::info!(agent = stream.agent().id, reason = ?end, "ReconcileProjects stream closed");
            Some((Err(Status::from(end)), (stream, gauge)))
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
        let v = |r: &ReconcileProjectsRequest| validate(r, 10_000, 2 << 20);
        assert_eq!(v(&req(&["g/a", "g/b"])).unwrap(), vec!["g/a", "g/b"]);
        assert!(v(&req(&[])).unwrap().is_empty());
        assert_eq!(v(&req(&["g/a", ""])).unwrap_err().code(), tonic::Code::InvalidArgument);
        let long_segment = format!("g/{}", "x".repeat(256));
        assert_eq!(v(&req(&[&long_segment])).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert!(v(&req(&[&format!("g/{}", "x".repeat(255))])).is_ok());
        let many: Vec<String> = (0..=10_000).map(|i| format!("g/{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(v(&req(&many)).unwrap_err().code(), tonic::Code::ResourceExhausted);
        assert_eq!(validate(&req(&["g/a", "g/b"]), 10, 8).unwrap_err().code(), tonic::Code::ResourceExhausted);
    }
}
