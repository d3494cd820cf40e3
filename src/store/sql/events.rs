//! The push-event log: recording a batch (with the registry refresh it carries), the outbox's
//! claim and publish marks, reading back for replay and fan-out, and pruning.

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, QueryBuilder};

use super::rows::{LOGGED_COLUMNS, LoggedRow, NOTICE_FROM, NoticeRow, ProjectRow, world_readable};
use super::{IN_LIST_CHUNK, SqlBackend, SqlStore, push_in_list};
use crate::domain::{EventKind, EventNotice, LoggedEvent, NewEvent, RecordOutcome};
use crate::domain::{ProjectUpdate, RepositoryAccess};
use crate::store::{EventLog, StoreError};

/// The upsert tail of a merged project update (see `domain::merged_visibility`, which this
/// mirrors): newer news replaces the path and visibility; a push without visibility keeps it,
/// unless it moves the project to another path (knowledge about the old path does not carry
/// over); late older news can only make the project more private. The two `CASE … END` in the
/// fourth branch rank a visibility (private < internal < public; unknown ranks as private).
const MERGE_PROJECT_ON_CONFLICT: &str = concat!(
    " ON CONFLICT (id) DO UPDATE SET ",
    "visibility = CASE ",
    "WHEN excluded.visibility IS NULL AND excluded.updated_at >= projects.updated_at ",
    "AND excluded.full_path <> projects.full_path THEN NULL ",
    "WHEN excluded.visibility IS NULL THEN projects.visibility ",
    "WHEN excluded.updated_at >= projects.updated_at THEN excluded.visibility ",
    "WHEN (CASE projects.visibility WHEN 'public' THEN 2 WHEN 'internal' THEN 1 ELSE 0 END) ",
    "<= (CASE excluded.visibility WHEN 'public' THEN 2 WHEN 'internal' THEN 1 ELSE 0 END) ",
    "THEN COALESCE(projects.visibility, 'private') ",
    "ELSE excluded.visibility END, ",
    "full_path = CASE WHEN excluded.updated_at >= projects.updated_at THEN excluded.full_path ELSE projects.full_path END, ",
    "updated_at = CASE WHEN excluded.updated_at >= projects.updated_at THEN excluded.updated_at ELSE projects.updated_at END ",
    "RETURNING id, full_path, visibility, repository_access"
);

/// One registry update per project, merged from the batch (newest path, most restrictive
/// visibility carried), in id order: concurrent batches then lock project rows in the same
/// order and cannot deadlock (PostgreSQL would abort one of them after deadlock_timeout).
fn merged_projects(batch: &[NewEvent]) -> Vec<ProjectUpdate> {
    let mut merged: BTreeMap<i64, ProjectUpdate> = BTreeMap::new();
    // An image push says nothing about the project's path history or visibility.
    for push in batch.iter().filter(|p| p.event.kind != EventKind::ImagePush) {
        let e = &push.event;
        merged
            .entry(e.project_id)
            .and_modify(|u| u.merge(&e.project_path, e.visibility, push.received_at))
            .or_insert_with(|| {
                ProjectUpdate::new(e.project_id, e.project_path.clone(), e.visibility, push.received_at)
            });
    }
    merged.into_values().collect()
}

#[async_trait]
impl<DB: SqlBackend> EventLog for SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'a> i64: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::Decode<'a, DB>,
    for<'a> &'a str: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::ColumnIndex<DB::Row>,
    for<'a> Option<&'a str>: sqlx::Encode<'a, DB>,
    for<'a> String: sqlx::Type<DB> + sqlx::Decode<'a, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    async fn record_pushes(&self, batch: &[NewEvent]) -> Result<Vec<RecordOutcome>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let projects = merged_projects(batch);
        // Events in key order, for the same reason (a redelivery racing in another batch).
        let mut events: Vec<&NewEvent> = batch.iter().collect();
        events.sort_by(|a, b| a.idempotency_key.cmp(&b.idempotency_key));
        let mut tx = self.pool.begin().await?;
        let mut registry: HashMap<i64, ProjectRow> = HashMap::new();
        if !projects.is_empty() {
            let mut q = QueryBuilder::<DB>::new(
                "INSERT INTO projects (id, full_path, visibility, repository_access, updated_at) ",
            );
            q.push_values(&projects, |mut row, p| {
                row.push_bind(p.id)
                    .push_bind(p.path.as_str())
                    .push_bind(p.visibility.map(|v| v.as_str()))
                    .push_bind(RepositoryAccess::default().as_str())
                    .push_bind(p.seen_at);
            });
            // `domain::merged_visibility` in SQL, so the read and the write are one atomic
            // statement on both backends. Repository access is the operator's (the webhook does
            // not carry it).
            q.push(MERGE_PROJECT_ON_CONFLICT);
            let rows: Vec<ProjectRow> = q.build_query_as().fetch_all(&mut *tx).await?;
            registry.extend(rows.into_iter().map(|row| (row.id, row)));
        }
        let mut q = QueryBuilder::<DB>::new(
            "INSERT INTO push_events (idempotency_key, project_id, project_path, kind, git_ref, before_sha, \
             after_sha, source, received_at, repository, registry_host) ",
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
                .push_bind(p.received_at)
                .push_bind(p.image.as_ref().map(|i| i.repository.as_str()))
                .push_bind(p.image.as_ref().and_then(|i| i.host.as_deref()));
        });
        q.push(" ON CONFLICT (idempotency_key) DO NOTHING RETURNING seq, idempotency_key");
        let inserted: Vec<(i64, String)> = q.build_query_as().fetch_all(&mut *tx).await?;
        let image_projects: Vec<i64> = events
            .iter()
            .filter(|e| e.event.kind == EventKind::ImagePush && !registry.contains_key(&e.event.project_id))
            .map(|e| e.event.project_id)
            .collect();
        if !image_projects.is_empty() {
            // An image push's project as the registry knows it, read in the same transaction,
            // after its first write: on SQLite a transaction that reads first and writes later
            // fails at once (SQLITE_BUSY) when another connection wrote in between.
            let mut q =
                QueryBuilder::<DB>::new("SELECT id, full_path, visibility, repository_access FROM projects WHERE id");
            push_in_list(&mut q, image_projects);
            let rows: Vec<ProjectRow> = q.build_query_as().fetch_all(&mut *tx).await?;
            registry.extend(rows.into_iter().map(|row| (row.id, row)));
        }

        tx.commit().await?;

        let mut seqs: HashMap<String, i64> = inserted.into_iter().map(|(s, k)| (k, s)).collect();
        Ok(batch
            .iter()
            .map(|p| match seqs.remove(&p.idempotency_key) {
                // The first push with a key gets the row; a repeat of the key within the batch
                // finds it taken and is a duplicate.
                Some(seq) => RecordOutcome::Recorded(EventNotice {
                    seq,
                    project_id: p.event.project_id,
                    project_path: p.event.project_path.clone(),
                    // The pushed path against the registry row as this transaction left it: a
                    // push under a path the project no longer has is not public.
                    world_readable: world_readable(
                        p.event.project_path.as_str(),
                        registry.get(&p.event.project_id).cloned(),
                    ),
                    received_at: p.received_at,
                    kind: p.event.kind,
                    image: p.image.clone().map(std::sync::Arc::new),
                }),
                None => RecordOutcome::Duplicate,
            })
            .collect())
    }

    async fn mark_published(&self, seqs: &[i64], now: i64) -> Result<(), StoreError> {
        for chunk in seqs.chunks(IN_LIST_CHUNK) {
            let mut q = QueryBuilder::<DB>::new("UPDATE push_events SET published_at = ");
            q.push_bind(now).push(", claimed_until = NULL WHERE seq");
            push_in_list(&mut q, chunk.iter().copied());
            q.build().execute(&self.pool).await?;
        }
        Ok(())
    }

    async fn claim_unpublished(
        &self,
        older_than: i64,
        now: i64,
        lease_ms: i64,
        limit: i64,
    ) -> Result<Vec<EventNotice>, StoreError> {
        let sql = AssertSqlSafe(format!(
            "{NOTICE_FROM} WHERE e.published_at IS NULL AND e.received_at < $1 \
             AND (e.claimed_until IS NULL OR e.claimed_until < $2) ORDER BY e.seq LIMIT $3"
        ));
        let candidates: Vec<NoticeRow> =
            sqlx::query_as(sql).bind(older_than).bind(now).bind(limit).fetch_all(&self.pool).await?;
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        // Only rows this UPDATE actually changes are ours: another replica that claimed first
        // has moved claimed_until past `now`.
        let mut q = QueryBuilder::<DB>::new("UPDATE push_events SET claimed_until = ");
        q.push_bind(now + lease_ms);
        q.push(" WHERE published_at IS NULL AND (claimed_until IS NULL OR claimed_until < ");
        q.push_bind(now);
        q.push(") AND seq");
        push_in_list(&mut q, candidates.iter().map(|c| c.seq));
        q.push(" RETURNING seq");
        let claimed: HashSet<i64> = q.build_query_scalar().fetch_all(&self.pool).await?.into_iter().collect();
        candidates.into_iter().filter(|c| claimed.contains(&c.seq)).map(EventNotice::try_from).collect()
    }

    async fn pushes_since(
        &self,
        after_seq: i64,
        overlap_from: i64,
        not_before: i64,
        projects: &[String],
        limit: i64,
    ) -> Result<Vec<EventNotice>, StoreError> {
        let mut q = QueryBuilder::<DB>::new(NOTICE_FROM);
        q.push(" WHERE (e.seq > ").push_bind(after_seq).push(" OR e.received_at >= ").push_bind(overlap_from);
        q.push(") AND e.received_at >= ").push_bind(not_before);
        if !projects.is_empty() {
            q.push(" AND e.project_path");
            push_in_list(&mut q, projects.iter().map(String::as_str));
        }
        q.push(" ORDER BY e.seq LIMIT ").push_bind(limit);
        let rows: Vec<NoticeRow> = q.build_query_as().fetch_all(&self.pool).await?;
        rows.into_iter().map(EventNotice::try_from).collect()
    }

    async fn pushes_by_seq(&self, seqs: &[i64]) -> Result<Vec<EventNotice>, StoreError> {
        let mut found = Vec::with_capacity(seqs.len());
        for chunk in seqs.chunks(IN_LIST_CHUNK) {
            let mut q = QueryBuilder::<DB>::new(NOTICE_FROM);
            q.push(" WHERE e.seq");
            push_in_list(&mut q, chunk.iter().copied());
            q.push(" ORDER BY e.seq");
            let rows: Vec<NoticeRow> = q.build_query_as().fetch_all(&self.pool).await?;
            for row in rows {
                found.push(EventNotice::try_from(row)?);
            }
        }
        found.sort_by_key(|n| n.seq);
        Ok(found)
    }

    async fn last_seq(&self) -> Result<i64, StoreError> {
        let seq: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM push_events").fetch_one(&self.pool).await?;
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
        Ok(DB::rows_affected(&done))
    }

    async fn recent_pushes(&self, limit: i64) -> Result<Vec<LoggedEvent>, StoreError> {
        let sql = AssertSqlSafe(format!("SELECT {LOGGED_COLUMNS} FROM push_events ORDER BY seq DESC LIMIT $1"));
        let rows: Vec<LoggedRow> = sqlx::query_as(sql).bind(limit).fetch_all(&self.pool).await?;
        rows.into_iter().map(LoggedEvent::try_from).collect()
    }
}
