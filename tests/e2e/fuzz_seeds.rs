//! Writes the fuzz targets' generated seeds (`fuzz/seeds/<target>/`): the bytes agentk sends
//! through its WebSocket (captured from real sessions against kas, with agentk's `:authority`),
//! the gRPC messages agentk and GitLab send, GitLab's JWTs, and hand-built HTTP/2 streams that
//! reach the rewriter's corners. Run it when the wire changes:
//! `cargo test --test e2e write_fuzz_seeds -- --ignored`; the seeds are kept in the repository.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use kas::gitlab::jwt::GitLabJwt;
use kas::proto::agent_configuration::rpc::ConfigurationRequest;
use kas::proto::agent_configuration::rpc::agent_configuration_client::AgentConfigurationClient;
use kas::proto::agent_registrar::rpc::RegisterRequest;
use kas::proto::agent_registrar::rpc::agent_registrar_client::AgentRegistrarClient;
use kas::proto::agent_tracker::rpc::GetConnectedAgentsRequest;
use kas::proto::agent_tracker::rpc::get_connected_agents_request::Request as By;
use kas::proto::entity::{AgentMeta, KubernetesVersion};
use kas::proto::event::{GitPushEvent, Project as EventProject};
use kas::proto::flux::rpc::git_lab_flux_client::GitLabFluxClient;
use kas::proto::flux::rpc::{Project, ReconcileProjectsRequest};
use kas::proto::gitlab_access::rpc::{HttpRequest, RequestHeader, Values, http_request};
use kas::proto::notifications::rpc::GitPushEventRequest;
use kas::proto::reverse_tunnel::rpc::reverse_tunnel_client::ReverseTunnelClient;
use kas::proto::reverse_tunnel::rpc::{AgentDescriptor, ConnectRequest, Descriptor, Method, Service, connect_request};
use kas::websocket::authority::{RewriteWrites, set_authority};
use kas::websocket::io::WsIo;
use kas::websocket::{SUBPROTOCOL, websocket_config};
use loona_hpack::Encoder;
use prost::Message;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tonic::codec::CompressionEncoding;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::support::agentk::{AGENTK_AUTHORITY, as_agent};
use crate::support::{TestApp, TestDb};

/// The key the `gitlab_jwt` target verifies with.
const FUZZ_JWT_SECRET: [u8; 32] = [7; 32];
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn seeds(target: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(seeds(target).join(name), bytes).unwrap();
}

/// A rewriter seed twice: the byte stream, and the frame records the target assembles into it
/// (`type, flags, stream, length:2, payload` per frame, no preface).
fn write_connection(name: &str, wire: &[u8]) {
    write("authority_rewrite", name, wire);
    let mut records = Vec::new();
    let mut rest = wire.strip_prefix(PREFACE).expect("a client stream starts with the preface");
    while rest.len() >= 9 {
        let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
        let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
        let Ok(stream) = u8::try_from(stream) else { break };
        let Ok(short) = u16::try_from(len) else { break };
        let Some(payload) = rest.get(9..9 + len) else { break };
        let (kind, flags) = (rest[3], rest[4]);
        rest = &rest[9 + len..];
        // The last record runs to the end of the input, so bytes a mutation inserts stay in it.
        let short = if rest.len() < 9 { u16::MAX } else { short };
        records.extend_from_slice(&[kind, flags, stream]);
        records.extend_from_slice(&short.to_be_bytes());
        records.extend_from_slice(payload);
    }
    write("authority_rewrite", &format!("{name}.records"), &records);
}

/// Records every byte written through it.
struct Tap<S> {
    inner: S,
    written: Arc<Mutex<Vec<u8>>>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tap<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tap<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            this.written.lock().unwrap().extend_from_slice(&buf[..n]);
        }
        result
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// One WebSocket connection as agentk makes it; returns what agentk wrote into the WebSocket
/// (the rewriter's input on the server).
async fn agentk_connection(addr: std::net::SocketAddr) -> (Channel, Arc<Mutex<Vec<u8>>>) {
    let written = Arc::new(Mutex::new(Vec::new()));
    let tap = written.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let tap = tap.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let mut request = "ws://gitlab.example.com/-/kubernetes-agent/".into_client_request()?;
            request.headers_mut().insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse().unwrap());
            let (ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(websocket_config())).await?;
            let io =
                RewriteWrites::new(Tap { inner: WsIo::new(ws), written: tap }, set_authority(AGENTK_AUTHORITY.into()));
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(hyper_util::rt::TokioIo::new(io))
        }
    });
    (Endpoint::from_static("http://kas.invalid").connect_with_connector(connector).await.unwrap(), written)
}

/// agentk's metadata as it travels (kas keeps it as bytes).
fn meta(pod: &str) -> Vec<u8> {
    use prost::Message;
    AgentMeta {
        version: "v17.6.0".into(),
        commit_id: "0123abcd".into(),
        pod_namespace: "gitlab-agent".into(),
        pod_name: pod.into(),
        kubernetes_version: Some(KubernetesVersion {
            major: "1".into(),
            minor: "31".into(),
            git_version: "v1.31.2".into(),
            platform: "linux/amd64".into(),
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

fn descriptor() -> ConnectRequest {
    let service = |name: &str, methods: &[&str]| Service {
        name: name.into(),
        methods: methods.iter().map(|m| Method { name: (*m).into() }).collect(),
    };
    ConnectRequest {
        msg: Some(connect_request::Msg::Descriptor(Descriptor {
            agent_descriptor: Some(AgentDescriptor {
                services: vec![
                    service("gitlab.agent.kubernetes_api.rpc.KubernetesApi", &["MakeRequest"]),
                    service("gitlab.agent.starboard_vulnerability.rpc.StarboardVulnerability", &["Scan"]),
                ],
            }),
        })),
    }
}

/// Waits until the connection has been quiet for a moment, then takes what it wrote.
async fn settle(written: &Arc<Mutex<Vec<u8>>>) -> Vec<u8> {
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = written.lock().unwrap().len();
        if now == last {
            return written.lock().unwrap().clone();
        }
        last = now;
    }
}

/// Captures agentk's side of real sessions through kas's WebSocket path.
async fn agentk_sessions() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |s| s.gitlab_external_url = Some("https://gitlab.example.com".into())).await;
    let (agent, token) = app.create_agent("deployer", "team/agent-config").await;
    app.store.set_agent_config(agent.id, Some("flux:\n  webhook_receiver_url: http://receiver/hook\n")).await.unwrap();

    // The Flux path on one connection: configuration, registration, projects, tunnel.
    let (channel, written) = agentk_connection(app.agent).await;
    let mut config = AgentConfigurationClient::new(channel.clone()).send_compressed(CompressionEncoding::Gzip);
    let request =
        ConfigurationRequest { commit_id: String::new(), agent_meta: Some(meta("agentk-0")), skip_register: true };
    let mut stream = config.get_configuration(as_agent(&token, request)).await.unwrap().into_inner();
    stream.message().await.unwrap().expect("a configuration");
    let mut registrar = AgentRegistrarClient::new(channel.clone()).send_compressed(CompressionEncoding::Gzip);
    let request = RegisterRequest { agent_meta: Some(meta("agentk-0")), pod_id: 4_242_424_242 };
    registrar.register(as_agent(&token, request)).await.unwrap();
    let mut flux = GitLabFluxClient::new(channel.clone()).send_compressed(CompressionEncoding::Gzip);
    let projects = ["team/agent-config", "team/app", "other-group/sub/service"];
    let request = ReconcileProjectsRequest { project: projects.iter().map(|p| Project { id: (*p).into() }).collect() };
    let _reconcile = flux.reconcile_projects(as_agent(&token, request)).await.unwrap();
    let mut tunnel = ReverseTunnelClient::new(channel.clone()).send_compressed(CompressionEncoding::Gzip);
    let _tunnel = tunnel.connect(as_agent(&token, futures::stream::iter([descriptor()]))).await.unwrap();
    write_connection("agentk-websocket-session", &settle(&written).await);

    // One RPC per connection: smaller starting points.
    let (channel, written) = agentk_connection(app.agent).await;
    let mut flux = GitLabFluxClient::new(channel).send_compressed(CompressionEncoding::Gzip);
    let request = ReconcileProjectsRequest { project: vec![Project { id: "team/agent-config".into() }] };
    let _reconcile = flux.reconcile_projects(as_agent(&token, request)).await.unwrap();
    write_connection("agentk-reconcile-projects", &settle(&written).await);

    let (channel, written) = agentk_connection(app.agent).await;
    let mut registrar = AgentRegistrarClient::new(channel);
    let request = RegisterRequest { agent_meta: Some(meta("agentk-1")), pod_id: 7 };
    registrar.register(as_agent(&token, request)).await.unwrap();
    write_connection("agentk-register-uncompressed", &settle(&written).await);
    app.stop().await;
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn request_headers(authority: &str) -> Vec<(&'static [u8], Vec<u8>)> {
    vec![
        (b":method", b"POST".to_vec()),
        (b":scheme", b"http".to_vec()),
        (b":path", b"/gitlab.agent.flux.rpc.GitLabFlux/ReconcileProjects".to_vec()),
        (b":authority", authority.as_bytes().to_vec()),
        (b"content-type", b"application/grpc".to_vec()),
        (b"te", b"trailers".to_vec()),
    ]
}

fn encode(encoder: &mut Encoder<'static>, headers: &[(&'static [u8], Vec<u8>)]) -> Vec<u8> {
    encoder.encode(headers.iter().map(|(n, v)| (*n, v.as_slice())))
}

/// HTTP/2 streams that reach the rewriter's corners, and the regression input of the HPACK
/// expansion (one 4 KiB dynamic-table entry referenced once per byte).
fn rewriter_corners() {
    let settings = frame(0x4, 0, 0, &[0, 0x4, 0, 0x40, 0, 0]); // SETTINGS_INITIAL_WINDOW_SIZE
    let mut encoder = Encoder::new();
    let first = encode(&mut encoder, &request_headers(AGENTK_AUTHORITY));
    let second = encode(&mut encoder, &request_headers(AGENTK_AUTHORITY));
    // Padding and priority on the first block; the second split over CONTINUATION frames and
    // using the client's dynamic table.
    let mut padded = vec![4u8, 0, 0, 0, 0, 16];
    padded.extend_from_slice(&first);
    padded.extend_from_slice(&[0; 4]);
    let mut wire = PREFACE.to_vec();
    wire.extend(&settings);
    wire.extend(frame(0x1, 0x4 | 0x8 | 0x20, 1, &padded));
    wire.extend(frame(0x0, 0x1, 1, b"\0\0\0\0\x05\x0a\x03\x0a\x01a"));
    let (a, b) = second.split_at(second.len() / 2);
    wire.extend(frame(0x1, 0, 3, a));
    wire.extend(frame(0x9, 0x4, 3, b));
    wire.extend(frame(0x6, 0, 0, b"pingpong")); // PING
    wire.extend(frame(0x3, 0, 3, &[0, 0, 0, 8])); // RST_STREAM
    write_connection("padding-priority-continuation", &wire);

    // A header larger than one frame, and a dynamic table size update.
    let mut encoder = Encoder::new();
    let mut headers = request_headers("kas.example.com:8150");
    headers.push((b"x-large", vec![b'v'; 20_000]));
    let block = encode(&mut encoder, &headers);
    let mut wire = PREFACE.to_vec();
    wire.extend(&settings);
    let (a, b) = block.split_at(16_000);
    wire.extend(frame(0x1, 0x1, 1, a));
    wire.extend(frame(0x9, 0x4, 1, b));
    let mut resized = vec![0x3f, 0xe1, 0x0f]; // table size update to 2048
    resized.extend(encode(&mut Encoder::new(), &request_headers("kas")));
    wire.extend(frame(0x1, 0x5, 5, &resized));
    write_connection("large-header-and-table-update", &wire);

    // A 4,000-byte header indexed on the first request and referenced by the second (12 KB
    // decoded, within every limit): one mutation away from the expansion below.
    let big = |first: bool| {
        if first {
            // Last, so it is the newest entry (index 62) when the second block starts.
            let mut b = encode(&mut Encoder::new(), &request_headers("kas"));
            b.extend_from_slice(&[0x40, 0x05]);
            b.extend_from_slice(b"x-big");
            b.extend_from_slice(&[0x7f, 0xa1, 0x1e]);
            b.extend(std::iter::repeat_n(b'a', 4000));
            b
        } else {
            let mut b = vec![0xbe, 0xbe];
            b.extend(encode(&mut Encoder::new(), &request_headers("kas")));
            b
        }
    };
    let mut wire = PREFACE.to_vec();
    wire.extend(frame(0x4, 0, 0, &[]));
    wire.extend(frame(0x1, 0x5, 1, &big(true)));
    wire.extend(frame(0x1, 0x5, 3, &big(false)));
    write_connection("indexed-large-header-reused", &wire);

    // The regression input: literal with incremental indexing (new name), a 4,000-byte value,
    // then index 62 (that entry) on every remaining byte of a 16 KiB frame: ~48 MB decoded.
    let mut block = vec![0x40, 0x05];
    block.extend_from_slice(b"x-big");
    block.extend_from_slice(&[0x7f, 0xa1, 0x1e]); // value length 4000 (127 + 3873)
    block.extend(std::iter::repeat_n(b'a', 4000));
    block.resize(16_384, 0xbe);
    let mut wire = PREFACE.to_vec();
    wire.extend(frame(0x4, 0, 0, &[]));
    wire.extend(frame(0x1, 0x4, 1, &block));
    write_connection("regression-hpack-expansion", &wire);
}

/// The request messages agentk and GitLab send, encoded.
fn grpc_messages() {
    let messages: Vec<(&str, Vec<u8>)> = vec![
        (
            "reconcile-projects",
            ReconcileProjectsRequest {
                project: ["team/agent-config", "team/app", "a/b/c/d"]
                    .iter()
                    .map(|p| Project { id: (*p).into() })
                    .collect(),
            }
            .encode_to_vec(),
        ),
        (
            "git-push-event",
            GitPushEventRequest {
                event: Some(GitPushEvent {
                    project: Some(EventProject { id: 42, full_path: "team/agent-config".into() }),
                }),
            }
            .encode_to_vec(),
        ),
        ("register", RegisterRequest { agent_meta: Some(meta("agentk-0")), pod_id: 4_242_424_242 }.encode_to_vec()),
        (
            "get-configuration",
            ConfigurationRequest {
                commit_id: "4f1c2a".into(),
                agent_meta: Some(meta("agentk-0")),
                skip_register: false,
            }
            .encode_to_vec(),
        ),
        (
            "get-connected-agents-by-project",
            GetConnectedAgentsRequest { request: Some(By::ProjectId(42)) }.encode_to_vec(),
        ),
        ("get-connected-agents-by-agent", GetConnectedAgentsRequest { request: Some(By::AgentId(7)) }.encode_to_vec()),
        ("connect-descriptor", descriptor().encode_to_vec()),
        (
            "gitlab-access-header",
            HttpRequest {
                message: Some(http_request::Message::Header(http_request::Header {
                    request: Some(RequestHeader {
                        method: "GET".into(),
                        header: [("Accept".to_string(), Values { value: vec!["application/json".into()] })].into(),
                        url_path: "/api/v4/job/allowed_agents".into(),
                        query: [("id".to_string(), Values { value: vec!["1".into()] })].into(),
                    }),
                    extra: Default::default(),
                })),
            }
            .encode_to_vec(),
        ),
    ];
    for (name, bytes) in messages {
        write("grpc_requests", name, &bytes);
    }
}

/// GitLab's JWTs: as the `authorization` value, and as `<header> NUL <claims>` for the target to
/// sign (far-future `exp`, so the fuzzer starts from accepted tokens).
fn jwts() {
    let token = GitLabJwt::new(&FUZZ_JWT_SECRET).sign_as_gitlab("gitlab.example.com");
    write("gitlab_jwt", "bearer-from-gitlab", format!("Bearer {token}").as_bytes());
    let claims = r#"{"iss":"gitlab.example.com","aud":"gitlab-kas","iat":1700000000,"nbf":1700000000,"exp":4102444800,"jti":"9f0c2d4e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"}"#;
    for (name, header, claims) in [
        ("signed-hs256", r#"{"typ":"JWT","alg":"HS256"}"#, claims),
        ("signed-hs512", r#"{"alg":"HS512"}"#, claims),
        ("signed-audience-list", r#"{"alg":"HS384"}"#, r#"{"aud":["gitlab","gitlab-kas"],"exp":4102444800}"#),
        ("signed-expired", r#"{"alg":"HS256"}"#, r#"{"aud":"gitlab-kas","exp":1700000000}"#),
        ("signed-none", r#"{"alg":"none"}"#, claims),
    ] {
        write("gitlab_jwt", name, format!("{header}\0{claims}").as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes fuzz/seeds; run by hand when the wire changes"]
async fn write_fuzz_seeds() {
    agentk_sessions().await;
    rewriter_corners();
    grpc_messages();
    jwts();
}
