//! ReconcileProjects through real gRPC clients: delivery, the access rule, coalescing, replay,
//! revocation, shutdown.

use std::time::Duration;

use kas::clock::now_ms;
use kas::domain::{ProjectInfo, ProjectPath, RepositoryAccess, Visibility};

use crate::support::agent::{TestAgent, drain, next_project};
use crate::support::{TestApp, TestDb, eventually};

const SOON: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(700);

async fn webhook_reaches_watching_agent(db: TestDb) {
    let app = TestApp::spawn(&db, |_| {}).await;
    let (_, token) = app.create_agent("deployer", "team/config").await;
    let agent = TestAgent::connect(app.agent, &token).await;
    let mut stream = agent.open(&["team/config"]).await.unwrap();
    assert_eq!(app.push(1, "team/config", 0).await.status(), 202);
    assert_eq!(next_project(&mut stream, SOON).await.as_deref(), Some("team/config"));
    // Pushes in sequence arrive in sequence.
    let (_, orderly_token) = app.create_agent("orderly", "team/config").await;
    let orderly = TestAgent::connect(app.agent, &orderly_token).await;
    let mut in_order = orderly.open(&["team/config", "team/a", "team/b"]).await.unwrap();
    for (id, p) in [(2, "team/a"), (3, "team/b"), (1, "team/config")] {
        app.push(id, p, 20).await;
        assert_eq!(next_project(&mut in_order, SOON).await.as_deref(), Some(p));
    }
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kas_streams_open{name=\"reconcile_projects\"} 2"), "{metrics}");
    assert!(metrics.contains("kas_connected_agents 2"), "{metrics}");
    assert!(metrics.contains("kas_intake_to_send_seconds_count"), "{metrics}");
    app.stop().await;
}
crate::both_backends!(delivery, webhook_reaches_watching_agent);

/// The security boundary, through the real server: private and internal projects reach their
/// own agent and no other, whatever the others ask for; public ones reach everyone who asks,
/// unless the repository is for members only.
async fn access_rule_end_to_end(db: TestDb) {
    let secret = crate::intake::write_gitlab_secret(&db);
    let app = TestApp::spawn(&db, |s| s.gitlab_secret_file = Some(secret)).await;
    let (_, own_token) = app.create_agent("own", "g/private-app").await;
    let (_, internal_token) = app.create_agent("internal-owner", "g/internal-app").await;
    let (_, other_token) = app.create_agent("other", "elsewhere/config").await;
    let every =
        ["g/private-app", "g/internal-app", "g/public-app", "g/public-members", "elsewhere/config", "never/seen"];
    let members_only = ProjectInfo {
        id: 4,
        path: ProjectPath::parse("g/public-members").unwrap(),
        visibility: Some(Visibility::Public),
        repository_access: RepositoryAccess::Members,
    };
    app.store.set_project(&members_only, now_ms()).await.unwrap();
    let own = TestAgent::connect(app.agent, &own_token).await;
    let internal = TestAgent::connect(app.agent, &internal_token).await;
    let other = TestAgent::connect(app.agent, &other_token).await;
    let mut own_s = own.open(&every).await.unwrap();
    let mut internal_s = internal.open(&every).await.unwrap();
    let mut other_s = other.open(&every).await.unwrap();

    for (id, path, level) in
        [(1, "g/private-app", 0), (2, "g/internal-app", 10), (3, "g/public-app", 20), (4, "g/public-members", 20)]
    {
        assert_eq!(app.push(id, path, level).await.status(), 202);
    }
    // GitLab's own door carries no visibility: a project kas never saw is private.
    let mut rails = crate::intake::grpc_client(&app).await;
    crate::intake::send_git_push(&mut rails, 77, "never/seen").await;

    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    assert_eq!(sorted(drain(&mut own_s, QUIET).await), ["g/private-app", "g/public-app"]);
    assert_eq!(sorted(drain(&mut internal_s, QUIET).await), ["g/internal-app", "g/public-app"]);
    assert_eq!(drain(&mut other_s, QUIET).await, ["g/public-app"]);

    // A project that turns private stops reaching other agents at once.
    assert_eq!(app.push(3, "g/public-app", 0).await.status(), 202);
    assert_eq!(drain(&mut own_s, QUIET).await, Vec::<String>::new());
    assert_eq!(drain(&mut other_s, QUIET).await, Vec::<String>::new());
    // A push to the private project through GitLab's door reaches its own agent only.
    crate::intake::send_git_push(&mut rails, 1, "g/private-app").await;
    assert_eq!(next_project(&mut own_s, SOON).await.as_deref(), Some("g/private-app"));
    assert!(next_project(&mut other_s, QUIET).await.is_none());
    assert!(next_project(&mut internal_s, Duration::from_millis(50)).await.is_none());
    app.stop().await;
}
crate::both_backends!(access_rule, access_rule_end_to_end);

/// A burst of 10,000 pushes to a project of a stream that cannot keep up becomes a handful of
/// messages, and another agent is not slowed by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_is_coalesced_and_slow_agent_does_not_slow_others() {
    let db = TestDb::sqlite();
    let secret = crate::intake::write_gitlab_secret(&db);
    let app = TestApp::spawn(&db, |s| s.gitlab_secret_file = Some(secret)).await;
    let (_, slow_token) = app.create_agent("slow", "g/hot").await;
    let (_, fast_token) = app.create_agent("fast", "g/other").await;
    let slow = TestAgent::connect_slow(app.agent, &slow_token).await;
    let fast = TestAgent::connect(app.agent, &fast_token).await;
    let mut slow_s = slow.open(&["g/hot"]).await.unwrap();
    let mut fast_s = fast.open(&["g/other"]).await.unwrap();

    let mut rails = crate::intake::grpc_client(&app).await;
    let burst = async {
        for chunk in 0..100 {
            let calls = (0..100).map(|_| {
                let mut c = rails.clone();
                async move { crate::intake::send_git_push(&mut c, 1, "g/hot").await }
            });
            futures::future::join_all(calls).await;
            if chunk % 25 == 0 {
                crate::intake::send_git_push(&mut rails.clone(), 2, "g/other").await;
            }
        }
    };
    // The fast agent keeps receiving during the burst while the slow one reads nothing.
    let fast_reader = async {
        let mut got = 0;
        while got < 4 {
            assert_eq!(next_project(&mut fast_s, Duration::from_secs(20)).await.as_deref(), Some("g/other"));
            got += 1;
        }
    };
    tokio::join!(burst, fast_reader);
    assert_eq!(app.logged().await, 10_004);
    let got = drain(&mut slow_s, QUIET).await;
    assert!(!got.is_empty() && got.iter().all(|p| p == "g/hot"));
    assert!(got.len() < 200, "10,000 pushes became {} messages", got.len());
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let coalesced: u64 =
        metrics.lines().find_map(|l| l.strip_prefix("kas_notifications_coalesced_total ")).unwrap().parse().unwrap();
    assert!(coalesced >= 9_000, "coalesced {coalesced}");
    // Not stuck: the next push still arrives.
    crate::intake::send_git_push(&mut rails, 1, "g/hot").await;
    assert_eq!(next_project(&mut slow_s, SOON).await.as_deref(), Some("g/hot"));
    app.stop().await;
}

async fn replay_after_disconnect(db: TestDb) {
    let app = TestApp::spawn(&db, |_| {}).await;
    let (agent_rec, token) = app.create_agent("roamer", "g/config").await;
    let agent = TestAgent::connect(app.agent, &token).await;
    let stream = agent.open(&["g/config", "g/app"]).await.unwrap();
    // Away: the stream and its connection close; the server saves the position.
    drop(stream);
    drop(agent);
    assert!(eventually(SOON, || async { app.store.load_position(agent_rec.id).await.unwrap().is_some() }).await);
    for _ in 0..50 {
        app.push(2, "g/app", 20).await;
    }
    app.push(3, "g/not-watched", 20).await;
    app.push(1, "g/config", 0).await;
    // Back: every project of its set pushed while away, once each.
    let agent = TestAgent::connect(app.agent, &token).await;
    let mut stream = agent.open(&["g/config", "g/app"]).await.unwrap();
    let mut got = drain(&mut stream, QUIET).await;
    got.sort();
    assert_eq!(got, ["g/app", "g/config"]);
    // Live delivery continues after the replay.
    app.push(2, "g/app", 20).await;
    assert_eq!(next_project(&mut stream, SOON).await.as_deref(), Some("g/app"));
    // A later reconnect that missed nothing gets nothing… beyond the overlap it documents:
    // events from the last two minutes before the position was saved are sent again.
    drop(stream);
    drop(agent);
    let agent = TestAgent::connect(app.agent, &token).await;
    let mut again = agent.open(&["g/config"]).await.unwrap();
    assert_eq!(drain(&mut again, QUIET).await, ["g/config"], "overlap re-sends, at least once");
    app.stop().await;
}
crate::both_backends!(replay, replay_after_disconnect);

#[tokio::test]
async fn no_replay_beyond_the_window() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |s| s.replay_window = Some("1s".into())).await;
    let (rec, token) = app.create_agent("late", "g/config").await;
    let agent = TestAgent::connect(app.agent, &token).await;
    drop(agent.open(&["g/config"]).await.unwrap());
    drop(agent);
    assert!(eventually(SOON, || async { app.store.load_position(rec.id).await.unwrap().is_some() }).await);
    app.push(1, "g/config", 0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let agent = TestAgent::connect(app.agent, &token).await;
    let mut stream = agent.open(&["g/config"]).await.unwrap();
    assert!(next_project(&mut stream, QUIET).await.is_none());
    app.stop().await;
}

#[tokio::test]
async fn replay_survives_a_restart_of_the_single_replica() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |_| {}).await;
    let (rec, token) = app.create_agent("patient", "g/config").await;
    let agent = TestAgent::connect(app.agent, &token).await;
    drop(agent.open(&["g/config"]).await.unwrap());
    drop(agent);
    assert!(eventually(SOON, || async { app.store.load_position(rec.id).await.unwrap().is_some() }).await);
    app.push(1, "g/config", 0).await;
    app.stop().await;
    // A new process: the in-memory engine starts empty, the database copy of the position remains.
    let app = TestApp::spawn(&db, |_| {}).await;
    let agent = TestAgent::connect(app.agent, &token).await;
    let mut stream = agent.open(&["g/config"]).await.unwrap();
    assert_eq!(next_project(&mut stream, SOON).await.as_deref(), Some("g/config"));
    app.stop().await;
}

#[tokio::test]
async fn tokens_are_checked_before_anything_is_sent() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |s| s.token_recheck = Some("200ms".into())).await;
    let (rec, token) = app.create_agent("checked", "g/config").await;
    for bad in ["", "glagent-unknown", "Bearer"] {
        let agent = TestAgent::connect(app.agent, bad).await;
        let err = agent.open(&["g/config"]).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
    }
    // Missing metadata altogether.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", app.agent)).unwrap().connect().await.unwrap();
    let mut raw = kas::proto::flux::rpc::git_lab_flux_client::GitLabFluxClient::new(channel);
    let err =
        raw.reconcile_projects(kas::proto::flux::rpc::ReconcileProjectsRequest { project: vec![] }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    // Empty project id.
    let agent = TestAgent::connect(app.agent, &token).await;
    assert_eq!(agent.open(&["g/config", ""]).await.unwrap_err().code(), tonic::Code::InvalidArgument);

    // Revoked while the stream is open: the stream closes within seconds.
    let mut stream = agent.open(&["g/config"]).await.unwrap();
    let token_id = app.store.list_tokens(rec.id).await.unwrap()[0].id;
    app.store.revoke_token(token_id, now_ms()).await.unwrap();
    let ended = tokio::time::timeout(SOON, stream.message()).await.expect("closed within seconds");
    assert_eq!(ended.unwrap_err().code(), tonic::Code::Unauthenticated);
    assert_eq!(agent.open(&["g/config"]).await.unwrap_err().code(), tonic::Code::Unauthenticated);
    app.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_ends_streams_cleanly() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |_| {}).await;
    let (_, token) = app.create_agent("leaver", "g/config").await;
    let agent = TestAgent::connect(app.agent, &token).await;
    let mut stream = agent.open(&["g/config"]).await.unwrap();
    let stopping = tokio::spawn(app.stop());
    // OK, the end agentk answers by reopening at once (on another replica).
    let end = tokio::time::timeout(SOON, stream.message()).await.expect("stream ends promptly");
    assert!(matches!(end, Ok(None)), "clean end, got {end:?}");
    let took = stopping.await.unwrap();
    assert!(took < Duration::from_secs(5), "shutdown did not wait for the grace period: {took:?}");
}

#[tokio::test]
async fn kas_watch_prints_notifications() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |_| {}).await;
    let (_, token) = app.create_agent("watcher", "g/config").await;
    let token_file = db.data_dir().join("token");
    std::fs::write(&token_file, &token).unwrap();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["watch", "--addr", &format!("http://{}", app.agent), "--token-file"])
        .arg(&token_file)
        .args(["--count", "1", "g/config"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The stream is open once the hub counts it.
    assert!(
        eventually(SOON, || async {
            app.metrics_text().await.contains("kas_streams_open{name=\"reconcile_projects\"} 1")
        })
        .await
    );
    app.push(1, "g/config", 0).await;
    let out = tokio::time::timeout(SOON, child.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success());
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(line["project"], "g/config");
    app.stop().await;
}
