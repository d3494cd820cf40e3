//! Rows as the database returns them, and the one place each becomes a record. A stored value
//! that no longer parses is `StoreError::Corrupt`, except in the access rule, where it counts
//! as private rather than failing delivery.

use crate::domain::{AgentName, EventKind, ProjectInfo, ProjectPath, RepositoryAccess, Visibility};
use crate::domain::{EventNotice, ImageRef, LoggedEvent};
use crate::store::{AgentRecord, StoreError, TokenRecord};

/// Columns of [`AgentRow`] (the configuration project's id comes from the registry, the newest
/// entry should two ids claim the path).
pub(super) const AGENT_COLUMNS: &str = "id, name, config_project_path, created_at, \
    (SELECT p.id FROM projects p WHERE p.full_path = agents.config_project_path ORDER BY p.updated_at DESC LIMIT 1) AS config_project_id";
/// Columns of [`TokenRow`].
pub(super) const TOKEN_COLUMNS: &str = "id, agent_id, created_at, last_used_at, revoked_at";
/// Columns of [`ProjectRow`].
pub(super) const PROJECT_COLUMNS: &str = "id, full_path, visibility, repository_access";
/// Columns of [`NoticeRow`], from `push_events e LEFT JOIN projects p ON p.id = e.project_id`.
pub(super) const NOTICE_FROM: &str = "SELECT e.seq, e.project_id, e.project_path, e.received_at, \
    e.kind, e.git_ref, e.after_sha, e.repository, e.registry_host, \
    p.full_path AS registry_path, p.visibility, p.repository_access \
    FROM push_events e LEFT JOIN projects p ON p.id = e.project_id";
/// Columns of [`LoggedRow`].
pub(super) const LOGGED_COLUMNS: &str = "seq, idempotency_key, project_id, project_path, kind, git_ref, before_sha, \
    after_sha, source, received_at, published_at";

fn corrupt(e: impl ToString) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// An `agents` row.
#[derive(sqlx::FromRow)]
pub(super) struct AgentRow {
    id: i64,
    name: String,
    config_project_path: String,
    created_at: i64,
    config_project_id: Option<i64>,
}

impl TryFrom<AgentRow> for AgentRecord {
    type Error = StoreError;

    fn try_from(r: AgentRow) -> Result<Self, StoreError> {
        Ok(AgentRecord {
            id: r.id,
            name: AgentName::parse(&r.name).map_err(corrupt)?,
            config_project: ProjectPath::parse(&r.config_project_path).map_err(corrupt)?,
            created_at: r.created_at,
            config_project_id: r.config_project_id,
        })
    }
}

/// An `agent_tokens` row (the digest is never read back).
#[derive(sqlx::FromRow)]
pub(super) struct TokenRow {
    id: i64,
    agent_id: i64,
    created_at: i64,
    last_used_at: Option<i64>,
    revoked_at: Option<i64>,
}

impl From<TokenRow> for TokenRecord {
    fn from(r: TokenRow) -> Self {
        TokenRecord {
            id: r.id,
            agent_id: r.agent_id,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            revoked_at: r.revoked_at,
        }
    }
}

/// A `projects` row.
#[derive(Clone, sqlx::FromRow)]
pub(super) struct ProjectRow {
    pub(super) id: i64,
    full_path: String,
    visibility: Option<String>,
    repository_access: String,
}

impl TryFrom<ProjectRow> for ProjectInfo {
    type Error = StoreError;

    fn try_from(r: ProjectRow) -> Result<Self, StoreError> {
        Ok(ProjectInfo {
            id: r.id,
            path: ProjectPath::parse(&r.full_path).map_err(corrupt)?,
            visibility: r.visibility.as_deref().map(str::parse::<Visibility>).transpose().map_err(corrupt)?,
            repository_access: r.repository_access.parse::<RepositoryAccess>().map_err(corrupt)?,
        })
    }
}

/// The access rule's "readable by everyone" for a push to `path` against the project's
/// registry row (none when the registry does not know the project).
pub(super) fn world_readable(path: &str, registry: Option<ProjectRow>) -> bool {
    // An unparsable row counts as private rather than failing delivery.
    let info = registry.and_then(|row| ProjectInfo::try_from(row).ok());
    crate::domain::access::is_world_readable(path, info.as_ref())
}

/// A `push_events` row joined with its project's registry row (all `None` when the registry
/// does not know the project).
#[derive(sqlx::FromRow)]
pub(super) struct NoticeRow {
    pub(super) seq: i64,
    project_id: i64,
    project_path: String,
    received_at: i64,
    kind: String,
    git_ref: Option<String>,
    after_sha: Option<String>,
    repository: Option<String>,
    registry_host: Option<String>,
    registry_path: Option<String>,
    visibility: Option<String>,
    repository_access: Option<String>,
}

impl TryFrom<NoticeRow> for EventNotice {
    type Error = StoreError;

    fn try_from(r: NoticeRow) -> Result<Self, StoreError> {
        let registry = r.registry_path.map(|full_path| ProjectRow {
            id: r.project_id,
            full_path,
            visibility: r.visibility,
            repository_access: r.repository_access.unwrap_or_default(),
        });
        Ok(EventNotice {
            seq: r.seq,
            project_id: r.project_id,
            world_readable: world_readable(&r.project_path, registry),
            project_path: ProjectPath::parse(&r.project_path).map_err(corrupt)?,
            received_at: r.received_at,
            kind: stored_kind(&r.kind)?,
            image: r.repository.map(|repository| {
                std::sync::Arc::new(ImageRef { repository, tag: r.git_ref, digest: r.after_sha, host: r.registry_host })
            }),
        })
    }
}

/// The event kind a row stores.
fn stored_kind(kind: &str) -> Result<EventKind, StoreError> {
    EventKind::from_stored(kind).ok_or_else(|| StoreError::Corrupt(format!("unknown event kind {kind:?}")))
}

/// A whole `push_events` row.
#[derive(sqlx::FromRow)]
pub(super) struct LoggedRow {
    seq: i64,
    idempotency_key: String,
    project_id: i64,
    project_path: String,
    kind: String,
    git_ref: Option<String>,
    before_sha: Option<String>,
    after_sha: Option<String>,
    source: String,
    received_at: i64,
    published_at: Option<i64>,
}

impl TryFrom<LoggedRow> for LoggedEvent {
    type Error = StoreError;

    fn try_from(r: LoggedRow) -> Result<Self, StoreError> {
        Ok(LoggedEvent {
            seq: r.seq,
            idempotency_key: r.idempotency_key,
            project_id: r.project_id,
            project_path: r.project_path,
            kind: stored_kind(&r.kind)?,
            git_ref: r.git_ref,
            before: r.before_sha,
            after: r.after_sha,
            source: r.source,
            received_at: r.received_at,
            published_at: r.published_at,
        })
    }
}
