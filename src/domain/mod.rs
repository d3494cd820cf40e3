//! The domain: projects, agents, tokens, events (Git pushes) and the access rule.
//!
//! Nothing here knows about HTTP, gRPC, SQL or Redis; values are validated once, when they are
//! built, so the rest of the code can trust them.

pub mod access;
pub mod agent;
pub mod event;
pub mod image;
pub mod project;
pub mod push;

pub use access::may_notify;
pub use agent::{AgentId, AgentName, AgentToken, TokenDigest};
pub use event::{
    DeliveryPosition, EventKind, EventNotice, EventSource, ImageRef, LoggedEvent, NewEvent, RecordOutcome,
};
pub use image::ImagePush;
pub use project::{ProjectInfo, ProjectPath, ProjectUpdate, RepositoryAccess, Visibility, merged_visibility};
pub use push::PushEvent;

/// A value the domain refused, with the reason in words a user can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct InvalidValue {
    /// What was being validated (`project path`, `agent name`, …).
    pub what: &'static str,
    /// Why it was refused.
    pub reason: String,
}

impl InvalidValue {
    pub(crate) fn new(what: &'static str, reason: impl Into<String>) -> Self {
        Self { what, reason: reason.into() }
    }
}
