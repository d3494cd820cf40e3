//! A push as GitLab reports it, reduced to what kas acts on.

use super::project::{ProjectPath, Visibility};

/// Whether a branch or a tag moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushKind {
    /// A branch push (`Push Hook`, system hook `push`, or GitLab's GitPushEvent).
    Branch,
    /// A tag push.
    Tag,
}

impl PushKind {
    /// The name stored in the event log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Branch => "push",
            Self::Tag => "tag_push",
        }
    }

    /// Parses the stored name.
    pub fn from_stored(s: &str) -> Option<Self> {
        match s {
            "push" => Some(Self::Branch),
            "tag_push" => Some(Self::Tag),
            _ => None,
        }
    }
}

/// A validated push, ready to be recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushEvent {
    /// GitLab's project id (> 0).
    pub project_id: i64,
    /// The project's full path.
    pub project_path: ProjectPath,
    /// Branch or tag.
    pub kind: PushKind,
    /// The ref that moved (`refs/heads/main`), when the source says.
    pub git_ref: Option<String>,
    /// Commit before the push; 40 zeros when the ref was created.
    pub before: Option<String>,
    /// Commit after the push; 40 zeros when the ref was deleted.
    pub after: Option<String>,
    /// The project's visibility when the payload carries it.
    pub visibility: Option<Visibility>,
}
