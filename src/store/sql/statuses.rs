//! Commit statuses posted for Flux results, and the last state of each agent's Kustomizations.

use async_trait::async_trait;

use super::{SqlBackend, SqlStore};
use crate::store::{KustomizationState, PostedStatus, StatusLog, StoreError};

#[async_trait]
impl<DB: SqlBackend> StatusLog for SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'a> i64: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::Decode<'a, DB>,
    for<'a> &'a str: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::ColumnIndex<DB::Row>,
    for<'a> Option<&'a str>: sqlx::Encode<'a, DB>,
    for<'a> String: sqlx::Type<DB> + sqlx::Decode<'a, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    async fn status_posted(&self, project: &str, sha: &str, name: &str, state: &str) -> Result<bool, StoreError> {
        let found: Option<(i64,)> = sqlx::query_as(
            "SELECT agent_id FROM sync_statuses WHERE project = $1 AND sha = $2 AND name = $3 AND state = $4",
        )
        .bind(project)
        .bind(sha)
        .bind(name)
        .bind(state)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    async fn record_status(&self, status: &PostedStatus) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO sync_statuses (project, sha, name, state, agent_id, posted_at) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (project, sha, name, state) DO NOTHING",
        )
        .bind(status.project.as_str())
        .bind(status.sha.as_str())
        .bind(status.name.as_str())
        .bind(status.state.as_str())
        .bind(status.agent)
        .bind(status.posted_at)
        .execute(&self.pool)
        .await?;
        Ok(DB::rows_affected(&done) == 1)
    }

    async fn set_kustomization(&self, k: &KustomizationState) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO sync_kustomizations \
             (agent_id, namespace, name, revision, state, project, sha, message, reported, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (agent_id, namespace, name) DO UPDATE SET revision = excluded.revision, \
             state = excluded.state, project = excluded.project, sha = excluded.sha, \
             message = excluded.message, reported = excluded.reported, updated_at = excluded.updated_at",
        )
        .bind(k.agent)
        .bind(k.namespace.as_str())
        .bind(k.name.as_str())
        .bind(k.revision.as_str())
        .bind(k.state.as_str())
        .bind(k.project.as_deref())
        .bind(k.sha.as_deref())
        .bind(k.message.as_str())
        .bind(k.reported.as_str())
        .bind(k.updated_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn kustomizations(&self, limit: i64) -> Result<Vec<KustomizationState>, StoreError> {
        #[allow(clippy::type_complexity)]
        let rows: Vec<(
            i64,
            String,
            String,
            String,
            String,
            Option<String>,
            Option<String>,
            String,
            String,
            i64,
        )> = sqlx::query_as(
            "SELECT agent_id, namespace, name, revision, state, project, sha, message, reported, updated_at \
                 FROM sync_kustomizations ORDER BY agent_id, namespace, name LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(agent, namespace, name, revision, state, project, sha, message, reported, updated_at)| {
                KustomizationState {
                    agent,
                    namespace,
                    name,
                    revision,
                    state,
                    project,
                    sha,
                    message,
                    reported,
                    updated_at,
                }
            })
            .collect())
    }

    async fn push_received(&self, project: &str, sha: &str) -> Result<Option<i64>, StoreError> {
        let (at,): (Option<i64>,) =
            sqlx::query_as("SELECT MIN(received_at) FROM push_events WHERE project_path = $1 AND after_sha = $2")
                .bind(project)
                .bind(sha)
                .fetch_one(&self.pool)
                .await?;
        Ok(at)
    }

    async fn prune_statuses(&self, before: i64) -> Result<u64, StoreError> {
        let done =
            sqlx::query("DELETE FROM sync_statuses WHERE posted_at < $1").bind(before).execute(&self.pool).await?;
        Ok(DB::rows_affected(&done))
    }
}
