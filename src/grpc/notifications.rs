//! `gitlab.agent.notifications.rpc.Notifications/GitPushEvent`: GitLab Rails' push door.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::app::App;
use crate::domain::{EventKind, ProjectPath, PushEvent};
use crate::domain::{EventSource, RecordOutcome};
use crate::proto::notifications::rpc::notifications_server::Notifications;
use crate::proto::notifications::rpc::{GitPushEventRequest, GitPushEventResponse};

/// The Notifications service.
pub struct NotificationsService {
    app: Arc<App>,
}

impl NotificationsService {
    /// Serves with the shared state.
    pub fn new(app: Arc<App>) -> Self {
        Self { app }
    }
}

/// Validates the request as upstream does: event and project required, id > 0, path valid.
pub fn validate(request: &GitPushEventRequest) -> Result<PushEvent, Status> {
    let project = request
        .event
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("event is required"))?
        .project
        .as_ref()
        .ok_or_else(|| Status::invalid_argument("event.project is required"))?;
    if project.id <= 0 {
        return Err(Status::invalid_argument("event.project.id must be greater than 0"));
    }
    let project_path = ProjectPath::parse(&project.full_path)
        .map_err(|e| Status::invalid_argument(format!("event.project.full_path: {e}")))?;
    Ok(PushEvent {
        project_id: project.id,
        project_path,
        kind: EventKind::Push,
        git_ref: None,
        before: None,
        after: None,
        visibility: None,
    })
}

#[tonic::async_trait]
impl Notifications for NotificationsService {
    async fn git_push_event(
        &self,
        request: Request<GitPushEventRequest>,
    ) -> Result<Response<GitPushEventResponse>, Status> {
        let app = &self.app;
        if let Err(status) = super::authorize_gitlab(app, request.metadata()) {
            app.metrics.git_push_event("unauthenticated");
            return Err(status);
        }
        let key = request.metadata().get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let push = validate(request.get_ref()).inspect_err(|_| app.metrics.git_push_event("invalid"))?;
        let project = push.project_path.clone();
        match app.intake.record(push, key.as_deref(), EventSource::GitPushEvent).await {
            Ok(RecordOutcome::Recorded(notice)) => {
                app.metrics.git_push_event("accepted");
                tracing::debug!(seq = notice.seq, %project, "push recorded");
                Ok(Response::new(GitPushEventResponse {}))
            }
            Ok(RecordOutcome::Duplicate) => {
                app.metrics.git_push_event("duplicate");
                Ok(Response::new(GitPushEventResponse {}))
            }
            Err(e) => {
                app.metrics.git_push_event(super::status::intake_label(&e));
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::event::{GitPushEvent, Project};

    fn req(id: i64, path: &str) -> GitPushEventRequest {
        GitPushEventRequest { event: Some(GitPushEvent { project: Some(Project { id, full_path: path.into() }) }) }
    }

    #[test]
    fn validation() {
        assert_eq!(validate(&req(5, "g/p")).unwrap().project_id, 5);
        for bad in [
            req(0, "g/p"),
            req(-1, "g/p"),
            req(5, ""),
            req(5, "g p"),
            GitPushEventRequest { event: None },
            GitPushEventRequest { event: Some(GitPushEvent { project: None }) },
        ] {
            assert_eq!(validate(&bad).unwrap_err().code(), tonic::Code::InvalidArgument);
        }
    }
}
