//! Push intake through both doors, on both backends.

use std::time::Duration;

use base64::Engine as _;
use kas::domain::{ProjectPath, Visibility};
use kas::proto::event::{GitPushEvent, Project};
use kas::proto::notifications::rpc::GitPushEventRequest;
use kas::proto::notifications::rpc::notifications_client::NotificationsClient;
use serde_json::json;
use tonic::codec::CompressionEncoding;

use crate::support::{TestApp, TestDb, eventually, fixture};

const FIXTURES: [(&str, &str, &str, i64); 4] = [
    ("project-hook-push.json", "Push Hook", "mike/diaspora", 15),
    ("project-hook-tag-push.json", "Tag Push Hook", "jsmith/example", 1),
    ("system-hook-push.json", "System Hook", "mike/diaspora", 15),
    ("test-button-push.json", "Push Hook", "gitlab/gitlab", 15),
];

impl TestApp {
    /// POSTs a webhook with the right secret and the given extra headers.
    pub async fn webhook(
        &self,
        event: &str,
        body: impl Into<reqwest::Body>,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut req = self
            .client
            .post(self.url("/webhooks/gitlab"))
            .header("X-Gitlab-Token", &self.webhook_secret)
            .header("X-Gitlab-Event", event)
            .header("Content-Type", "application/json")
            .body(body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().await.unwrap()
    }

    /// A push webhook for `path` (id `id`, visibility level `level`).
    pub async fn push(&self, id: i64, path: &str, level: i64) -> reqwest::Response {
        let body = json!({"object_kind": "push", "ref": "refs/heads/main", "project": {"id": id, "path_with_namespace": path, "visibility_level": level}});
        self.webhook("Push Hook", body.to_string(), &[]).await
    }

    /// Number of events in the log.
    pub async fn logged(&self) -> usize {
        self.store.recent_pushes(100_000).await.unwrap().len()
    }
}

async fn every_fixture_is_recorded(db: TestDb) {
    let app = TestApp::spawn(&db, |_| {}).await;
    for (i, (file, event, path, id)) in FIXTURES.iter().enumerate() {
        let uuid = format!("uuid-{i}");
        let r = app.webhook(event, fixture(file), &[("X-Gitlab-Event-UUID", &uuid)]).await;
        assert_eq!(r.status(), 202, "{file}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["status"], "accepted");
        let logged = app.store.recent_pushes(1).await.unwrap().remove(0);
        assert_eq!((logged.project_path.as_str(), logged.project_id), (*path, *id), "{file}");
        assert_eq!(logged.seq, body["seq"].as_i64().unwrap());
    }
    let tag =
        app.store.recent_pushes(10).await.unwrap().into_iter().find(|l| l.project_path == "jsmith/example").unwrap();
    assert_eq!(tag.kind.as_str(), "tag_push");
    assert_eq!(tag.git_ref.as_deref(), Some("refs/tags/v1.0.0"));
    // The registry learned the visibility carried by the payloads, and follows a project id to
    // its new path (the test-button sample reuses id 15 under another path).
    let p = app.store.project_by_path(&ProjectPath::parse("jsmith/example").unwrap()).await.unwrap().unwrap();
    assert_eq!((p.id, p.visibility), (1, Some(Visibility::Private)));
    assert!(app.store.project_by_path(&ProjectPath::parse("mike/diaspora").unwrap()).await.unwrap().is_none());
    assert_eq!(app.store.project_by_path(&ProjectPath::parse("gitlab/gitlab").unwrap()).await.unwrap().unwrap().id, 15);
    // The outbox publishes them (the in-process engine cannot fail).
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.store.recent_pushes(10).await.unwrap().iter().all(|l| l.published_at.is_some())
        })
        .await,
        "every event published"
    );
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kas_webhooks_total{result=\"accepted\"} 4"), "{metrics}");
    app.stop().await;
}
crate::both_backends!(fixtures, every_fixture_is_recorded);

async fn redeliveries_are_recorded_once(db: TestDb) {
    let app = TestApp::spawn(&db, |_| {}).await;
    let body = fixture("project-hook-push.json");
    // Idempotency-Key wins over the event UUID, which GitLab may change on a resend.
    let first =
        app.webhook("Push Hook", body.clone(), &[("Idempotency-Key", "key-1"), ("X-Gitlab-Event-UUID", "a")]).await;
    assert_eq!(first.status(), 202);
    let again =
        app.webhook("Push Hook", body.clone(), &[("Idempotency-Key", "key-1"), ("X-Gitlab-Event-UUID", "b")]).await;
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<serde_json::Value>().await.unwrap()["status"], "duplicate");
    // Without Idempotency-Key, the event UUID de-duplicates.
    assert_eq!(app.webhook("Push Hook", body.clone(), &[("X-Gitlab-Event-UUID", "u-1")]).await.status(), 202);
    assert_eq!(app.webhook("Push Hook", body.clone(), &[("X-Gitlab-Event-UUID", "u-1")]).await.status(), 200);
    // Without either, every delivery is a new push.
    assert_eq!(app.webhook("Push Hook", body.clone(), &[]).await.status(), 202);
    assert_eq!(app.webhook("Push Hook", body.clone(), &[]).await.status(), 202);
    assert_eq!(app.logged().await, 4);
    // Concurrent redeliveries of one event: exactly one record.
    let results = futures::future::join_all(
        (0..20).map(|_| app.webhook("Push Hook", body.clone(), &[("Idempotency-Key", "burst")])),
    )
    .await;
    assert_eq!(results.iter().filter(|r| r.status() == 202).count(), 1);
    assert_eq!(results.iter().filter(|r| r.status() == 200).count(), 19);
    assert_eq!(app.logged().await, 5);
    app.stop().await;
}
crate::both_backends!(redeliveries, redeliveries_are_recorded_once);

async fn bad_input_changes_nothing(db: TestDb) {
    let app = TestApp::spawn(&db, |s| s.webhook_body_limit = Some("4KiB".into())).await;
    let body = fixture("project-hook-push.json");
    let url = app.url("/webhooks/gitlab");
    // Missing and wrong tokens.
    let r = app.client.post(&url).header("X-Gitlab-Event", "Push Hook").body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .post(&url)
        .header("X-Gitlab-Event", "Push Hook")
        .header("X-Gitlab-Token", "wrong")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let near = format!("{}x", app.webhook_secret);
    let r = app
        .client
        .post(&url)
        .header("X-Gitlab-Event", "Push Hook")
        .header("X-Gitlab-Token", near)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // Malformed bodies.
    for (event, bad) in [
        ("Push Hook", "{not json".to_owned()),
        ("Push Hook", "[]".to_owned()),
        ("Push Hook", r#"{"object_kind":"push","project":{"id":3}}"#.to_owned()),
        ("Push Hook", r#"{"object_kind":"push","project":{"path_with_namespace":"g/p"}}"#.to_owned()),
        ("Push Hook", r#"{"object_kind":"push","project":{"id":3,"path_with_namespace":"../etc"}}"#.to_owned()),
        ("System Hook", r#"{"event_name":"push","project_id":"15"}"#.to_owned()),
    ] {
        let r = app.webhook(event, bad.clone(), &[]).await;
        assert_eq!(r.status(), 400, "{bad}");
        assert!(r.json::<serde_json::Value>().await.unwrap()["error"].is_string());
    }
    let r =
        app.client.post(&url).header("X-Gitlab-Token", &app.webhook_secret).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 400, "missing X-Gitlab-Event");
    // Oversized, declared: answered from the headers alone (the body is never sent here).
    let head = format!(
        "POST /webhooks/gitlab HTTP/1.1\r\nHost: kas\r\nX-Gitlab-Token: {}\r\nX-Gitlab-Event: Push Hook\r\nContent-Length: 8192\r\n\r\n",
        app.webhook_secret
    );
    assert!(raw_http(app.http, head.as_bytes()).await.starts_with("HTTP/1.1 413"));
    // Oversized, chunked: refused once the limit is passed, without waiting for the rest.
    let mut chunked = format!(
        "POST /webhooks/gitlab HTTP/1.1\r\nHost: kas\r\nX-Gitlab-Token: {}\r\nX-Gitlab-Event: Push Hook\r\nTransfer-Encoding: chunked\r\n\r\n",
        app.webhook_secret
    )
    .into_bytes();
    for _ in 0..5 {
        chunked.extend_from_slice(format!("400\r\n{}\r\n", " ".repeat(1024)).as_bytes());
    }
    assert!(raw_http(app.http, &chunked).await.starts_with("HTTP/1.1 413"));
    // Ignored kinds get 200.
    for (event, body) in [
        ("Merge Request Hook", r#"{"object_kind":"merge_request"}"#),
        ("Issue Hook", r#"{"object_kind":"issue"}"#),
        ("Pipeline Hook", "{}"),
        ("System Hook", r#"{"event_name":"project_create","project_id":5}"#),
        ("System Hook", r#"{"event_name":"repository_update","project_id":5}"#),
    ] {
        let r = app.webhook(event, body, &[]).await;
        assert_eq!(r.status(), 200, "{event}");
        assert_eq!(r.json::<serde_json::Value>().await.unwrap()["status"], "ignored");
    }
    assert_eq!(app.logged().await, 0, "nothing recorded");
    assert!(app.store.project_by_path(&ProjectPath::parse("mike/diaspora").unwrap()).await.unwrap().is_none());
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        "kas_webhooks_total{result=\"unauthorized\"} 3",
        "kas_webhooks_total{result=\"bad_request\"} 7",
        "kas_webhooks_total{result=\"too_large\"} 2",
        "kas_webhooks_total{result=\"ignored\"} 5",
    ] {
        assert!(metrics.contains(line), "{line} missing in\n{metrics}");
    }
    app.stop().await;
}
crate::both_backends!(bad_input, bad_input_changes_nothing);

/// Concurrent pushes to overlapping projects are written by concurrent batches; they must never
/// deadlock on the project registry (PostgreSQL would abort one batch after a second: 503s).
async fn concurrent_overlapping_pushes(db: TestDb) {
    let app = TestApp::spawn(&db, |_| {}).await;
    let shared = &app;
    let pushes = (0..600).map(|i| async move {
        // Each burst touches the same 30 projects in a different order.
        let project = (i * 7 + i / 30) % 30;
        shared.push(1000 + project, &format!("g/p{project}"), (i % 3) * 10).await
    });
    let statuses: Vec<u16> = futures::future::join_all(pushes).await.iter().map(|r| r.status().as_u16()).collect();
    assert!(statuses.iter().all(|s| *s == 202), "{:?}", statuses.iter().filter(|s| **s != 202).collect::<Vec<_>>());
    assert_eq!(app.logged().await, 600);
    app.stop().await;
}
crate::both_backends!(overlapping_batches, concurrent_overlapping_pushes);

#[tokio::test]
async fn rotated_secrets_are_both_accepted() {
    let db = TestDb::sqlite();
    let file = db.data_dir().join("secrets");
    std::fs::write(&file, "old-secret-0123456789\nnew-secret-0123456789\n").unwrap();
    let path = file.display().to_string();
    let app = TestApp::spawn(&db, |s| s.webhook_secret_file = Some(path)).await;
    for secret in ["old-secret-0123456789", "new-secret-0123456789"] {
        let r = app
            .client
            .post(app.url("/webhooks/gitlab"))
            .header("X-Gitlab-Token", secret)
            .header("X-Gitlab-Event", "Push Hook")
            .body(fixture("project-hook-push.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202, "{secret}");
    }
    app.stop().await;
}

#[tokio::test]
async fn visibility_follows_the_payload() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |_| {}).await;
    let path = ProjectPath::parse("g/moving").unwrap();
    assert_eq!(app.push(9, "g/moving", 20).await.status(), 202);
    assert_eq!(app.store.project_by_path(&path).await.unwrap().unwrap().visibility, Some(Visibility::Public));
    assert_eq!(app.push(9, "g/moving", 0).await.status(), 202);
    assert_eq!(app.store.project_by_path(&path).await.unwrap().unwrap().visibility, Some(Visibility::Private));
    app.stop().await;
}

#[tokio::test]
async fn database_failure_is_503_and_retry_succeeds_later() {
    let db = TestDb::postgres().await;
    let app = TestApp::spawn(&db, |_| {}).await;
    db.cleanup().await; // this test's own database disappears under the server
    let r = app.webhook("Push Hook", fixture("project-hook-push.json"), &[("Idempotency-Key", "k")]).await;
    assert_eq!(r.status(), 503);
    drop(app);
}

#[tokio::test]
async fn old_events_are_pruned() {
    let db = TestDb::sqlite();
    let store = db.open_store().await;
    let old = kas::clock::now_ms() - 3_600_000;
    let recorded = store.record_pushes(&[crate::store_story::push("old", 1, "g/p", None, old)]).await.unwrap();
    let kas::domain::RecordOutcome::Recorded(old_notice) = &recorded[0] else { panic!("recorded") };
    store.mark_published(&[old_notice.seq], old + 1).await.unwrap();
    store.record_pushes(&[crate::store_story::push("new", 1, "g/p", None, kas::clock::now_ms())]).await.unwrap();
    store.close().await;
    let app = TestApp::spawn(&db, |s| s.event_retention = Some("30m".into())).await;
    assert!(
        eventually(Duration::from_secs(5), || async { app.logged().await == 1 }).await,
        "the hour-old event is pruned at start"
    );
    assert_eq!(app.store.recent_pushes(1).await.unwrap()[0].idempotency_key, "new");
    app.stop().await;
}

#[tokio::test]
async fn events_left_unpublished_are_swept() {
    // As if another replica recorded them and crashed before publishing.
    let db = TestDb::postgres().await;
    let app = TestApp::spawn(&db, |_| {}).await;
    let orphan = kas::clock::now_ms() - 10_000;
    app.store.record_pushes(&[crate::store_story::push("orphan", 1, "g/p", None, orphan)]).await.unwrap();
    let swept = eventually(Duration::from_secs(10), || async {
        app.store.recent_pushes(1).await.unwrap()[0].published_at.is_some()
    })
    .await;
    assert!(swept, "the sweeper published the orphaned event");
    app.stop().await;
    db.cleanup().await;
}

// ---- the GitLab-facing gRPC door ----

fn gitlab_secret() -> [u8; 32] {
    *b"0123456789abcdef0123456789abcdef"
}

/// A JWT built as GitLab Rails builds it (JSONWebToken::HMACToken): HS256, issuer = host.
pub fn gitlab_jwt(key: &[u8], aud: &str, exp_in: i64) -> String {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let claims = json!({"iss": "gitlab.example.com", "aud": aud, "iat": now, "nbf": now - 5, "exp": now + exp_in, "jti": "b0a5f2f3"});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )
    .unwrap()
}

/// Writes GitLab's shared secret (base64) into the data dir and returns its path.
pub fn write_gitlab_secret(db: &TestDb) -> String {
    let path = db.data_dir().join("gitlab-kas-secret");
    std::fs::write(&path, base64::engine::general_purpose::STANDARD.encode(gitlab_secret())).unwrap();
    path.display().to_string()
}

/// A client of the GitLab-facing listener, as GitLab Rails is.
pub async fn grpc_client(app: &TestApp) -> NotificationsClient<tonic::transport::Channel> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", app.api)).unwrap().connect().await.unwrap();
    NotificationsClient::new(channel).send_compressed(CompressionEncoding::Gzip)
}

fn git_push(id: i64, path: &str, jwt: Option<&str>) -> tonic::Request<GitPushEventRequest> {
    let mut r = tonic::Request::new(GitPushEventRequest {
        event: Some(GitPushEvent { project: Some(Project { id, full_path: path.into() }) }),
    });
    if let Some(jwt) = jwt {
        r.metadata_mut().insert("authorization", format!("Bearer {jwt}").parse().unwrap());
    }
    r
}

async fn git_push_event_door(db: TestDb) {
    let secret_path = write_gitlab_secret(&db);
    let app = TestApp::spawn(&db, |s| s.gitlab_secret_file = Some(secret_path.clone())).await;
    let mut client = grpc_client(&app).await;
    let key = gitlab_secret();
    client.git_push_event(git_push(42, "group/sub/app", Some(&gitlab_jwt(&key, "gitlab-kas", 60)))).await.unwrap();
    let logged = app.store.recent_pushes(1).await.unwrap().remove(0);
    assert_eq!(
        (logged.project_id, logged.project_path.as_str(), logged.source.as_str()),
        (42, "group/sub/app", "grpc")
    );

    for (what, jwt) in [
        ("expired", Some(gitlab_jwt(&key, "gitlab-kas", -120))),
        ("wrong audience", Some(gitlab_jwt(&key, "gitlab", 60))),
        ("wrong key", Some(gitlab_jwt(&[9; 32], "gitlab-kas", 60))),
        ("missing", None),
    ] {
        let err = client.git_push_event(git_push(42, "group/sub/app", jwt.as_deref())).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{what}");
    }
    let good = gitlab_jwt(&key, "gitlab-kas", 60);
    for (id, path) in [(0, "g/p"), (-3, "g/p"), (5, ""), (5, "not a path")] {
        let err = client.git_push_event(git_push(id, path, Some(&good))).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{id} {path:?}");
    }
    let mut empty = tonic::Request::new(GitPushEventRequest { event: None });
    empty.metadata_mut().insert("authorization", format!("Bearer {good}").parse().unwrap());
    assert_eq!(client.git_push_event(empty).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(app.logged().await, 1, "refused calls record nothing");

    // `kas push`, the CLI twin of GitLab's client.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .args([
            "push",
            "--addr",
            &format!("http://{}", app.api),
            "--secret-file",
            &secret_path,
            "--project-id",
            "7",
            "--full-path",
            "g/cli",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(app.store.recent_pushes(1).await.unwrap()[0].project_path, "g/cli");
    app.stop().await;
}
crate::both_backends!(git_push_event, git_push_event_door);

#[tokio::test]
async fn git_push_event_without_configured_secret_is_refused() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |_| {}).await;
    let mut client = grpc_client(&app).await;
    let err = client
        .git_push_event(git_push(1, "g/p", Some(&gitlab_jwt(&gitlab_secret(), "gitlab-kas", 60))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    app.stop().await;
}

#[tokio::test]
async fn git_push_event_database_down_is_unavailable() {
    let db = TestDb::postgres().await;
    let secret_path = write_gitlab_secret(&db);
    let app = TestApp::spawn(&db, |s| s.gitlab_secret_file = Some(secret_path)).await;
    let mut client = grpc_client(&app).await;
    db.cleanup().await;
    let err = client
        .git_push_event(git_push(1, "g/p", Some(&gitlab_jwt(&gitlab_secret(), "gitlab-kas", 60))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    drop(app);
}

/// Sends GitPushEvent as GitLab Rails does (valid JWT, gzip); panics on failure.
pub async fn send_git_push(client: &mut NotificationsClient<tonic::transport::Channel>, id: i64, path: &str) {
    client.git_push_event(git_push(id, path, Some(&gitlab_jwt(&gitlab_secret(), "gitlab-kas", 60)))).await.unwrap();
}

/// Writes `request` on a fresh connection (never finishing any body it announces) and returns
/// what the server answers.
async fn raw_http(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut answer))
        .await
        .expect("answer without the body")
        .unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}
