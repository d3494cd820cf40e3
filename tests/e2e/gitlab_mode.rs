//! GitLab as the source of truth, against a stand-in GitLab started by the test: each GitLab
//! version's paths and headers, private CAs, what Rails asks kas in this mode, and what
//! strangers and oversized answers cannot do.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kas::proto::agent_configuration::rpc::ConfigurationRequest;
use kas::proto::agent_configuration::rpc::agent_configuration_client::AgentConfigurationClient;

use crate::support::agent::{TestAgent, drain, next_project};
use crate::support::agentk::as_agent;
use crate::support::gitlab::{Agent, Mode, Project, StandInGitLab, Version};
use crate::support::wire;
use crate::support::{TestApp, TestDb};

const SECRET: &[u8; 32] = b"0123456789abcdef0123456789abcdef";
const API_TOKEN: &str = "glpat-standin-config-reader";
const TOKEN: &str = "glagent-from-gitlab-valid-token";
const REVOKED: &str = "glagent-from-gitlab-revoked";
/// A token as an instance with a token prefix issues it: passed to GitLab as it is.
const PREFIXED: &str = "inst42-glagent-prefixed-by-the-instance_Xy9";
const THIRD: &str = "glagent-third-agent-token";
const HEAD: &str = "1111111111111111111111111111111111111111";
const QUIET: Duration = Duration::from_millis(700);
const SOON: Duration = Duration::from_secs(10);
const LEGACY_PATH: &str = "/api/v4/internal/kubernetes/agent_info";
const AGENTK_PATH: &str = "/api/v4/internal/agents/agentk/agent_info";

/// One agent ("deployer", config project team/config, id 100) with a revoked token, two more
/// agents of the same project, the four kinds of project, and a configuration file.
fn populate(gitlab: &StandInGitLab) {
    let mut w = gitlab.state.world.lock().unwrap();
    let agent =
        Agent { id: 7, name: "deployer".into(), project_id: 100, project_path: "team/config".into(), revoked: false };
    w.agents.insert(TOKEN.into(), agent.clone());
    w.agents.insert(REVOKED.into(), Agent { revoked: true, ..agent.clone() });
    w.agents.insert(PREFIXED.into(), Agent { id: 8, name: "second".into(), ..agent.clone() });
    w.agents.insert(THIRD.into(), Agent { id: 9, name: "third".into(), ..agent });
    for (path, id, visibility, everyone) in [
        ("team/config", 100, "private", true),
        ("team/public", 101, "public", true),
        ("team/public-members", 102, "public", false),
        ("team/internal", 103, "internal", true),
        ("team/private", 104, "private", true),
    ] {
        w.projects.insert(path.into(), Project { id, visibility, repository_for_everyone: everyone });
    }
    w.heads.insert((100, "main".into()), HEAD.into());
    w.files.insert(
        (100, HEAD.into(), ".gitlab/agents/deployer/config.yaml".into()),
        "flux:\n  webhook_receiver_url: http://receiver/one\n".into(),
    );
}

/// kas in GitLab mode against `url`.
async fn kas_for(db: &TestDb, url: String, cache_ttl: &str, tweak: impl FnOnce(&mut kas::config::Settings)) -> TestApp {
    let secret_file = crate::intake::write_gitlab_secret(db);
    let api_token_file = db.data_dir().join("api-token");
    std::fs::write(&api_token_file, API_TOKEN).unwrap();
    let ttl = cache_ttl.to_owned();
    TestApp::spawn(db, move |s| {
        s.gitlab_url = Some(url);
        s.gitlab_secret_file = Some(secret_file);
        s.gitlab_api_token_file = Some(api_token_file.display().to_string());
        s.gitlab_cache_ttl = Some(ttl);
        s.token_recheck = Some("200ms".into());
        tweak(s);
    })
    .await
}

/// A stand-in GitLab 18 with the world above, and kas pointed at it.
async fn setup(db: &TestDb, cache_ttl: &str) -> (StandInGitLab, TestApp) {
    setup_version(db, cache_ttl, Version::V18).await
}

async fn setup_version(db: &TestDb, cache_ttl: &str, version: Version) -> (StandInGitLab, TestApp) {
    let gitlab = StandInGitLab::start_version(SECRET, API_TOKEN, version).await;
    populate(&gitlab);
    let app = kas_for(db, gitlab.url(), cache_ttl, |_| {}).await;
    (gitlab, app)
}

/// Each GitLab version reads the agent token from its own header and serves `agent_info` on its
/// own path; kas satisfies every one, asks the path that worked last, and never rejects a token
/// for its shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gitlab_version_gets_the_token_where_it_reads_it() {
    for version in [Version::V16, Version::V17, Version::V18, Version::Newest] {
        let db = TestDb::sqlite();
        let (gitlab, app) = setup_version(&db, "5m", version).await;
        let agent = TestAgent::connect(app.agent, TOKEN).await;
        let mut stream =
            agent.open(&["team/public", "team/private"]).await.unwrap_or_else(|e| panic!("{version:?}: {e}"));
        assert_eq!(app.push(101, "team/public", 20).await.status(), 202);
        assert_eq!(app.push(104, "team/private", 0).await.status(), 202);
        assert_eq!(drain(&mut stream, QUIET).await, ["team/public"], "{version:?}");
        assert_eq!(
            gitlab.calls_with("verify_project_access", TOKEN).len(),
            2,
            "{version:?}: verify_project_access carried the token where this version reads it"
        );
        let second = TestAgent::connect(app.agent, PREFIXED).await;
        second.open(&["team/config"]).await.unwrap_or_else(|e| panic!("{version:?}: {e}"));
        let expected = match version {
            // The new path first (404), then the old one, remembered for the next token.
            Version::V16 | Version::V17 => vec![AGENTK_PATH, LEGACY_PATH, LEGACY_PATH],
            Version::V18 | Version::Newest => vec![AGENTK_PATH, AGENTK_PATH],
        };
        assert_eq!(gitlab.paths("agent_info"), expected, "{version:?}");
        app.stop().await;
    }
}

/// GitLab upgraded under a running kas (the old path gone): the remembered path answers 404, kas
/// asks the other one and remembers that instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gitlab_upgrade_under_kas_is_followed() {
    let db = TestDb::sqlite();
    let (gitlab, app) = setup_version(&db, "5m", Version::V16).await;
    TestAgent::connect(app.agent, TOKEN).await.open(&["team/config"]).await.unwrap();
    gitlab.set_version(Version::Newest);
    TestAgent::connect(app.agent, PREFIXED).await.open(&["team/config"]).await.unwrap();
    TestAgent::connect(app.agent, THIRD).await.open(&["team/config"]).await.unwrap();
    assert_eq!(gitlab.paths("agent_info"), [AGENTK_PATH, LEGACY_PATH, LEGACY_PATH, AGENTK_PATH, AGENTK_PATH]);
    app.stop().await;
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

/// agentk opens several calls at once with a token kas does not know yet: GitLab is asked once,
/// and the others get its answer (a good one or a refusal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_with_a_new_token_ask_gitlab_once() {
    let db = TestDb::sqlite();
    let (gitlab, app) = setup(&db, "5m").await;
    gitlab.set_mode(Mode::Slow(Duration::from_millis(200)));
    for (token, ok) in [(THIRD, true), ("glagent-nobody-knows-this-either", false)] {
        let agent = TestAgent::connect(app.agent, token).await;
        let opens = (0..10).map(|_| agent.open(&["team/config"]));
        for result in futures::future::join_all(opens).await {
            match result {
                Ok(_) => assert!(ok, "{token}"),
                Err(status) => assert!(!ok && status.code() == tonic::Code::Unauthenticated, "{token}: {status:?}"),
            }
        }
        assert_eq!(gitlab.calls_with("agent_info", token).len(), 1, "{token}: one lookup for ten calls");
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

/// GitLab's "Connect a cluster" list in this mode: the agents with a configuration file on the
/// project's default branch, read from the repository tree (several pages of it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_files_come_from_the_repository_tree() {
    let db = TestDb::sqlite();
    let (gitlab, app) = setup(&db, "5m").await;
    let mut expected = vec!["deployer".to_owned()];
    {
        let mut w = gitlab.state.world.lock().unwrap();
        let mut add = |path: String| w.files.insert((100, HEAD.into(), path), "{}\n".into());
        for i in 0..150 {
            expected.push(format!("agent-{i:03}"));
            add(format!(".gitlab/agents/agent-{i:03}/config.yaml"));
        }
        // Not an agent's configuration file.
        for path in [
            ".gitlab/agents/Not_A_Name/config.yaml",
            ".gitlab/agents/deployer/notes.md",
            ".gitlab/agents/nested/deeper/config.yaml",
            ".gitlab/agents/config.yaml",
            "README.md",
        ] {
            add(path.into());
        }
    }
    expected.sort();
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", app.api)).unwrap().connect().await.unwrap();
    let list = |path: &str| {
        let jwt = crate::intake::gitlab_jwt(SECRET, "gitlab-kas", 60);
        let request = wire::as_rails(&jwt, wire::list_config_files_request(100, path));
        let channel = channel.clone();
        async move {
            wire::unary::<_, wire::ListAgentConfigFilesResponse>(
                &channel,
                wire::LIST_AGENT_CONFIG_FILES,
                request,
                false,
            )
            .await
        }
    };
    let files = list("team/config").await.unwrap().config_files;
    let mut names: Vec<String> = files.iter().map(|f| f.agent_name.clone()).collect();
    names.sort();
    assert_eq!(names, expected);
    assert!(files.iter().all(|f| f.name == format!(".gitlab/agents/{}/config.yaml", f.agent_name)));
    assert!(gitlab.calls("tree") >= 4, "several pages read");
    assert!(list("team/public").await.unwrap().config_files.is_empty(), "a project without .gitlab/agents");
    gitlab.set_mode(Mode::Down);
    assert_eq!(list("team/config").await.unwrap_err().code(), tonic::Code::Unavailable);
    app.stop().await;
}

/// The seed's service-proxy Receiver URL in the repository's file reaches agentk unchanged, and
/// the configuration stream stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_proxy_receiver_url_reaches_the_agent() {
    const URL: &str = "/api/v1/namespaces/flux-system/services/http:webhook-receiver:80/proxy";
    let db = TestDb::sqlite();
    let (gitlab, app) = setup(&db, "5m").await;
    gitlab.state.world.lock().unwrap().files.insert(
        (100, HEAD.into(), ".gitlab/agents/deployer/config.yaml".into()),
        format!("flux:\n  webhook_receiver_url: {URL}\n"),
    );
    let (channel, _) = crate::support::agentk::connect(app.agent, crate::support::agentk::Transport::Plain).await;
    let mut stream = crate::agentk::get_configuration(&channel, TOKEN, "").await;
    let first = crate::agentk::next_config(&mut stream, SOON).await.expect("configuration sent");
    assert_eq!(first.configuration.unwrap().flux.unwrap().webhook_receiver_url, URL);
    assert!(crate::agentk::next_config(&mut stream, QUIET).await.is_none(), "stream stays open");
    app.stop().await;
}

/// GitLab over https with a certificate from a private CA: trusted with KAS_GITLAB_CA_FILE,
/// refused (and nobody let in) without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_ca_for_gitlab() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "kas test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();
    let gitlab = StandInGitLab::start_tls(SECRET, API_TOKEN, &cert.pem(), &key.serialize_pem()).await;
    populate(&gitlab);

    let db = TestDb::sqlite();
    let ca_file = db.data_dir().join("gitlab-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let trusting = kas_for(&db, gitlab.url(), "5m", |s| s.gitlab_ca_file = Some(ca_file.display().to_string())).await;
    let agent = TestAgent::connect(trusting.agent, TOKEN).await;
    let mut stream = agent.open(&["team/public"]).await.expect("GitLab's certificate is trusted");
    trusting.push(101, "team/public", 20).await;
    assert_eq!(next_project(&mut stream, SOON).await.as_deref(), Some("team/public"));
    trusting.stop().await;

    let other = TestDb::sqlite();
    let untrusting = kas_for(&other, gitlab.url(), "5m", |_| {}).await;
    let agent = TestAgent::connect(untrusting.agent, TOKEN).await;
    assert_eq!(agent.open(&["team/public"]).await.unwrap_err().code(), tonic::Code::Unavailable);
    untrusting.stop().await;
}

/// A CA file that holds no certificate stops the start, naming the setting.
#[test]
fn a_bad_gitlab_ca_file_stops_the_start() {
    let db = TestDb::sqlite();
    let secret = crate::intake::write_gitlab_secret(&db);
    let bad = db.data_dir().join("not-a-ca.pem");
    std::fs::write(&bad, "this is not PEM\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["serve", "--http-addr", "127.0.0.1:0", "--agent-addr", "127.0.0.1:0", "--api-addr", "127.0.0.1:0"])
        .env("KAS_DATA_DIR", db.data_dir())
        .env("KAS_GITLAB_URL", "https://127.0.0.1:9")
        .env("KAS_GITLAB_SECRET_FILE", secret)
        .env("KAS_GITLAB_CA_FILE", &bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("KAS_GITLAB_CA_FILE"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A user:password in KAS_GITLAB_URL never reaches the logs, and is not sent to GitLab (GitLab 18
/// refuses any `Authorization` on its agentk path, so the agent would be refused otherwise).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_url_credentials_are_neither_logged_nor_sent() {
    let db = TestDb::sqlite();
    let gitlab = StandInGitLab::start(SECRET, API_TOKEN).await;
    populate(&gitlab);
    let url = format!("http://kas-reader:hunter2-s3cret@{}", gitlab.addr);
    let replica = crate::support::process::ProcessReplica::spawn(
        &db,
        &[("KAS_GITLAB_URL", url), ("KAS_GITLAB_SECRET_FILE", crate::intake::write_gitlab_secret(&db))],
    );
    let agent = TestAgent::connect(replica.agent, TOKEN).await;
    agent.open(&["team/config"]).await.expect("accepted: no Authorization sent on the agentk path");
    let logs = replica.logs.lock().unwrap().join("\n");
    assert!(!logs.contains("hunter2"), "{logs}");
    assert!(logs.contains(&format!("http://{}", gitlab.addr)), "the URL is logged without credentials: {logs}");
}

/// The value of the metric line `name` (with its labels) in Prometheus text; 0 when absent.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// 2,000 lookups of random tokens from four connections of one address while a known agent
/// works: the push still reaches the agent, GitLab is asked only within the address's budget
/// (the rest fail at once with UNAVAILABLE, none waits past the queue deadline), and the
/// refusal cache and the peer table hold no more than that; afterwards a new agent gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_unknown_tokens_neither_starves_known_agents_nor_grows_caches() {
    const FLOOD: usize = 2000;
    const CLIENTS: usize = 4;
    let db = TestDb::sqlite();
    let (gitlab, app) = setup(&db, "5m").await;
    let agent = TestAgent::connect(app.agent, TOKEN).await;
    let mut stream = agent.open(&["team/public"]).await.unwrap();
    let started = Instant::now();
    let flood: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let addr = app.agent;
            tokio::spawn(async move {
                let connection = TestAgent::connect(addr, "").await.channel;
                let mut codes: HashMap<tonic::Code, usize> = HashMap::new();
                let mut slowest = Duration::ZERO;
                for i in 0..FLOOD / CLIENTS {
                    let stranger =
                        TestAgent { token: format!("glagent-stranger-{c}-{i}"), channel: connection.clone() };
                    let at = Instant::now();
                    let code = stranger.open(&["team/public"]).await.expect_err("a stranger is refused").code();
                    slowest = slowest.max(at.elapsed());
                    *codes.entry(code).or_default() += 1;
                }
                (codes, slowest)
            })
        })
        .collect();
    // Meanwhile a public push (whose access kas has not asked GitLab about yet) reaches the agent.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(app.push(101, "team/public", 20).await.status(), 202);
    assert_eq!(next_project(&mut stream, SOON).await.as_deref(), Some("team/public"), "the known agent is served");
    let mut codes: HashMap<tonic::Code, usize> = HashMap::new();
    let mut slowest = Duration::ZERO;
    for f in flood {
        let (c, s) = f.await.unwrap();
        slowest = slowest.max(s);
        for (code, n) in c {
            *codes.entry(code).or_default() += n;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let refused = codes.remove(&tonic::Code::Unauthenticated).unwrap_or(0);
    let shed = codes.remove(&tonic::Code::Unavailable).unwrap_or(0);
    assert!(codes.is_empty(), "only UNAUTHENTICATED or UNAVAILABLE: {codes:?}");
    assert_eq!(refused + shed, FLOOD);
    assert!(slowest < Duration::from_secs(3), "every refusal within the 2 s queue deadline: {slowest:?}");
    // Every token GitLab was asked about, it refused; the rest never reached it.
    let asked = gitlab.calls("agent_info") - 1;
    assert_eq!(asked, refused);
    let budget = 20.0 + 10.0 * elapsed + 2.0;
    assert!((asked as f64) <= budget, "{asked} lookups in {elapsed:.1}s: over the address's budget");
    assert!(shed > FLOOD / 2, "most strangers failed fast: {shed}");
    let metrics = app.metrics_text().await;
    assert_eq!(metric(&metrics, r#"kas_gitlab_cache_entries{name="refusals"}"#) as usize, refused);
    assert_eq!(metric(&metrics, r#"kas_gitlab_cache_entries{name="peers"}"#), 1.0);
    assert_eq!(metric(&metrics, r#"kas_gitlab_calls_total{call="agent_info",result="shed"}"#) as usize, shed);

    // Once the address's bucket refills, a new agent from it gets in.
    let newcomer = TestAgent::connect(app.agent, THIRD).await;
    assert!(crate::support::eventually(SOON, || async { newcomer.open(&["team/config"]).await.is_ok() }).await);
    app.stop().await;
}

/// The configuration file is at most 128 KiB: a larger one from GitLab ends the configuration
/// stream with FAILED_PRECONDITION and kas stops reading it (the stand-in streams 128 MiB and
/// counts what it produced), whether GitLab announces its length or not; exactly 128 KiB is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_file_over_128_kib_is_refused_unread() {
    const HUGE: usize = 128 << 20;
    let db = TestDb::sqlite();
    let (gitlab, app) = setup(&db, "5m").await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", app.agent)).unwrap().connect().await.unwrap();
    let path = ".gitlab/agents/deployer/config.yaml".to_owned();
    for (head, size, with_length) in [
        ("5555555555555555555555555555555555555555", HUGE, false),
        ("6666666666666666666666666666666666666666", HUGE, true),
        ("7777777777777777777777777777777777777777", 128 * 1024, false),
    ] {
        {
            let mut w = gitlab.state.world.lock().unwrap();
            w.heads.insert((100, "main".into()), head.into());
            w.huge_files.insert((100, head.into(), path.clone()), (size, with_length));
        }
        let before = gitlab.state.streamed.load(std::sync::atomic::Ordering::SeqCst);
        let request = ConfigurationRequest { commit_id: String::new(), agent_meta: None, skip_register: true };
        let mut client = AgentConfigurationClient::new(channel.clone());
        let mut stream = client.get_configuration(as_agent(TOKEN, request)).await.unwrap().into_inner();
        let first = tokio::time::timeout(SOON, stream.message()).await.expect("answered");
        if size > 128 * 1024 {
            let err = first.unwrap_err();
            assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
            assert!(err.message().contains("larger than 131072 bytes"), "{}", err.message());
            // Whatever sits in socket buffers aside, kas did not read on to the end.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let produced = gitlab.state.streamed.load(std::sync::atomic::Ordering::SeqCst) - before;
            assert!(produced < HUGE / 8, "the stand-in produced {produced} of {HUGE} bytes");
        } else {
            assert_eq!(first.unwrap().unwrap().commit_id, head, "exactly 128 KiB is read");
        }
    }
    app.stop().await;
}
