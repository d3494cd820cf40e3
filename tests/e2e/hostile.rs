//! Clients that never authenticate and try to make kas hold sockets or memory: silent sockets,
//! half handshakes, floods past a listener's cap, HPACK bombs and huge messages through the
//! WebSocket path. Each bound is shown at small scale against a real server on 127.0.0.1.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use kas::handshake::PREFACE;
use kas::proto::flux::rpc::git_lab_flux_client::GitLabFluxClient;
use kas::proto::flux::rpc::{Project, ReconcileProjectsRequest};
use kas::websocket::{SUBPROTOCOL, websocket_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::support::agentk::{Transport, as_agent, connect};
use crate::support::process::ProcessReplica;
use crate::support::{TestApp, TestDb, eventually};

/// How long a test waits for the server to close a socket; far above the timeouts it sets.
const CLOSED_WITHIN: Duration = Duration::from_secs(10);
/// An empty SETTINGS frame: with the preface, a complete HTTP/2 handshake from the client.
const SETTINGS: [u8; 9] = [0, 0, 0, 0x4, 0, 0, 0, 0, 0];

fn h2_hello() -> Vec<u8> {
    let mut hello = PREFACE.to_vec();
    hello.extend_from_slice(&SETTINGS);
    hello
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// True when the server closes `tcp` (EOF or reset) within `within`; whatever it sends first
/// is read and ignored.
async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await
    .is_ok()
}

/// The same for a WebSocket.
async fn ws_closed_within(ws: &mut WebSocketStream<TcpStream>, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await
    .is_ok()
}

/// A WebSocket upgraded as agentk's is, with nothing sent through it yet.
async fn websocket(addr: SocketAddr) -> WebSocketStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut request = "ws://gitlab.example.com/-/kubernetes-agent/".into_client_request().unwrap();
    request.headers_mut().insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse().unwrap());
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, tcp, Some(websocket_config())).await.unwrap();
    ws
}

/// True when a fresh connection to `addr` completes an HTTP/2 handshake: the server answers
/// the preface with its own SETTINGS.
async fn h2_answers(addr: SocketAddr) -> bool {
    let attempt = async {
        let mut tcp = TcpStream::connect(addr).await.ok()?;
        tcp.write_all(&h2_hello()).await.ok()?;
        let mut head = [0u8; 9];
        tcp.read_exact(&mut head).await.ok()?;
        Some(head[3] == 0x4)
    };
    tokio::time::timeout(Duration::from_secs(5), attempt).await.ok().flatten().unwrap_or(false)
}

/// One HTTP/1.1 GET on an open connection; returns the status code.
async fn http1_get(tcp: &mut TcpStream, path: &str) -> u16 {
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: kas\r\n\r\n").as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    let head_end = loop {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed before the response");
        response.extend_from_slice(&buf[..n]);
        if let Some(at) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
    };
    let head = String::from_utf8_lossy(&response[..head_end]).to_lowercase();
    let length: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).map(|v| v.trim().parse().unwrap()).unwrap_or(0);
    while response.len() < head_end + length {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "connection closed inside the body");
        response.extend_from_slice(&buf[..n]);
    }
    head[9..12].parse().unwrap()
}

/// The value of one sample in `/metrics`, e.g. `kas_connections_open{name="api"}`.
async fn metric(app: &TestApp, sample: &str) -> f64 {
    let text = app.metrics_text().await;
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{sample} not in {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_handshakes_are_closed_at_the_deadline() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |s| s.handshake_timeout = Some("1s".into())).await;
    let mut sockets = Vec::new();
    for (listener, addr) in [("http", app.http), ("agent", app.agent), ("api", app.api)] {
        for (what, sent) in [
            ("silent socket", &b""[..]),
            ("half an HTTP/2 preface", &PREFACE[..16]),
            ("HTTP/2 preface without SETTINGS", &PREFACE[..]),
            ("HTTP/1.1 head without its blank line", &b"POST /webhooks/gitlab HTTP/1.1\r\nHost: kas\r\n"[..]),
        ] {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(sent).await.unwrap();
            sockets.push((listener, what, tcp));
        }
    }
    let mut upgraded = websocket(app.agent).await;
    let mut half_inside = websocket(app.agent).await;
    half_inside.send(Message::Binary(PREFACE[..10].to_vec().into())).await.unwrap();

    for (listener, what, tcp) in &mut sockets {
        assert!(closed_within(tcp, CLOSED_WITHIN).await, "{what} on the {listener} listener stays open");
    }
    assert!(ws_closed_within(&mut upgraded, CLOSED_WITHIN).await, "a WebSocket with nothing inside stays open");
    assert!(ws_closed_within(&mut half_inside, CLOSED_WITHIN).await, "a WebSocket with half a preface stays open");
    for listener in ["http", "api"] {
        assert_eq!(metric(&app, &format!("kas_handshakes_failed_total{{name=\"{listener}\"}}")).await, 4.0);
    }
    assert_eq!(metric(&app, "kas_handshakes_failed_total{name=\"agent\"}").await, 6.0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_handshakes_are_kept_and_idle_keep_alive_connections_end() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |s| {
        s.handshake_timeout = Some("1s".into());
        s.http_idle_timeout = Some("3s".into());
    })
    .await;
    // HTTP/1.1 keep-alive: a second request after the handshake deadline is served, then the
    // idle connection is closed after the idle timeout, not before.
    let mut tcp = TcpStream::connect(app.http).await.unwrap();
    assert_eq!(http1_get(&mut tcp, "/healthz").await, 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(http1_get(&mut tcp, "/healthz").await, 200);
    let idle_since = Instant::now();
    assert!(closed_within(&mut tcp, CLOSED_WITHIN).await, "an idle keep-alive connection stays open");
    assert!(idle_since.elapsed() >= Duration::from_secs(2), "closed before the idle timeout");

    // HTTP/2: a connection that sent its preface and SETTINGS is an agent's, idle or not.
    let mut h2 = TcpStream::connect(app.agent).await.unwrap();
    h2.write_all(&h2_hello()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    h2.write_all(&frame(0x6, 0, 0, b"kas-ping")).await.unwrap();
    let mut got = Vec::new();
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 1024];
        loop {
            let n = h2.read(&mut buf).await.unwrap();
            assert!(n > 0, "an HTTP/2 connection past its handshake was closed");
            got.extend_from_slice(&buf[..n]);
            if got.windows(8).any(|w| w == b"kas-ping") {
                return;
            }
        }
    })
    .await;
    assert!(pong.is_ok(), "no PING answer");
    // A client that ignores GOAWAY would hold shutdown for the whole grace period.
    drop(h2);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_refuses_new_connections_and_the_others_keep_serving() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |s| {
        s.max_connections_api = Some("3".into());
        s.max_connections_agent = Some("3".into());
    })
    .await;
    for (name, addr) in [("api", app.api), ("agent", app.agent)] {
        // Three connections that completed their handshake hold the listener's three places.
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(&h2_hello()).await.unwrap();
            held.push(tcp);
        }
        let open = format!("kas_connections_open{{name=\"{name}\"}}");
        assert!(eventually(CLOSED_WITHIN, || async { metric(&app, &open).await == 3.0 }).await);
        let mut over = TcpStream::connect(addr).await.unwrap();
        let _ = over.write_all(&h2_hello()).await;
        assert!(closed_within(&mut over, CLOSED_WITHIN).await, "the {name} listener took a fourth connection");
        assert_eq!(metric(&app, &format!("kas_connections_refused_total{{name=\"{name}\"}}")).await, 1.0);
        // The other listeners and the health endpoint answer meanwhile.
        let r = app.client.get(app.url("/healthz")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let other = if name == "api" { app.agent } else { app.api };
        assert!(h2_answers(other).await, "the other gRPC listener stopped answering");
        // Places free up as connections end.
        drop(held);
        assert!(eventually(CLOSED_WITHIN, || h2_answers(addr)).await, "the {name} listener stays full");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_flood_on_the_webhook_port_is_capped_and_cleared_at_the_deadline() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |s| {
        s.handshake_timeout = Some("1s".into());
        s.max_connections_http = Some("40".into());
    })
    .await;
    let mut flood = Vec::new();
    for _ in 0..60 {
        flood.push(TcpStream::connect(app.http).await.unwrap());
    }
    // The agent listener is untouched by the flood.
    assert!(h2_answers(app.agent).await);
    for tcp in &mut flood {
        assert!(closed_within(tcp, CLOSED_WITHIN).await, "an idle socket on the webhook port stays open");
    }
    let r = app.client.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Every flood socket was either refused over the cap or closed at the deadline.
    let refused = metric(&app, "kas_connections_refused_total{name=\"http\"}").await;
    let timed_out = metric(&app, "kas_handshakes_failed_total{name=\"http\"}").await;
    assert!(refused >= 1.0, "the cap of 40 refused none of 60");
    assert_eq!(refused + timed_out, 60.0);
    app.stop().await;
}

/// A 4,000-byte dynamic-table entry, then `refs` one-byte references to it: each byte sent
/// decodes to a 4 KiB header.
fn hpack_bomb(refs: usize) -> Vec<u8> {
    let mut block = loona_hpack::Encoder::new().encode(vec![(&b"x-bomb"[..], &[b'b'; 4000][..])]);
    block.extend(std::iter::repeat_n(0x80 | 62, refs));
    block
}

/// What each attacking connection sends through its WebSocket after the upgrade.
fn attack(shape: usize) -> Vec<u8> {
    const HEADERS: u8 = 0x1;
    const CONTINUATION: u8 = 0x9;
    const END_HEADERS: u8 = 0x4;
    let mut wire = h2_hello();
    match shape {
        // One frame of the largest size: ~48 MB of headers once decoded.
        0 => wire.extend(frame(HEADERS, END_HEADERS, 1, &hpack_bomb(12_000))),
        // The same, continued over CONTINUATION frames.
        1 => {
            wire.extend(frame(HEADERS, 0, 1, &hpack_bomb(12_000)));
            for last in [false, false, true] {
                wire.extend(frame(CONTINUATION, if last { END_HEADERS } else { 0 }, 1, &[0x80 | 62; 16_000]));
            }
        }
        // A first HEADERS frame far over the frame size.
        _ => wire.extend(frame(HEADERS, END_HEADERS, 1, &hpack_bomb(60_000))),
    }
    wire
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_bombs_are_refused_with_bounded_memory() {
    crate::support::init();
    let db = TestDb::sqlite();
    let replica = ProcessReplica::spawn(&db, &[]);
    // Warm up the paths (allocator arenas, the first WebSocket) before the baseline.
    let mut warm = websocket(replica.agent).await;
    warm.send(Message::Binary(attack(0).into())).await.unwrap();
    assert!(ws_closed_within(&mut warm, CLOSED_WITHIN).await);
    let before = replica.peak_rss_kib();

    let attackers = (0..16).map(|i| {
        let addr = replica.agent;
        tokio::spawn(async move {
            let mut ws = websocket(addr).await;
            if i % 4 == 3 {
                // A 4 MiB message: refused from its frame header, before its payload is read.
                let _ = ws.send(Message::Binary(vec![0u8; 4 << 20].into())).await;
            } else {
                let _ = ws.send(Message::Binary(attack(i % 4).into())).await;
            }
            ws_closed_within(&mut ws, CLOSED_WITHIN).await
        })
    });
    for closed in futures::future::join_all(attackers).await {
        assert!(closed.unwrap(), "an attacking WebSocket stays open");
    }
    // The peak, not the final figure: memory held for a moment counts too. Before the limits,
    // these 16 connections grew the server by well over a gigabyte.
    let grown_kib = replica.peak_rss_kib().saturating_sub(before);
    assert!(grown_kib < 32 << 10, "peak RSS grew by {grown_kib} KiB");
    let health = reqwest::get(format!("http://{}/healthz", replica.http)).await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_websocket_streams_with_ok_before_exiting() {
    crate::support::init();
    let db = TestDb::sqlite();
    let mut replica = ProcessReplica::spawn(&db, &[]);
    let store = db.open_store().await;
    let token = kas::domain::AgentToken::generate();
    let name = kas::domain::AgentName::parse("ws-agent").unwrap();
    let project = kas::domain::ProjectPath::parse("g/ws-config").unwrap();
    store.create_agent(&name, &project, &token.digest(), None, kas::clock::now_ms()).await.unwrap();
    let (channel, _) = connect(replica.agent, Transport::WebSocket).await;
    let request = ReconcileProjectsRequest { project: vec![Project { id: "g/ws-config".into() }] };
    let mut stream = GitLabFluxClient::new(channel)
        .reconcile_projects(as_agent(token.expose(), request))
        .await
        .unwrap()
        .into_inner();
    // An abrupt end would cost the agent a 10 s+ backoff; OK makes it reconnect at once.
    let stopped = tokio::task::spawn_blocking(move || replica.terminate());
    let end = tokio::time::timeout(CLOSED_WITHIN, stream.message()).await.expect("the stream ends");
    assert!(matches!(end, Ok(None)), "the stream ended with {end:?}, not OK");
    assert!(stopped.await.unwrap(), "kas exits cleanly");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_websocket_connections() {
    const FRAME_HEADER: usize = 9;
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |s| s.shutdown_grace = Some("20s".into())).await;
    let mut ws = websocket(app.agent).await;
    ws.send(Message::Binary(h2_hello().into())).await.unwrap();
    // An HTTP/2 client inside the WebSocket that answers PINGs two seconds late: the server's
    // graceful close (GOAWAY, PING, wait for the answer) takes that long.
    let client = tokio::spawn(async move {
        let mut pending = Vec::new();
        while let Some(Ok(message)) = ws.next().await {
            let Message::Binary(data) = message else { continue };
            pending.extend_from_slice(&data);
            while pending.len() >= FRAME_HEADER {
                let len = (usize::from(pending[0]) << 16) | (usize::from(pending[1]) << 8) | usize::from(pending[2]);
                if pending.len() < FRAME_HEADER + len {
                    break;
                }
                let f: Vec<u8> = pending.drain(..FRAME_HEADER + len).collect();
                if f[3] == 0x6 && f[4] & 0x1 == 0 {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let _ = ws.send(Message::Binary(frame(0x6, 0x1, 0, &f[FRAME_HEADER..]).into())).await;
                }
            }
        }
    });
    let open = || async { metric(&app, "kas_connections_open{name=\"agent\"}").await == 1.0 };
    assert!(eventually(CLOSED_WITHIN, open).await);
    app.stop().await;
    // The server closed the WebSocket before it returned, so the client sees the end at once
    // (an untracked WebSocket task would close it two seconds later).
    let ended = tokio::time::timeout(Duration::from_millis(1000), client).await;
    assert!(ended.is_ok(), "the WebSocket outlived the server");
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_limit() {
    let db = TestDb::sqlite();
    let replica = ProcessReplica::spawn_with(&db, &[], Some(256));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", replica.pid())).unwrap();
    let open_files: Vec<&str> =
        limits.lines().find(|l| l.starts_with("Max open files")).unwrap().split_whitespace().collect();
    assert_eq!(open_files[3], open_files[4], "soft and hard limits: {open_files:?}");
    let logged = replica.startup_logs.iter().find(|l| l["message"] == "open-file limit").expect("logged");
    assert_eq!(logged["was"], "256");
    assert_eq!(logged["soft"], open_files[3]);
    assert_eq!(logged["hard"], open_files[4]);
}
