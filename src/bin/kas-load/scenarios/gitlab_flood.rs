//! `gitlab-flood`: kas in GitLab mode against a stand-in GitLab (in this process, 127.0.0.1),
//! known agents receiving pushes, first quietly, then while strangers present 1,000 random
//! tokens per second. Prints the known agents' notification latency in both phases, what became
//! of the strangers' calls, how many reached GitLab, and the server's memory before and after.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{Ctx, LoadDb, Report, SECRET, header, serve_args, wait_for};
use crate::process::{ServerProcess, cores};
use crate::stats::Samples;
use crate::webhooks::{self, Job, push_body};

/// Known agents, each with its own stream.
const KNOWN: usize = 50;
/// Pushes per second to the known agents (half to their configuration projects, half to a
/// public project GitLab is asked about).
const PUSH_RATE: u64 = 20;
/// Random-token calls per second during the flood, and the connections they come over.
const FLOOD_RATE: u64 = 1000;
const FLOOD_CONNECTIONS: usize = 8;
/// How long the stand-in GitLab takes to answer.
const GITLAB_LATENCY: Duration = Duration::from_millis(10);

fn token(i: usize) -> String {
    format!("glagent-known-{i:04}-{}", "k".repeat(30))
}

/// The stand-in's state: the agents it knows and the calls it got.
#[derive(Default)]
struct StandIn {
    agents: HashMap<String, usize>,
    known_calls: AtomicU64,
    stranger_calls: AtomicU64,
    access_calls: AtomicU64,
}

fn presented(headers: &HeaderMap) -> Option<&str> {
    headers.get("gitlab-agent-api-request").and_then(|v| v.to_str().ok())
}

async fn agent_info(State(s): State<Arc<StandIn>>, headers: HeaderMap) -> Response {
    tokio::time::sleep(GITLAB_LATENCY).await;
    let Some(&i) = presented(&headers).and_then(|t| s.agents.get(t)) else {
        s.stranger_calls.fetch_add(1, Ordering::Relaxed);
        return StatusCode::UNAUTHORIZED.into_response();
    };
    s.known_calls.fetch_add(1, Ordering::Relaxed);
    axum::Json(serde_json::json!({
        "project_id": 100_000 + i, "agent_id": 1 + i, "agent_name": format!("k{i}"), "default_branch": "main",
        "gitaly_info": {"address": "unix:/gitaly.socket"},
        "gitaly_repository": {"storage_name": "default", "relative_path": "x.git", "gl_project_path": format!("load/k{i}")}
    }))
    .into_response()
}

async fn verify_project_access(
    State(s): State<Arc<StandIn>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> StatusCode {
    tokio::time::sleep(GITLAB_LATENCY).await;
    s.access_calls.fetch_add(1, Ordering::Relaxed);
    let known = presented(&headers).is_some_and(|t| s.agents.contains_key(t));
    if known && q.get("id").is_some_and(|id| id.starts_with("load/public-")) {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::FORBIDDEN
    }
}

async fn start_gitlab() -> Result<(SocketAddr, Arc<StandIn>), String> {
    let state = Arc::new(StandIn { agents: (0..KNOWN).map(|i| (token(i), i)).collect(), ..Default::default() });
    let app = axum::Router::new()
        .route("/api/v4/internal/agents/agentk/agent_info", axum::routing::get(agent_info))
        .route("/api/v4/internal/kubernetes/verify_project_access", axum::routing::get(verify_project_access))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, state))
}

/// Project → when its push was sent, and the latencies of those received.
#[derive(Default)]
struct Receipts {
    pending: Mutex<HashMap<String, Instant>>,
    latency: Mutex<Samples>,
    delivered: AtomicU64,
}

/// What became of the strangers' calls.
#[derive(Default)]
struct Strangers {
    by_code: Mutex<HashMap<String, u64>>,
    latency: Mutex<Samples>,
}

/// Pushes at `PUSH_RATE` for `seconds` to the known agents, in turn; returns how many.
async fn paced_pushes(
    pool: &tokio::sync::mpsc::Sender<Job>,
    receipts: &Arc<Receipts>,
    phase: &str,
    d: Duration,
) -> u64 {
    let period = Duration::from_nanos(1_000_000_000 / PUSH_RATE);
    let started = Instant::now();
    let mut i = 0u64;
    while started.elapsed() < d {
        tokio::time::sleep_until((started + period * i as u32).into()).await;
        let k = i as usize % KNOWN;
        // Even pushes go to the agent's configuration project, odd ones to a public project of
        // its own, which kas asks GitLab about (the answers are cached for 2 s).
        let (project, id, level) = if i.is_multiple_of(2) {
            (format!("load/k{k}"), 100_000 + k as i64, 0)
        } else {
            (format!("load/public-{k}"), 200_000 + k as i64, 20)
        };
        let (done, _answer) = tokio::sync::oneshot::channel();
        let (receipts, pending) = (receipts.clone(), project.clone());
        let job = Job {
            body: push_body(id, &project, level),
            key: format!("{phase}-{i}"),
            on_send: Box::new(move || {
                receipts.pending.lock().unwrap().insert(pending, Instant::now());
            }),
            done,
        };
        if pool.send(job).await.is_err() {
            break;
        }
        i += 1;
    }
    i
}

/// Random-token ReconcileProjects calls at `FLOOD_RATE` for `d`, spread over connections.
async fn flood(addr: SocketAddr, d: Duration, strangers: Arc<Strangers>) -> Result<u64, String> {
    let mut connections = Vec::new();
    for _ in 0..FLOOD_CONNECTIONS {
        connections.push(crate::agents::connect(addr).await?);
    }
    let period = Duration::from_nanos(1_000_000_000 / FLOOD_RATE);
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut i = 0u64;
    while started.elapsed() < d {
        tokio::time::sleep_until((started + period * i as u32).into()).await;
        let connection = connections[i as usize % FLOOD_CONNECTIONS].clone();
        let strangers = strangers.clone();
        tasks.push(tokio::spawn(async move {
            let token = format!("glagent-stranger-{i}-{:08x}", crate::process::rand_u32());
            let at = Instant::now();
            let outcome = match crate::agents::open(connection, addr, &token, &["load/k0".to_owned()]).await {
                Ok(_) => "ACCEPTED (!)".to_owned(),
                Err(e) => crate::agents::refusal_code(&e).map_or_else(|| format!("error: {e}"), str::to_owned),
            };
            strangers.latency.lock().unwrap().push(at.elapsed());
            *strangers.by_code.lock().unwrap().entry(outcome).or_default() += 1;
        }));
        i += 1;
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(i)
}

pub(super) async fn gitlab_flood(ctx: &Ctx, report: &mut Report) -> Result<(), String> {
    let name = "gitlab-flood";
    let d = ctx.options.duration();
    header(&format!(
        "{name}: GitLab mode, {KNOWN} known agents getting {PUSH_RATE} pushes/s; {:.0} s quiet, then {:.0} s with {FLOOD_RATE} random-token calls/s from one address (stand-in GitLab answers in {} ms)",
        d.as_secs_f64(),
        d.as_secs_f64(),
        GITLAB_LATENCY.as_millis()
    ));
    let (gitlab, stand_in) = start_gitlab().await?;
    let db = LoadDb::postgres(&ctx.options.postgres).await?;
    let secret_file = db.dir.path().join("gitlab-secret");
    {
        use base64::Engine as _;
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| e.to_string())?;
        std::fs::write(&secret_file, base64::engine::general_purpose::STANDARD.encode(key))
            .map_err(|e| e.to_string())?;
    }
    let mut args = serve_args(ctx, &db, "gitlab", None);
    args.extend([
        "--gitlab-url".into(),
        format!("http://{gitlab}"),
        "--gitlab-secret-file".into(),
        secret_file.display().to_string(),
        // Short: the known agents' tokens and access answers go back to GitLab during the run.
        "--gitlab-cache-ttl".into(),
        "2s".into(),
        "--token-recheck".into(),
        "1s".into(),
    ]);
    let server = ServerProcess::spawn("serve-child", &args, &ctx.logs)?;
    let receipts = Arc::new(Receipts::default());
    // All from one address, and unknown to kas at first: past the address's burst they are
    // refused with UNAVAILABLE and retry, as agentk does (with a shorter backoff).
    let connecting = Instant::now();
    for i in 0..KNOWN {
        let projects = [format!("load/k{i}"), format!("load/public-{i}")];
        let mut attempt = 0;
        let mut stream = loop {
            let connection = crate::agents::connect(server.addrs.agent).await?;
            match crate::agents::open(connection, server.addrs.agent, &token(i), &projects).await {
                Ok(stream) => break stream,
                Err(e) if crate::agents::refusal_code(&e) == Some("UNAVAILABLE") && attempt < 100 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(format!("known agent {i}: {e}")),
            }
        };
        let receipts = receipts.clone();
        tokio::spawn(async move {
            while let Some(project) = stream.next().await {
                if let Some(sent) = receipts.pending.lock().unwrap().remove(&project) {
                    receipts.latency.lock().unwrap().push(sent.elapsed());
                    receipts.delivered.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    report.add(
        name,
        "known agents connected (one address)",
        format!("{KNOWN} in {:.1} s", connecting.elapsed().as_secs_f64()),
        "",
        None,
    );
    let pool = webhooks::pool(server.addrs.http, SECRET, 8).await?;
    webhooks::flood("warm", server.addrs.http, SECRET, 2, Duration::from_millis(500), |_| {
        push_body(999_999, "load/warm", 0)
    })
    .await?;

    let mut phases = Vec::new();
    for flooded in [false, true] {
        let phase = if flooded { "flood" } else { "quiet" };
        *receipts.latency.lock().unwrap() = Samples::default();
        receipts.delivered.store(0, Ordering::Relaxed);
        let strangers = Arc::new(Strangers::default());
        let before = server.usage();
        let asked_before = stand_in.stranger_calls.load(Ordering::Relaxed);
        let started = Instant::now();
        let flooding = flooded.then(|| tokio::spawn(flood(server.addrs.agent, d, strangers.clone())));
        let sent = paced_pushes(&pool, &receipts, phase, d).await;
        let calls = match flooding {
            Some(f) => f.await.map_err(|e| e.to_string())??,
            None => 0,
        };
        let elapsed = started.elapsed();
        let all_in = wait_for(|| receipts.delivered.load(Ordering::Relaxed) >= sent, Duration::from_secs(15)).await;
        let after = server.usage();
        let delivered = receipts.delivered.load(Ordering::Relaxed);
        let latency = receipts.latency.lock().unwrap().clone();
        report.add(
            name,
            &format!("{phase}: known agents notified"),
            format!("{delivered} / {sent}"),
            "all",
            Some(all_in && delivered == sent),
        );
        report.add(name, &format!("{phase}: intake-to-known-agent latency"), latency.summary(), "", None);
        if flooded {
            let p99 = latency.percentile(99.0);
            let quiet_p99: f64 = phases.first().copied().unwrap_or(0.0);
            report.add(
                name,
                "flood: known agents' p99 against quiet",
                format!("{p99:.2} ms vs {quiet_p99:.2} ms"),
                "p99 ≤ 100 ms (was 10 s)",
                Some(all_in && p99 <= 100.0),
            );
            let mut codes: Vec<(String, u64)> = strangers.by_code.lock().unwrap().clone().into_iter().collect();
            codes.sort();
            let codes: Vec<String> = codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
            report.add(
                name,
                "flood: stranger calls and answers",
                format!("{calls} in {:.1} s: {}", elapsed.as_secs_f64(), codes.join(", ")),
                "none accepted",
                Some(!codes.iter().any(|c| c.starts_with("ACCEPTED") || c.starts_with("error"))),
            );
            report.add(name, "flood: time to refuse a stranger", strangers.latency.lock().unwrap().summary(), "", None);
            let asked = stand_in.stranger_calls.load(Ordering::Relaxed) - asked_before;
            let budget = 20.0 + 10.0 * elapsed.as_secs_f64();
            report.add(
                name,
                "flood: stranger lookups reaching GitLab",
                format!("{asked} ({:.1}/s)", asked as f64 / elapsed.as_secs_f64()),
                &format!("≤ {budget:.0} (10/s per address, burst 20)"),
                Some(asked as f64 <= budget + 2.0),
            );
        } else {
            phases.push(latency.percentile(99.0));
        }
        report.add(
            name,
            &format!("{phase}: server CPU (cores), RSS"),
            format!("{:.2}, {} → {} MiB", cores(before, after), before.rss_kib / 1024, after.rss_kib / 1024),
            "",
            None,
        );
    }
    report.add(
        name,
        "GitLab calls for known agents",
        format!(
            "agent_info {}, verify_project_access {}",
            stand_in.known_calls.load(Ordering::Relaxed),
            stand_in.access_calls.load(Ordering::Relaxed)
        ),
        "",
        None,
    );
    drop(pool);
    server.stop();
    db.drop_database().await;
    Ok(())
}
