//! A push as GitLab reports it, reduced to what kas acts on.

use super::event::EventKind;
use super::project::{ProjectPath, Visibility};

/// A validated push, ready to be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushEvent {
    /// GitLab's project id (> 0).
    pub project_id: i64,
    /// The project's full path.
    pub project_path: ProjectPath,
    /// Branch or tag.
    pub kind: EventKind,
    /// The ref that moved (`refs/heads/main`), when the source says.
    pub git_ref: Option<String>,
    /// Commit before the push; 40 zeros when the ref was created.
    pub before: Option<String>,
    /// Commit after the push; 40 zeros when the ref was deleted.
    pub after: Option<String>,
    /// The project's visibility when the payload carries it.
    pub visibility: Option<Visibility>,
}
