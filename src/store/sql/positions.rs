//! Agents' delivery positions, where they must outlive Redis.

use async_trait::async_trait;
use sqlx::QueryBuilder;

use super::{SqlBackend, SqlStore};
use crate::domain::AgentId;
use crate::store::{DeliveryPosition, PositionStore, StoreError};

/// Rows per statement of a batch save (three parameters each, within both backends' limits).
const SAVE_CHUNK: usize = 5000;

/// One statement saving `positions` (at most [`SAVE_CHUNK`]); a newer save replaces the stored
/// position.
fn upsert_positions<DB: SqlBackend>(positions: &[(AgentId, DeliveryPosition)]) -> QueryBuilder<DB>
where
    for<'a> i64: sqlx::Type<DB> + sqlx::Encode<'a, DB>,
{
    let mut q = QueryBuilder::new("INSERT INTO agent_positions (agent_id, seq, updated_at) ");
    q.push_values(positions, |mut row, (agent, p)| {
        row.push_bind(*agent).push_bind(p.seq).push_bind(p.at);
    });
    q.push(" ON CONFLICT (agent_id) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at");
    q
}

#[async_trait]
impl<DB: SqlBackend> PositionStore for SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'a> i64: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::Decode<'a, DB>,
    for<'a> &'a str: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::ColumnIndex<DB::Row>,
    for<'a> Option<&'a str>: sqlx::Encode<'a, DB>,
    for<'a> String: sqlx::Type<DB> + sqlx::Decode<'a, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    async fn save_position(&self, agent: AgentId, position: DeliveryPosition) -> Result<(), StoreError> {
        upsert_positions::<DB>(&[(agent, position)]).build().execute(&self.pool).await?;
        Ok(())
    }

    async fn save_positions(&self, positions: &[(AgentId, DeliveryPosition)]) -> Result<(), StoreError> {
        // One transaction, so the periodic save of thousands of agents costs the database one
        // commit (one WAL flush) next to the intake's, not one per chunk.
        let mut tx = self.pool.begin().await?;
        for chunk in positions.chunks(SAVE_CHUNK) {
            upsert_positions::<DB>(chunk).build().execute(&mut *tx).await?;
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
