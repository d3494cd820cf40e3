//! One `KubernetesApi/MakeRequest` through one claimed tunnel (design brief §12): kas sends
//! `request_info`, the `HttpRequest` header (with an empty `HeaderExtra`: agentk calls as its own
//! service account), the body in `data` messages, the trailer, then `close_send`; agentk answers
//! `header`, `message`s (each a serialized `HttpResponse`: header, data…, trailer), `trailer`, or
//! `error`. Every step has the call's deadline; the tunnel is never used again.

use std::collections::HashMap;

use bytes::Bytes;
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::registry::{BusyGuard, TunnelIo};
use super::{KubeRequest, KubeResponse, ResponseBody, TunnelConfig, TunnelError};
use crate::delivery::EndSignal;
use crate::proto::kubernetes_api::rpc as kapi;
use crate::proto::reverse_tunnel::rpc::{self as rt, connect_request, connect_response};

/// The inner method, as agentk's internal server routes it.
pub const METHOD_NAME: &str = "/gitlab.agent.kubernetes_api.rpc.KubernetesApi/MakeRequest";
/// Type URL of the header's `extra`.
const HEADER_EXTRA_TYPE: &str = "type.googleapis.com/gitlab.agent.kubernetes_api.rpc.HeaderExtra";
/// Request body bytes per `data` message.
const CHUNK: usize = 32 << 10;
/// Response chunks buffered ahead of a slow reader.
const BODY_QUEUE: usize = 8;

/// Headers never sent into a cluster: credentials (agentk would forward them instead of its own
/// token, or impersonate someone), and hop-by-hop headers of kas's own connection.
fn forwardable(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    !(matches!(
        n.as_str(),
        "authorization"
            | "proxy-authorization"
            | "cookie"
            | "set-cookie"
            | "host"
            | "connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "content-length"
            | "via"
    ) || n.starts_with("impersonate-")
        || n.starts_with("proxy-")
        || n.starts_with("x-remote-"))
}

fn values_map<V: From<Vec<String>>>(pairs: impl IntoIterator<Item = (String, String)>) -> HashMap<String, V> {
    let mut grouped: HashMap<String, Vec<String>> = HashMap::new();
    for (k, v) in pairs {
        grouped.entry(k).or_default().push(v);
    }
    grouped.into_iter().map(|(k, v)| (k, V::from(v))).collect()
}

impl From<Vec<String>> for kapi::Values {
    fn from(value: Vec<String>) -> Self {
        Self { value }
    }
}

/// The `HttpRequest` messages of `request`, serialized: header, data…, trailer.
pub(super) fn request_messages(request: &KubeRequest) -> Vec<Vec<u8>> {
    let headers = request.headers.iter().filter(|(k, _)| forwardable(k)).map(|(k, v)| (http_name(k), v.clone()));
    let extra = kapi::HeaderExtra { imp_config: Some(kapi::ImpersonationConfig::default()) };
    let header = kapi::HttpRequest {
        message: Some(kapi::http_request::Message::Header(kapi::http_request::Header {
            request: Some(kapi::PrototoolHttpRequest {
                method: request.method.clone(),
                header: values_map(headers),
                url_path: request.path.clone(),
                query: values_map(request.query.iter().cloned()),
            }),
            extra: Some(prost_types::Any { type_url: HEADER_EXTRA_TYPE.into(), value: extra.encode_to_vec() }),
            content_length: Some(request.body.len() as i64),
        })),
    };
    let mut out = vec![header.encode_to_vec()];
    for chunk in request.body.chunks(CHUNK) {
        let data = kapi::HttpRequest {
            message: Some(kapi::http_request::Message::Data(kapi::http_request::Data { data: chunk.to_vec() })),
        };
        out.push(data.encode_to_vec());
    }
    let trailer =
        kapi::HttpRequest { message: Some(kapi::http_request::Message::Trailer(kapi::http_request::Trailer {})) };
    out.push(trailer.encode_to_vec());
    out
}

/// Canonical header case (`content-type` → `Content-Type`), as Go's HTTP server would see it.
fn http_name(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut c = part.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + &c.as_str().to_ascii_lowercase(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Makes the call; returns when the response header arrived, the body streams after.
pub(super) async fn run(
    io: TunnelIo,
    busy: BusyGuard,
    request: &KubeRequest,
    limits: &TunnelConfig,
    deadline: Instant,
) -> Result<KubeResponse, TunnelError> {
    let mut sends = vec![rt::ConnectResponse {
        msg: Some(connect_response::Msg::RequestInfo(rt::RequestInfo {
            method_name: METHOD_NAME.into(),
            meta: HashMap::new(),
        })),
    }];
    for data in request_messages(request) {
        sends.push(rt::ConnectResponse { msg: Some(connect_response::Msg::Message(rt::Message { data })) });
    }
    sends.push(rt::ConnectResponse { msg: Some(connect_response::Msg::CloseSend(rt::CloseSend {})) });
    for message in sends {
        let sent = tokio::select! {
            sent = tokio::time::timeout_at(deadline, io.outbound.send(Ok(message))) => sent,
            end = ended(&io.revoked, &io.closing) => return Err(abandon(&io, end)),
        };
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(TunnelError::Lost("the agent's tunnel stream ended".into())),
            Err(_) => return Err(abandon(&io, TunnelError::Timeout("sending the request into the tunnel".into()))),
        }
    }
    let mut reader = Reader { io, state: State::Start, deadline };
    let head = match reader.head().await {
        Ok(head) => head,
        Err(e) => return Err(abandon(&reader.io, e)),
    };
    let (tx, rx) = mpsc::channel(BODY_QUEUE);
    let limit = limits.max_response_body;
    tokio::spawn(async move {
        let _busy = busy;
        let mut total = 0usize;
        loop {
            match reader.next_data().await {
                Ok(Some(chunk)) => {
                    total += chunk.len();
                    if total > limit {
                        let _ = tx.send(Err(abandon(&reader.io, TunnelError::ResponseTooLarge(limit)))).await;
                        return;
                    }
                    // A reader that went away abandons the call.
                    if tx.send(Ok(chunk)).await.is_err() {
                        abandon(&reader.io, TunnelError::Lost("the caller stopped reading".into()));
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Err(abandon(&reader.io, e))).await;
                    return;
                }
            }
        }
        // The answer is complete: read agentk's side to its end, then end the stream with OK.
        reader.finish().await;
    });
    Ok(KubeResponse { status: head.0, reason: head.1, headers: head.2, body: ResponseBody { rx } })
}

/// Why the tunnel ended from kas's side while in use.
async fn ended(revoked: &EndSignal, closing: &CancellationToken) -> TunnelError {
    tokio::select! {
        _ = revoked.ended() => TunnelError::Lost("agent token revoked".into()),
        _ = closing.cancelled() => TunnelError::Lost("kas is shutting down or the connection reached its maximum age".into()),
    }
}

/// Ends the tunnel stream with an error agentk treats as a cancelled call (it reopens at once),
/// and returns `e`.
fn abandon(io: &TunnelIo, e: TunnelError) -> TunnelError {
    let status = match &e {
        TunnelError::Lost(m) if m.contains("revoked") => tonic::Status::unauthenticated("agent token revoked"),
        TunnelError::Protocol(m) => tonic::Status::invalid_argument(m.clone()),
        other => tonic::Status::cancelled(other.to_string()),
    };
    let _ = io.outbound.try_send(Err(status));
    e
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Nothing read yet.
    Start,
    /// agentk's inner gRPC header arrived.
    Headers,
    /// The HTTP response header arrived; data follows.
    Body,
    /// The HTTP response trailer arrived.
    Done,
}

struct Reader {
    io: TunnelIo,
    state: State,
    deadline: Instant,
}

type Head = (u16, String, Vec<(String, String)>);

impl Reader {
    /// The next message from agentk, within the deadline; `None` when its side ended.
    async fn recv(&mut self) -> Result<Option<connect_request::Msg>, TunnelError> {
        let next = tokio::select! {
            next = tokio::time::timeout_at(self.deadline, self.io.inbound.next()) => next,
            end = ended(&self.io.revoked, &self.io.closing) => return Err(end),
        };
        match next {
            Err(_) => Err(TunnelError::Timeout("waiting for the cluster's answer".into())),
            Ok(None) => Ok(None),
            Ok(Some(Err(status))) => Err(TunnelError::Lost(format!("{}: {}", status.code(), status.message()))),
            Ok(Some(Ok(rt::ConnectRequest { msg: None }))) => Err(TunnelError::Protocol("empty message".into())),
            Ok(Some(Ok(rt::ConnectRequest { msg: Some(m) }))) => Ok(Some(m)),
        }
    }

    /// Reads up to the HTTP response header.
    async fn head(&mut self) -> Result<Head, TunnelError> {
        loop {
            match self.recv().await? {
                None => return Err(TunnelError::Lost("the tunnel ended before the answer".into())),
                Some(connect_request::Msg::Header(_)) if self.state == State::Start => self.state = State::Headers,
                // The inner call ended early: an error (or the end) follows.
                Some(connect_request::Msg::Trailer(_)) => {}
                Some(connect_request::Msg::Error(e)) => return Err(agent_error(e)),
                Some(connect_request::Msg::Message(m)) if self.state != State::Body => match decode(&m.data)? {
                    kapi::http_response::Message::Header(h) => {
                        let r = h.response.ok_or_else(|| TunnelError::Protocol("header without response".into()))?;
                        let status = u16::try_from(r.status_code)
                            .ok()
                            .filter(|s| (100..1000).contains(s))
                            .ok_or_else(|| TunnelError::Protocol(format!("status code {}", r.status_code)))?;
                        self.state = State::Body;
                        let mut headers: Vec<(String, String)> = r
                            .header
                            .into_iter()
                            .flat_map(|(k, v)| v.value.into_iter().map(move |v| (k.clone(), v)))
                            .collect();
                        headers.sort();
                        return Ok((status, r.status, headers));
                    }
                    other => return Err(TunnelError::Protocol(format!("{} before the response header", name(&other)))),
                },
                Some(other) => return Err(TunnelError::Protocol(format!("unexpected {} first", msg_name(&other)))),
            }
        }
    }

    /// The next body chunk; `None` after the response trailer.
    async fn next_data(&mut self) -> Result<Option<Bytes>, TunnelError> {
        loop {
            if self.state == State::Done {
                return Ok(None);
            }
            match self.recv().await? {
                None => return Err(TunnelError::Lost("the tunnel ended in the middle of the answer".into())),
                // The inner call ended before the answer did: an error (or the end) follows.
                Some(connect_request::Msg::Trailer(_)) => {}
                Some(connect_request::Msg::Error(e)) => return Err(agent_error(e)),
                Some(connect_request::Msg::Message(m)) => match decode(&m.data)? {
                    kapi::http_response::Message::Data(d) if !d.data.is_empty() => {
                        return Ok(Some(Bytes::from(d.data)));
                    }
                    kapi::http_response::Message::Data(_) => {}
                    kapi::http_response::Message::Trailer(_) => self.state = State::Done,
                    other => return Err(TunnelError::Protocol(format!("{} in the body", name(&other)))),
                },
                Some(other) => {
                    return Err(TunnelError::Protocol(format!("unexpected {} in the body", msg_name(&other))));
                }
            }
        }
    }

    /// Reads agentk's side to its end (its trailer, maybe an error) within the deadline; the
    /// stream then ends with OK when the reader is dropped.
    async fn finish(mut self) {
        loop {
            match self.recv().await {
                Ok(None) => return,
                Ok(Some(connect_request::Msg::Trailer(_))) => {}
                Ok(Some(connect_request::Msg::Error(e))) => {
                    tracing::debug!(error = %agent_error(e), "agentk reported an error after a complete answer");
                }
                Ok(Some(other)) => {
                    abandon(
                        &self.io,
                        TunnelError::Protocol(format!("unexpected {} after the answer", msg_name(&other))),
                    );
                    return;
                }
                Err(_) => return,
            }
        }
    }
}

fn decode(data: &[u8]) -> Result<kapi::http_response::Message, TunnelError> {
    kapi::HttpResponse::decode(data)
        .map_err(|e| TunnelError::Protocol(format!("HttpResponse: {e}")))?
        .message
        .ok_or_else(|| TunnelError::Protocol("empty HttpResponse".into()))
}

fn agent_error(e: rt::Error) -> TunnelError {
    let status = e.status.unwrap_or_default();
    TunnelError::Agent { code: status.code, message: status.message }
}

fn name(m: &kapi::http_response::Message) -> &'static str {
    match m {
        kapi::http_response::Message::Header(_) => "response header",
        kapi::http_response::Message::Data(_) => "response data",
        kapi::http_response::Message::Trailer(_) => "response trailer",
        kapi::http_response::Message::UpgradeData(_) => "upgrade data",
    }
}

fn msg_name(m: &connect_request::Msg) -> &'static str {
    match m {
        connect_request::Msg::Descriptor(_) => "descriptor",
        connect_request::Msg::Header(_) => "header",
        connect_request::Msg::Message(_) => "message",
        connect_request::Msg::Trailer(_) => "trailer",
        connect_request::Msg::Error(_) => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_never_reach_the_cluster() {
        let request = KubeRequest {
            method: "GET".into(),
            path: "/version".into(),
            headers: vec![
                ("Authorization".into(), "Bearer secret".into()),
                ("cookie".into(), "session=1".into()),
                ("Impersonate-User".into(), "admin".into()),
                ("Impersonate-Extra-Scopes".into(), "x".into()),
                ("accept".into(), "application/json".into()),
            ],
            ..Default::default()
        };
        let messages = request_messages(&request);
        assert_eq!(messages.len(), 2, "header and trailer, no data for an empty body");
        let header = match kapi::HttpRequest::decode(messages[0].as_slice()).unwrap().message {
            Some(kapi::http_request::Message::Header(h)) => h,
            other => panic!("{other:?}"),
        };
        let names: Vec<&String> = header.request.as_ref().unwrap().header.keys().collect();
        assert_eq!(names, ["Accept"]);
        let extra = header.extra.unwrap();
        assert_eq!(extra.type_url, HEADER_EXTRA_TYPE);
        let extra = kapi::HeaderExtra::decode(extra.value.as_slice()).unwrap();
        assert_eq!(extra.imp_config, Some(kapi::ImpersonationConfig::default()), "no impersonation");
    }

    #[test]
    fn bodies_go_in_chunks() {
        let request = KubeRequest {
            method: "PATCH".into(),
            path: "/apis/x".into(),
            body: vec![7; CHUNK * 2 + 1],
            ..Default::default()
        };
        assert_eq!(request_messages(&request).len(), 5);
        assert_eq!(http_name("content-type"), "Content-Type");
    }
}
