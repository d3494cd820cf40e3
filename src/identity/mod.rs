//! Agent identity and access: who a presented token belongs to, whether that credential still
//! works, and whether an agent may hear about a project. The local registry is the default
//! source of truth; GitLab can be instead.

mod registry;

use std::net::IpAddr;

use async_trait::async_trait;

use crate::domain::{AgentId, AgentToken};

pub use registry::RegistryDirectory;

/// An authenticated agent, as long as its stream lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    /// Agent id.
    pub id: AgentId,
    /// Agent name.
    pub name: String,
    /// Full path of the agent's configuration project.
    pub config_project: String,
    /// GitLab id of the configuration project, when known.
    pub config_project_id: Option<i64>,
    /// The configuration project's default branch, when the source of truth says (GitLab).
    pub default_branch: Option<String>,
    /// Which credential authenticated it (a token id), for revocation checks.
    pub credential: i64,
}

/// The answer of a credential re-check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rechecked {
    /// Still work, as of now.
    pub valid: Vec<i64>,
    /// Could not be checked now (the source of truth did not answer); neither valid nor revoked.
    pub unverified: Vec<i64>,
}

/// What the directory could not do. Mapped to gRPC codes in `grpc/`.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Unknown, revoked or malformed credential.
    #[error("unknown or revoked agent token")]
    Unauthenticated,
    /// The source of truth refused (GitLab's 403).
    #[error("{0}")]
    PermissionDenied(String),
    /// The agent does not exist any more (GitLab's 404).
    #[error("{0}")]
    NotFound(String),
    /// The source of truth cannot answer now; try again. The source is the database's or
    /// GitLab's error, or a sentence when there is none.
    #[error("agent directory unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// The source of truth for agents and what they may see.
#[async_trait]
pub trait AgentDirectory: Send + Sync + 'static {
    /// Resolves a presented token, presented from `peer` (the connection's address, when known:
    /// lookups of tokens the directory does not know yet may be limited per peer).
    async fn authenticate(&self, token: &AgentToken, peer: Option<IpAddr>) -> Result<AgentIdentity, IdentityError>;

    /// Re-checks these credentials (held by open streams): the ones that still work, and the
    /// ones the source of truth could not answer for now. Any other one was revoked.
    async fn recheck(&self, credentials: &[i64]) -> Result<Rechecked, IdentityError>;

    /// Cheap, synchronous first cut used when fanning an event out: false only when the agent
    /// certainly may not hear about `project`.
    fn could_notify(&self, agent: &AgentIdentity, project: &str, world_readable: bool) -> bool;

    /// The access rule, applied before every send.
    async fn may_notify(
        &self,
        agent: &AgentIdentity,
        project: &str,
        world_readable: bool,
    ) -> Result<bool, IdentityError>;
}
