//! What kas did in agents' clusters, one row per agent and event.

use async_trait::async_trait;
use sqlx::{AssertSqlSafe, QueryBuilder};

use super::rows::{NOTICE_FROM, NoticeRow};
use super::{IN_LIST_CHUNK, SqlBackend, SqlStore, push_in_list};
use crate::domain::{AgentId, EventKind, EventNotice};
use crate::store::{ActionLog, ActionRecord, StoreError};

#[async_trait]
impl<DB: SqlBackend> ActionLog for SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'a> i64: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::Decode<'a, DB>,
    for<'a> &'a str: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::ColumnIndex<DB::Row>,
    for<'a> Option<&'a str>: sqlx::Encode<'a, DB>,
    for<'a> String: sqlx::Type<DB> + sqlx::Decode<'a, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    async fn events_of_kind(
        &self,
        kind: EventKind,
        not_before: i64,
        after_seq: i64,
        limit: i64,
    ) -> Result<Vec<EventNotice>, StoreError> {
        let sql = AssertSqlSafe(format!(
            "{NOTICE_FROM} WHERE e.kind = $1 AND e.received_at >= $2 AND e.seq > $3 ORDER BY e.seq LIMIT $4"
        ));
        let rows: Vec<NoticeRow> = sqlx::query_as(sql)
            .bind(kind.as_str())
            .bind(not_before)
            .bind(after_seq)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(EventNotice::try_from).collect()
    }

    async fn actions_done(&self, seqs: &[i64]) -> Result<Vec<(AgentId, i64)>, StoreError> {
        let mut done = Vec::new();
        for chunk in seqs.chunks(IN_LIST_CHUNK) {
            let mut q = QueryBuilder::<DB>::new("SELECT agent_id, seq FROM cluster_actions WHERE seq");
            push_in_list(&mut q, chunk.iter().copied());
            let rows: Vec<(i64, i64)> = q.build_query_as().fetch_all(&self.pool).await?;
            done.extend(rows);
        }
        Ok(done)
    }

    async fn record_action(&self, action: &ActionRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO cluster_actions (agent_id, seq, outcome, detail, done_at) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (agent_id, seq) DO NOTHING",
        )
        .bind(action.agent)
        .bind(action.seq)
        .bind(action.outcome.as_str())
        .bind(action.detail.as_str())
        .bind(action.done_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn recent_actions(&self, limit: i64) -> Result<Vec<ActionRecord>, StoreError> {
        let rows: Vec<(i64, i64, String, String, i64)> = sqlx::query_as(
            "SELECT agent_id, seq, outcome, detail, done_at FROM cluster_actions ORDER BY done_at DESC, seq DESC LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(agent, seq, outcome, detail, done_at)| ActionRecord { agent, seq, outcome, detail, done_at })
            .collect())
    }

    async fn prune_actions(&self, before: i64) -> Result<u64, StoreError> {
        let done =
            sqlx::query("DELETE FROM cluster_actions WHERE done_at < $1").bind(before).execute(&self.pool).await?;
        Ok(DB::rows_affected(&done))
    }
}
