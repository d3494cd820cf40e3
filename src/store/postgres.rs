//! PostgreSQL, for production and for several replicas sharing one registry and event log.

use std::time::Duration;

use sqlx::Postgres;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPoolOptions, PgQueryResult};

use super::StoreError;
use super::sql::{SqlBackend, SqlStore};

/// The PostgreSQL implementation of [`super::Store`].
pub type PostgresStore = SqlStore<Postgres>;

impl SqlBackend for Postgres {
    const MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

    fn rows_affected(done: &PgQueryResult) -> u64 {
        done.rows_affected()
    }
}

impl PostgresStore {
    /// Connects, retrying for a bounded time so a database that starts alongside kas (as in
    /// docker-compose) is waited for rather than fatal.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let options = PgPoolOptions::new().max_connections(16).acquire_timeout(Duration::from_secs(5));
        let mut attempt = 0;
        loop {
            match options.clone().connect(url).await {
                Ok(pool) => return Ok(Self { pool }),
                Err(e @ (sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut)) if attempt < 15 => {
                    attempt += 1;
                    tracing::warn!(error = %e, attempt, "PostgreSQL not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
