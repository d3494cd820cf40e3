//! Test support: fresh databases on either backend, a kas server on port 0, helpers.

#![allow(dead_code)]

pub mod agent;
pub mod agentk;
pub mod db;
pub mod flux;
pub mod gitlab;
pub mod kube;
pub mod process;
pub mod redis;
pub mod sync;
pub mod tunnel;
pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Once};
use std::time::Duration;

use kas::clock::now_ms;
use kas::config::Settings;
use kas::domain::{AgentName, AgentToken, ProjectPath};
use kas::store::{AgentRecord, Store};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use db::TestDb;

/// Runs a test body once against SQLite and once against PostgreSQL.
#[macro_export]
macro_rules! both_backends {
    ($name:ident, $body:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = $crate::support::TestDb::sqlite();
                super::$body(db.clone()).await;
                db.cleanup().await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let db = $crate::support::TestDb::postgres().await;
                super::$body(db.clone()).await;
                db.cleanup().await;
            }
        }
    };
}

/// Quiet unless `TEST_LOG` is set; installs the rustls crypto provider for clients.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        if std::env::var_os("TEST_LOG").is_some() {
            kas::telemetry::init(kas::config::LogFormat::Text, "debug");
        }
    });
}

/// A running server and what a test needs to talk to it.
pub struct TestApp {
    pub http: SocketAddr,
    pub agent: SocketAddr,
    pub api: SocketAddr,
    pub store: Arc<dyn Store>,
    pub db: TestDb,
    pub data_dir: PathBuf,
    pub webhook_secret: String,
    /// The admin secret (`GET /agents`).
    pub admin_secret: String,
    pub client: reqwest::Client,
    /// `http://<http listener>` or `https://localhost:<port>`.
    pub base: String,
    /// The running server's shared state (its library API).
    pub state: Arc<kas::app::App>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), kas::ServeError>>>,
}

impl TestApp {
    /// Starts kas on fresh port-0 listeners against `db`, after `tweak` adjusts the settings.
    pub async fn spawn(db: &TestDb, tweak: impl FnOnce(&mut Settings)) -> TestApp {
        init();
        let data_dir = db.data_dir();
        let mut settings = Settings {
            database_url: Some(db.url()),
            data_dir: Some(data_dir.display().to_string()),
            replica_name: Some(format!("test-{}", rand_suffix())),
            shutdown_grace: Some("5s".into()),
            ..Default::default()
        };
        tweak(&mut settings);
        let settings_tls = settings.tls_cert_file.clone();
        let config = settings.resolve().expect("test settings resolve");
        let data_dir = config.store.data_dir.clone();
        let listeners = kas::Listeners {
            http: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            agent: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            api: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let (http, agent, api) = (
            listeners.http.local_addr().unwrap(),
            listeners.agent.local_addr().unwrap(),
            listeners.api.local_addr().unwrap(),
        );
        let (tx, rx) = oneshot::channel::<()>();
        let (state_tx, state_rx) = oneshot::channel();
        let secret_file = config.webhook_secret_file.clone();
        let admin_file = config.admin_secret_file.clone().unwrap_or_else(|| data_dir.join("admin-secret"));
        let task = tokio::spawn(kas::server::serve_with_state(
            config,
            listeners,
            async move {
                let _ = rx.await;
            },
            Some(state_tx),
        ));
        // With TLS the client trusts the configured (self-signed) certificate and speaks https.
        let tls_cert = settings_tls.as_ref().map(|p| std::fs::read(p).unwrap());
        let mut client = reqwest::Client::builder().timeout(Duration::from_secs(15));
        if let Some(pem) = &tls_cert {
            client = client.tls_certs_only([reqwest::Certificate::from_pem(pem).unwrap()]);
        }
        let client = client.build().unwrap();
        let base =
            if tls_cert.is_some() { format!("https://localhost:{}", http.port()) } else { format!("http://{http}") };
        // Wait until the server answers, so tests never race its start.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = client.get(format!("{base}/healthz")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "server did not start");
            assert!(!task.is_finished(), "server exited during start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let secret_path = secret_file.unwrap_or_else(|| data_dir.join("webhook-secret"));
        let first_word = |path: &std::path::Path| {
            let text = std::fs::read_to_string(path).unwrap();
            let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap().to_owned();
            line.split_whitespace().next().unwrap().to_owned()
        };
        let webhook_secret = first_word(&secret_path);
        let admin_secret = first_word(&admin_file);
        let store = db.open_store().await;
        let state = state_rx.await.expect("the server hands over its state");
        TestApp {
            http,
            agent,
            api,
            store,
            db: db.clone(),
            data_dir,
            webhook_secret,
            admin_secret,
            client,
            base,
            state,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics_text(&self) -> String {
        self.client.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap()
    }

    /// `http://<http listener><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// Registers an agent directly in the store and returns it with its token.
    pub async fn create_agent(&self, name: &str, config_project: &str) -> (AgentRecord, String) {
        let token = AgentToken::generate();
        let (agent, _) = self
            .store
            .create_agent(
                &AgentName::parse(name).unwrap(),
                &ProjectPath::parse(config_project).unwrap(),
                &token.digest(),
                None,
                now_ms(),
            )
            .await
            .unwrap();
        (agent, token.expose().to_owned())
    }

    /// Stops the server and waits for it to finish; returns how long that took.
    pub async fn stop(mut self) -> Duration {
        let started = std::time::Instant::now();
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("server stops within 30s")
                .expect("server task")
                .expect("server ran without error");
        }
        self.store.close().await;
        started.elapsed()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Eight random hex characters.
pub fn rand_suffix() -> String {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A fixture from `tests/fixtures/`.
pub fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// Polls `check` every 20 ms until it returns true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
