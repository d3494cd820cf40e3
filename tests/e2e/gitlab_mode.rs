//! GitLab as the source of truth, against a stand-in GitLab started by the test.

use std::time::Duration;

use kas::proto::agent_configuration::rpc::ConfigurationRequest;
use kas::proto::agent_configuration::rpc::agent_configuration_client::AgentConfigurationClient;

use crate::support::agent::{TestAgent, drain, next_project};
use crate::support::agentk::as_agent;
use crate::support::gitlab::{Agent, Mode, Project, StandInGitLab};
use crate::support::{TestApp, TestDb};

const SECRET: &[u8; 32] = b"0123456789abcdef0123456789abcdef";
const API_TOKEN: &str = "glpat-standin-config-reader";
const TOKEN: &str = "glagent-from-gitlab-valid-token";
const REVOKED: &str = "glagent-from-gitlab-revoked";
const QUIET: Duration = Duration::from_millis(700);
const SOON: Duration = Duration::from_secs(10);

/// A stand-in with one agent ("deployer", config project team/config, id 100) and the four kinds
/// of project, and kas pointed at it.
async fn setup(db: &TestDb, cache_ttl: &str) -> (StandInGitLab, TestApp) {
    let gitlab = StandInGitLab::start(SECRET, API_TOKEN).await;
    {
        let mut w = gitlab.state.world.lock().unwrap();
        let agent = Agent {
            id: 7,
            name: "deployer".into(),
            project_id: 100,
            project_path: "team/config".into(),
            revoked: false,
        };
        w.agents.insert(TOKEN.into(), agent.clone());
        w.agents.insert(REVOKED.into(), Agent { revoked: true, ..agent });
        for (path, id, visibility, everyone) in [
            ("team/config", 100, "private", true),
            ("team/public", 101, "public", true),
            ("team/public-members", 102, "public", false),
            ("team/internal", 103, "internal", true),
            ("team/private", 104, "private", true),
        ] {
            w.projects.insert(path.into(), Project { id, visibility, repository_for_everyone: everyone });
        }
        w.heads.insert((100, "main".into()), "1111111111111111111111111111111111111111".into());
        w.files.insert(
            (100, "1111111111111111111111111111111111111111".into(), ".gitlab/agents/deployer/config.yaml".into()),
            "flux:\n  webhook_receiver_url: http://receiver/one\n".into(),
        );
    }
    let secret_file = crate::intake::write_gitlab_secret(db);
    let api_token_file = db.data_dir().join("api-token");
    std::fs::write(&api_token_file, API_TOKEN).unwrap();
    let (url, ttl) = (gitlab.url(), cache_ttl.to_owned());
    let app = TestApp::spawn(db, move |s| {
        s.gitlab_url = Some(url);
        s.gitlab_secret_file = Some(secret_file);
        s.gitlab_api_token_file = Some(api_token_file.display().to_string());
        s.gitlab_cache_ttl = Some(ttl);
        s.token_recheck = Some("200ms".into());
    })
    .await;
    (gitlab, app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_with_gitlab_and_refusals_cached() {
    let db = TestDb::sqlite();
    let (gitlab, app) = setup(&db, "5m").await;
    let agent = TestAgent::connect(app.agent, TOKEN).await;
    let mut stream = agent.open(&["team/config"]).await.unwrap();
    assert_eq!(app.push(100, "team/config", 0).await.status(), 202);
    assert_eq!(next_project(&mut stream, SOON).await.as_deref(), Some("team/config"));
    // A second stream with the same token is served from the cache.
    let _second = agent.open(&["team/config"]).await.unwrap();
    assert_eq!(gitlab.calls_with("agent_info", TOKEN).len(), 1);

    for bad in [REVOKED, "glagent-nobody-knows-this"] {
        let client = TestAgent::connect(app.agent, bad).await;
        for _ in 0..5 {
            assert_eq!(client.open(&["team/config"]).await.unwrap_err().code(), tonic::Code::Unauthenticated, "{bad}");
        }
        assert_eq!(gitlab.calls_with("agent_info", bad).len(), 1, "refusal cached: one call for five attempts");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_is_what_gitlab_says() {
    let db = TestDb::sqlite();
    let (gitlab, app) = setup(&db, "5m").await;
    let agent = TestAgent::connect(app.agent, TOKEN).await;
    let every = ["team/config", "team/public", "team/public-members", "team/internal", "team/private"];
    let mut stream = agent.open(&every).await.unwrap();
    for (id, path, level) in [
        (100, "team/config", 0),
        (101, "team/public", 20),
        (102, "team/public-members", 20),
        (103, "team/internal", 10),
        (104, "team/private", 0),
    ] {
        assert_eq!(app.push(id, path, level).await.status(), 202);
    }
    let mut got = drain(&mut stream, QUIET).await;
    got.sort();
    assert_eq!(got, ["team/config", "team/public"]);
    // Its own configuration project needs no question; the other four were asked, once each.
    assert_eq!(gitlab.calls("verify_project_access"), 4);
    for (id, path, level) in [(101, "team/public", 20), (102, "team/public-members", 20)] {
        app.push(id, path, level).await;
    }
    assert_eq!(drain(&mut stream, QUIET).await, ["team/public"]);
    assert_eq!(gitlab.calls("verify_project_access"), 4, "cached per (agent, project)");

    // The public project turns private: the next push carries that, and GitLab is asked again.
    gitlab.state.world.lock().unwrap().projects.get_mut("team/public").unwrap().visibility = "private";
    app.push(101, "team/public", 0).await;
    assert!(next_project(&mut stream, QUIET).await.is_none(), "no longer sent");
    assert_eq!(gitlab.calls("verify_project_access"), 5);
    app.stop().await;
}

/// GitLab slow: still delivered. GitLab down: nothing private is sent, new tokens are not
/// accepted, and the notification waits; once GitLab is back it is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_slow_or_down_fails_closed_and_retries() {
    let db = TestDb::sqlite();
    let (gitlab, app) = setup(&db, "5m").await;
    let agent = TestAgent::connect(app.agent, TOKEN).await;
    let mut stream = agent.open(&["team/public", "team/internal"]).await.unwrap();
    gitlab.set_mode(Mode::Slow(Duration::from_millis(300)));
    app.push(101, "team/public", 20).await;
    assert_eq!(next_project(&mut stream, SOON).await.as_deref(), Some("team/public"));

    gitlab.set_mode(Mode::Down);
    app.push(103, "team/internal", 10).await;
    assert!(next_project(&mut stream, Duration::from_millis(1500)).await.is_none(), "fail closed");
    let newcomer = TestAgent::connect(app.agent, "glagent-new-while-down").await;
    assert_eq!(newcomer.open(&["team/public"]).await.unwrap_err().code(), tonic::Code::Unavailable);

    // GitLab comes back and allows it: the waiting notification goes out (retried, not dropped).
    gitlab.state.world.lock().unwrap().projects.get_mut("team/internal").unwrap().visibility = "public";
    gitlab.set_mode(Mode::Normal);
    assert_eq!(next_project(&mut stream, SOON).await.as_deref(), Some("team/internal"));
    app.stop().await;
}

/// GitLab answers 500 for one project's access check: that project is retried with backoff,
/// and every other project of the stream (the configuration project needs no question at all)
/// goes out meanwhile; once GitLab answers, the held-back project is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_failing_project_does_not_block_the_stream() {
    let db = TestDb::sqlite();
    let (gitlab, app) = setup(&db, "5m").await;
    gitlab
        .state
        .world
        .lock()
        .unwrap()
        .projects
        .insert("team/broken".into(), Project { id: 105, visibility: "broken", repository_for_everyone: true });
    let agent = TestAgent::connect(app.agent, TOKEN).await;
    let mut stream = agent.open(&["team/broken", "team/config", "team/public"]).await.unwrap();
    app.push(105, "team/broken", 20).await;
    app.push(100, "team/config", 0).await;
    app.push(101, "team/public", 20).await;
    let mut got = drain(&mut stream, Duration::from_millis(1500)).await;
    got.sort();
    assert_eq!(got, ["team/config", "team/public"], "the failing project holds nothing back");
    assert!(gitlab.calls("verify_project_access") >= 2, "the failing project is retried");
    // More pushes to the failing project wait with it; the agent hears it once GitLab answers.
    app.push(105, "team/broken", 20).await;
    gitlab.state.world.lock().unwrap().projects.get_mut("team/broken").unwrap().visibility = "public";
    assert_eq!(next_project(&mut stream, SOON).await.as_deref(), Some("team/broken"));
    assert!(next_project(&mut stream, QUIET).await.is_none(), "coalesced into one notification");
    assert!(!app.metrics_text().await.contains("kas_access_check_failures_total 0"));
    app.stop().await;
}

/// While a stream is open, its token reaches GitLab once per cache period (what keeps the agent
/// "Connected"), no more often, and not at all once the stream is gone; a token GitLab revokes
/// closes the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_streams_keep_the_agent_connected_in_gitlab() {
    let db = TestDb::sqlite();
    let (gitlab, app) = setup(&db, "1s").await;
    let agent = TestAgent::connect(app.agent, TOKEN).await;
    let mut stream = agent.open(&["team/config"]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let calls = gitlab.calls_with("agent_info", TOKEN);
    assert!((4..=6).contains(&calls.len()), "one refresh per second while open, got {}", calls.len());
    for pair in calls.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_millis(900), "no more often than the cache period");
    }
    // Revoked in GitLab: the stream closes at the next refresh.
    gitlab.state.world.lock().unwrap().agents.get_mut(TOKEN).unwrap().revoked = true;
    let end = tokio::time::timeout(SOON, stream.message()).await.expect("closed within seconds");
    assert_eq!(end.unwrap_err().code(), tonic::Code::Unauthenticated);
    let after = gitlab.calls_with("agent_info", TOKEN).len();
    drop(agent);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(gitlab.calls_with("agent_info", TOKEN).len(), after, "no calls once no stream holds the token");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_comes_from_the_repository_and_follows_pushes() {
    let db = TestDb::sqlite();
    let (gitlab, app) = setup(&db, "5m").await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", app.agent)).unwrap().connect().await.unwrap();
    let mut client = AgentConfigurationClient::new(channel);
    let request = || ConfigurationRequest { commit_id: String::new(), agent_meta: None, skip_register: true };
    let mut stream = client.get_configuration(as_agent(TOKEN, request())).await.unwrap().into_inner();
    let first = tokio::time::timeout(SOON, stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(first.commit_id, "1111111111111111111111111111111111111111", "the branch head");
    let c = first.configuration.unwrap();
    assert_eq!((c.agent_id, c.project_id, c.project_path.as_str()), (7, 100, "team/config"));
    assert_eq!(c.flux.unwrap().webhook_receiver_url, "http://receiver/one");

    // A new commit changes the file; the push to the configuration project makes kas re-read it
    // at once (not at the next poll, minutes away).
    {
        let mut w = gitlab.state.world.lock().unwrap();
        w.heads.insert((100, "main".into()), "2222222222222222222222222222222222222222".into());
        w.files.insert(
            (100, "2222222222222222222222222222222222222222".into(), ".gitlab/agents/deployer/config.yaml".into()),
            "flux:\n  webhook_receiver_url: http://receiver/two\n".into(),
        );
    }
    assert_eq!(app.push(100, "team/config", 0).await.status(), 202);
    let second = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("re-read on push")
        .unwrap()
        .unwrap();
    assert_eq!(second.commit_id, "2222222222222222222222222222222222222222");
    assert_eq!(second.configuration.unwrap().flux.unwrap().webhook_receiver_url, "http://receiver/two");

    // The file removed: an empty configuration.
    gitlab
        .state
        .world
        .lock()
        .unwrap()
        .heads
        .insert((100, "main".into()), "3333333333333333333333333333333333333333".into());
    app.push(100, "team/config", 0).await;
    let third = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(third.commit_id, "3333333333333333333333333333333333333333");
    assert!(third.configuration.unwrap().flux.is_none());

    // A broken file ends the stream with FAILED_PRECONDITION naming the problem.
    {
        let mut w = gitlab.state.world.lock().unwrap();
        w.heads.insert((100, "main".into()), "4444444444444444444444444444444444444444".into());
        w.files.insert(
            (100, "4444444444444444444444444444444444444444".into(), ".gitlab/agents/deployer/config.yaml".into()),
            "flux:\n  webhook_reciever_url: http://typo\n".into(),
        );
    }
    app.push(100, "team/config", 0).await;
    let err = tokio::time::timeout(Duration::from_secs(5), stream.message()).await.unwrap().unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("webhook_reciever_url"), "{}", err.message());
    app.stop().await;
}

#[test]
fn gitlab_mode_needs_the_shared_secret() {
    let db = TestDb::sqlite();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["serve", "--http-addr", "127.0.0.1:0", "--agent-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
        .env("KAS_DATA_DIR", db.data_dir())
        .env("KAS_GITLAB_URL", "http://127.0.0.1:9")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("KAS_GITLAB_SECRET_FILE"));
}
