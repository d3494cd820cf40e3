//! The container registry's notifications: `POST /webhooks/registry` records manifest pushes in
//! the event log under their project, answers the registry as it expects, and never tells an
//! agent stream about them (agentk reconciles Git repositories; image pushes are for cluster
//! actions).

use std::time::Duration;

use kas::domain::{EventKind, ProjectInfo, ProjectPath, RepositoryAccess, Visibility};

use crate::support::agent::{TestAgent, drain};
use crate::support::{TestApp, TestDb, fixture};

const V1: &str = "application/vnd.docker.distribution.events.v1+json";
const V2: &str = "application/vnd.docker.distribution.events.v2+json";

fn registry_secret(app: &TestApp) -> String {
    std::fs::read_to_string(app.data_dir.join("registry-secret")).unwrap().trim().to_owned()
}

async fn notify(app: &TestApp, authorization: &str, media: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    app.client
        .post(app.url("/webhooks/registry"))
        .header("authorization", authorization)
        .header("content-type", media)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn logged(app: &TestApp) -> Vec<kas::domain::LoggedEvent> {
    app.store.recent_pushes(100).await.unwrap()
}

async fn registry_pushes_are_recorded_under_their_project(db: TestDb) {
    let app = TestApp::spawn(&db, |s| s.webhook_body_limit = Some("8KiB".into())).await;
    let project = ProjectInfo {
        id: 42,
        path: ProjectPath::parse("group/app").unwrap(),
        visibility: Some(Visibility::Private),
        repository_access: RepositoryAccess::Everyone,
    };
    app.store.set_project(&project, kas::clock::now_ms()).await.unwrap();
    let secret = registry_secret(&app);
    let body = fixture("registry-push-v1.json");

    // Refused whole, nothing recorded: no or a wrong secret, the webhook or admin secret, a
    // foreign media type, broken JSON, an oversized body.
    for wrong in ["", "nope", &app.webhook_secret, &format!("Bearer {}", app.admin_secret)] {
        assert_eq!(notify(&app, wrong, V1, body.clone()).await.status(), 401, "{wrong:?}");
    }
    assert_eq!(notify(&app, &secret, "text/plain", body.clone()).await.status(), 415);
    assert_eq!(notify(&app, &secret, V1, "{\"events\":[").await.status(), 400);
    assert_eq!(notify(&app, &secret, V1, vec![b' '; 16 << 10]).await.status(), 413);
    assert!(logged(&app).await.is_empty());

    // The nested image maps to its project; the registry's retry is a duplicate.
    let first = notify(&app, &secret, V1, body.clone()).await;
    assert_eq!(first.status(), 200);
    let answer: serde_json::Value = first.json().await.unwrap();
    assert_eq!(answer["accepted"], 1, "{answer}");
    let again: serde_json::Value = notify(&app, &format!("Bearer {secret}"), V1, body).await.json().await.unwrap();
    assert_eq!((again["accepted"].as_u64(), again["duplicates"].as_u64()), (Some(0), Some(1)), "{again}");
    let events = logged(&app).await;
    assert_eq!(events.len(), 1);
    let e = &events[0];
    assert_eq!(
        (e.kind, e.project_id, e.project_path.as_str(), e.source.as_str()),
        (EventKind::ImagePush, 42, "group/app", "registry")
    );
    assert_eq!(e.git_ref.as_deref(), Some("v1.4.0"));
    assert!(e.after.as_deref().is_some_and(|d| d.starts_with("sha256:")));
    // The registry said nothing about visibility: the project stays as it was.
    let info = app.store.project_by_id(42).await.unwrap().unwrap();
    assert_eq!(info.visibility, Some(Visibility::Private));

    // A v2 envelope: the untagged manifest is recorded, the blob upload, pull and delete are
    // acknowledged and ignored.
    let mixed: serde_json::Value =
        notify(&app, &secret, V2, fixture("registry-mixed-v2.json")).await.json().await.unwrap();
    assert_eq!((mixed["accepted"].as_u64(), mixed["ignored"].as_u64()), (Some(1), Some(3)), "{mixed}");
    let newest = logged(&app).await.remove(0);
    assert_eq!((newest.project_id, newest.project_path.as_str(), newest.git_ref), (42, "group/app", None));
    // A repository of no known project: recorded under its own path and no project id.
    let stray = r#"{"events":[{"id":"stray-1","action":"push","target":{"repository":"other/thing/img","tag":"x"}}]}"#;
    let answer: serde_json::Value = notify(&app, &secret, "application/json", stray).await.json().await.unwrap();
    assert_eq!(answer["unknown_project"], 1, "{answer}");
    let newest = logged(&app).await.remove(0);
    assert_eq!((newest.project_id, newest.project_path.as_str()), (0, "other/thing/img"));
    let metrics = app.metrics_text().await;
    for line in [
        "kas_registry_events_total{result=\"accepted\"} 3",
        "kas_registry_events_total{result=\"unknown_project\"} 1",
        "kas_registry_events_total{result=\"duplicate\"} 1",
        "kas_registry_events_total{result=\"ignored\"} 3",
        "kas_registry_events_total{result=\"unauthorized\"} 4",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    app.stop().await;
}
crate::both_backends!(registry_intake, registry_pushes_are_recorded_under_their_project);

/// An agent watching the project hears about its Git pushes, not about its images.
#[tokio::test]
async fn image_pushes_never_reach_agent_streams() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |_| {}).await;
    let project = ProjectInfo {
        id: 7,
        path: ProjectPath::parse("team/config").unwrap(),
        visibility: Some(Visibility::Private),
        repository_access: RepositoryAccess::Everyone,
    };
    app.store.set_project(&project, kas::clock::now_ms()).await.unwrap();
    let (_, token) = app.create_agent("deployer", "team/config").await;
    let agent = TestAgent::connect(app.agent, &token).await;
    let mut stream = agent.open(&["team/config"]).await.unwrap();
    let body = r#"{"events":[{"id":"img-1","action":"push","target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","repository":"team/config","tag":"latest","digest":"sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}}]}"#;
    assert_eq!(notify(&app, &registry_secret(&app), V1, body).await.status(), 200);
    assert!(drain(&mut stream, Duration::from_millis(800)).await.is_empty(), "an image push reached agentk");
    assert_eq!(app.push(7, "team/config", 0).await.status(), 202);
    assert_eq!(drain(&mut stream, Duration::from_millis(800)).await, ["team/config"]);
    app.stop().await;
}
