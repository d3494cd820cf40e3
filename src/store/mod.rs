//! Storage: the registry (agents with their configuration files, tokens, projects), the
//! push-event log with its outbox columns, and agents' delivery positions. Each role is a small
//! trait ([`Lifecycle`], [`AgentRegistry`], [`Credentials`], [`ProjectRegistry`], [`EventLog`],
//! [`PositionStore`]) so a consumer sees only what it needs; [`Store`] is all of them, which is
//! what [`open`] returns. `sql/` implements every role once for both sqlx databases (runtime
//! queries, embedded migrations); `sqlite.rs` and `postgres.rs` connect.

mod postgres;
mod replay;
mod sql;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{Backend, StoreConfig};
use crate::domain::{
    AgentId, AgentName, DeliveryPosition, EventKind, EventNotice, LoggedEvent, NewEvent, ProjectInfo, ProjectPath,
    RecordOutcome, TokenDigest,
};

pub use postgres::PostgresStore;
pub use replay::{LogReplay, replay_log};
pub use sqlite::SqliteStore;

/// Most active tokens an agent may have at once, as GitLab allows.
pub const MAX_ACTIVE_TOKENS: i64 = 2;

/// What storage could not do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The named thing does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// The change would break a uniqueness rule.
    #[error("{0}")]
    Conflict(String),
    /// The change would exceed a limit.
    #[error("{0}")]
    Limit(String),
    /// A stored value no longer parses; the database was changed behind our back.
    #[error("stored data is invalid: {0}")]
    Corrupt(String),
    /// The database could not be reached or failed.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// Migrations failed.
    #[error("database migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Unavailable(e)
    }
}

/// A registered agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    /// Registry id.
    pub id: AgentId,
    /// DNS-label name, unique per configuration project.
    pub name: AgentName,
    /// The configuration project's full path.
    pub config_project: ProjectPath,
    /// Unix milliseconds.
    pub created_at: i64,
    /// The configuration project's GitLab id, when the project registry knows its path.
    pub config_project_id: Option<i64>,
}

/// A token's metadata; the token itself is never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Token id, used to revoke it.
    pub id: i64,
    /// Owning agent.
    pub agent_id: AgentId,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds of the last successful authentication.
    pub last_used_at: Option<i64>,
    /// Unix milliseconds of revocation; `None` while active.
    pub revoked_at: Option<i64>,
}

/// The agent a presented token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The agent.
    pub agent: AgentRecord,
    /// The token used, so open streams can be closed when it is revoked.
    pub token_id: i64,
}

/// The database as a whole: its schema, its health, closing it, and the keys replicas agree on.
#[async_trait]
pub trait Lifecycle: Send + Sync + 'static {
    /// Applies the embedded migrations.
    async fn migrate(&self) -> Result<(), StoreError>;
    /// Checks the database answers.
    async fn ping(&self) -> Result<(), StoreError>;
    /// Closes the pool.
    async fn close(&self);
    /// The shared key called `name`: the stored one, or `candidate` when none was stored yet
    /// (the first replica to ask stores its candidate; every other one reads it).
    async fn shared_key(&self, name: &str, candidate: &str, now: i64) -> Result<String, StoreError>;
}

/// Agents and their configuration files.
#[async_trait]
pub trait AgentRegistry: Send + Sync + 'static {
    /// Creates an agent together with its first token (and its configuration file, already
    /// validated), in one transaction.
    async fn create_agent(
        &self,
        name: &AgentName,
        config_project: &ProjectPath,
        first_token: &TokenDigest,
        config: Option<&str>,
        now: i64,
    ) -> Result<(AgentRecord, TokenRecord), StoreError>;
    /// Replaces an agent's configuration file (validated by the caller); returns the new version.
    async fn set_agent_config(&self, agent: AgentId, config: Option<&str>) -> Result<i64, StoreError>;
    /// An agent's configuration file and its version; `None` when there is no such agent.
    async fn agent_config(&self, agent: AgentId) -> Result<Option<(Option<String>, i64)>, StoreError>;
    /// Configuration versions of these agents (missing agents are left out).
    async fn config_versions(&self, agents: &[AgentId]) -> Result<Vec<(AgentId, i64)>, StoreError>;
    /// Every agent, by id.
    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    /// Agents with this name (one per configuration project).
    async fn agents_named(&self, name: &AgentName) -> Result<Vec<AgentRecord>, StoreError>;
    /// One agent by id.
    async fn agent(&self, id: AgentId) -> Result<Option<AgentRecord>, StoreError>;
    /// Deletes an agent and its tokens; false when it did not exist.
    async fn delete_agent(&self, id: AgentId) -> Result<bool, StoreError>;
}

/// Agent tokens: issuing, listing and revoking them, and finding the agent a token belongs to.
#[async_trait]
pub trait Credentials: Send + Sync + 'static {
    /// Adds a token, refusing when the agent already has `MAX_ACTIVE_TOKENS` active ones.
    async fn create_token(&self, agent: AgentId, digest: &TokenDigest, now: i64) -> Result<TokenRecord, StoreError>;
    /// An agent's tokens, by id.
    async fn list_tokens(&self, agent: AgentId) -> Result<Vec<TokenRecord>, StoreError>;
    /// Revokes a token; `None` when there is no such token.
    async fn revoke_token(&self, token: i64, now: i64) -> Result<Option<TokenRecord>, StoreError>;
    /// The agent an active token belongs to, recording the use.
    async fn authenticate(&self, digest: &TokenDigest, now: i64) -> Result<Option<Authenticated>, StoreError>;
    /// Which of these token ids are still active.
    async fn active_tokens(&self, ids: &[i64]) -> Result<Vec<i64>, StoreError>;
}

/// What the registry knows of GitLab projects: path, visibility, repository access.
#[async_trait]
pub trait ProjectRegistry: Send + Sync + 'static {
    /// Creates or replaces a project's registry entry.
    async fn set_project(&self, project: &ProjectInfo, now: i64) -> Result<(), StoreError>;
    /// The registry entry for a path (the newest, should two ids claim it).
    async fn project_by_path(&self, path: &ProjectPath) -> Result<Option<ProjectInfo>, StoreError>;
    /// The registry entry of GitLab project `id`.
    async fn project_by_id(&self, id: i64) -> Result<Option<ProjectInfo>, StoreError>;
}

/// The push-event log with its outbox columns: recording, publishing, reading back, pruning.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Records a batch of pushes in one transaction, refreshing each project's registry entry
    /// from the push; returns one outcome per input, in order.
    async fn record_pushes(&self, batch: &[NewEvent]) -> Result<Vec<RecordOutcome>, StoreError>;
    /// Marks events as published.
    async fn mark_published(&self, seqs: &[i64], now: i64) -> Result<(), StoreError>;
    /// Claims up to `limit` unpublished events received before `older_than` and not claimed
    /// by someone else, for `lease_ms`; the caller publishes them and marks them published.
    async fn claim_unpublished(
        &self,
        older_than: i64,
        now: i64,
        lease_ms: i64,
        limit: i64,
    ) -> Result<Vec<EventNotice>, StoreError>;
    /// Events with `seq > after_seq` or received at or after `overlap_from`, none received
    /// before `not_before`, for the given project paths (all when empty), in sequence order, at
    /// most `limit`; visibility as the registry says now.
    async fn pushes_since(
        &self,
        after_seq: i64,
        overlap_from: i64,
        not_before: i64,
        projects: &[String],
        limit: i64,
    ) -> Result<Vec<EventNotice>, StoreError>;
    /// The recorded events with these sequence numbers (unknown ones are skipped), in sequence
    /// order; visibility as the registry says now.
    async fn pushes_by_seq(&self, seqs: &[i64]) -> Result<Vec<EventNotice>, StoreError>;
    /// The highest sequence number recorded so far (0 when the log is empty).
    async fn last_seq(&self) -> Result<i64, StoreError>;
    /// Deletes published events received before `before`, at most `limit`; returns how many.
    /// An event the outbox has not published yet is kept, however old.
    async fn prune_pushes(&self, before: i64, limit: i64) -> Result<u64, StoreError>;
    /// The newest `limit` events of the log, newest first.
    async fn recent_pushes(&self, limit: i64) -> Result<Vec<LoggedEvent>, StoreError>;
}

/// Agents' delivery positions, where they must outlive Redis.
#[async_trait]
pub trait PositionStore: Send + Sync + 'static {
    /// Saves an agent's delivery position.
    async fn save_position(&self, agent: AgentId, position: DeliveryPosition) -> Result<(), StoreError>;
    /// Saves several agents' positions, one statement per chunk.
    async fn save_positions(&self, positions: &[(AgentId, DeliveryPosition)]) -> Result<(), StoreError>;
    /// Loads an agent's delivery position.
    async fn load_position(&self, agent: AgentId) -> Result<Option<DeliveryPosition>, StoreError>;
}

/// One thing kas did (or decided not to do) in an agent's cluster for one event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ActionRecord {
    /// The agent.
    pub agent: AgentId,
    /// The event's sequence number.
    pub seq: i64,
    /// `ok`, `no_match`, `forbidden`, `not_opted_in`, `failed`.
    pub outcome: String,
    /// What was done, for the operator (objects patched, or the error).
    pub detail: String,
    /// Unix milliseconds.
    pub done_at: i64,
}

/// What kas did in agents' clusters for recorded events: the marks that make each action
/// happen once per agent and event, also across replicas and restarts.
#[async_trait]
pub trait ActionLog: Send + Sync + 'static {
    /// Events of `kind` after sequence number `after_seq`, received at or after `not_before`, in
    /// sequence order, at most `limit`.
    async fn events_of_kind(
        &self,
        kind: EventKind,
        not_before: i64,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<EventNotice>, StoreError>;
    /// The (agent, event) pairs already acted on among these events.
    async fn actions_done(&self, seqs: &[i64]) -> Result<Vec<(AgentId, i64)>, StoreError>;
    /// Records an action; a second record for the same agent and event is ignored.
    async fn record_action(&self, action: &ActionRecord) -> Result<(), StoreError>;
    /// The newest `limit` actions.
    async fn recent_actions(&self, limit: i64) -> Result<Vec<ActionRecord>, StoreError>;
    /// Forgets actions done before `before`; returns how many.
    async fn prune_actions(&self, before: i64) -> Result<u64, StoreError>;
}

/// A commit status kas posted to GitLab for a Flux result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostedStatus {
    /// Full project path.
    pub project: String,
    /// Commit sha.
    pub sha: String,
    /// `flux/<agent>/<namespace>/<kustomization>`.
    pub name: String,
    /// `running`, `success` or `failed`.
    pub state: String,
    /// The agent whose cluster reported it.
    pub agent: AgentId,
    /// Unix milliseconds.
    pub posted_at: i64,
}

/// The last state Flux reported for one of an agent's Kustomizations.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KustomizationState {
    /// The agent.
    pub agent: AgentId,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The revision Flux names (`main@sha1:…`).
    pub revision: String,
    /// `running`, `success` or `failed`.
    pub state: String,
    /// The GitLab project it maps to, when it does.
    pub project: Option<String>,
    /// The commit it maps to, when it does.
    pub sha: Option<String>,
    /// Flux's message.
    pub message: String,
    /// What kas did with it: `posted`, `queued`, `not_allowed`, `unmapped`, `off`.
    pub reported: String,
    /// Unix milliseconds.
    pub updated_at: i64,
}

/// Flux results as commit statuses: what was posted (so each status is posted once, also
/// across replicas and restarts) and the last state per agent and Kustomization.
#[async_trait]
pub trait StatusLog: Send + Sync + 'static {
    /// Whether this (project, sha, name, state) was posted.
    async fn status_posted(&self, project: &str, sha: &str, name: &str, state: &str) -> Result<bool, StoreError>;
    /// Records a posted status; false when it was recorded already.
    async fn record_status(&self, status: &PostedStatus) -> Result<bool, StoreError>;
    /// Creates or replaces the last state of one Kustomization.
    async fn set_kustomization(&self, state: &KustomizationState) -> Result<(), StoreError>;
    /// The last states, by agent, namespace and name, at most `limit`.
    async fn kustomizations(&self, limit: i64) -> Result<Vec<KustomizationState>, StoreError>;
    /// When kas first recorded a push of `sha` to `project` (the end-to-end figure's start).
    async fn push_received(&self, project: &str, sha: &str) -> Result<Option<i64>, StoreError>;
    /// Forgets statuses posted before `before`; returns how many.
    async fn prune_statuses(&self, before: i64) -> Result<u64, StoreError>;
}

/// Every storage role at once, as a backend implements them; a consumer that needs one role
/// takes that trait (`Arc<dyn Store>` upcasts to any of them).
pub trait Store:
    Lifecycle + AgentRegistry + Credentials + ProjectRegistry + EventLog + PositionStore + ActionLog + StatusLog
{
}

impl<T> Store for T where
    T: Lifecycle + AgentRegistry + Credentials + ProjectRegistry + EventLog + PositionStore + ActionLog + StatusLog
{
}

/// Opens the database the configuration names (creating the SQLite file and its directory).
pub async fn open(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    let url = config.database_url.expose();
    match config.backend() {
        Backend::Sqlite => Ok(Arc::new(SqliteStore::open(url, &config.data_dir).await?)),
        Backend::Postgres => Ok(Arc::new(PostgresStore::open(url).await?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use crate::domain::{EventKind, EventSource, NewEvent, PushEvent, Visibility};

    /// `open` hands out one object that serves every role: a consumer given only the event log
    /// (by upcasting) records into the same database the registry reads.
    #[tokio::test]
    async fn one_store_upcasts_to_each_role() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("kas.db").display());
        let config = StoreConfig { database_url: Secret::new(url), data_dir: dir.path().to_owned() };
        assert_eq!(config.backend(), Backend::Sqlite);
        let store = open(&config).await.unwrap();
        store.migrate().await.unwrap();

        let log: Arc<dyn EventLog> = store.clone();
        let path = ProjectPath::parse("g/p").unwrap();
        let push = NewEvent {
            event: PushEvent {
                project_id: 7,
                project_path: path.clone(),
                kind: EventKind::Push,
                git_ref: None,
                before: None,
                after: None,
                visibility: Some(Visibility::Internal),
            },
            image: None,
            idempotency_key: "k".into(),
            source: EventSource::Webhook,
            received_at: 1000,
        };
        let outcomes = log.record_pushes(&[push.clone(), push]).await.unwrap();
        assert!(matches!(&outcomes[..], [RecordOutcome::Recorded(n), RecordOutcome::Duplicate] if n.seq == 1));

        let projects: Arc<dyn ProjectRegistry> = store.clone();
        let info = projects.project_by_id(7).await.unwrap().unwrap();
        assert_eq!((info.path, info.visibility), (path, Some(Visibility::Internal)));
        let positions: Arc<dyn PositionStore> = store.clone();
        positions.save_position(3, DeliveryPosition { seq: 1, at: 1000 }).await.unwrap();
        assert_eq!(positions.load_position(3).await.unwrap(), Some(DeliveryPosition { seq: 1, at: 1000 }));
        store.close().await;
    }
}
