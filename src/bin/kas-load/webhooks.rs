//! A lean HTTP/1.1 webhook sender: keep-alive connections, one request in flight on each.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::stats::Samples;

/// A push webhook body for project `id` at `path`.
pub fn push_body(id: i64, path: &str, visibility_level: i64) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "object_kind": "push",
            "ref": "refs/heads/main",
            "before": "95790bf891e76fee5e1747ab589903a6a1f80f22",
            "after": "da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
            "project_id": id,
            "project": {"id": id, "path_with_namespace": path, "visibility_level": visibility_level},
            "commits": [],
            "total_commits_count": 0
        })
        .to_string(),
    )
}

/// One keep-alive connection.
pub async fn connect(addr: SocketAddr) -> Result<SendRequest<Full<Bytes>>, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends one webhook; returns the status.
pub async fn post(sender: &mut SendRequest<Full<Bytes>>, secret: &str, key: &str, body: Bytes) -> Result<u16, String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let request = http::Request::post("/webhooks/gitlab")
        .header("host", "kas")
        .header("content-type", "application/json")
        .header("x-gitlab-event", "Push Hook")
        .header("x-gitlab-token", secret)
        .header("idempotency-key", key)
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    response.into_body().collect().await.map_err(|e| e.to_string())?;
    Ok(status)
}

/// What a flood measured.
#[derive(Default)]
pub struct Flood {
    pub latencies: Samples,
    pub statuses: std::collections::BTreeMap<u16, u64>,
    pub errors: u64,
    pub elapsed: Duration,
}

/// Sends as fast as `concurrency` connections allow for `duration`; `body(i)` makes request i,
/// whose idempotency key is `<key_prefix>-<i>`.
pub async fn flood(
    key_prefix: &str,
    addr: SocketAddr,
    secret: &str,
    concurrency: usize,
    duration: Duration,
    body: impl Fn(u64) -> Bytes + Send + Sync + 'static,
) -> Result<Flood, String> {
    let body = Arc::new(body);
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let mut sender = connect(addr).await?;
        let (body, counter, secret, prefix) = (body.clone(), counter.clone(), secret.to_owned(), key_prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut out = Flood::default();
            while Instant::now() < deadline {
                let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let t = Instant::now();
                match post(&mut sender, &secret, &format!("{prefix}-{i}"), body(i)).await {
                    Ok(status) => {
                        out.latencies.push(t.elapsed());
                        *out.statuses.entry(status).or_default() += 1;
                    }
                    Err(_) => out.errors += 1,
                }
            }
            out
        }));
    }
    let mut total = Flood::default();
    for t in tasks {
        let part = t.await.map_err(|e| e.to_string())?;
        total.latencies.extend(part.latencies);
        total.errors += part.errors;
        for (s, n) in part.statuses {
            *total.statuses.entry(s).or_default() += n;
        }
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

/// A request for the paced sender: body, idempotency key, and where to report.
pub struct Job {
    pub body: Bytes,
    pub key: String,
    /// Called just before the request is written, and with the status when it is answered.
    pub on_send: Box<dyn FnOnce() + Send>,
    pub done: oneshot::Sender<(Result<u16, String>, Instant)>,
}

/// A pool of `size` connections taking jobs from one queue.
pub async fn pool(addr: SocketAddr, secret: &str, size: usize) -> Result<mpsc::Sender<Job>, String> {
    let (tx, rx) = mpsc::channel::<Job>(100_000);
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..size {
        let mut sender = connect(addr).await?;
        let (rx, secret) = (rx.clone(), secret.to_owned());
        tokio::spawn(async move {
            loop {
                let job = { rx.lock().await.recv().await };
                let Some(job) = job else { return };
                (job.on_send)();
                let result = post(&mut sender, &secret, &job.key, job.body).await;
                let _ = job.done.send((result, Instant::now()));
            }
        });
    }
    Ok(tx)
}
