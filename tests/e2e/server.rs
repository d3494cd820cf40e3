//! The server as a process and as a library: health, readiness, metrics, TLS, shutdown.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{TestApp, TestDb};

async fn health_readiness_metrics(db: TestDb) {
    let app = TestApp::spawn(&db, |_| {}).await;
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["checks"]["database"], "ok");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kas_webhooks_total") || metrics.contains("kas_events_recorded_total"), "{metrics}");
    assert!(metrics.contains("# EOF"));
    app.stop().await;
}
crate::both_backends!(health, health_readiness_metrics);

#[tokio::test]
async fn readyz_reports_postgres_failure() {
    let db = TestDb::postgres().await;
    let app = TestApp::spawn(&db, |_| {}).await;
    // Terminate the server's own database sessions and drop the database: a real outage of
    // exactly this test's database, nothing else.
    db.cleanup().await;
    let failing = crate::support::eventually(Duration::from_secs(10), || async {
        let r = app.client.get(app.url("/readyz")).send().await.unwrap();
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap();
        // Unauthenticated callers learn which part fails, never why.
        status == 503 && body["checks"]["database"] == "failing"
    })
    .await;
    assert!(failing, "readyz must name the database as failing");
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200, "liveness does not depend on the database");
    drop(app);
}

#[tokio::test]
async fn tls_on_every_listener() {
    crate::support::init();
    let db = TestDb::sqlite();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert_path, key_path) = (db.data_dir().join("tls.crt"), db.data_dir().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let app = TestApp::spawn(&db, |s| {
        s.tls_cert_file = Some(cert_path.display().to_string());
        s.tls_key_file = Some(key_path.display().to_string());
    })
    .await;
    assert!(app.url("/healthz").starts_with("https://"));
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Plain HTTP on a TLS listener gets nowhere.
    assert!(reqwest::Client::new().get(format!("http://{}/healthz", app.http)).send().await.is_err());
    // The gRPC listeners speak TLS too.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(cert.cert.pem()))
        .domain_name("localhost");
    for addr in [app.agent, app.api] {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("https://localhost:{}", addr.port())).unwrap();
        endpoint.tls_config(tls.clone()).unwrap().connect().await.expect("TLS gRPC connection");
    }
    app.stop().await;
}

#[test]
fn refuses_a_gitlab_secret_that_is_not_32_bytes() {
    let db = TestDb::sqlite();
    let secret = db.data_dir().join("gitlab-secret");
    std::fs::write(&secret, "c2hvcnQ=").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["serve", "--http-addr", "127.0.0.1:0", "--agent-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
        .env("KAS_DATA_DIR", db.data_dir())
        .env("KAS_GITLAB_SECRET_FILE", &secret)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("exactly 32"), "{err}");
}

/// The binary on the embedded default, stopped by SIGTERM: it drains and exits 0.
#[test]
fn sigterm_stops_the_binary_cleanly() {
    let db = TestDb::sqlite();
    let mut child = Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["serve", "--http-addr", "127.0.0.1:0", "--agent-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
        .env("KAS_DATA_DIR", db.data_dir())
        .env("KAS_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let http = loop {
        let line = lines.next().expect("server logs before exiting").unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON log lines");
        if v["message"] == "kas is serving" {
            break v["http"].as_str().unwrap().to_owned();
        }
    };
    let health = reqwest::blocking_get(&format!("http://{http}/healthz"));
    assert_eq!(health, 200);
    let started = std::time::Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(rest.iter().any(|l| l.contains("\"stopped\"")), "{rest:?}");
}

mod reqwest {
    pub use ::reqwest::*;

    /// A GET from a synchronous test, on a throwaway runtime; returns the status code.
    pub fn blocking_get(url: &str) -> u16 {
        tokio::runtime::Runtime::new().unwrap().block_on(async { ::reqwest::get(url).await.unwrap().status().as_u16() })
    }
}
