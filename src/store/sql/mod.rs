//! The SQL both backends share, written once as code generic over the sqlx database. The
//! statements are portable (`$n` placeholders work on SQLite and PostgreSQL alike, times are
//! integer milliseconds), so [`SqlStore`] implements every storage role for any
//! [`SqlBackend`]; what differs between the two (connecting, pragmas, migrations) lives in
//! `sqlite.rs` and `postgres.rs`.
//!
//! Rows are read into `FromRow` structs (`rows.rs`) and turned into records in one place each.
//! The roles are implemented by file: `registry.rs` (agents, tokens, projects), `events.rs`
//! (the event log and its outbox), `positions.rs` (delivery positions); the database as a
//! whole is here.
//!
//! Every role impl carries the same `where` clause: what the shared SQL needs of a sqlx
//! database (executors on its connections, and encoding and decoding the few column types the
//! schema uses). Rust does not carry bounds on other types from a trait to its users, so they
//! cannot live in [`SqlBackend`]; both databases meet them.

mod actions;
mod events;
mod positions;
mod registry;
mod rows;
mod statuses;

use async_trait::async_trait;
use sqlx::migrate::{Migrate, Migrator};
use sqlx::{Database, Encode, IntoArguments, Pool, QueryBuilder, Type};

use super::{Lifecycle, StoreError};

/// A store on one sqlx database; [`super::SqliteStore`] and [`super::PostgresStore`] name the two.
pub struct SqlStore<DB: Database> {
    pub(super) pool: Pool<DB>,
}

/// What differs between the two databases beyond the connection: their migrations and how a
/// statement's row count is read (sqlx has no common accessor for it).
pub trait SqlBackend: Database<Connection: Migrate, Arguments: IntoArguments<Self>> {
    /// The embedded migrations for this database.
    const MIGRATOR: Migrator;
    /// Rows a statement changed.
    fn rows_affected(done: &Self::QueryResult) -> u64;
}

/// Largest IN-list per statement: far below both backends' bind-parameter limits.
const IN_LIST_CHUNK: usize = 1000;

/// Appends ` IN ($a, $b, …)` binding `values`: the one way an IN-list is written. `values` must
/// not be empty (`IN ()` is not SQL); lists that grow with the caller's input are chunked by
/// [`IN_LIST_CHUNK`].
fn push_in_list<'v, DB, T>(q: &mut QueryBuilder<DB>, values: impl IntoIterator<Item = T>)
where
    DB: Database,
    T: Encode<'v, DB> + Type<DB> + 'v,
{
    q.push(" IN (");
    let mut list = q.separated(", ");
    let mut empty = true;
    for value in values {
        list.push_bind(value);
        empty = false;
    }
    debug_assert!(!empty, "an empty IN-list is not SQL");
    q.push(")");
}

/// Maps a unique-constraint violation to a `Conflict` with the given message.
fn conflict_or(e: sqlx::Error, message: impl FnOnce() -> String) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::Conflict(message()),
        _ => StoreError::Unavailable(e),
    }
}

#[async_trait]
impl<DB: SqlBackend> Lifecycle for SqlStore<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
    for<'a> i64: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::Decode<'a, DB>,
    for<'a> &'a str: sqlx::Type<DB> + sqlx::Encode<'a, DB> + sqlx::ColumnIndex<DB::Row>,
    for<'a> Option<&'a str>: sqlx::Encode<'a, DB>,
    for<'a> String: sqlx::Type<DB> + sqlx::Decode<'a, DB>,
    usize: sqlx::ColumnIndex<DB::Row>,
{
    async fn migrate(&self) -> Result<(), StoreError> {
        DB::MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn shared_key(&self, name: &str, candidate: &str, now: i64) -> Result<String, StoreError> {
        sqlx::query(
            "INSERT INTO engine_keys (name, secret, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(candidate)
        .bind(now)
        .execute(&self.pool)
        .await?;
        let secret: String = sqlx::query_scalar("SELECT secret FROM engine_keys WHERE name = $1")
            .bind(name)
            .fetch_one(&self.pool)
            .await?;
        Ok(secret)
    }
}
