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

// ---------------------------------------------------------------------------------------------
// Through the tunnel: image pushes make Flux reconcile, once, only where allowed.

mod cluster {
    use std::time::Duration;

    use kas::domain::{ProjectInfo, ProjectPath, RepositoryAccess, Visibility};
    use serde_json::json;

    use super::{V1, notify, registry_secret};
    use crate::support::agentk::{Transport, connect};
    use crate::support::flux::{FluxCluster, Repo, Served};
    use crate::support::redis as test_redis;
    use crate::support::tunnel::{Behaviour, TunnelAgent};
    use crate::support::{TestApp, TestDb, eventually, fixture};

    const SOON: Duration = Duration::from_secs(15);
    const OPTED_IN: &str = "kas:\n  oci:\n    enabled: true\n";
    const URL: &str = "oci://registry.example.com/group/app/web";

    fn repos() -> Vec<Repo> {
        let r = |namespace, name, url: &str, reference| Repo { namespace, name, url: url.into(), reference };
        vec![
            r("flux-system", "web", URL, json!({"tag": "v1.4.0"})),
            r("apps", "web-v2", URL, json!({"tag": "v2.0.0"})),
            r("apps", "web-pinned", URL, json!({"digest": "sha256:00"})),
            r("apps", "api", "oci://registry.example.com/group/app/api", json!({"tag": "v1.4.0"})),
        ]
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

    /// An agent of `config_project` with `config`, and an agentk double with tunnels to `app`
    /// forwarding to `cluster`.
    async fn agent(
        app: &TestApp,
        name: &str,
        config_project: &str,
        config: &str,
        cluster: &FluxCluster,
    ) -> (i64, TunnelAgent) {
        let (record, token) = app.create_agent(name, config_project).await;
        app.store.set_agent_config(record.id, Some(config)).await.unwrap();
        (record.id, tunnels(app, &token, cluster).await)
    }

    async fn tunnels(app: &TestApp, token: &str, cluster: &FluxCluster) -> TunnelAgent {
        let (channel, _) = connect(app.agent, Transport::Plain).await;
        TunnelAgent::start(channel, token, cluster.base(), 2, Behaviour::Answer)
    }

    async fn actions(app: &TestApp) -> Vec<serde_json::Value> {
        let listed: serde_json::Value = app
            .client
            .get(app.url("/agents"))
            .bearer_auth(&app.admin_secret)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        listed["cluster_actions"].as_array().cloned().unwrap_or_default()
    }

    fn with_registry_host(s: &mut kas::config::Settings) {
        s.registry_host = Some("Registry.Example.com".into());
    }

    /// The owner's cluster gets one reconcile of exactly the object the tag moved; a stranger's
    /// cluster following the same private image gets nothing; an agent that did not opt in gets
    /// nothing; redeliveries and later sweeps do not patch again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_registry_push_reconciles_what_it_moved_once_and_only_where_allowed() {
        let db = TestDb::sqlite();
        let app = TestApp::spawn(&db, with_registry_host).await;
        project(&app, 42, "group/app", Visibility::Private).await;
        let owner_cluster = FluxCluster::start(Served::V1, repos()).await;
        let stranger_cluster = FluxCluster::start(Served::V1, repos()).await;
        let shy_cluster = FluxCluster::start(Served::V1, repos()).await;
        let (owner, _owner_tunnels) = agent(&app, "prod", "group/app", OPTED_IN, &owner_cluster).await;
        let (stranger, _t2) = agent(&app, "prod", "other/config", OPTED_IN, &stranger_cluster).await;
        let (shy, _t3) =
            agent(&app, "shy", "group/app", "observability:\n  logging:\n    level: info\n", &shy_cluster).await;
        let registry = app.state.tunnels.registry().clone();
        assert!(eventually(SOON, || async { [owner, stranger, shy].iter().all(|a| registry.holds(*a)) }).await);

        let secret = registry_secret(&app);
        assert_eq!(notify(&app, &secret, V1, fixture("registry-push-v1.json")).await.status(), 200);
        assert!(
            eventually(SOON, || async { !owner_cluster.patches().is_empty() }).await,
            "the owner's Flux was asked to reconcile"
        );
        let patch = &owner_cluster.patches()[0];
        assert_eq!(patch.path, "/apis/source.toolkit.fluxcd.io/v1/namespaces/flux-system/ocirepositories/web");
        assert_eq!(patch.content_type, "application/merge-patch+json");
        let requested = patch.body["metadata"]["annotations"]["reconcile.fluxcd.io/requestedAt"].as_str().unwrap();
        assert!(requested.ends_with('Z') && requested.len() == 24, "{requested}");
        assert!(
            eventually(SOON, || async {
                let a = actions(&app).await;
                a.iter().any(|a| a["agent"] == owner && a["outcome"] == "ok")
            })
            .await,
            "{:?}",
            actions(&app).await
        );

        // The registry's retry, and a sweep later: nothing more.
        notify(&app, &secret, V1, fixture("registry-push-v1.json")).await;
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(owner_cluster.patches().len(), 1, "patched once");
        assert!(stranger_cluster.patches().is_empty(), "a private project's image reached a stranger's cluster");
        assert!(shy_cluster.patches().is_empty(), "an agent that did not opt in was acted on");
        assert!(actions(&app).await.iter().all(|a| a["agent"] != stranger && a["agent"] != shy));
        assert!(_t3.received().is_empty(), "an agent that did not opt in was called");
        let metrics = app.metrics_text().await;
        assert!(metrics.contains("kas_oci_reconciles_total{result=\"ok\"} 1"), "{metrics}");
        assert!(metrics.contains("kas_registry_push_to_patch_seconds_count 1"), "{metrics}");
        app.stop().await;
    }

    /// An agent that connects after the push (within the replay window) still gets its
    /// reconcile, under `v1beta2` where `v1` is not served; a cluster that answers 403 is
    /// recorded as forbidden and not asked again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn late_agents_old_flux_and_refusing_clusters() {
        let db = TestDb::sqlite();
        let app = TestApp::spawn(&db, with_registry_host).await;
        project(&app, 42, "group/app", Visibility::Public).await;
        let secret = registry_secret(&app);
        assert_eq!(notify(&app, &secret, V1, fixture("registry-push-v1.json")).await.status(), 200);

        let old_flux = FluxCluster::start(Served::V1Beta2Only, repos()).await;
        let refusing = FluxCluster::start(Served::Forbidden, repos()).await;
        // A public project: any agent that opted in may hear about it.
        let (late, _t1) = agent(&app, "late", "team/late", OPTED_IN, &old_flux).await;
        let (locked, t2) = agent(&app, "locked", "team/locked", OPTED_IN, &refusing).await;
        assert!(eventually(SOON, || async { !old_flux.patches().is_empty() }).await, "the late agent was served");
        assert_eq!(
            old_flux.patches()[0].path,
            "/apis/source.toolkit.fluxcd.io/v1beta2/namespaces/flux-system/ocirepositories/web"
        );
        assert!(
            eventually(SOON, || async {
                actions(&app).await.iter().any(|a| a["agent"] == locked && a["outcome"] == "forbidden")
            })
            .await
        );
        let asked = t2.received().len();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(t2.received().len(), asked, "a refusing cluster was asked again");
        assert_eq!(old_flux.patches().len(), 1);
        let metrics = app.metrics_text().await;
        assert!(metrics.contains("kas_oci_reconciles_total{result=\"forbidden\"} 1"), "{metrics}");
        let _ = late;
        app.stop().await;
    }

    /// Two replicas both holding tunnels of the agent: one reconcile, whichever replica took
    /// the registry's notification.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_with_tunnels_reconcile_once() {
        let db = TestDb::postgres().await;
        let prefix = test_redis::prefix();
        let redis = |s: &mut kas::config::Settings| {
            with_registry_host(s);
            s.redis_url = Some(test_redis::SHARED.into());
            s.redis_prefix = Some(prefix.clone());
        };
        let a = TestApp::spawn(&db, redis).await;
        let b = TestApp::spawn(&db, redis).await;
        project(&a, 42, "group/app", Visibility::Private).await;
        let cluster = FluxCluster::start(Served::V1, repos()).await;
        let (record, token) = a.create_agent("prod", "group/app").await;
        a.store.set_agent_config(record.id, Some(OPTED_IN)).await.unwrap();
        let _on_a = tunnels(&a, &token, &cluster).await;
        let _on_b = tunnels(&b, &token, &cluster).await;
        let (ra, rb) = (a.state.tunnels.registry().clone(), b.state.tunnels.registry().clone());
        assert!(eventually(SOON, || async { ra.holds(record.id) && rb.holds(record.id) }).await);

        assert_eq!(notify(&b, &registry_secret(&a), V1, fixture("registry-push-v1.json")).await.status(), 200);
        assert!(eventually(SOON, || async { !cluster.patches().is_empty() }).await);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(cluster.patches().len(), 1, "both replicas acted");
        a.stop().await;
        b.stop().await;
        test_redis::cleanup(&prefix).await;
        db.cleanup().await;
    }

    /// A push taken before a restart, whose agent connects only afterwards, is still acted on:
    /// the event log, not memory, says what is owed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_push_survives_a_restart_until_its_agent_connects() {
        let db = TestDb::sqlite();
        let app = TestApp::spawn(&db, with_registry_host).await;
        project(&app, 42, "group/app", Visibility::Private).await;
        let (record, token) = app.create_agent("prod", "group/app").await;
        app.store.set_agent_config(record.id, Some(OPTED_IN)).await.unwrap();
        assert_eq!(notify(&app, &registry_secret(&app), V1, fixture("registry-push-v1.json")).await.status(), 200);
        app.stop().await;

        let app = TestApp::spawn(&db, with_registry_host).await;
        let cluster = FluxCluster::start(Served::V1, repos()).await;
        let _tunnels = tunnels(&app, &token, &cluster).await;
        assert!(
            eventually(SOON, || async { !cluster.patches().is_empty() }).await,
            "the push was owed after the restart"
        );
        assert_eq!(
            cluster.patches()[0].path,
            "/apis/source.toolkit.fluxcd.io/v1/namespaces/flux-system/ocirepositories/web"
        );
        app.stop().await;
    }
}
