//! Flux sync status: kas follows Kustomizations in opted-in clusters through agentk's tunnels
//! and reports them to GitLab as commit statuses, once, only to allowed projects, surviving a
//! GitLab that fails for a while, a restart and a second replica.

use std::time::Duration;

use kas::domain::{ProjectInfo, ProjectPath, RepositoryAccess, Visibility};
use serde_json::json;

use crate::support::agentk::{Transport, connect};
use crate::support::redis as test_redis;
use crate::support::sync::{
    FluxSync, Status, StatusGitLab, failed, git_repository, kustomization, oci_repository, ready, reconciling,
};
use crate::support::tunnel::{Behaviour, TunnelAgent};
use crate::support::{TestApp, TestDb, eventually};

const SOON: Duration = Duration::from_secs(20);
const TOKEN: &str = "glpat-status-token";
const SHA1: &str = "1111111111111111111111111111111111111111";
const SHA2: &str = "2222222222222222222222222222222222222222";
const SHA3: &str = "3333333333333333333333333333333333333333";
/// Opted in; statuses may go to its own project and to a private project of another namespace
/// (which the access rule still refuses).
const OPTED_IN: &str = "kas:\n  sync_status:\n    enabled: true\n    projects: [group/app, other/secret]\n";

fn rev(sha: &str) -> String {
    format!("main@sha1:{sha}")
}

/// Settings pointing kas at the stand-in GitLab, listing clusters every second.
fn settings(gitlab: &StatusGitLab, dir: &std::path::Path) -> impl Fn(&mut kas::config::Settings) + Clone + use<> {
    let token_file = dir.join("status-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let url = gitlab.url();
    move |s: &mut kas::config::Settings| {
        s.gitlab_status_url = Some(url.clone());
        s.gitlab_status_token_file = Some(token_file.display().to_string());
        s.gitlab_external_url = Some("https://gitlab.example.com".into());
        s.sync_status_interval = Some("1s".into());
    }
}

async fn project(app: &TestApp, id: i64, path: &str, visibility: Visibility) {
    let info = ProjectInfo {
        id,
        path: ProjectPath::parse(path).unwrap(),
        visibility: Some(visibility),
        repository_access: RepositoryAccess::Everyone,
    };
    app.store.set_project(&info, kas::clock::now_ms()).await.unwrap();
}

async fn tunnels(app: &TestApp, token: &str, cluster: &FluxSync) -> TunnelAgent {
    let (channel, _) = connect(app.agent, Transport::Plain).await;
    TunnelAgent::start(channel, token, cluster.base(), 2, Behaviour::Answer)
}

fn of(taken: &[Status], project: &str, sha: &str, name: &str, state: &str) -> usize {
    taken.iter().filter(|s| s.project == project && s.sha == sha && s.name == name && s.state == state).count()
}

async fn sync_view(app: &TestApp) -> Vec<serde_json::Value> {
    let listed: serde_json::Value =
        app.client.get(app.url("/agents")).bearer_auth(&app.admin_secret).send().await.unwrap().json().await.unwrap();
    listed["sync"].as_array().cloned().unwrap_or_default()
}

/// The story on one replica: reconciling → ready → a new revision fails; a GitLab that answers
/// 500 at first; projects not listed or not visible get nothing; an OCI artifact maps through its
/// annotations; push → synced is measured; a restart posts nothing twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux_states_reach_gitlab_once_and_only_where_allowed() {
    let db = TestDb::sqlite();
    let gitlab = StatusGitLab::start(TOKEN).await;
    let with = settings(&gitlab, &db.data_dir());
    let app = TestApp::spawn(&db, with.clone()).await;
    project(&app, 42, "group/app", Visibility::Private).await;
    project(&app, 43, "other/secret", Visibility::Private).await;
    project(&app, 44, "group/unlisted", Visibility::Public).await;
    // The push kas records for SHA1 starts the push → synced clock.
    let push = json!({"object_kind": "push", "ref": "refs/heads/main", "after": SHA1,
        "project": {"id": 42, "path_with_namespace": "group/app", "visibility_level": 0}});
    assert_eq!(app.webhook("Push Hook", push.to_string(), &[]).await.status(), 202);

    let cluster = FluxSync::start().await;
    cluster.set_sources(
        vec![
            git_repository("app", "https://gitlab.example.com/group/app.git", &rev(SHA1)),
            git_repository("secret", "ssh://git@gitlab.example.com/other/secret.git", &rev(SHA1)),
            git_repository("unlisted", "https://gitlab.example.com/group/unlisted", &rev(SHA1)),
        ],
        vec![oci_repository("manifests", "latest@sha256:abcd", "https://gitlab.example.com/group/app", &rev(SHA2))],
    );
    cluster.put(kustomization("apps", ("GitRepository", "app"), reconciling(&rev(SHA1))));
    cluster.put(kustomization("secret", ("GitRepository", "secret"), ready(&rev(SHA1))));
    cluster.put(kustomization("unlisted", ("GitRepository", "unlisted"), ready(&rev(SHA1))));
    cluster.put(kustomization("oci", ("OCIRepository", "manifests"), ready("latest@sha256:abcd")));
    gitlab.fail_next(2);

    let (record, token) = app.create_agent("prod", "group/app").await;
    app.store.set_agent_config(record.id, Some(OPTED_IN)).await.unwrap();
    let _tunnels = tunnels(&app, &token, &cluster).await;
    // An agent of the same project that did not opt in: its cluster is never asked.
    let shy_cluster = FluxSync::start().await;
    shy_cluster.set_sources(vec![git_repository("app", "https://gitlab.example.com/group/app", &rev(SHA1))], vec![]);
    shy_cluster.put(kustomization("apps", ("GitRepository", "app"), ready(&rev(SHA1))));
    let (shy, shy_token) = app.create_agent("shy", "group/app").await;
    app.store.set_agent_config(shy.id, Some("kas:\n  cluster_read: true\n")).await.unwrap();
    let _shy_tunnels = tunnels(&app, &shy_token, &shy_cluster).await;

    let name = "flux/prod/flux-system/apps";
    assert!(
        eventually(SOON, || async { of(&gitlab.taken(), "group/app", SHA1, name, "running") == 1 }).await,
        "running reached GitLab after its 500s: {:?}",
        gitlab.taken()
    );
    assert!(
        eventually(SOON, || async {
            of(&gitlab.taken(), "group/app", SHA2, "flux/prod/flux-system/oci", "success") == 1
        })
        .await,
        "the OCI artifact's commit got its status: {:?}",
        gitlab.taken()
    );
    let changed = std::time::Instant::now();
    cluster.put(kustomization("apps", ("GitRepository", "app"), ready(&rev(SHA1))));
    assert!(eventually(SOON, || async { of(&gitlab.taken(), "group/app", SHA1, name, "success") == 1 }).await);
    // Within one listing interval (1 s here) and a post.
    let delay = changed.elapsed();
    eprintln!("Flux Ready -> GitLab status: {delay:?}");
    assert!(delay < Duration::from_secs(3), "{delay:?}");
    let taken = gitlab.taken();
    let success = taken.iter().find(|s| s.state == "success" && s.name == name).unwrap();
    assert_eq!(success.description, format!("Applied revision: {}", rev(SHA1)));
    assert_eq!(success.git_ref.as_deref(), Some("main"));

    // A new commit that fails.
    cluster.put(kustomization(
        "apps",
        ("GitRepository", "app"),
        failed(&rev(SHA1), &rev(SHA3), "kustomize build failed"),
    ));
    assert!(eventually(SOON, || async { of(&gitlab.taken(), "group/app", SHA3, name, "failed") == 1 }).await);

    // Several looks later: each status once, nothing for the refused projects.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let taken = gitlab.taken();
    assert_eq!(taken.len(), 4, "{taken:?}");
    assert!(taken.iter().all(|s| s.project == "group/app"), "a status went to a refused project: {taken:?}");
    assert!(app.state.tunnels.registry().holds(shy.id));
    assert_eq!(shy_cluster.requests(), 0, "the cluster of an agent that did not opt in was listed");
    let metrics = app.metrics_text().await;
    for line in [
        "kas_sync_statuses_total{result=\"posted\"} 4",
        "kas_sync_statuses_total{result=\"not_allowed\"} 2",
        "kas_push_to_synced_seconds_count 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    let view = sync_view(&app).await;
    let apps = view.iter().find(|k| k["name"] == "apps").unwrap();
    assert_eq!((apps["state"].as_str(), apps["revision"].as_str()), (Some("failed"), Some(rev(SHA3).as_str())));
    assert_eq!(apps["reported"], "queued");
    let secret = view.iter().find(|k| k["name"] == "secret").unwrap();
    assert_eq!(secret["reported"], "not_allowed");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["agents", "--addr", &format!("http://{}", app.http), "--data-dir"])
        .arg(db.data_dir())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("FLUX SYNC"), "{table}");
    assert!(
        table.lines().any(|l| l.contains("flux-system/apps") && l.contains("failed") && l.contains(&rev(SHA3))),
        "{table}"
    );
    drop(_tunnels);
    app.stop().await;

    // After a restart the watcher sees everything afresh: nothing is posted twice.
    let app = TestApp::spawn(&db, with).await;
    let _tunnels = tunnels(&app, &token, &cluster).await;
    let registry = app.state.tunnels.registry().clone();
    assert!(eventually(SOON, || async { registry.holds(record.id) }).await);
    assert!(
        eventually(SOON, || async {
            app.metrics_text().await.contains("kas_sync_statuses_total{result=\"duplicate\"} 2")
        })
        .await,
        "the restarted watcher offered the current states again: {}",
        app.metrics_text().await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(gitlab.taken().len(), 4, "{:?}", gitlab.taken());
    assert_eq!(gitlab.refused(), 0, "kas posted what GitLab had");
    app.stop().await;
}

/// Two replicas both holding tunnels of the agent: each state is posted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_post_once() {
    let db = TestDb::postgres().await;
    let gitlab = StatusGitLab::start(TOKEN).await;
    let prefix = test_redis::prefix();
    let base = settings(&gitlab, &db.data_dir());
    let with = |s: &mut kas::config::Settings| {
        base(s);
        s.redis_url = Some(test_redis::SHARED.into());
        s.redis_prefix = Some(prefix.clone());
    };
    let a = TestApp::spawn(&db, with).await;
    let b = TestApp::spawn(&db, with).await;
    project(&a, 42, "group/app", Visibility::Private).await;
    let cluster = FluxSync::start().await;
    cluster.set_sources(vec![git_repository("app", "https://gitlab.example.com/group/app", &rev(SHA1))], vec![]);
    cluster.put(kustomization("apps", ("GitRepository", "app"), reconciling(&rev(SHA1))));
    let (record, token) = a.create_agent("prod", "group/app").await;
    // Default projects: the configuration project only.
    a.store.set_agent_config(record.id, Some("kas:\n  sync_status:\n    enabled: true\n")).await.unwrap();
    let _on_a = tunnels(&a, &token, &cluster).await;
    let _on_b = tunnels(&b, &token, &cluster).await;
    let (ra, rb) = (a.state.tunnels.registry().clone(), b.state.tunnels.registry().clone());
    assert!(eventually(SOON, || async { ra.holds(record.id) && rb.holds(record.id) }).await);

    let name = "flux/prod/flux-system/apps";
    assert!(eventually(SOON, || async { of(&gitlab.taken(), "group/app", SHA1, name, "running") == 1 }).await);
    cluster.put(kustomization("apps", ("GitRepository", "app"), ready(&rev(SHA1))));
    assert!(eventually(SOON, || async { of(&gitlab.taken(), "group/app", SHA1, name, "success") == 1 }).await);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(gitlab.taken().len(), 2, "{:?}", gitlab.taken());
    assert_eq!(gitlab.refused(), 0, "both replicas posted");
    a.stop().await;
    b.stop().await;
    test_redis::cleanup(&prefix).await;
    db.cleanup().await;
}

/// Without a GitLab URL and token for statuses, sync status is off: opted-in clusters are not
/// even listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_credentials_nothing_is_listed() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |_| {}).await;
    let cluster = FluxSync::start().await;
    cluster.put(kustomization("apps", ("GitRepository", "app"), ready(&rev(SHA1))));
    let (record, token) = app.create_agent("prod", "group/app").await;
    app.store.set_agent_config(record.id, Some(OPTED_IN)).await.unwrap();
    let _tunnels = tunnels(&app, &token, &cluster).await;
    let registry = app.state.tunnels.registry().clone();
    assert!(eventually(SOON, || async { registry.holds(record.id) }).await);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(cluster.requests(), 0);
    assert!(sync_view(&app).await.is_empty());
    app.stop().await;
}
