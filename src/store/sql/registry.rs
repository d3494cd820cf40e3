//! Agents with their configuration files, their tokens, and the project registry.

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, QueryBuilder};

use super::rows::{AGENT_COLUMNS, AgentRow, PROJECT_COLUMNS, ProjectRow, TOKEN_COLUMNS, TokenRow};
use super::{IN_LIST_CHUNK, SqlBackend, SqlStore, conflict_or, push_in_list};
use crate::domain::{AgentId, AgentName, ProjectInfo, ProjectPath, TokenDigest};
use crate::store::{
    AgentRecord, AgentRegistry, Authenticated, Credentials, MAX_ACTIVE_TOKENS, ProjectRegistry, StoreError, TokenRecord,
};

/// Adds a token row to an agent inside `tx`; a digest that is already stored is a conflict.
async fn insert_token<DB: SqlBackend>(
    tx: &mut DB::Connection,
    agent: AgentId,
    digest: &TokenDigest,
    now: i64,
) -> Result<TokenRecord, StoreError>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'a> i64: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::Decode<'a, DB>,
    for<'a> &'a str: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::ColumnIndex<DB::Row>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    let id: i64 =
        sqlx::query_scalar("INSERT INTO agent_tokens (agent_id, digest, created_at) VALUES ($1, $2, $3) RETURNING id")
            .bind(agent)
            .bind(digest.as_str())
            .bind(now)
            .fetch_one(tx)
            .await
            .map_err(|e| conflict_or(e, || "token collision; try again".into()))?;
    Ok(TokenRecord { id, agent_id: agent, created_at: now, last_used_at: None, revoked_at: None })
}

#[async_trait]
impl<DB: SqlBackend> AgentRegistry for SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'a> i64: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::Decode<'a, DB>,
    for<'a> &'a str: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::ColumnIndex<DB::Row>,
    for<'a> Option<&'a str>: sqlx::Encode<'a, DB>,
    for<'a> String: sqlx::Type<DB> + sqlx::Decode<'a, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    async fn create_agent(
        &self,
        name: &AgentName,
        config_project: &ProjectPath,
        first_token: &TokenDigest,
        config: Option<&str>,
        now: i64,
    ) -> Result<(AgentRecord, TokenRecord), StoreError> {
        let mut tx = self.pool.begin().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO agents (name, config_project_path, created_at, config_yaml, config_version) \
             VALUES ($1, $2, $3, $4, $5) RETURNING id",
        )
        .bind(name.as_str())
        .bind(config_project.as_str())
        .bind(now)
        .bind(config)
        .bind(i64::from(config.is_some()))
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| conflict_or(e, || format!("agent {name} already exists for {config_project}")))?;
        let token = insert_token::<DB>(&mut tx, id, first_token, now).await?;
        tx.commit().await?;
        let agent = self.agent(id).await?.ok_or_else(|| StoreError::NotFound(format!("agent {id}")))?;
        Ok((agent, token))
    }

    async fn set_agent_config(&self, agent: AgentId, config: Option<&str>) -> Result<i64, StoreError> {
        let version: Option<i64> = sqlx::query_scalar(
            "UPDATE agents SET config_yaml = $2, config_version = config_version + 1 WHERE id = $1 RETURNING config_version",
        )
        .bind(agent)
        .bind(config)
        .fetch_optional(&self.pool)
        .await?;
        version.ok_or_else(|| StoreError::NotFound(format!("agent {agent}")))
    }

    async fn agent_config(&self, agent: AgentId) -> Result<Option<(Option<String>, i64)>, StoreError> {
        Ok(sqlx::query_as("SELECT config_yaml, config_version FROM agents WHERE id = $1")
            .bind(agent)
            .fetch_optional(&self.pool)
            .await?)
    }

    async fn config_versions(&self, agents: &[AgentId]) -> Result<Vec<(AgentId, i64)>, StoreError> {
        let mut versions = Vec::with_capacity(agents.len());
        for chunk in agents.chunks(IN_LIST_CHUNK) {
            let mut q = QueryBuilder::<DB>::new("SELECT id, config_version FROM agents WHERE id");
            push_in_list(&mut q, chunk.iter().copied());
            versions.extend(q.build_query_as::<(i64, i64)>().fetch_all(&self.pool).await?);
        }
        Ok(versions)
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        let sql = AssertSqlSafe(format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY id"));
        let rows: Vec<AgentRow> = sqlx::query_as(sql).fetch_all(&self.pool).await?;
        rows.into_iter().map(AgentRecord::try_from).collect()
    }

    async fn agents_named(&self, name: &AgentName) -> Result<Vec<AgentRecord>, StoreError> {
        let sql = AssertSqlSafe(format!("SELECT {AGENT_COLUMNS} FROM agents WHERE name = $1 ORDER BY id"));
        let rows: Vec<AgentRow> = sqlx::query_as(sql).bind(name.as_str()).fetch_all(&self.pool).await?;
        rows.into_iter().map(AgentRecord::try_from).collect()
    }

    async fn agent(&self, id: AgentId) -> Result<Option<AgentRecord>, StoreError> {
        let sql = AssertSqlSafe(format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1"));
        let row: Option<AgentRow> = sqlx::query_as(sql).bind(id).fetch_optional(&self.pool).await?;
        row.map(AgentRecord::try_from).transpose()
    }

    async fn delete_agent(&self, id: AgentId) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM agent_tokens WHERE agent_id = $1").bind(id).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM agent_positions WHERE agent_id = $1").bind(id).execute(&mut *tx).await?;
        let done = sqlx::query("DELETE FROM agents WHERE id = $1").bind(id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(DB::rows_affected(&done) > 0)
    }
}

#[async_trait]
impl<DB: SqlBackend> Credentials for SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'a> i64: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::Decode<'a, DB>,
    for<'a> &'a str: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::ColumnIndex<DB::Row>,
    for<'a> Option<&'a str>: sqlx::Encode<'a, DB>,
    for<'a> String: sqlx::Type<DB> + sqlx::Decode<'a, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    async fn create_token(&self, agent: AgentId, digest: &TokenDigest, now: i64) -> Result<TokenRecord, StoreError> {
        let mut tx = self.pool.begin().await?;
        // A no-op write on the agent row serialises concurrent token creations for one agent on
        // both backends (a row lock in PostgreSQL, the write lock in SQLite), so the limit below
        // cannot be raced past.
        let locked = sqlx::query("UPDATE agents SET name = name WHERE id = $1").bind(agent).execute(&mut *tx).await?;
        if DB::rows_affected(&locked) == 0 {
            return Err(StoreError::NotFound(format!("agent {agent}")));
        }
        let active: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM agent_tokens WHERE agent_id = $1 AND revoked_at IS NULL")
                .bind(agent)
                .fetch_one(&mut *tx)
                .await?;
        if active >= MAX_ACTIVE_TOKENS {
            return Err(StoreError::Limit(format!(
                "agent already has {active} active tokens (at most {MAX_ACTIVE_TOKENS}); revoke one first"
            )));
        }
        let token = insert_token::<DB>(&mut tx, agent, digest, now).await?;
        tx.commit().await?;
        Ok(token)
    }

    async fn list_tokens(&self, agent: AgentId) -> Result<Vec<TokenRecord>, StoreError> {
        let sql = AssertSqlSafe(format!("SELECT {TOKEN_COLUMNS} FROM agent_tokens WHERE agent_id = $1 ORDER BY id"));
        let rows: Vec<TokenRow> = sqlx::query_as(sql).bind(agent).fetch_all(&self.pool).await?;
        Ok(rows.into_iter().map(TokenRecord::from).collect())
    }

    async fn revoke_token(&self, token: i64, now: i64) -> Result<Option<TokenRecord>, StoreError> {
        sqlx::query("UPDATE agent_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
            .bind(token)
            .bind(now)
            .execute(&self.pool)
            .await?;
        let sql = AssertSqlSafe(format!("SELECT {TOKEN_COLUMNS} FROM agent_tokens WHERE id = $1"));
        let row: Option<TokenRow> = sqlx::query_as(sql).bind(token).fetch_optional(&self.pool).await?;
        Ok(row.map(TokenRecord::from))
    }

    async fn authenticate(&self, digest: &TokenDigest, now: i64) -> Result<Option<Authenticated>, StoreError> {
        let token: Option<(i64, i64)> = sqlx::query_as(
            "UPDATE agent_tokens SET last_used_at = $2 WHERE digest = $1 AND revoked_at IS NULL RETURNING id, agent_id",
        )
        .bind(digest.as_str())
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        let Some((token_id, agent_id)) = token else { return Ok(None) };
        Ok(self.agent(agent_id).await?.map(|agent| Authenticated { agent, token_id }))
    }

    async fn active_tokens(&self, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        let mut active = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(IN_LIST_CHUNK) {
            let mut q = QueryBuilder::<DB>::new("SELECT id FROM agent_tokens WHERE revoked_at IS NULL AND id");
            push_in_list(&mut q, chunk.iter().copied());
            active.extend(q.build_query_scalar::<i64>().fetch_all(&self.pool).await?);
        }
        Ok(active)
    }
}

#[async_trait]
impl<DB: SqlBackend> ProjectRegistry for SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'a> i64: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::Decode<'a, DB>,
    for<'a> &'a str: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::ColumnIndex<DB::Row>,
    for<'a> Option<&'a str>: sqlx::Encode<'a, DB>,
    for<'a> String: sqlx::Type<DB> + sqlx::Decode<'a, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    async fn set_project(&self, project: &ProjectInfo, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO projects (id, full_path, visibility, repository_access, updated_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO UPDATE SET full_path = excluded.full_path, visibility = excluded.visibility, \
             repository_access = excluded.repository_access, updated_at = excluded.updated_at",
        )
        .bind(project.id)
        .bind(project.path.as_str())
        .bind(project.visibility.map(|v| v.as_str()))
        .bind(project.repository_access.as_str())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn project_by_path(&self, path: &ProjectPath) -> Result<Option<ProjectInfo>, StoreError> {
        let sql = AssertSqlSafe(format!(
            "SELECT {PROJECT_COLUMNS} FROM projects WHERE full_path = $1 ORDER BY updated_at DESC, id DESC LIMIT 1"
        ));
        let row: Option<ProjectRow> = sqlx::query_as(sql).bind(path.as_str()).fetch_optional(&self.pool).await?;
        row.map(ProjectInfo::try_from).transpose()
    }

    async fn project_by_id(&self, id: i64) -> Result<Option<ProjectInfo>, StoreError> {
        let sql = AssertSqlSafe(format!("SELECT {PROJECT_COLUMNS} FROM projects WHERE id = $1"));
        let row: Option<ProjectRow> = sqlx::query_as(sql).bind(id).fetch_optional(&self.pool).await?;
        row.map(ProjectInfo::try_from).transpose()
    }
}
