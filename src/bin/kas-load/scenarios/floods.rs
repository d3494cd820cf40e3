//! Floods of clients that never complete a handshake: what the other clients see meanwhile,
//! and whether the server lets go of the sockets by itself.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use super::{Ctx, LoadDb, Report, SECRET, header, serve_args};
use crate::process::ServerProcess;
use crate::stats::Samples;
use crate::webhooks::{self, push_body};

/// The server's handshake timeout in this scenario (kas's default).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long past the handshake timeout a socket may stay open before it counts as kept.
const SLACK: Duration = Duration::from_secs(5);
/// Requests measured on each path while the flood is held.
const PROBES: usize = 20;

/// `idle-flood`: `--idle-sockets` connections to the webhook port that send nothing, held
/// while /healthz, a webhook and the agent listener are timed; then waits for the server to
/// close every one of them.
pub async fn idle_flood(ctx: &Ctx, report: &mut Report) -> Result<(), String> {
    let n = ctx.options.idle_sockets.clamp(1, 20_000);
    header(&format!("idle flood: {n} silent sockets on the webhook port (handshake timeout {HANDSHAKE_TIMEOUT:?})"));
    let db = LoadDb::postgres(&ctx.options.postgres).await?;
    let mut args = serve_args(ctx, &db, "idle-flood", None);
    args.extend(["--handshake-timeout".into(), format!("{}s", HANDSHAKE_TIMEOUT.as_secs())]);
    let server = ServerProcess::spawn("serve-child", &args, &ctx.logs)?;
    let http = server.addrs.http;
    let quiet = probe_health(http).await?;
    let fds_quiet = open_fds(&server);

    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(ctx.options.connect_concurrency.max(1)));
    let connects: Vec<_> = (0..n)
        .map(|_| {
            let semaphore = semaphore.clone();
            tokio::spawn(async move {
                let _permit = semaphore.acquire_owned().await.expect("semaphore");
                let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(http)).await;
                tcp.ok().and_then(Result::ok).map(|t| (t, Instant::now()))
            })
        })
        .collect();
    let mut sockets = Vec::with_capacity(n);
    for c in connects {
        if let Some(socket) = c.await.map_err(|e| e.to_string())? {
            sockets.push(socket);
        }
    }
    let held = sockets.len();
    let fds_flooded = open_fds(&server);
    let flooded = probe_health(http).await?;
    let webhook = probe_webhook(http).await;
    let agent = probe_agent(server.addrs.agent).await;

    // Each socket: how long after its connect the server closed it (None: still open).
    let closes: Vec<_> = sockets
        .into_iter()
        .map(|(mut tcp, connected)| {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let wait = HANDSHAKE_TIMEOUT + SLACK - connected.elapsed().min(HANDSHAKE_TIMEOUT + SLACK);
                match tokio::time::timeout(wait, tcp.read(&mut buf)).await {
                    Ok(Ok(0) | Err(_)) => Some(connected.elapsed()),
                    _ => None,
                }
            })
        })
        .collect();
    let mut closed = Samples::default();
    let mut kept = 0;
    for c in closes {
        match c.await.map_err(|e| e.to_string())? {
            Some(after) => closed.push(after),
            None => kept += 1,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_after = open_fds(&server);

    report.add("idle-flood", "sockets opened / attempted", format!("{held} / {n}"), "", None);
    report.add("idle-flood", "/healthz before the flood", quiet.summary(), "", None);
    report.add(
        "idle-flood",
        "/healthz while flooded",
        flooded.summary(),
        "all 200, p99 ≤ 100 ms",
        Some(flooded.0.len() == PROBES && flooded.percentile(99.0) <= 100.0),
    );
    let (status, took) = webhook;
    report.add(
        "idle-flood",
        "webhook while flooded",
        format!("{status} in {:.2} ms", took.as_secs_f64() * 1000.0),
        "202",
        Some(status == 202),
    );
    report.add(
        "idle-flood",
        "agent HTTP/2 handshake while flooded",
        match &agent {
            Ok(took) => format!("{:.2} ms", took.as_secs_f64() * 1000.0),
            Err(e) => format!("failed: {e}"),
        },
        "succeeds",
        Some(agent.is_ok()),
    );
    report.add(
        "idle-flood",
        "closed by the server after connect",
        format!("{} ({kept} still open {:?} after connect)", closed.summary(), HANDSHAKE_TIMEOUT + SLACK),
        "every socket, within the handshake timeout",
        Some(kept == 0 && closed.percentile(100.0) <= (HANDSHAKE_TIMEOUT + SLACK).as_secs_f64() * 1000.0),
    );
    report.add(
        "idle-flood",
        "server descriptors: quiet / flooded / after",
        format!("{fds_quiet} / {fds_flooded} / {fds_after}"),
        "back to quiet",
        Some(fds_after <= fds_quiet + 16),
    );
    server.stop();
    db.drop_database().await;
    Ok(())
}

/// `PROBES` GETs of /healthz, each on a new connection (as a load balancer's check would be).
async fn probe_health(addr: SocketAddr) -> Result<Samples, String> {
    let mut samples = Samples::default();
    for _ in 0..PROBES {
        let started = Instant::now();
        let attempt = async {
            let mut sender = webhooks::connect(addr).await?;
            sender.ready().await.map_err(|e| e.to_string())?;
            let request = http::Request::get("/healthz")
                .header("host", "kas")
                .body(Full::new(Bytes::new()))
                .map_err(|e| e.to_string())?;
            let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            response.into_body().collect().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(status)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(200)) => samples.push(started.elapsed()),
            Ok(Ok(status)) => return Err(format!("/healthz answered {status}")),
            Ok(Err(e)) => return Err(format!("/healthz: {e}")),
            Err(_) => return Err("/healthz did not answer within 5 s".into()),
        }
    }
    Ok(samples)
}

/// One webhook on a new connection: its status (0 for a transport error) and how long it took.
async fn probe_webhook(addr: SocketAddr) -> (u16, Duration) {
    let started = Instant::now();
    let attempt = async {
        let mut sender = webhooks::connect(addr).await?;
        webhooks::post(&mut sender, SECRET, "idle-flood-probe", push_body(7, "load/idle-flood", 0)).await
    };
    let status = tokio::time::timeout(Duration::from_secs(5), attempt).await.ok().and_then(Result::ok).unwrap_or(0);
    (status, started.elapsed())
}

/// An HTTP/2 handshake with the agent listener.
async fn probe_agent(addr: SocketAddr) -> Result<Duration, String> {
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), crate::agents::connect(addr))
        .await
        .map_err(|_| "no handshake within 5 s".to_owned())??;
    Ok(started.elapsed())
}

/// Descriptors the server holds open.
fn open_fds(server: &ServerProcess) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", server.pid())).map(|d| d.count()).unwrap_or(0)
}
