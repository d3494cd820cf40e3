//! A fresh database per test: a SQLite file in a temporary directory, or a new PostgreSQL
//! database on the local server (`KAS_TEST_POSTGRES_URL`, default postgres://postgres@127.0.0.1:5432)
//! that the test drops again. Nothing the test did not create is touched.

use std::path::PathBuf;
use std::sync::Arc;

use kas::config::{Secret, StoreConfig};
use kas::store::Store;
use sqlx::Connection;

/// Where a test's data lives.
#[derive(Clone)]
pub struct TestDb {
    kind: Kind,
    dir: Arc<tempfile::TempDir>,
}

#[derive(Clone)]
enum Kind {
    Sqlite,
    Postgres { server: String, name: String },
}

fn postgres_server() -> String {
    std::env::var("KAS_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

impl TestDb {
    /// A SQLite database file in a new temporary directory.
    pub fn sqlite() -> Self {
        TestDb { kind: Kind::Sqlite, dir: Arc::new(tempfile::tempdir().unwrap()) }
    }

    /// A new, empty PostgreSQL database.
    pub async fn postgres() -> Self {
        let server = postgres_server();
        let name = format!("kas_test_{}", super::rand_suffix());
        let mut conn = sqlx::PgConnection::connect(&format!("{server}/postgres"))
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (see .ci/run)");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
        conn.close().await.unwrap();
        TestDb { kind: Kind::Postgres { server, name }, dir: Arc::new(tempfile::tempdir().unwrap()) }
    }

    /// The database URL kas is given.
    pub fn url(&self) -> String {
        match &self.kind {
            Kind::Sqlite => format!("sqlite://{}", self.dir.path().join("kas.db").display()),
            Kind::Postgres { server, name } => format!("{server}/{name}"),
        }
    }

    /// The data directory (secrets, SQLite file).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    /// Whether this is the PostgreSQL backend.
    pub fn is_postgres(&self) -> bool {
        matches!(self.kind, Kind::Postgres { .. })
    }

    /// Opens and migrates a store on this database.
    pub async fn open_store(&self) -> Arc<dyn Store> {
        let config = StoreConfig { database_url: Secret::new(self.url()), data_dir: self.data_dir() };
        let store = kas::store::open(&config).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    /// Drops the PostgreSQL database this test created (the temporary directory goes with
    /// the last clone).
    pub async fn cleanup(&self) {
        if let Kind::Postgres { server, name } = &self.kind
            && let Ok(mut conn) = sqlx::PgConnection::connect(&format!("{server}/postgres")).await
        {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
                .execute(&mut conn)
                .await;
            let _ = conn.close().await;
        }
    }
}
