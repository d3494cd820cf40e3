//! agentk's side of the reverse tunnel, spoken exactly as agentk does (design brief §12), with
//! message declarations of its own (independent of kas's `proto/`): it opens `slots` tunnels,
//! sends the descriptor first, waits; on `request_info` it reads the `HttpRequest` messages up to
//! `close_send`, makes the HTTP request against a stand-in Kubernetes API, and answers `header`,
//! `message`s (`HttpResponse` header, data…, trailer), `trailer`; then reopens, one request per
//! stream. A gRPC error from kas backs off briefly; an OK end reopens at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::transport::Channel;

pub const CONNECT: &str = "/gitlab.agent.reverse_tunnel.rpc.ReverseTunnel/Connect";
pub const MAKE_REQUEST: &str = "/gitlab.agent.kubernetes_api.rpc.KubernetesApi/MakeRequest";
pub const HEADER_EXTRA: &str = "type.googleapis.com/gitlab.agent.kubernetes_api.rpc.HeaderExtra";

// ---- gitlab.agent.reverse_tunnel ----

#[derive(Clone, PartialEq, Message)]
pub struct Method {
    #[prost(string, tag = "1")]
    pub name: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Service {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(message, repeated, tag = "2")]
    pub methods: Vec<Method>,
}

#[derive(Clone, PartialEq, Message)]
pub struct AgentDescriptor {
    #[prost(message, repeated, tag = "1")]
    pub services: Vec<Service>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Descriptor {
    #[prost(message, optional, tag = "1")]
    pub agent_descriptor: Option<AgentDescriptor>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Values {
    #[prost(string, repeated, tag = "1")]
    pub value: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Meta {
    #[prost(map = "string, message", tag = "1")]
    pub meta: HashMap<String, Values>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Frame {
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct TunnelError {
    #[prost(message, optional, tag = "1")]
    pub status: Option<RpcStatus>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Up {
    #[prost(message, tag = "1")]
    Descriptor(Descriptor),
    #[prost(message, tag = "2")]
    Header(Meta),
    #[prost(message, tag = "3")]
    Message(Frame),
    #[prost(message, tag = "4")]
    Trailer(Meta),
    #[prost(message, tag = "5")]
    Error(TunnelError),
}

#[derive(Clone, PartialEq, Message)]
pub struct ConnectRequest {
    #[prost(oneof = "Up", tags = "1, 2, 3, 4, 5")]
    pub msg: Option<Up>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RequestInfo {
    #[prost(string, tag = "1")]
    pub method_name: String,
    #[prost(map = "string, message", tag = "2")]
    pub meta: HashMap<String, Values>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Down {
    #[prost(message, tag = "1")]
    RequestInfo(RequestInfo),
    #[prost(message, tag = "2")]
    Message(Frame),
    #[prost(message, tag = "3")]
    CloseSend(Empty),
}

#[derive(Clone, PartialEq, Message)]
pub struct ConnectResponse {
    #[prost(oneof = "Down", tags = "1, 2, 3")]
    pub msg: Option<Down>,
}

// ---- gitlab.agent.grpctool / prototool / kubernetes_api ----

#[derive(Clone, PartialEq, Message)]
pub struct PrototoolRequest {
    #[prost(string, tag = "1")]
    pub method: String,
    #[prost(map = "string, message", tag = "2")]
    pub header: HashMap<String, Values>,
    #[prost(string, tag = "3")]
    pub url_path: String,
    #[prost(map = "string, message", tag = "4")]
    pub query: HashMap<String, Values>,
}

#[derive(Clone, PartialEq, Message)]
pub struct RequestHeader {
    #[prost(message, optional, tag = "1")]
    pub request: Option<PrototoolRequest>,
    #[prost(message, optional, tag = "2")]
    pub extra: Option<prost_types::Any>,
    #[prost(int64, optional, tag = "3")]
    pub content_length: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum HttpRequestPart {
    #[prost(message, tag = "1")]
    Header(RequestHeader),
    #[prost(message, tag = "2")]
    Data(Frame),
    #[prost(message, tag = "3")]
    Trailer(Empty),
    #[prost(message, tag = "4")]
    UpgradeData(Frame),
}

#[derive(Clone, PartialEq, Message)]
pub struct HttpRequest {
    #[prost(oneof = "HttpRequestPart", tags = "1, 2, 3, 4")]
    pub message: Option<HttpRequestPart>,
}

#[derive(Clone, PartialEq, Message)]
pub struct PrototoolResponse {
    #[prost(int32, tag = "1")]
    pub status_code: i32,
    #[prost(string, tag = "2")]
    pub status: String,
    #[prost(map = "string, message", tag = "3")]
    pub header: HashMap<String, Values>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ResponseHeader {
    #[prost(message, optional, tag = "1")]
    pub response: Option<PrototoolResponse>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum HttpResponsePart {
    #[prost(message, tag = "1")]
    Header(ResponseHeader),
    #[prost(message, tag = "2")]
    Data(Frame),
    #[prost(message, tag = "3")]
    Trailer(Empty),
    #[prost(message, tag = "4")]
    UpgradeData(Frame),
}

#[derive(Clone, PartialEq, Message)]
pub struct HttpResponse {
    #[prost(oneof = "HttpResponsePart", tags = "1, 2, 3, 4")]
    pub message: Option<HttpResponsePart>,
}

#[derive(Clone, PartialEq, Message)]
pub struct ImpersonationConfig {
    #[prost(string, tag = "1")]
    pub username: String,
    #[prost(string, repeated, tag = "2")]
    pub groups: Vec<String>,
    #[prost(string, tag = "3")]
    pub uid: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct HeaderExtra {
    #[prost(message, optional, tag = "1")]
    pub imp_config: Option<ImpersonationConfig>,
}

// ---- the double ----

/// How the double behaves when it gets a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Answers fully.
    Answer,
    /// Sends the header and the first body chunk, then resets the stream (a pod dying mid-call).
    DieMidAnswer,
    /// Cannot reach the API server: header, trailer, then `error` UNAVAILABLE, as agentk does when
    /// its inner call fails.
    Unreachable,
}

/// A request as the double received it through the tunnel.
#[derive(Debug, Clone)]
pub struct Received {
    pub method_name: String,
    pub method: String,
    pub url_path: String,
    pub query: HashMap<String, Vec<String>>,
    pub header: HashMap<String, Vec<String>>,
    pub extra_type_url: String,
    /// The impersonation config, decoded from `extra` (`None` when absent).
    pub imp_config: Option<ImpersonationConfig>,
}

/// agentk's tunnels of one agent.
pub struct TunnelAgent {
    pub received: Arc<Mutex<Vec<Received>>>,
    /// Status codes kas ended tunnel streams with (OK ends are not listed).
    pub errors: Arc<Mutex<Vec<tonic::Code>>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TunnelAgent {
    /// Opens `slots` tunnels to kas at `channel` as the agent with `token`, answering from the
    /// Kubernetes API at `kube`.
    pub fn start(channel: Channel, token: &str, kube: String, slots: usize, behaviour: Behaviour) -> TunnelAgent {
        let received = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let tasks = (0..slots)
            .map(|_| {
                let slot = Slot {
                    channel: channel.clone(),
                    token: token.to_owned(),
                    kube: kube.clone(),
                    behaviour,
                    received: received.clone(),
                    errors: errors.clone(),
                    http: reqwest::Client::new(),
                };
                let stop = stop.clone();
                tokio::spawn(async move { slot.run(stop).await })
            })
            .collect();
        TunnelAgent { received, errors, stop, tasks }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn errors(&self) -> Vec<tonic::Code> {
        self.errors.lock().unwrap().clone()
    }

    /// Closes every tunnel (the pod goes away).
    pub async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

struct Slot {
    channel: Channel,
    token: String,
    kube: String,
    behaviour: Behaviour,
    received: Arc<Mutex<Vec<Received>>>,
    errors: Arc<Mutex<Vec<tonic::Code>>>,
    http: reqwest::Client,
}

fn up(msg: Up) -> ConnectRequest {
    ConnectRequest { msg: Some(msg) }
}

fn values(map: HashMap<String, Values>) -> HashMap<String, Vec<String>> {
    map.into_iter().map(|(k, v)| (k, v.value)).collect()
}

impl Slot {
    async fn run(self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let (tx, rx) = mpsc::channel::<ConnectRequest>(16);
            let descriptor = Descriptor {
                agent_descriptor: Some(AgentDescriptor {
                    services: vec![Service {
                        name: "gitlab.agent.kubernetes_api.rpc.KubernetesApi".into(),
                        methods: vec![Method { name: "MakeRequest".into() }],
                    }],
                }),
            };
            tx.send(up(Up::Descriptor(descriptor))).await.unwrap();
            let mut request = tonic::Request::new(ReceiverStream::new(rx));
            request.metadata_mut().insert("authorization", format!("Bearer {}", self.token).parse().unwrap());
            let mut grpc = tonic::client::Grpc::new(self.channel.clone()).send_compressed(CompressionEncoding::Gzip);
            let opened = async {
                grpc.ready().await.map_err(|e| tonic::Status::unknown(e.to_string()))?;
                let path = http::uri::PathAndQuery::from_static(CONNECT);
                grpc.streaming(request, path, tonic_prost::ProstCodec::<ConnectRequest, ConnectResponse>::default())
                    .await
            };
            let mut inbound = match opened.await {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    self.errors.lock().unwrap().push(status.code());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let first = tokio::select! {
                _ = stop.cancelled() => return,
                first = inbound.message() => first,
            };
            match first {
                Ok(Some(ConnectResponse { msg: Some(Down::RequestInfo(info)) })) => {
                    if self.serve(info, &mut inbound, tx).await {
                        // Read kas's side to its end.
                        while let Ok(Some(_)) = inbound.message().await {}
                    }
                    // Else dropped with the request half: the stream is reset, as when a pod dies.
                }
                Ok(None) => {} // nothing to do: reopen at once
                Ok(Some(other)) => panic!("kas sent {other:?} before request_info"),
                Err(status) => {
                    self.errors.lock().unwrap().push(status.code());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    async fn serve(
        &self,
        info: RequestInfo,
        inbound: &mut tonic::Streaming<ConnectResponse>,
        tx: mpsc::Sender<ConnectRequest>,
    ) -> bool {
        assert_eq!(info.method_name, MAKE_REQUEST);
        let mut header = None;
        let mut body = Vec::new();
        let mut trailer = false;
        loop {
            match inbound.message().await {
                Ok(Some(ConnectResponse { msg: Some(Down::Message(frame)) })) => {
                    let part = HttpRequest::decode(frame.data.as_slice()).unwrap().message.unwrap();
                    match part {
                        HttpRequestPart::Header(h) => {
                            assert!(header.is_none(), "one header");
                            header = Some(h);
                        }
                        HttpRequestPart::Data(d) => body.extend(d.data),
                        HttpRequestPart::Trailer(_) => trailer = true,
                        HttpRequestPart::UpgradeData(_) => panic!("kas never upgrades"),
                    }
                }
                Ok(Some(ConnectResponse { msg: Some(Down::CloseSend(_)) })) => break,
                other => panic!("expected messages then close_send, got {other:?}"),
            }
        }
        assert!(trailer, "the request ends with its trailer");
        let header = header.expect("a request header");
        let request = header.request.clone().unwrap();
        let extra = header.extra.clone().unwrap_or_default();
        let imp_config = HeaderExtra::decode(extra.value.as_slice()).ok().and_then(|e| e.imp_config);
        self.received.lock().unwrap().push(Received {
            method_name: info.method_name.clone(),
            method: request.method.clone(),
            url_path: request.url_path.clone(),
            query: values(request.query.clone()),
            header: values(request.header.clone()),
            extra_type_url: extra.type_url.clone(),
            imp_config,
        });
        if self.behaviour == Behaviour::Unreachable {
            let error = TunnelError {
                status: Some(RpcStatus {
                    code: 14,
                    message: "dial tcp 10.96.0.1:443: connect: connection refused".into(),
                }),
            };
            for m in [up(Up::Header(Meta::default())), up(Up::Trailer(Meta::default())), up(Up::Error(error))] {
                let _ = tx.send(m).await;
            }
            return true;
        }
        // Forward to the API server as agentk does: the request's headers, its own credentials
        // (the stand-in has none).
        let mut url = reqwest::Url::parse(&format!("{}{}", self.kube, request.url_path)).unwrap();
        for (k, vs) in &request.query {
            for v in &vs.value {
                url.query_pairs_mut().append_pair(k, v);
            }
        }
        let mut outgoing = self.http.request(request.method.parse().unwrap(), url).body(body);
        for (k, vs) in &request.header {
            for v in &vs.value {
                outgoing = outgoing.header(k, v);
            }
        }
        let answer = outgoing.send().await.unwrap();
        let status = answer.status();
        let mut headers: HashMap<String, Values> = HashMap::new();
        for (k, v) in answer.headers() {
            headers.entry(k.as_str().to_owned()).or_default().value.push(v.to_str().unwrap().to_owned());
        }
        let data = answer.bytes().await.unwrap();
        let grpc_meta = HashMap::from([("content-type".to_owned(), Values { value: vec!["application/grpc".into()] })]);
        let send = |m: ConnectRequest| {
            let tx = tx.clone();
            async move { tx.send(m).await.is_ok() }
        };
        let frame = |r: HttpResponse| up(Up::Message(Frame { data: r.encode_to_vec() }));
        send(up(Up::Header(Meta { meta: grpc_meta }))).await;
        let response_header = HttpResponse {
            message: Some(HttpResponsePart::Header(ResponseHeader {
                response: Some(PrototoolResponse {
                    status_code: status.as_u16() as i32,
                    status: status.to_string(),
                    header: headers,
                }),
            })),
        };
        send(frame(response_header)).await;
        for (i, chunk) in data.chunks(32 << 10).enumerate() {
            send(frame(HttpResponse { message: Some(HttpResponsePart::Data(Frame { data: chunk.to_vec() })) })).await;
            if i == 0 && self.behaviour == Behaviour::DieMidAnswer {
                // Give kas the first chunk, then vanish without ending the stream cleanly.
                tokio::time::sleep(Duration::from_millis(200)).await;
                return false;
            }
        }
        send(frame(HttpResponse { message: Some(HttpResponsePart::Trailer(Empty {})) })).await;
        send(up(Up::Trailer(Meta::default()))).await;
        // Dropping `tx` half-closes agentk's side.
        true
    }
}
