//! SQLite, the embedded default: one file in the data directory, WAL journal, fully
//! synchronous commits so an acknowledged push survives a crash.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Sqlite;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult, SqliteSynchronous};

use super::StoreError;
use super::sql::{SqlBackend, SqlStore};

/// The SQLite implementation of [`super::Store`].
pub type SqliteStore = SqlStore<Sqlite>;

impl SqlBackend for Sqlite {
    const MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

    fn rows_affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `url`; `data_dir` is created first so the
    /// default location works on a fresh machine.
    pub async fn open(url: &str, data_dir: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let io = |e| StoreError::Unavailable(sqlx::Error::Io(e));
        let file = options.get_filename().to_owned();
        for dir in [Some(data_dir), file.parent()].into_iter().flatten() {
            crate::files::create_private_dir_all(dir).map_err(io)?;
        }
        // Created private before SQLite sees it: SQLite gives its WAL and shared-memory files
        // the database file's mode, so all three stay 0600.
        let in_memory = file.as_os_str().is_empty() || file.as_os_str() == ":memory:";
        if !in_memory && !file.exists() {
            crate::files::create_private_file(&file).map_err(io)?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }
}
