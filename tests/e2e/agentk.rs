//! An unmodified agentk (16 to 18) against kas: configuration, registration, connected agents,
//! the reverse tunnel, GitLab access, maximum connection age, and all of it over WebSocket.
//! agentk's and GitLab's messages are declared per version in `support/wire.rs`.

use std::collections::HashMap;
use std::time::Duration;

use kas::clock::now_ms;
use kas::domain::{ProjectInfo, ProjectPath, RepositoryAccess, Visibility};
use kas::proto::flux::rpc::git_lab_flux_client::GitLabFluxClient;
use kas::proto::flux::rpc::{Project, ReconcileProjectsRequest};
use kas::proto::gitlab_access::rpc::gitlab_access_client::GitlabAccessClient;
use kas::proto::gitlab_access::rpc::{HttpRequest, RequestHeader, http_request, http_response};
use kas::proto::reverse_tunnel::rpc::reverse_tunnel_client::ReverseTunnelClient;
use kas::proto::reverse_tunnel::rpc::{AgentDescriptor, ConnectRequest, Descriptor, connect_request};
use tonic::codec::{CompressionEncoding, Streaming};
use tonic::transport::Channel;

use crate::support::agentk::{AGENTK_AUTHORITY, Transport, as_agent, connect, plain_with_agentk_authority};
use crate::support::wire::{
    self, AgentMeta16, AgentMeta18, By, ConfigurationRequest16, ConfigurationRequest17, ConfigurationResponse,
    ConnectedAgentInfo16, ConnectedAgentInfo18, Empty, KubernetesVersion, RegisterRequest16, RegisterRequest18,
};
use crate::support::{TestApp, TestDb};

const SOON: Duration = Duration::from_secs(10);
const CONFIG: &str = "flux:\n  webhook_receiver_url: http://receiver.flux-system.svc/hook\nobservability:\n  logging:\n    level: debug\nci_access:\n  projects:\n    - id: g/other\n";
const EXTERNAL: &str = "https://gitlab.example.com";
const SECRET: &[u8; 32] = b"0123456789abcdef0123456789abcdef";

fn kubernetes() -> Option<KubernetesVersion> {
    Some(KubernetesVersion {
        major: "1".into(),
        minor: "31".into(),
        git_version: "v1.31.2".into(),
        platform: "linux/amd64".into(),
    })
}

/// What agentk 16 says about a pod.
fn meta(pod: &str) -> AgentMeta16 {
    AgentMeta16 {
        version: "v16.11.0".into(),
        commit_id: "abc123".into(),
        pod_namespace: "gitlab-agent".into(),
        pod_name: pod.into(),
        kubernetes_version: kubernetes(),
    }
}

/// What agentk 18 says about a pod, with a field from a later version nobody declares yet.
fn meta18(pod: &str) -> AgentMeta18 {
    AgentMeta18 {
        version: "v18.2.1".into(),
        commit_id: "def456".into(),
        pod_namespace: "gitlab-agent".into(),
        pod_name: pod.into(),
        kubernetes_version: kubernetes(),
        git_ref: "v18.2.1".into(),
        extra_telemetry_data: HashMap::from([("helm_chart_version".into(), "2.16.0".into())]),
        later: "a field from a later agentk".into(),
    }
}

/// An app with the agent "deployer" (configuration file stored), its configuration project
/// known to the registry as id 42, and GitLab's external URL set.
async fn app_with_agent(db: &TestDb, tweak: impl FnOnce(&mut kas::config::Settings)) -> (TestApp, i64, String) {
    let secret = crate::intake::write_gitlab_secret(db);
    let app = TestApp::spawn(db, |s| {
        s.gitlab_external_url = Some(EXTERNAL.into());
        s.gitlab_secret_file = Some(secret);
        tweak(s);
    })
    .await;
    let (agent, token) = app.create_agent("deployer", "team/agent-config").await;
    app.store.set_agent_config(agent.id, Some(CONFIG)).await.unwrap();
    let project = ProjectInfo {
        id: 42,
        path: ProjectPath::parse("team/agent-config").unwrap(),
        visibility: Some(Visibility::Private),
        repository_access: RepositoryAccess::Everyone,
    };
    app.store.set_project(&project, now_ms()).await.unwrap();
    (app, agent.id, token)
}

/// GetConfiguration as agentk 17.1+ opens it: the commit id only.
pub(crate) async fn get_configuration(
    channel: &Channel,
    token: &str,
    commit: &str,
) -> Streaming<ConfigurationResponse> {
    let request = ConfigurationRequest17 { commit_id: commit.into() };
    wire::server_streaming(channel, wire::GET_CONFIGURATION, as_agent(token, request)).await.unwrap()
}

/// GetConfiguration as agentk 16 opens it: with its metadata, and asking kas to register the
/// pod on the stream unless it registers itself.
async fn get_configuration16(
    channel: &Channel,
    token: &str,
    skip_register: bool,
    pod: &str,
) -> Streaming<ConfigurationResponse> {
    let request = ConfigurationRequest16 { commit_id: String::new(), agent_meta: Some(meta(pod)), skip_register };
    wire::server_streaming(channel, wire::GET_CONFIGURATION, as_agent(token, request)).await.unwrap()
}

pub(crate) async fn next_config(
    stream: &mut Streaming<ConfigurationResponse>,
    within: Duration,
) -> Option<ConfigurationResponse> {
    match tokio::time::timeout(within, stream.message()).await {
        Err(_) => None,
        Ok(result) => Some(result.expect("no stream error").expect("stream open")),
    }
}

/// The whole Flux path of agentk on one connection: configuration first, then ReconcileProjects.
async fn flux_path(app: &TestApp, agent_id: i64, token: &str, transport: Transport) {
    let (channel, handshake) = connect(app.agent, transport).await;
    let mut config = get_configuration(&channel, token, "").await;
    let first = next_config(&mut config, SOON).await.expect("configuration sent");
    assert!(!first.commit_id.is_empty());
    let c = first.configuration.expect("configuration present");
    assert_eq!(c.agent_id, agent_id);
    assert_eq!(c.project_id, 42);
    assert_eq!(c.project_path, "team/agent-config");
    assert_eq!(c.gitlab_external_url, EXTERNAL);
    assert_eq!(c.flux.unwrap().webhook_receiver_url, "http://receiver.flux-system.svc/hook");
    assert_eq!(c.observability.unwrap().logging.unwrap().level, 1, "debug");

    let mut flux = GitLabFluxClient::new(channel.clone()).send_compressed(CompressionEncoding::Gzip);
    let request = ReconcileProjectsRequest { project: vec![Project { id: "team/agent-config".into() }] };
    let mut reconcile = flux.reconcile_projects(as_agent(token, request)).await.unwrap().into_inner();
    assert_eq!(app.push(42, "team/agent-config", 0).await.status(), 202);
    let got = tokio::time::timeout(SOON, reconcile.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(got.project.unwrap().id, "team/agent-config");

    // The same commit id again: nothing is sent, and the stream stays open.
    let mut same = get_configuration(&channel, token, &first.commit_id).await;
    assert!(next_config(&mut same, Duration::from_millis(800)).await.is_none());
    // A changed configuration reaches both open streams.
    app.store.set_agent_config(agent_id, Some("flux:\n  webhook_receiver_url: http://other/hook\n")).await.unwrap();
    for stream in [&mut config, &mut same] {
        let changed = next_config(stream, SOON).await.expect("change sent");
        assert_ne!(changed.commit_id, first.commit_id);
        let c = changed.configuration.unwrap();
        assert_eq!(c.flux.unwrap().webhook_receiver_url, "http://other/hook");
        assert!(c.observability.is_none());
    }
    if let Some(h) =
        Some(handshake.lock().unwrap().clone()).filter(|h| h.subprotocol.is_some() || h.extensions.is_some())
    {
        assert_eq!(h.subprotocol.as_deref(), Some("ws-tunnel"));
        assert_eq!(h.extensions, None, "no WebSocket extensions");
    }
}

async fn flux_path_plain(db: TestDb) {
    let (app, agent, token) = app_with_agent(&db, |_| {}).await;
    flux_path(&app, agent, &token, Transport::Plain).await;
    app.stop().await;
}
crate::both_backends!(plain_grpc, flux_path_plain);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_with_agentk_authority() {
    let db = TestDb::sqlite();
    let (app, agent, token) = app_with_agent(&db, |_| {}).await;
    let (_, handshake) = connect(app.agent, Transport::WebSocket).await;
    flux_path(&app, agent, &token, Transport::WebSocket).await;
    // The handshake answered as agentk needs.
    let h = handshake.lock().unwrap().clone();
    assert_eq!(h.subprotocol.as_deref(), Some("ws-tunnel"));
    assert_eq!(h.extensions, None);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_under_tls_without_alpn() {
    crate::support::init();
    let db = TestDb::sqlite();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (db.data_dir().join("tls.crt"), db.data_dir().join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let (app, agent, token) = app_with_agent(&db, |s| {
        s.tls_cert_file = Some(cert_path.display().to_string());
        s.tls_key_file = Some(key_path.display().to_string());
    })
    .await;
    flux_path(&app, agent, &token, Transport::WebSocketTls(cert.cert.pem())).await;
    app.stop().await;
}

/// The control experiment: the same authority over plain gRPC, where nothing rewrites it, is
/// refused by `h2`. This is what the WebSocket path fixes.
#[tokio::test]
async fn without_rewriting_h2_refuses_the_agentk_authority() {
    let db = TestDb::sqlite();
    let (app, _, token) = app_with_agent(&db, |_| {}).await;
    let channel = plain_with_agentk_authority(app.agent).await;
    let request = as_agent(&token, ConfigurationRequest17 { commit_id: String::new() });
    let result = wire::server_streaming::<_, ConfigurationResponse>(&channel, wire::GET_CONFIGURATION, request).await;
    assert!(result.is_err(), "h2 accepted {AGENTK_AUTHORITY:?}; the rewrite would be unnecessary");
    app.stop().await;
}

async fn api_channel(app: &TestApp) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", app.api)).unwrap().connect().await.unwrap()
}

fn rails_jwt() -> String {
    crate::intake::gitlab_jwt(SECRET, "gitlab-kas", 60)
}

/// `GetConnectedAgents` as GitLab 16 calls it.
async fn connected16(app: &TestApp, by: By) -> Vec<ConnectedAgentInfo16> {
    let request = wire::as_rails(&rails_jwt(), wire::GetConnectedAgentsRequest16 { request: Some(by) });
    let response: wire::GetConnectedAgentsResponse16 =
        wire::unary(&api_channel(app).await, wire::GET_CONNECTED_AGENTS, request, false).await.unwrap();
    let mut agents = response.agents;
    agents.sort_by_key(|a| a.connection_id);
    agents
}

/// The by-ids call as GitLab 16.7 to 18 makes it, under the method name `path`.
pub(crate) async fn connected18(app: &TestApp, path: &'static str, ids: &[i64]) -> Vec<ConnectedAgentInfo18> {
    let request = wire::as_rails(&rails_jwt(), wire::ByAgentIdsRequest { agent_ids: ids.to_vec() });
    let response: wire::ByAgentIdsResponse = wire::unary(&api_channel(app).await, path, request, false).await.unwrap();
    let mut agents = response.agents;
    agents.sort_by_key(|a| a.connection_id);
    agents
}

/// agentk 16 registers on one replica, GitLab 16 lists on another; registration on the
/// configuration stream too, gone when the stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_is_visible_across_replicas() {
    let db = TestDb::postgres().await;
    let prefix = crate::support::redis::prefix();
    let redis = |s: &mut kas::config::Settings| {
        s.redis_url = Some(crate::support::redis::SHARED.into());
        s.redis_prefix = Some(prefix.clone());
    };
    let (a, agent_id, token) = app_with_agent(&db, redis).await;
    let secret = crate::intake::write_gitlab_secret(&db);
    let b = TestApp::spawn(&db, |s| {
        redis(s);
        s.gitlab_secret_file = Some(secret);
    })
    .await;
    let (channel, _) = connect(a.agent, Transport::Plain).await;
    let register = |token: &str, agent_meta: Option<AgentMeta16>, pod_id: i64| {
        let request = as_agent(token, RegisterRequest16 { agent_meta, pod_id });
        let channel = channel.clone();
        async move { wire::unary::<_, Empty>(&channel, wire::REGISTER, request, true).await }
    };
    register(&token, Some(meta("agentk-7d9f")), 777).await.unwrap();
    let bad = register(&token, None, 1).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let unauthenticated = register("glagent-wrong", Some(meta("x")), 1).await.unwrap_err();
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);

    let by_agent = connected16(&b, By::AgentId(agent_id)).await;
    assert_eq!(by_agent.len(), 1);
    let info = &by_agent[0];
    assert_eq!((info.connection_id, info.agent_id, info.project_id), (777, agent_id, 42));
    assert_eq!(info.agent_meta.as_ref(), Some(&meta("agentk-7d9f")), "what the pod sent");
    assert!(info.connected_at.as_ref().unwrap().seconds > 0);
    assert_eq!(connected16(&b, By::ProjectId(42)).await.len(), 1);
    assert!(connected16(&b, By::ProjectId(43)).await.is_empty());
    // Re-registering keeps the first connected_at.
    register(&token, Some(meta("agentk-7d9f")), 777).await.unwrap();
    assert_eq!(connected16(&a, By::AgentId(agent_id)).await[0].connected_at, info.connected_at);

    // agentk 16 asking kas to register it on its configuration stream: registered while open.
    let mut config = get_configuration16(&channel, &token, false, "agentk-stream").await;
    next_config(&mut config, SOON).await.unwrap();
    let pods = connected16(&b, By::AgentId(agent_id)).await;
    assert_eq!(pods.len(), 2);
    assert!(pods.iter().any(|p| p.agent_meta.as_ref().unwrap().pod_name == "agentk-stream"));
    // `kas agents` shows version and pod.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["agents", "--addr", &format!("http://{}", b.http), "--data-dir"])
        .arg(db.data_dir())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("gitlab-agent/agentk-7d9f") && table.contains("v16.11.0"), "{table}");
    drop(config);
    drop(channel);
    let gone =
        crate::support::eventually(SOON, || async { connected16(&b, By::AgentId(agent_id)).await.len() == 1 }).await;
    assert!(gone, "the stream's registration ends with the stream");

    // GetConnectedAgents needs GitLab's JWT.
    let request = tonic::Request::new(wire::GetConnectedAgentsRequest16 { request: Some(By::AgentId(agent_id)) });
    let err = wire::unary::<_, wire::GetConnectedAgentsResponse16>(
        &api_channel(&b).await,
        wire::GET_CONNECTED_AGENTS,
        request,
        false,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    a.stop().await;
    b.stop().await;
    crate::support::redis::cleanup(&prefix).await;
    db.cleanup().await;
}

/// agentk 17.1+ opens its configuration stream with only a commit id: no phantom pod. agentk 18
/// registers with its newer metadata, which GitLab 18 reads back whole (fields kas does not
/// know included) under all three by-ids names, from another replica; Unregister through
/// another replica removes the pod everywhere, and only the agent's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agentk_18_registers_and_unregisters_across_replicas() {
    let db = TestDb::postgres().await;
    let prefix = crate::support::redis::prefix();
    let redis = |s: &mut kas::config::Settings| {
        s.redis_url = Some(crate::support::redis::SHARED.into());
        s.redis_prefix = Some(prefix.clone());
    };
    let (a, agent_id, token) = app_with_agent(&db, redis).await;
    let secret = crate::intake::write_gitlab_secret(&db);
    let b = TestApp::spawn(&db, |s| {
        redis(s);
        s.gitlab_secret_file = Some(secret);
    })
    .await;
    let (_, other_token) = a.create_agent("other", "team/agent-config").await;
    let (on_a, _) = connect(a.agent, Transport::Plain).await;
    let (on_b, _) = connect(b.agent, Transport::Plain).await;

    let mut config = get_configuration(&on_a, &token, "").await;
    assert!(next_config(&mut config, SOON).await.is_some(), "configured");
    for path in wire::BY_AGENT_IDS {
        assert!(connected18(&b, path, &[agent_id]).await.is_empty(), "{path}: no pod from the configuration stream");
    }

    let request =
        |token: &str, pod_id: i64| as_agent(token, RegisterRequest18 { agent_meta: Some(meta18("agentk-18")), pod_id });
    wire::unary::<_, Empty>(&on_a, wire::REGISTER, request(&token, 1801), true).await.unwrap();
    for path in wire::BY_AGENT_IDS {
        let pods = connected18(&b, path, &[agent_id, 999_999]).await;
        assert_eq!(pods.len(), 1, "{path}");
        let p = &pods[0];
        assert_eq!((p.connection_id, p.agent_id, p.project_id), (1801, agent_id, 42), "{path}");
        assert_eq!(p.agent_meta.as_ref(), Some(&meta18("agentk-18")), "{path}: kept whole, later fields too");
        assert!(p.connected_at.is_some() && p.warnings.is_empty());
    }
    // GitLab 16 reads the same pod with its older message.
    let old = connected16(&b, By::AgentId(agent_id)).await;
    assert_eq!(old[0].agent_meta.as_ref().unwrap().version, "v18.2.1");

    // Another agent cannot unregister this pod; a pod id is required; the token is checked.
    wire::unary::<_, Empty>(&on_b, wire::UNREGISTER, request(&other_token, 1801), true).await.unwrap();
    assert_eq!(connected18(&a, wire::BY_AGENT_IDS[2], &[agent_id]).await.len(), 1, "not another agent's pod");
    let err = wire::unary::<_, Empty>(&on_b, wire::UNREGISTER, request(&token, 0), true).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = wire::unary::<_, Empty>(&on_b, wire::UNREGISTER, request("glagent-wrong", 1801), true).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // The pod stops: agentk unregisters it, here through the other replica.
    wire::unary::<_, Empty>(&on_b, wire::UNREGISTER, request(&token, 1801), true).await.unwrap();
    for app in [&a, &b] {
        assert!(connected18(app, wire::BY_AGENT_IDS[1], &[agent_id]).await.is_empty(), "gone on every replica");
    }
    a.stop().await;
    b.stop().await;
    crate::support::redis::cleanup(&prefix).await;
    db.cleanup().await;
}

async fn open_tunnel(channel: &Channel, token: &str) -> Streaming<kas::proto::reverse_tunnel::rpc::ConnectResponse> {
    let mut client = ReverseTunnelClient::new(channel.clone()).send_compressed(CompressionEncoding::Gzip);
    let descriptor = ConnectRequest {
        msg: Some(connect_request::Msg::Descriptor(Descriptor { agent_descriptor: Some(AgentDescriptor::default()) })),
    };
    let outbound = futures::stream::iter(vec![descriptor]).chain(futures::stream::pending());
    client.connect(as_agent(token, outbound)).await.unwrap().into_inner()
}

use futures::StreamExt;

#[tokio::test]
async fn tunnel_is_held_and_gitlab_access_answers_404() {
    let db = TestDb::sqlite();
    let (app, _, token) = app_with_agent(&db, |_| {}).await;
    let (channel, _) = connect(app.agent, Transport::Plain).await;
    let mut tunnel = open_tunnel(&channel, &token).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(800), tunnel.message()).await.is_err(),
        "held open, nothing sent"
    );

    let mut access = GitlabAccessClient::new(channel.clone()).send_compressed(CompressionEncoding::Gzip);
    let header = HttpRequest {
        message: Some(http_request::Message::Header(http_request::Header {
            request: Some(RequestHeader {
                method: "GET".into(),
                url_path: "/api/v4/projects".into(),
                ..Default::default()
            }),
            extra: Default::default(),
        })),
    };
    let mut answer =
        access.make_request(as_agent(&token, futures::stream::iter(vec![header]))).await.unwrap().into_inner();
    let first = answer.message().await.unwrap().unwrap();
    match first.message {
        Some(http_response::Message::Header(h)) => assert_eq!(h.response.unwrap().status_code, 404),
        other => panic!("{other:?}"),
    }
    assert!(matches!(answer.message().await.unwrap().unwrap().message, Some(http_response::Message::Trailer(_))));
    assert!(answer.message().await.unwrap().is_none(), "ends with OK after the trailer");

    // Shutdown ends the held tunnel with OK.
    let stopping = tokio::spawn(app.stop());
    let end = tokio::time::timeout(SOON, tunnel.message()).await.unwrap();
    assert!(matches!(end, Ok(None)), "{end:?}");
    stopping.await.unwrap();
}

/// Connections older than the maximum age are asked to go away: every long stream ends with
/// OK, and the agent reopens them at once on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connection_age_ends_streams_with_ok() {
    let db = TestDb::sqlite();
    let (app, _, token) = app_with_agent(&db, |s| s.max_connection_age = Some("1s".into())).await;
    for transport in [Transport::Plain, Transport::WebSocket] {
        let (channel, _) = connect(app.agent, transport).await;
        let mut config = get_configuration(&channel, &token, "").await;
        next_config(&mut config, SOON).await.unwrap();
        let mut flux = GitLabFluxClient::new(channel.clone());
        let request = ReconcileProjectsRequest { project: vec![Project { id: "team/agent-config".into() }] };
        let mut reconcile = flux.reconcile_projects(as_agent(&token, request)).await.unwrap().into_inner();
        let mut tunnel = open_tunnel(&channel, &token).await;
        let started = std::time::Instant::now();
        for end in [
            tokio::time::timeout(SOON, config.message()).await.unwrap().map(|m| m.is_none()),
            tokio::time::timeout(SOON, reconcile.message()).await.unwrap().map(|m| m.is_none()),
            tokio::time::timeout(SOON, tunnel.message()).await.unwrap().map(|m| m.is_none()),
        ] {
            assert!(matches!(end, Ok(true)), "clean end expected, got {end:?}");
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        // Reopened at once, on a fresh connection.
        let (channel, _) = connect(app.agent, Transport::Plain).await;
        let mut again = get_configuration(&channel, &token, "").await;
        assert!(next_config(&mut again, SOON).await.is_some());
    }
    app.stop().await;
}

#[test]
fn config_commands_validate_the_file() {
    let db = TestDb::sqlite();
    let dir = db.data_dir();
    let good = dir.join("good.yaml");
    let bad = dir.join("bad.yaml");
    std::fs::write(&good, CONFIG).unwrap();
    std::fs::write(&bad, "flux:\n  webhook_receiver_url: http://x\nfluxx: {}\n").unwrap();
    let kas = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_kas"))
            .args(args)
            .env("KAS_DATABASE_URL", db.url())
            .env("KAS_DATA_DIR", db.data_dir())
            .output()
            .unwrap()
    };
    let out = kas(&["agent", "create", "cfg", "--config-project", "g/c", "--config-file", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fluxx"), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!String::from_utf8_lossy(&kas(&["agent", "list"]).stdout).contains("cfg"), "nothing created");
    let out = kas(&["agent", "create", "cfg", "--config-project", "g/c", "--config-file", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = kas(&["agent", "config", "cfg", "--file", bad.to_str().unwrap()]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("fluxx"));
    let out = kas(&["agent", "config", "cfg", "--file", good.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("version 2"), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(kas(&["agent", "config", "cfg", "--clear"]).status.success());
}

/// The seed's service-proxy Receiver URL: `kas agent config` takes it, and agentk gets it as it
/// was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_proxy_receiver_url_through_kas_agent_config() {
    const URL: &str = "/api/v1/namespaces/flux-system/services/http:webhook-receiver:80/proxy";
    let db = TestDb::sqlite();
    let (app, _, token) = app_with_agent(&db, |_| {}).await;
    let file = db.data_dir().join("proxy.yaml");
    std::fs::write(&file, format!("flux:\n  webhook_receiver_url: {URL}\n")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["agent", "config", "deployer", "--file", file.to_str().unwrap()])
        .env("KAS_DATABASE_URL", db.url())
        .env("KAS_DATA_DIR", db.data_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (channel, _) = connect(app.agent, Transport::Plain).await;
    let mut config = get_configuration(&channel, &token, "").await;
    let first = next_config(&mut config, SOON).await.expect("configuration sent");
    assert_eq!(first.configuration.unwrap().flux.unwrap().webhook_receiver_url, URL);
    app.stop().await;
}
