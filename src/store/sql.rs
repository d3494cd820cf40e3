//! The SQL both backends share. The statements are portable (`$n` placeholders work on
//! SQLite and PostgreSQL alike, times are integer milliseconds), so one macro writes the
//! `Store` implementation for each concrete sqlx pool type; what differs between the two
//! (connecting, migrations, pragmas) lives in `sqlite.rs` and `postgres.rs`.

use crate::domain::{AgentName, EventKind, ProjectInfo, ProjectPath, RepositoryAccess, Visibility};

use super::{AgentRecord, StoreError, TokenRecord};

/// Columns of an agent row, in the order `agent_from_parts` takes them.
pub(super) const AGENT_COLUMNS: &str = "id, name, config_project_path, created_at, \
    (SELECT p.id FROM projects p WHERE p.full_path = agents.config_project_path ORDER BY p.updated_at DESC LIMIT 1) AS config_project_id";
/// Columns of a token row.
pub(super) const TOKEN_COLUMNS: &str = "id, agent_id, created_at, last_used_at, revoked_at";

pub(super) fn agent_from_parts(
    id: i64,
    name: String,
    path: String,
    created_at: i64,
    config_project_id: Option<i64>,
) -> Result<AgentRecord, StoreError> {
    Ok(AgentRecord {
        id,
        name: AgentName::parse(&name).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        config_project: ProjectPath::parse(&path).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        created_at,
        config_project_id,
    })
}

pub(super) fn token_from_parts(
    id: i64,
    agent_id: i64,
    created_at: i64,
    last_used_at: Option<i64>,
    revoked_at: Option<i64>,
) -> TokenRecord {
    TokenRecord { id, agent_id, created_at, last_used_at, revoked_at }
}

pub(super) fn project_from_parts(
    id: i64,
    path: String,
    visibility: Option<String>,
    access: String,
) -> Result<ProjectInfo, StoreError> {
    let corrupt = |e: crate::domain::InvalidValue| StoreError::Corrupt(e.to_string());
    Ok(ProjectInfo {
        id,
        path: ProjectPath::parse(&path).map_err(corrupt)?,
        visibility: visibility.as_deref().map(str::parse::<Visibility>).transpose().map_err(corrupt)?,
        repository_access: access.parse::<RepositoryAccess>().map_err(corrupt)?,
    })
}

/// The access rule's "readable by everyone" for a registry row read back from the database.
pub(super) fn world_readable(
    path: &str,
    id: i64,
    registry_path: Option<String>,
    visibility: Option<String>,
    access: Option<String>,
) -> bool {
    let Some(registry_path) = registry_path else {
        return false;
    };
    // An unparsable row counts as private rather than failing delivery.
    let info = project_from_parts(id, registry_path, visibility, access.unwrap_or_default()).ok();
    crate::domain::access::is_world_readable(path, info.as_ref())
}

pub(super) fn kind_from_stored(kind: &str) -> Result<EventKind, StoreError> {
    EventKind::from_stored(kind).ok_or_else(|| StoreError::Corrupt(format!("unknown push kind {kind:?}")))
}

/// Rank of a stored visibility (private < internal < public); unknown ranks as private.
macro_rules! visibility_rank {
    ($col:literal) => {
        concat!("(CASE ", $col, " WHEN 'public' THEN 2 WHEN 'internal' THEN 1 ELSE 0 END)")
    };
}

/// The upsert tail of a merged project update (see `domain::merged_visibility`, which this
/// mirrors): newer news replaces the path and visibility; a push without visibility keeps it,
/// unless it moves the project to another path (knowledge about the old path does not carry
/// over); late older news can only make the project more private.
pub(super) const MERGE_PROJECT_ON_CONFLICT: &str = concat!(
    " ON CONFLICT (id) DO UPDATE SET ",
    "visibility = CASE ",
    "WHEN excluded.visibility IS NULL AND excluded.updated_at >= projects.updated_at ",
    "AND excluded.full_path <> projects.full_path THEN NULL ",
    "WHEN excluded.visibility IS NULL THEN projects.visibility ",
    "WHEN excluded.updated_at >= projects.updated_at THEN excluded.visibility ",
    "WHEN ",
    visibility_rank!("projects.visibility"),
    " <= ",
    visibility_rank!("excluded.visibility"),
    " THEN COALESCE(projects.visibility, 'private') ",
    "ELSE excluded.visibility END, ",
    "full_path = CASE WHEN excluded.updated_at >= projects.updated_at THEN excluded.full_path ELSE projects.full_path END, ",
    "updated_at = CASE WHEN excluded.updated_at >= projects.updated_at THEN excluded.updated_at ELSE projects.updated_at END ",
    "RETURNING id, full_path, visibility, repository_access"
);

/// Maps a unique-constraint violation to a `Conflict` with the given message.
pub(super) fn conflict_or(e: sqlx::Error, message: impl FnOnce() -> String) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(message()),
        _ => StoreError::Unavailable(e),
    }
}

/// Writes `impl Store for $store`, whose `pool` field is a `sqlx::Pool<$db>`.
macro_rules! impl_store {
    ($store:ty, $db:ty) => {
        #[async_trait::async_trait]
        impl $crate::store::Store for $store {
            async fn migrate(&self) -> Result<(), StoreError> {
                Self::MIGRATOR.run(&self.pool).await?;
                Ok(())
            }

            async fn ping(&self) -> Result<(), StoreError> {
                sqlx::query("SELECT 1").execute(&self.pool).await?;
                Ok(())
            }

            async fn close(&self) {
                self.pool.close().await;
            }

            async fn create_agent(
                &self,
                name: &AgentName,
                config_project: &ProjectPath,
                first_token: &TokenDigest,
                config: Option<&str>,
                now: i64,
            ) -> Result<(AgentRecord, TokenRecord), StoreError> {
                let mut tx = self.pool.begin().await?;
                let (id,): (i64,) = sqlx::query_as(
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
                let (token_id,): (i64,) = sqlx::query_as(
                    "INSERT INTO agent_tokens (agent_id, digest, created_at) VALUES ($1, $2, $3) RETURNING id",
                )
                .bind(id)
                .bind(first_token.as_str())
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| conflict_or(e, || "token collision; try again".into()))?;
                tx.commit().await?;
                let agent = self.agent(id).await?.ok_or_else(|| StoreError::NotFound(format!("agent {id}")))?;
                Ok((agent, token_from_parts(token_id, id, now, None, None)))
            }

            async fn set_agent_config(&self, agent: AgentId, config: Option<&str>) -> Result<i64, StoreError> {
                let row: Option<(i64,)> = sqlx::query_as(
                    "UPDATE agents SET config_yaml = $2, config_version = config_version + 1 WHERE id = $1 RETURNING config_version",
                )
                .bind(agent)
                .bind(config)
                .fetch_optional(&self.pool)
                .await?;
                row.map(|(v,)| v).ok_or_else(|| StoreError::NotFound(format!("agent {agent}")))
            }

            async fn agent_config(&self, agent: AgentId) -> Result<Option<(Option<String>, i64)>, StoreError> {
                Ok(sqlx::query_as("SELECT config_yaml, config_version FROM agents WHERE id = $1")
                    .bind(agent)
                    .fetch_optional(&self.pool)
                    .await?)
            }

            async fn config_versions(&self, agents: &[AgentId]) -> Result<Vec<(AgentId, i64)>, StoreError> {
                let mut versions = Vec::with_capacity(agents.len());
                for chunk in agents.chunks(1000) {
                    let mut q = sqlx::QueryBuilder::<$db>::new("SELECT id, config_version FROM agents WHERE id IN (");
                    let mut list = q.separated(", ");
                    for id in chunk {
                        list.push_bind(*id);
                    }
                    q.push(")");
                    versions.extend(q.build_query_as::<(i64, i64)>().fetch_all(&self.pool).await?);
                }
                Ok(versions)
            }

            async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
                let sql = sqlx::AssertSqlSafe(format!("SELECT {AGENT_COLUMNS} FROM agents ORDER BY id"));
                let rows: Vec<(i64, String, String, i64, Option<i64>)> = sqlx::query_as(sql).fetch_all(&self.pool).await?;
                rows.into_iter().map(|(a, b, c, d, e)| agent_from_parts(a, b, c, d, e)).collect()
            }

            async fn agents_named(&self, name: &AgentName) -> Result<Vec<AgentRecord>, StoreError> {
                let sql = sqlx::AssertSqlSafe(format!("SELECT {AGENT_COLUMNS} FROM agents WHERE name = $1 ORDER BY id"));
                let rows: Vec<(i64, String, String, i64, Option<i64>)> =
                    sqlx::query_as(sql).bind(name.as_str()).fetch_all(&self.pool).await?;
                rows.into_iter().map(|(a, b, c, d, e)| agent_from_parts(a, b, c, d, e)).collect()
            }

            async fn agent(&self, id: AgentId) -> Result<Option<AgentRecord>, StoreError> {
                let sql = sqlx::AssertSqlSafe(format!("SELECT {AGENT_COLUMNS} FROM agents WHERE id = $1"));
                let row: Option<(i64, String, String, i64, Option<i64>)> =
                    sqlx::query_as(sql).bind(id).fetch_optional(&self.pool).await?;
                row.map(|(a, b, c, d, e)| agent_from_parts(a, b, c, d, e)).transpose()
            }

            async fn delete_agent(&self, id: AgentId) -> Result<bool, StoreError> {
                let mut tx = self.pool.begin().await?;
                sqlx::query("DELETE FROM agent_tokens WHERE agent_id = $1").bind(id).execute(&mut *tx).await?;
                sqlx::query("DELETE FROM agent_positions WHERE agent_id = $1").bind(id).execute(&mut *tx).await?;
                let done = sqlx::query("DELETE FROM agents WHERE id = $1").bind(id).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(done.rows_affected() > 0)
            }

            async fn create_token(&self, agent: AgentId, digest: &TokenDigest, now: i64) -> Result<TokenRecord, StoreError> {
                let mut tx = self.pool.begin().await?;
                // A no-op write on the agent row serialises concurrent token creations for
                // one agent on both backends (a row lock in PostgreSQL, the write lock in
                // SQLite), so the limit below cannot be raced past.
                let locked = sqlx::query("UPDATE agents SET name = name WHERE id = $1").bind(agent).execute(&mut *tx).await?;
                if locked.rows_affected() == 0 {
                    return Err(StoreError::NotFound(format!("agent {agent}")));
                }
                let (active,): (i64,) = sqlx::query_as(
                    "SELECT COUNT(*) FROM agent_tokens WHERE agent_id = $1 AND revoked_at IS NULL",
                )
                .bind(agent)
                .fetch_one(&mut *tx)
                .await?;
                if active >= $crate::store::MAX_ACTIVE_TOKENS {
                    return Err(StoreError::Limit(format!(
                        "agent already has {active} active tokens (at most {}); revoke one first",
                        $crate::store::MAX_ACTIVE_TOKENS
                    )));
                }
                let (id,): (i64,) = sqlx::query_as(
                    "INSERT INTO agent_tokens (agent_id, digest, created_at) VALUES ($1, $2, $3) RETURNING id",
                )
                .bind(agent)
                .bind(digest.as_str())
                .bind(now)
                .fetch_one(&mut *tx)
                .await
                .map_err(|e| conflict_or(e, || "token collision; try again".into()))?;
                tx.commit().await?;
                Ok(token_from_parts(id, agent, now, None, None))
            }

            async fn list_tokens(&self, agent: AgentId) -> Result<Vec<TokenRecord>, StoreError> {
                let sql = sqlx::AssertSqlSafe(format!("SELECT {TOKEN_COLUMNS} FROM agent_tokens WHERE agent_id = $1 ORDER BY id"));
                let rows: Vec<(i64, i64, i64, Option<i64>, Option<i64>)> =
                    sqlx::query_as(sql).bind(agent).fetch_all(&self.pool).await?;
                Ok(rows.into_iter().map(|(a, b, c, d, e)| token_from_parts(a, b, c, d, e)).collect())
            }

            async fn revoke_token(&self, token: i64, now: i64) -> Result<Option<TokenRecord>, StoreError> {
                sqlx::query("UPDATE agent_tokens SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL")
                    .bind(token)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                let sql = sqlx::AssertSqlSafe(format!("SELECT {TOKEN_COLUMNS} FROM agent_tokens WHERE id = $1"));
                let row: Option<(i64, i64, i64, Option<i64>, Option<i64>)> =
                    sqlx::query_as(sql).bind(token).fetch_optional(&self.pool).await?;
                Ok(row.map(|(a, b, c, d, e)| token_from_parts(a, b, c, d, e)))
            }

            async fn authenticate(&self, digest: &TokenDigest, now: i64) -> Result<Option<Authenticated>, StoreError> {
                let token: Option<(i64, i64)> = sqlx::query_as(
                    "UPDATE agent_tokens SET last_used_at = $2 WHERE digest = $1 AND revoked_at IS NULL \
                     RETURNING id, agent_id",
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
                // Chunks keep every statement far below both backends' bind-parameter limits.
                for chunk in ids.chunks(1000) {
                    let mut q = sqlx::QueryBuilder::<$db>::new("SELECT id FROM agent_tokens WHERE revoked_at IS NULL AND id IN (");
                    let mut list = q.separated(", ");
                    for id in chunk {
                        list.push_bind(*id);
                    }
                    q.push(")");
                    let rows: Vec<(i64,)> = q.build_query_as().fetch_all(&self.pool).await?;
                    active.extend(rows.into_iter().map(|(id,)| id));
                }
                Ok(active)
            }

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
                let row: Option<(i64, String, Option<String>, String)> = sqlx::query_as(
                    "SELECT id, full_path, visibility, repository_access FROM projects \
                     WHERE full_path = $1 ORDER BY updated_at DESC, id DESC LIMIT 1",
                )
                .bind(path.as_str())
                .fetch_optional(&self.pool)
                .await?;
                row.map(|(a, b, c, d)| project_from_parts(a, b, c, d)).transpose()
            }

            async fn project_by_id(&self, id: i64) -> Result<Option<ProjectInfo>, StoreError> {
                let row: Option<(i64, String, Option<String>, String)> =
                    sqlx::query_as("SELECT id, full_path, visibility, repository_access FROM projects WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&self.pool)
                        .await?;
                row.map(|(a, b, c, d)| project_from_parts(a, b, c, d)).transpose()
            }

            async fn record_pushes(&self, batch: &[NewEvent]) -> Result<Vec<RecordOutcome>, StoreError> {
                if batch.is_empty() {
                    return Ok(Vec::new());
                }
                // One registry update per project, merged from the batch (newest path, most
                // restrictive visibility carried), in id order: concurrent batches then lock
                // project rows in the same order and cannot deadlock (PostgreSQL would abort one
                // of them after deadlock_timeout).
                let mut merged: std::collections::BTreeMap<i64, $crate::domain::ProjectUpdate> =
                    std::collections::BTreeMap::new();
                for push in batch {
                    let e = &push.event;
                    merged
                        .entry(e.project_id)
                        .and_modify(|u| u.merge(&e.project_path, e.visibility, push.received_at))
                        .or_insert_with(|| {
                            $crate::domain::ProjectUpdate::new(e.project_id, e.project_path.clone(), e.visibility, push.received_at)
                        });
                }
                let projects: Vec<$crate::domain::ProjectUpdate> = merged.into_values().collect();
                // Events in key order, for the same reason (a redelivery racing in another batch).
                let mut events: Vec<&NewEvent> = batch.iter().collect();
                events.sort_by(|a, b| a.idempotency_key.cmp(&b.idempotency_key));
                let mut tx = self.pool.begin().await?;
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO projects (id, full_path, visibility, repository_access, updated_at) ",
                );
                q.push_values(&projects, |mut row, p| {
                    row.push_bind(p.id)
                        .push_bind(p.path.as_str())
                        .push_bind(p.visibility.map(|v| v.as_str()))
                        .push_bind($crate::domain::RepositoryAccess::default().as_str())
                        .push_bind(p.seen_at);
                });
                // `domain::merged_visibility` in SQL, so the read and the write are one atomic
                // statement on both backends. Repository access is the operator's (the webhook
                // does not carry it).
                q.push($crate::store::sql::MERGE_PROJECT_ON_CONFLICT);
                let rows: Vec<(i64, String, Option<String>, String)> = q.build_query_as().fetch_all(&mut *tx).await?;
                let registry: std::collections::HashMap<i64, (String, Option<String>, String)> =
                    rows.into_iter().map(|(id, p, v, a)| (id, (p, v, a))).collect();

                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO push_events (idempotency_key, project_id, project_path, kind, git_ref, before_sha, \
                     after_sha, source, received_at) ",
                );
                q.push_values(&events, |mut row, p| {
                    row.push_bind(p.idempotency_key.as_str())
                        .push_bind(p.event.project_id)
                        .push_bind(p.event.project_path.as_str())
                        .push_bind(p.event.kind.as_str())
                        .push_bind(p.event.git_ref.as_deref())
                        .push_bind(p.event.before.as_deref())
                        .push_bind(p.event.after.as_deref())
                        .push_bind(p.source.as_str())
                        .push_bind(p.received_at);
                });
                q.push(" ON CONFLICT (idempotency_key) DO NOTHING RETURNING seq, idempotency_key");
                let inserted: Vec<(i64, String)> = q.build_query_as().fetch_all(&mut *tx).await?;
                tx.commit().await?;

                let mut seqs: std::collections::HashMap<String, i64> = inserted.into_iter().map(|(s, k)| (k, s)).collect();
                Ok(batch
                    .iter()
                    .map(|p| match seqs.remove(&p.idempotency_key) {
                        // The first push with a key gets the row; a repeat of the key within
                        // the batch finds it taken and is a duplicate.
                        Some(seq) => RecordOutcome::Recorded(EventNotice {
                            seq,
                            project_id: p.event.project_id,
                            project_path: p.event.project_path.clone(),
                            // The pushed path against the registry row as this transaction left
                            // it: a push under a path the project no longer has is not public.
                            world_readable: registry.get(&p.event.project_id).is_some_and(|(path, v, a)| {
                                world_readable(
                                    p.event.project_path.as_str(),
                                    p.event.project_id,
                                    Some(path.clone()),
                                    v.clone(),
                                    Some(a.clone()),
                                )
                            }),
                            received_at: p.received_at,
                        }),
                        None => RecordOutcome::Duplicate,
                    })
                    .collect())
            }

            async fn mark_published(&self, seqs: &[i64], now: i64) -> Result<(), StoreError> {
                for chunk in seqs.chunks(1000) {
                    let mut q = sqlx::QueryBuilder::<$db>::new("UPDATE push_events SET published_at = ");
                    q.push_bind(now);
                    q.push(", claimed_until = NULL WHERE seq IN (");
                    let mut list = q.separated(", ");
                    for seq in chunk {
                        list.push_bind(*seq);
                    }
                    q.push(")");
                    q.build().execute(&self.pool).await?;
                }
                Ok(())
            }

            async fn claim_unpublished(&self, older_than: i64, now: i64, lease_ms: i64, limit: i64)
                -> Result<Vec<EventNotice>, StoreError>
            {
                let candidates: Vec<(i64, i64, String, i64, Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
                    "SELECT e.seq, e.project_id, e.project_path, e.received_at, p.full_path, p.visibility, p.repository_access \
                     FROM push_events e LEFT JOIN projects p ON p.id = e.project_id \
                     WHERE e.published_at IS NULL AND e.received_at < $1 AND (e.claimed_until IS NULL OR e.claimed_until < $2) \
                     ORDER BY e.seq LIMIT $3",
                )
                .bind(older_than)
                .bind(now)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
                if candidates.is_empty() {
                    return Ok(Vec::new());
                }
                // Only rows this UPDATE actually changes are ours: another replica that claimed
                // first has moved claimed_until past `now`.
                let mut q = sqlx::QueryBuilder::<$db>::new("UPDATE push_events SET claimed_until = ");
                q.push_bind(now + lease_ms);
                q.push(" WHERE published_at IS NULL AND (claimed_until IS NULL OR claimed_until < ");
                q.push_bind(now);
                q.push(") AND seq IN (");
                let mut list = q.separated(", ");
                for c in &candidates {
                    list.push_bind(c.0);
                }
                q.push(") RETURNING seq");
                let claimed: std::collections::HashSet<i64> =
                    q.build_query_as::<(i64,)>().fetch_all(&self.pool).await?.into_iter().map(|(s,)| s).collect();
                candidates
                    .into_iter()
                    .filter(|c| claimed.contains(&c.0))
                    .map(notice_from_row)
                    .collect()
            }

            async fn pushes_since(
                &self,
                after_seq: i64,
                overlap_from: i64,
                not_before: i64,
                projects: &[String],
                limit: i64,
            ) -> Result<Vec<EventNotice>, StoreError> {
                let mut q = sqlx::QueryBuilder::<$db>::new(
                    "SELECT e.seq, e.project_id, e.project_path, e.received_at, p.full_path, p.visibility, p.repository_access \
                     FROM push_events e LEFT JOIN projects p ON p.id = e.project_id WHERE (e.seq > ",
                );
                q.push_bind(after_seq).push(" OR e.received_at >= ").push_bind(overlap_from);
                q.push(") AND e.received_at >= ").push_bind(not_before);
                if !projects.is_empty() {
                    q.push(" AND e.project_path IN (");
                    let mut list = q.separated(", ");
                    for p in projects {
                        list.push_bind(p.as_str());
                    }
                    q.push(")");
                }
                q.push(" ORDER BY e.seq LIMIT ").push_bind(limit);
                #[allow(clippy::type_complexity)]
                let rows: Vec<(i64, i64, String, i64, Option<String>, Option<String>, Option<String>)> =
                    q.build_query_as().fetch_all(&self.pool).await?;
                rows.into_iter().map(notice_from_row).collect()
            }

            async fn pushes_by_seq(&self, seqs: &[i64]) -> Result<Vec<EventNotice>, StoreError> {
                let mut found = Vec::with_capacity(seqs.len());
                for chunk in seqs.chunks(1000) {
                    let mut q = sqlx::QueryBuilder::<$db>::new(
                        "SELECT e.seq, e.project_id, e.project_path, e.received_at, p.full_path, p.visibility, p.repository_access \
                         FROM push_events e LEFT JOIN projects p ON p.id = e.project_id WHERE e.seq IN (",
                    );
                    let mut list = q.separated(", ");
                    for seq in chunk {
                        list.push_bind(*seq);
                    }
                    q.push(") ORDER BY e.seq");
                    #[allow(clippy::type_complexity)]
                    let rows: Vec<(i64, i64, String, i64, Option<String>, Option<String>, Option<String>)> =
                        q.build_query_as().fetch_all(&self.pool).await?;
                    for row in rows {
                        found.push(notice_from_row(row)?);
                    }
                }
                found.sort_by_key(|n| n.seq);
                Ok(found)
            }

            async fn shared_key(&self, name: &str, candidate: &str, now: i64) -> Result<String, StoreError> {
                sqlx::query("INSERT INTO engine_keys (name, secret, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING")
                    .bind(name)
                    .bind(candidate)
                    .bind(now)
                    .execute(&self.pool)
                    .await?;
                let (secret,): (String,) = sqlx::query_as("SELECT secret FROM engine_keys WHERE name = $1")
                    .bind(name)
                    .fetch_one(&self.pool)
                    .await?;
                Ok(secret)
            }

            async fn last_seq(&self) -> Result<i64, StoreError> {
                let (seq,): (Option<i64>,) = sqlx::query_as("SELECT MAX(seq) FROM push_events").fetch_one(&self.pool).await?;
                Ok(seq.unwrap_or(0))
            }

            async fn prune_pushes(&self, before: i64, limit: i64) -> Result<u64, StoreError> {
                let done = sqlx::query(
                    // Never an event the outbox still owes to the other replicas.
                    "DELETE FROM push_events WHERE seq IN \
                     (SELECT seq FROM push_events WHERE received_at < $1 AND published_at IS NOT NULL ORDER BY seq LIMIT $2)",
                )
                .bind(before)
                .bind(limit)
                .execute(&self.pool)
                .await?;
                Ok(done.rows_affected())
            }

            async fn recent_pushes(&self, limit: i64) -> Result<Vec<LoggedEvent>, StoreError> {
                #[allow(clippy::type_complexity)]
                let rows: Vec<(i64, String, i64, String, String, Option<String>, Option<String>, Option<String>, String, i64, Option<i64>)> =
                    sqlx::query_as(
                        "SELECT seq, idempotency_key, project_id, project_path, kind, git_ref, before_sha, after_sha, \
                         source, received_at, published_at FROM push_events ORDER BY seq DESC LIMIT $1",
                    )
                    .bind(limit)
                    .fetch_all(&self.pool)
                    .await?;
                rows.into_iter()
                    .map(|r| {
                        Ok(LoggedEvent {
                            seq: r.0,
                            idempotency_key: r.1,
                            project_id: r.2,
                            project_path: r.3,
                            kind: kind_from_stored(&r.4)?,
                            git_ref: r.5,
                            before: r.6,
                            after: r.7,
                            source: r.8,
                            received_at: r.9,
                            published_at: r.10,
                        })
                    })
                    .collect()
            }

            async fn save_position(&self, agent: AgentId, position: DeliveryPosition) -> Result<(), StoreError> {
                sqlx::query(
                    "INSERT INTO agent_positions (agent_id, seq, updated_at) VALUES ($1, $2, $3) \
                     ON CONFLICT (agent_id) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at",
                )
                .bind(agent)
                .bind(position.seq)
                .bind(position.at)
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn save_positions(&self, positions: &[(AgentId, DeliveryPosition)]) -> Result<(), StoreError> {
                // One transaction, so the periodic save of thousands of agents costs the database one
                // commit (one WAL flush) next to the intake's, not one per chunk.
                let mut tx = self.pool.begin().await?;
                for chunk in positions.chunks(5000) {
                    let mut q = sqlx::QueryBuilder::<$db>::new("INSERT INTO agent_positions (agent_id, seq, updated_at) ");
                    q.push_values(chunk, |mut row, (agent, p)| {
                        row.push_bind(*agent).push_bind(p.seq).push_bind(p.at);
                    });
                    q.push(" ON CONFLICT (agent_id) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at");
                    q.build().execute(&mut *tx).await?;
                }
                tx.commit().await?;
                Ok(())
            }

            async fn load_position(&self, agent: AgentId) -> Result<Option<DeliveryPosition>, StoreError> {
                let row: Option<(i64, i64)> = sqlx::query_as("SELECT seq, updated_at FROM agent_positions WHERE agent_id = $1")
                    .bind(agent)
                    .fetch_optional(&self.pool)
                    .await?;
                Ok(row.map(|(seq, at)| DeliveryPosition { seq, at }))
            }
        }
    };
}

pub(super) use impl_store;

/// Builds a notice from `seq, project_id, project_path, received_at` and the joined registry
/// row `full_path, visibility, repository_access`.
#[allow(clippy::type_complexity)]
pub(super) fn notice_from_row(
    r: (i64, i64, String, i64, Option<String>, Option<String>, Option<String>),
) -> Result<super::EventNotice, StoreError> {
    let (seq, project_id, path, received_at, registry_path, visibility, access) = r;
    Ok(super::EventNotice {
        seq,
        project_id,
        world_readable: world_readable(&path, project_id, registry_path, visibility, access),
        project_path: ProjectPath::parse(&path).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        received_at,
    })
}
