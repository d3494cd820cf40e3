//! An unmodified agentk against kas: configuration, registration, connected agents, the
//! reverse tunnel, GitLab access, maximum connection age, and all of it over WebSocket.

use std::time::Duration;

use kas::domain::{ProjectInfo, ProjectPath, RepositoryAccess, Visibility};
use kas::proto::agent_configuration::rpc::agent_configuration_client::AgentConfigurationClient;
use kas::proto::agent_configuration::rpc::{ConfigurationRequest, ConfigurationResponse};
use kas::proto::agent_registrar::rpc::RegisterRequest;
use kas::proto::agent_registrar::rpc::agent_registrar_client::AgentRegistrarClient;
use kas::proto::agent_tracker::rpc::GetConnectedAgentsRequest;
use kas::proto::agent_tracker::rpc::agent_tracker_client::AgentTrackerClient;
use kas::proto::agent_tracker::rpc::get_connected_agents_request::Request as By;
use kas::proto::entity::{AgentMeta, KubernetesVersion};
use kas::proto::flux::rpc::git_lab_flux_client::GitLabFluxClient;
use kas::proto::flux::rpc::{Project, ReconcileProjectsRequest};
use kas::proto::gitlab_access::rpc::gitlab_access_client::GitlabAccessClient;
use kas::proto::gitlab_access::rpc::{HttpRequest, RequestHeader, http_request, http_response};
use kas::proto::reverse_tunnel::rpc::reverse_tunnel_client::ReverseTunnelClient;
use kas::proto::reverse_tunnel::rpc::{AgentDescriptor, ConnectRequest, Descriptor, connect_request};
use kas::store::now_ms;
use tonic::codec::{CompressionEncoding, Streaming};
use tonic::transport::Channel;

use crate::support::agentk::{AGENTK_AUTHORITY, Transport, as_agent, connect, plain_with_agentk_authority};
use crate::support::{TestApp, TestDb};

const SOON: Duration = Duration::from_secs(10);
const CONFIG: &str = "flux:\n  webhook_receiver_url: http://receiver.flux-system.svc/hook\nobservability:\n  logging:\n    level: debug\nci_access:\n  projects:\n    - id: g/other\n";
const EXTERNAL: &str = "https://gitlab.example.com";

fn meta(pod: &str) -> AgentMeta {
    AgentMeta {
        version: "v17.6.0".into(),
        commit_id: "abc123".into(),
        pod_namespace: "gitlab-agent".into(),
        pod_name: pod.into(),
        kubernetes_version: Some(KubernetesVersion {
            major: "1".into(),
            minor: "31".into(),
            git_version: "v1.31.2".into(),
            platform: "linux/amd64".into(),
        }),
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

async fn get_configuration(
    channel: &Channel,
    token: &str,
    commit: &str,
    skip_register: bool,
    pod: &str,
) -> Streaming<ConfigurationResponse> {
    let mut client = AgentConfigurationClient::new(channel.clone()).send_compressed(CompressionEncoding::Gzip);
    let request = ConfigurationRequest { commit_id: commit.into(), agent_meta: Some(meta(pod)), skip_register };
    client.get_configuration(as_agent(token, request)).await.unwrap().into_inner()
}

async fn next_config(stream: &mut Streaming<ConfigurationResponse>, within: Duration) -> Option<ConfigurationResponse> {
    match tokio::time::timeout(within, stream.message()).await {
        Err(_) => None,
        Ok(result) => Some(result.expect("no stream error").expect("stream open")),
    }
}

/// The whole Flux path of agentk on one connection: configuration first, then ReconcileProjects.
async fn flux_path(app: &TestApp, agent_id: i64, token: &str, transport: Transport) {
    let (channel, handshake) = connect(app.agent, transport).await;
    let mut config = get_configuration(&channel, token, "", true, "agentk-0").await;
    let first = next_config(&mut config, SOON).await.expect("configuration sent");
    assert!(!first.commit_id.is_empty());
    let c = first.configuration.expect("configuration present");
    assert_eq!(c.agent_id, agent_id);
    assert_eq!(c.project_id, 42);
    assert_eq!(c.project_path, "team/agent-config");
    assert_eq!(c.gitlab_external_url, EXTERNAL);
    assert_eq!(c.flux.unwrap().webhook_receiver_url, "http://receiver.flux-system.svc/hook");
    assert_eq!(c.observability.unwrap().logging.unwrap().level, kas::proto::agentcfg::LogLevelEnum::Debug as i32);

    let mut flux = GitLabFluxClient::new(channel.clone()).send_compressed(CompressionEncoding::Gzip);
    let request = ReconcileProjectsRequest { project: vec![Project { id: "team/agent-config".into() }] };
    let mut reconcile = flux.reconcile_projects(as_agent(token, request)).await.unwrap().into_inner();
    assert_eq!(app.push(42, "team/agent-config", 0).await.status(), 202);
    let got = tokio::time::timeout(SOON, reconcile.message()).await.unwrap().unwrap().unwrap();
    assert_eq!(got.project.unwrap().id, "team/agent-config");

    // The same commit id again: nothing is sent, and the stream stays open.
    let mut same = get_configuration(&channel, token, &first.commit_id, true, "agentk-0").await;
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
    let mut client = AgentConfigurationClient::new(channel);
    let request = ConfigurationRequest { commit_id: String::new(), agent_meta: Some(meta("p")), skip_register: true };
    let result = client.get_configuration(as_agent(&token, request)).await;
    assert!(result.is_err(), "h2 accepted {AGENTK_AUTHORITY:?}; the rewrite would be unnecessary");
    app.stop().await;
}

async fn tracker(app: &TestApp) -> AgentTrackerClient<Channel> {
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", app.api)).unwrap().connect().await.unwrap();
    AgentTrackerClient::new(channel)
}

async fn connected(app: &TestApp, by: By) -> Vec<kas::proto::agent_tracker::ConnectedAgentInfo> {
    let mut client = tracker(app).await;
    let jwt = crate::intake::gitlab_jwt(b"0123456789abcdef0123456789abcdef", "gitlab-kas", 60);
    let mut request = tonic::Request::new(GetConnectedAgentsRequest { request: Some(by) });
    request.metadata_mut().insert("authorization", format!("Bearer {jwt}").parse().unwrap());
    let mut agents = client.get_connected_agents(request).await.unwrap().into_inner().agents;
    agents.sort_by_key(|a| a.connection_id);
    agents
}

/// Register on one replica, GetConnectedAgents on another; registration on the configuration
/// stream too, gone when the stream ends.
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
    let mut registrar = AgentRegistrarClient::new(channel.clone()).send_compressed(CompressionEncoding::Gzip);
    registrar
        .register(as_agent(&token, RegisterRequest { agent_meta: Some(meta("agentk-7d9f")), pod_id: 777 }))
        .await
        .unwrap();
    let bad = registrar.register(as_agent(&token, RegisterRequest { agent_meta: None, pod_id: 1 })).await.unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let unauthenticated = registrar
        .register(as_agent("glagent-wrong", RegisterRequest { agent_meta: Some(meta("x")), pod_id: 1 }))
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), tonic::Code::Unauthenticated);

    let by_agent = connected(&b, By::AgentId(agent_id)).await;
    assert_eq!(by_agent.len(), 1);
    let info = &by_agent[0];
    assert_eq!((info.connection_id, info.agent_id, info.project_id), (777, agent_id, 42));
    let m = info.agent_meta.as_ref().unwrap();
    assert_eq!((m.version.as_str(), m.pod_name.as_str()), ("v17.6.0", "agentk-7d9f"));
    assert_eq!(m.kubernetes_version.as_ref().unwrap().git_version, "v1.31.2");
    assert!(info.connected_at.as_ref().unwrap().seconds > 0);
    assert_eq!(connected(&b, By::ProjectId(42)).await.len(), 1);
    assert!(connected(&b, By::ProjectId(43)).await.is_empty());
    // Re-registering keeps the first connected_at.
    registrar
        .register(as_agent(&token, RegisterRequest { agent_meta: Some(meta("agentk-7d9f")), pod_id: 777 }))
        .await
        .unwrap();
    assert_eq!(connected(&a, By::AgentId(agent_id)).await[0].connected_at, info.connected_at);

    // A configuration stream that does not register itself is registered by kas while open.
    let mut config = get_configuration(&channel, &token, "", false, "agentk-stream").await;
    next_config(&mut config, SOON).await.unwrap();
    let pods = connected(&b, By::AgentId(agent_id)).await;
    assert_eq!(pods.len(), 2);
    assert!(pods.iter().any(|p| p.agent_meta.as_ref().unwrap().pod_name == "agentk-stream"));
    // `kas agents` shows version and pod.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["agents", "--addr", &format!("http://{}", b.http), "--data-dir"])
        .arg(db.data_dir())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("gitlab-agent/agentk-7d9f") && table.contains("v17.6.0"), "{table}");
    drop(config);
    drop(channel);
    let gone =
        crate::support::eventually(SOON, || async { connected(&b, By::AgentId(agent_id)).await.len() == 1 }).await;
    assert!(gone, "the stream's registration ends with the stream");

    // GetConnectedAgents needs GitLab's JWT.
    let mut client = tracker(&b).await;
    let err = client
        .get_connected_agents(GetConnectedAgentsRequest { request: Some(By::AgentId(agent_id)) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
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
        let mut config = get_configuration(&channel, &token, "", true, "p").await;
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
        let mut again = get_configuration(&channel, &token, "", true, "p").await;
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
