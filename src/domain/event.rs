//! Events as kas records and delivers them: what happened (a kind), which door it came
//! through, its place in the log, and how far an agent's delivery got. A Git push is one kind;
//! a container registry push is meant to be the next kind of the same event, not a second
//! pipeline.

use super::project::ProjectPath;
use super::push::PushEvent;

/// What happened. The stored name is the event log's `kind` column, so a new kind needs no
/// new table or pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A branch push (`Push Hook`, system hook `push`, or GitLab's GitPushEvent).
    Push,
    /// A tag push.
    TagPush,
    /// A manifest pushed to the container registry.
    ImagePush,
}

impl EventKind {
    /// The name stored in the event log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Push => "push",
            Self::TagPush => "tag_push",
            Self::ImagePush => "image_push",
        }
    }

    /// Whether a Git ref moved (what agent streams are told about).
    pub fn is_git(self) -> bool {
        matches!(self, Self::Push | Self::TagPush)
    }

    /// Parses the stored name.
    pub fn from_stored(s: &str) -> Option<Self> {
        match s {
            "push" => Some(Self::Push),
            "tag_push" => Some(Self::TagPush),
            "image_push" => Some(Self::ImagePush),
            _ => None,
        }
    }
}

/// Which door an event came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSource {
    /// `POST /webhooks/gitlab`.
    Webhook,
    /// GitLab's `GitPushEvent` gRPC call.
    GitPushEvent,
    /// `POST /webhooks/registry`: the container registry's notifications.
    Registry,
}

impl EventSource {
    /// Stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Webhook => "webhook",
            Self::GitPushEvent => "grpc",
            Self::Registry => "registry",
        }
    }
}

/// What an image push carries besides its project: which repository, tag and digest, and
/// which registry host the client pushed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// Repository path (`group/project` or `group/project/image`).
    pub repository: String,
    /// Pushed tag, when the manifest was tagged.
    pub tag: Option<String>,
    /// Manifest digest.
    pub digest: Option<String>,
    /// Registry host, when the registry said.
    pub host: Option<String>,
}

/// An event to be recorded.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The validated push: a Git push, or an image push mapped to its project (kind
    /// `ImagePush`, no visibility: the registry says nothing about it).
    pub event: PushEvent,
    /// What an image push pushed; `None` for Git pushes.
    pub image: Option<ImageRef>,
    /// De-duplication key: the sender's, or a fresh random one when it gave none.
    pub idempotency_key: String,
    /// Which door it came through.
    pub source: EventSource,
    /// Unix milliseconds of receipt.
    pub received_at: i64,
}

/// A recorded push as delivery needs it: which project, in what order, and whether the
/// registry considers the project readable by everyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventNotice {
    /// Global sequence number in the event log.
    pub seq: i64,
    /// GitLab project id.
    pub project_id: i64,
    /// Full path at the time of the push.
    pub project_path: ProjectPath,
    /// Public with repository access for everyone (the access rule's second branch).
    pub world_readable: bool,
    /// Unix milliseconds of receipt, for the intake-to-send latency.
    pub received_at: i64,
    /// What happened: agent streams hear about Git pushes; image pushes go to cluster actions.
    pub kind: EventKind,
    /// What an image push pushed.
    pub image: Option<std::sync::Arc<ImageRef>>,
}

/// What happened to one push of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordOutcome {
    /// Newly recorded.
    Recorded(EventNotice),
    /// Its idempotency key was already in the log.
    Duplicate,
}

/// A recorded push as the log keeps it (for operators and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    /// Sequence number.
    pub seq: i64,
    /// De-duplication key.
    pub idempotency_key: String,
    /// Project id.
    pub project_id: i64,
    /// Project path.
    pub project_path: String,
    /// Branch or tag.
    pub kind: EventKind,
    /// Ref, before and after, when the source said.
    pub git_ref: Option<String>,
    /// Previous commit.
    pub before: Option<String>,
    /// New commit.
    pub after: Option<String>,
    /// Door.
    pub source: String,
    /// Unix milliseconds of receipt.
    pub received_at: i64,
    /// Unix milliseconds of publication; `None` while the outbox still owes it.
    pub published_at: Option<i64>,
}

/// How far an agent's notifications got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryPosition {
    /// Every event up to this sequence number has been delivered (or did not concern it).
    pub seq: i64,
    /// Unix milliseconds when the position was taken.
    pub at: i64,
}
