//! The measured scenarios and the report.

mod floods;
mod gitlab_flood;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kas::clock::now_ms;
use kas::config::{Secret, StoreConfig};
use kas::domain::{AgentName, AgentToken, ProjectInfo, ProjectPath, RepositoryAccess, Visibility};
use kas::store::Store;
use sqlx::Connection;
use tokio::sync::oneshot;

use crate::Options;
use crate::process::{ServerProcess, Usage, cores, rand_u32};
use crate::stats::Samples;
use crate::webhooks::{self, Job, push_body};

const SECRET: &str = "kas-load-webhook-secret";
const PUBLIC: &str = "load/public";
const SETTLE: Duration = Duration::from_secs(15);

/// One line of the report.
#[derive(serde::Serialize)]
struct Figure {
    scenario: String,
    metric: String,
    value: String,
    target: String,
    ok: Option<bool>,
}

#[derive(Default)]
struct Report(Vec<Figure>);

impl Report {
    fn add(&mut self, scenario: &str, metric: &str, value: String, target: &str, ok: Option<bool>) {
        println!(
            "  {metric:<42} {value:<58} {target}{}",
            match ok {
                Some(true) => "  ✓",
                Some(false) => "  ✗",
                None => "",
            }
        );
        self.0.push(Figure { scenario: scenario.into(), metric: metric.into(), value, target: target.into(), ok });
    }
}

/// Runs the scenarios `options` names.
pub async fn run(options: Options) -> Result<(), String> {
    for url in [&options.postgres, &options.redis] {
        let host = url.split("://").nth(1).unwrap_or("").rsplit('@').next().unwrap_or("");
        if !(host.starts_with("127.0.0.1") || host.starts_with("localhost") || host.starts_with("[::1]")) {
            return Err(format!("{url}: the load tool only targets 127.0.0.1"));
        }
    }
    // gitlab-flood alone connects a few dozen agents, not `--agents`.
    if options.scenario != "gitlab-flood" {
        check_open_files(options.agents.max(options.idle_sockets))?;
    }
    // Server logs are kept when a run fails, and their place is printed.
    let logs = tempfile::Builder::new().prefix("kas-load-").tempdir().map_err(|e| e.to_string())?.keep();
    let secret_file = logs.join("webhook-secret");
    std::fs::write(&secret_file, SECRET).map_err(|e| e.to_string())?;
    let ctx = Ctx { options: options.clone(), logs: logs.clone(), secret_file };
    let mut report = Report::default();
    println!("machine: {} cores, {}", num_cpus(), cpu_model());
    let all = options.scenario == "all";
    let wants = |s: &str| all || options.scenario == s;
    let run = async {
        if wants("baseline-http") {
            baseline_http(&ctx, &mut report).await?;
        }
        if wants("baseline-memory") {
            baseline_memory(&ctx, &mut report).await?;
        }
        if wants("baseline-redis") {
            baseline_redis(&ctx, &mut report).await?;
        }
        if wants("intake") {
            intake(&ctx, &mut report).await?;
        }
        if wants("fanout") {
            fanout(&ctx, &mut report, false).await?;
        }
        if wants("fanout-redis") {
            fanout(&ctx, &mut report, true).await?;
        }
        if wants("idle-flood") {
            floods::idle_flood(&ctx, &mut report).await?;
        }
        if wants("gitlab-flood") {
            gitlab_flood::gitlab_flood(&ctx, &mut report).await?;
        }
        Ok::<(), String>(())
    };
    if let Err(e) = run.await {
        return Err(format!("{e} (server logs in {})", logs.display()));
    }
    if report.0.is_empty() {
        return Err(format!("unknown scenario {:?}", options.scenario));
    }
    let _ = std::fs::remove_dir_all(&logs);
    if let Some(path) = &options.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.0).expect("serializable"))
            .map_err(|e| e.to_string())?;
    }
    let failed: Vec<&Figure> = report.0.iter().filter(|f| f.ok == Some(false)).collect();
    println!("\n{} figures, {} targets missed", report.0.len(), failed.len());
    for f in failed {
        println!("  missed: {} / {}: {} (target {})", f.scenario, f.metric, f.value, f.target);
    }
    Ok(())
}

struct Ctx {
    options: Options,
    logs: std::path::PathBuf,
    secret_file: std::path::PathBuf,
}

fn check_open_files(agents: usize) -> Result<(), String> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft: usize = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3)?.parse().ok())
        .unwrap_or(usize::MAX);
    if soft < agents + 512 {
        return Err(format!(
            "open-file limit {soft} is too low for {agents} agent connections; run `ulimit -n {}` first (both the tool and the server it starts need one descriptor per connection)",
            agents + 1024
        ));
    }
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default()
}

fn header(title: &str) {
    println!("\n== {title}");
}

// ---- baselines ----

/// The throughput flood, identical for the HTTP baseline and for kas so that their figures are a
/// ratio: the same connections, payloads (100 projects) and duration. Returns the server's usage
/// before and after.
async fn measured_flood(ctx: &Ctx, server: &ServerProcess) -> Result<(webhooks::Flood, Usage, Usage), String> {
    let before = server.usage();
    let flood =
        webhooks::flood("flood", server.addrs.http, SECRET, ctx.options.concurrency, ctx.options.duration(), |i| {
            push_body(1 + (i % 100) as i64, &format!("load/p{}", i % 100), 0)
        })
        .await?;
    Ok((flood, before, server.usage()))
}

async fn baseline_http(ctx: &Ctx, report: &mut Report) -> Result<(), String> {
    header("baseline: bare axum handler answering 202 (the HTTP ceiling)");
    let server = ServerProcess::spawn("axum-child", &[], &ctx.logs)?;
    let (flood, before, after) = measured_flood(ctx, &server).await?;
    let ok = flood.statuses.get(&202).copied().unwrap_or(0);
    report.add("baseline-http", "requests/s", format!("{:.0}", ok as f64 / flood.elapsed.as_secs_f64()), "", None);
    report.add("baseline-http", "latency", flood.latencies.summary(), "", None);
    report.add("baseline-http", "server CPU (cores)", format!("{:.2}", cores(before, after)), "", None);
    server.stop();
    Ok(())
}

async fn baseline_redis(ctx: &Ctx, report: &mut Report) -> Result<(), String> {
    header("baseline: raw Redis PUBLISH → subscriber (the fan-out floor)");
    let client = redis::Client::open(ctx.options.redis.as_str()).map_err(|e| e.to_string())?;
    let channel = format!("kas-load-{}", rand_u32());
    let mut pubsub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
    pubsub.subscribe(&channel).await.map_err(|e| e.to_string())?;
    let sent: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let samples: Arc<Mutex<Samples>> = Arc::default();
    let (seen_sent, seen_samples) = (sent.clone(), samples.clone());
    let receiver = tokio::spawn(async move {
        use futures::StreamExt;
        let mut messages = pubsub.on_message();
        while let Some(m) = messages.next().await {
            let seq: u64 = m.get_payload().unwrap_or(u64::MAX);
            if seq == u64::MAX {
                break;
            }
            if let Some(t) = seen_sent.lock().unwrap().remove(&seq) {
                seen_samples.lock().unwrap().push(t.elapsed());
            }
        }
    });
    let mut publisher = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
    let count = ctx.options.rate * ctx.options.seconds.min(10);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / ctx.options.rate.max(1)));
    for seq in 0..count {
        tick.tick().await;
        sent.lock().unwrap().insert(seq, Instant::now());
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(seq)
            .query_async(&mut publisher)
            .await
            .map_err(|e| e.to_string())?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg(u64::MAX)
        .query_async(&mut publisher)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tokio::time::timeout(Duration::from_secs(5), receiver).await;
    let samples = samples.lock().unwrap().clone();
    report.add("baseline-redis", &format!("PUBLISH→receive at {}/s", ctx.options.rate), samples.summary(), "", None);
    report.add("baseline-redis", "received / published", format!("{} / {count}", samples.0.len()), "", None);
    Ok(())
}

async fn baseline_memory(ctx: &Ctx, report: &mut Report) -> Result<(), String> {
    let n = ctx.options.agents;
    header(&format!(
        "baseline: bare hyper HTTP/2, {n} connections each holding one never-ending response (the memory floor)"
    ));
    let server = ServerProcess::spawn("h2-child", &[], &ctx.logs)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = server.usage();
    let tokens = vec!["unused".to_owned(); n];
    let tracker = Arc::new(Tracker::default());
    let (_, bare) = connect_agents(ctx.options.connect_concurrency, &server, &tokens, &tracker).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let streams = server.usage();
    let per = |a: Usage, b: Usage| b.rss_kib.saturating_sub(a.rss_kib) as f64 / n as f64;
    report.add(
        "baseline-memory",
        "per connection / per stream / total",
        format!("{:.1} KiB / {:.1} KiB / {:.1} KiB", per(idle, bare), per(bare, streams), per(idle, streams)),
        "",
        None,
    );
    server.stop();
    Ok(())
}

// ---- kas ----

/// A database of this run's own, dropped at the end.
struct LoadDb {
    url: String,
    server: String,
    name: String,
    dir: tempfile::TempDir,
}

impl LoadDb {
    async fn postgres(server: &str) -> Result<Self, String> {
        let name = format!("kas_load_{}", rand_u32());
        let mut conn = sqlx::PgConnection::connect(&format!("{server}/postgres")).await.map_err(|e| e.to_string())?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let _ = conn.close().await;
        Ok(Self {
            url: format!("{server}/{name}"),
            server: server.into(),
            name,
            dir: tempfile::tempdir().map_err(|e| e.to_string())?,
        })
    }

    async fn store(&self) -> Result<Arc<dyn Store>, String> {
        let config = StoreConfig { database_url: Secret::new(self.url.clone()), data_dir: self.dir.path().to_owned() };
        let store = kas::store::open(&config).await.map_err(|e| e.to_string())?;
        store.migrate().await.map_err(|e| e.to_string())?;
        Ok(store)
    }

    async fn drop_database(self) {
        if let Ok(mut conn) = sqlx::PgConnection::connect(&format!("{}/postgres", self.server)).await {
            let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
                .execute(&mut conn)
                .await;
        }
    }
}

fn serve_args(ctx: &Ctx, db: &LoadDb, replica: &str, redis_prefix: Option<&str>) -> Vec<String> {
    let mut args = vec![
        "--database-url".into(),
        db.url.clone(),
        "--data-dir".into(),
        db.dir.path().join(replica).display().to_string(),
        "--webhook-secret-file".into(),
        ctx.secret_file.display().to_string(),
        "--replica-name".into(),
        replica.into(),
        "--shutdown-grace".into(),
        "5s".into(),
    ];
    if let Some(prefix) = redis_prefix {
        args.extend(["--redis-url".into(), ctx.options.redis.clone(), "--redis-prefix".into(), prefix.into()]);
    }
    args
}

async fn delete_redis_prefix(url: &str, prefix: &str) {
    if let Ok(client) = redis::Client::open(url)
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        let keys: Vec<String> =
            redis::cmd("KEYS").arg(format!("{{{prefix}}}:*")).query_async(&mut conn).await.unwrap_or_default();
        if !keys.is_empty() {
            let _: Result<(), _> = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await;
        }
    }
}

async fn intake(ctx: &Ctx, report: &mut Report) -> Result<(), String> {
    header("intake: webhooks as fast as possible, PostgreSQL + Redis, one replica");
    let db = LoadDb::postgres(&ctx.options.postgres).await?;
    let prefix = format!("kas-load-{}", rand_u32());
    let server = ServerProcess::spawn("serve-child", &serve_args(ctx, &db, "intake", Some(&prefix)), &ctx.logs)?;
    // Warm up connections and the database.
    webhooks::flood("warm", server.addrs.http, SECRET, 8, Duration::from_secs(1), |i| {
        push_body(1, "load/warm", (i % 2) as i64)
    })
    .await?;
    let (flood, before, after) = measured_flood(ctx, &server).await?;
    let accepted = flood.statuses.get(&202).copied().unwrap_or(0);
    let rate = accepted as f64 / flood.elapsed.as_secs_f64();
    report.add(
        "intake",
        "accepted webhooks/s",
        format!("{rate:.0} ({accepted} in {:.1} s)", flood.elapsed.as_secs_f64()),
        "≥ 10000/s",
        Some(rate >= 10_000.0),
    );
    let p99 = flood.latencies.percentile(99.0);
    report.add("intake", "intake latency", flood.latencies.summary(), "p99 ≤ 20 ms", Some(p99 <= 20.0));
    let other: u64 = flood.statuses.iter().filter(|(s, _)| **s != 202).map(|(_, n)| n).sum();
    report.add(
        "intake",
        "non-202 answers / transport errors",
        format!("{other} / {}", flood.errors),
        "0 / 0",
        Some(other == 0 && flood.errors == 0),
    );
    report.add("intake", "server CPU (cores)", format!("{:.2}", cores(before, after)), "", None);
    report.add("intake", "server RSS", format!("{} MiB", after.rss_kib / 1024), "", None);
    // Every accepted webhook is in the log, once.
    let store = db.store().await?;
    let recorded = store
        .recent_pushes(10_000_000)
        .await
        .map_err(|e| e.to_string())?
        .iter()
        .filter(|p| p.idempotency_key.starts_with("webhook:flood-"))
        .count() as u64;
    report.add(
        "intake",
        "recorded / accepted",
        format!("{recorded} / {accepted}"),
        "equal",
        Some(recorded == accepted),
    );
    store.close().await;
    server.stop();
    delete_redis_prefix(&ctx.options.redis, &prefix).await;
    db.drop_database().await;
    Ok(())
}

/// Receipts of the agents.
#[derive(Default)]
struct Tracker {
    /// Project → when its push was sent, for pushes not yet received.
    pending: Mutex<HashMap<String, Instant>>,
    from_send: Mutex<Samples>,
    public_sent: OnceLock<Instant>,
    public: Mutex<Samples>,
    delivered: AtomicU64,
    public_delivered: AtomicU64,
    unexpected: AtomicU64,
}

impl Tracker {
    fn received(&self, project: &str) {
        if project == PUBLIC {
            if let Some(sent) = self.public_sent.get() {
                self.public.lock().unwrap().push(sent.elapsed());
                self.public_delivered.fetch_add(1, Ordering::Relaxed);
            } else {
                self.unexpected.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
        match self.pending.lock().unwrap().remove(project) {
            Some(sent) => {
                self.from_send.lock().unwrap().push(sent.elapsed());
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                self.unexpected.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn seed(store: &Arc<dyn Store>, agents: usize) -> Result<Vec<String>, String> {
    let public = ProjectInfo {
        id: 1,
        path: ProjectPath::parse(PUBLIC).unwrap(),
        visibility: Some(Visibility::Public),
        repository_access: RepositoryAccess::Everyone,
    };
    store.set_project(&public, now_ms()).await.map_err(|e| e.to_string())?;
    let mut tokens = vec![String::new(); agents];
    let chunks: Vec<(usize, Vec<usize>)> =
        (0..agents).collect::<Vec<_>>().chunks(agents.div_ceil(16).max(1)).map(|c| (c[0], c.to_vec())).collect();
    let mut tasks = Vec::new();
    for (_, ids) in chunks {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in ids {
                let token = AgentToken::generate();
                let name = AgentName::parse(&format!("a{i}")).unwrap();
                let project = ProjectPath::parse(&format!("load/a{i}")).unwrap();
                store
                    .create_agent(&name, &project, &token.digest(), None, now_ms())
                    .await
                    .map_err(|e| e.to_string())?;
                out.push((i, token.expose().to_owned()));
            }
            Ok::<_, String>(out)
        }));
    }
    for t in tasks {
        for (i, token) in t.await.map_err(|e| e.to_string())?? {
            tokens[i] = token;
        }
    }
    Ok(tokens)
}

/// Opens every agent's connection, reports the server's memory with bare connections, then
/// opens every stream; returns how long the streams took.
async fn connect_agents(
    concurrency: usize,
    server: &ServerProcess,
    tokens: &[String],
    tracker: &Arc<Tracker>,
) -> Result<(Duration, Usage), String> {
    let addr = server.addrs.agent;
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut handshakes = Vec::with_capacity(tokens.len());
    for _ in tokens {
        let semaphore = semaphore.clone();
        handshakes.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await.expect("semaphore");
            crate::agents::connect(addr).await
        }));
    }
    let mut connections = Vec::with_capacity(tokens.len());
    for h in handshakes {
        connections.push(h.await.map_err(|e| e.to_string())??);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bare = server.usage();
    let started = Instant::now();
    let retries = Arc::new(AtomicU64::new(0));
    let mut ready = Vec::with_capacity(tokens.len());
    for ((i, token), connection) in tokens.iter().enumerate().zip(connections) {
        let (tx, rx) = oneshot::channel();
        ready.push(rx);
        let (token, tracker, semaphore, retries) = (token.clone(), tracker.clone(), semaphore.clone(), retries.clone());
        tokio::spawn(async move {
            let permit = semaphore.acquire_owned().await.expect("semaphore");
            let projects = [format!("load/a{i}"), PUBLIC.to_owned()];
            // A connection lost during setup (an OS-level reset) is retried on a new one and
            // counted; a refusal by the server (a gRPC status) is not retried.
            let mut attempt = crate::agents::open(connection, addr, &token, &projects).await;
            for _ in 0..3 {
                match &attempt {
                    Err(e) if !e.starts_with("refused") => {
                        retries.fetch_add(1, Ordering::Relaxed);
                        attempt = match crate::agents::connect(addr).await {
                            Ok(c) => crate::agents::open(c, addr, &token, &projects).await,
                            Err(e) => Err(e),
                        };
                    }
                    _ => break,
                }
            }
            let mut stream = match attempt {
                Ok(s) => s,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            drop(permit);
            let _ = tx.send(Ok(()));
            while let Some(project) = stream.next().await {
                tracker.received(&project);
            }
        });
    }
    let mut failures = 0;
    let mut first_error = None;
    for rx in ready {
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failures += 1;
                first_error.get_or_insert(e);
            }
            Err(_) => failures += 1,
        }
    }
    if failures > 0 {
        return Err(format!("{failures} agent streams failed to open: {}", first_error.unwrap_or_default()));
    }
    let retried = retries.load(Ordering::Relaxed);
    if retried > 0 {
        println!("  ({retried} stream setups were retried on a new connection after a transport error)");
    }
    Ok((started.elapsed(), bare))
}

async fn wait_for(what: impl Fn() -> bool, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if what() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    what()
}

async fn fanout(ctx: &Ctx, report: &mut Report, two_replicas: bool) -> Result<(), String> {
    let n = ctx.options.agents;
    let name = if two_replicas { "fanout-redis" } else { "fanout" };
    header(&format!(
        "{name}: {n} agent streams (own HTTP/2 connection each), {} pushes/s spread over them, then one public push; {}",
        ctx.options.rate,
        if two_replicas {
            "PostgreSQL + Redis, webhooks to replica A, agents on replica B"
        } else {
            "PostgreSQL, one replica (in-process engine)"
        }
    ));
    let db = LoadDb::postgres(&ctx.options.postgres).await?;
    let store = db.store().await?;
    let seeding = Instant::now();
    let tokens = seed(&store, n).await?;
    println!("  seeded {n} agents in {:.1} s", seeding.elapsed().as_secs_f64());
    let prefix = format!("kas-load-{}", rand_u32());
    let redis = two_replicas.then_some(prefix.as_str());
    let a = ServerProcess::spawn("serve-child", &serve_args(ctx, &db, "replica-a", redis), &ctx.logs)?;
    let b = if two_replicas {
        Some(ServerProcess::spawn("serve-child", &serve_args(ctx, &db, "replica-b", redis), &ctx.logs)?)
    } else {
        None
    };
    let agents_server = b.as_ref().unwrap_or(&a);
    // Warm the intake path.
    webhooks::flood("warm", a.addrs.http, SECRET, 4, Duration::from_millis(500), |_| {
        push_body(999_999, "load/warm", 0)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = agents_server.usage();

    let tracker = Arc::new(Tracker::default());
    let (took, bare) = connect_agents(ctx.options.connect_concurrency, agents_server, &tokens, &tracker).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Ok(hook) = std::env::var("KAS_LOAD_BEFORE_MEASURE") {
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(hook.replace("{pid}", &agents_server.pid().to_string()))
            .output();
    }
    let connected = agents_server.usage();
    let per_stream = (connected.rss_kib.saturating_sub(idle.rss_kib)) as f64 / n as f64;
    report.add(name, "streams opened", format!("{n} in {:.1} s", took.as_secs_f64()), "", None);
    report.add(
        name,
        "server RSS idle → connected → streams",
        format!("{} → {} → {} MiB", idle.rss_kib / 1024, bare.rss_kib / 1024, connected.rss_kib / 1024),
        "",
        None,
    );
    report.add(
        name,
        "of which per connection / per stream",
        format!(
            "{:.1} KiB / {:.1} KiB",
            bare.rss_kib.saturating_sub(idle.rss_kib) as f64 / n as f64,
            connected.rss_kib.saturating_sub(bare.rss_kib) as f64 / n as f64
        ),
        "",
        None,
    );
    report.add(
        name,
        "resident memory per idle stream",
        format!("{per_stream:.1} KiB"),
        "≤ 20 KiB",
        Some(per_stream <= 20.0),
    );

    // Paced pushes: event i goes to agent (i × 7919) mod n, so each agent gets its share in turn.
    let pool = webhooks::pool(a.addrs.http, SECRET, 32).await?;
    let intake_latency: Arc<Mutex<Samples>> = Arc::default();
    let accepted = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let before_a = a.usage();
    let before_b = agents_server.usage();
    let total = ctx.options.rate * ctx.options.seconds.clamp(1, 600);
    let period = Duration::from_nanos(1_000_000_000 / ctx.options.rate.max(1));
    let started = Instant::now();
    for i in 0..total {
        let due = started + period * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let k = (i as usize * 7919) % n;
        let project = format!("load/a{k}");
        let (done, answer) = oneshot::channel();
        let (tracker, send_project) = (tracker.clone(), project.clone());
        let sent_at = Arc::new(OnceLock::new());
        let mark = sent_at.clone();
        let job = Job {
            body: push_body(10 + k as i64, &project, 0),
            key: format!("paced-{i}"),
            on_send: Box::new(move || {
                let now = Instant::now();
                let _ = mark.set(now);
                tracker.pending.lock().unwrap().insert(send_project, now);
            }),
            done,
        };
        pool.send(job).await.map_err(|_| "webhook pool stopped".to_string())?;
        let (intake_latency, accepted, refused) = (intake_latency.clone(), accepted.clone(), refused.clone());
        tokio::spawn(async move {
            if let Ok((result, at)) = answer.await {
                match result {
                    Ok(202) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        if let Some(sent) = sent_at.get() {
                            intake_latency.lock().unwrap().push(at.duration_since(*sent));
                        }
                    }
                    _ => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    let send_time = started.elapsed();
    let all_in = wait_for(
        || {
            tracker.delivered.load(Ordering::Relaxed) >= accepted.load(Ordering::Relaxed)
                && accepted.load(Ordering::Relaxed) + refused.load(Ordering::Relaxed) >= total
        },
        SETTLE,
    )
    .await;
    let after_a = a.usage();
    let after_b = agents_server.usage();
    let delivered = tracker.delivered.load(Ordering::Relaxed);
    let accepted_n = accepted.load(Ordering::Relaxed);
    let samples = tracker.from_send.lock().unwrap().clone();
    report.add(
        name,
        "pushes sent / accepted",
        format!("{total} in {:.1} s / {accepted_n}", send_time.as_secs_f64()),
        "",
        None,
    );
    report.add(
        name,
        "notifications delivered / expected",
        format!("{delivered} / {accepted_n} (unexpected {})", tracker.unexpected.load(Ordering::Relaxed)),
        "equal, nothing lost",
        Some(all_in && delivered == accepted_n && accepted_n == total),
    );
    let (p50, p99) = (samples.percentile(50.0), samples.percentile(99.0));
    report.add(
        name,
        "intake-to-agent latency (from webhook sent)",
        samples.summary(),
        "p50 ≤ 2 ms, p99 ≤ 10 ms",
        Some(p50 <= 2.0 && p99 <= 10.0),
    );
    report.add(name, "of which intake (webhook sent → 202)", intake_latency.lock().unwrap().summary(), "", None);
    report.add(name, "server CPU (cores), intake replica", format!("{:.2}", cores(before_a, after_a)), "", None);
    if two_replicas {
        report.add(name, "server CPU (cores), agents replica", format!("{:.2}", cores(before_b, after_b)), "", None);
    }

    // One push to a public project every agent watches.
    let (done, answer) = oneshot::channel();
    let tracker_public = tracker.clone();
    pool.send(Job {
        body: push_body(1, PUBLIC, 20),
        key: "public".into(),
        on_send: Box::new(move || {
            let _ = tracker_public.public_sent.set(Instant::now());
        }),
        done,
    })
    .await
    .map_err(|_| "webhook pool stopped".to_string())?;
    let status = answer.await.map_err(|e| e.to_string())?.0;
    let everyone = wait_for(|| tracker.public_delivered.load(Ordering::Relaxed) >= n as u64, SETTLE).await;
    let public = tracker.public.lock().unwrap().clone();
    report.add(
        name,
        "public push: agents notified",
        format!("{} / {n} (push answered {:?})", public.0.len(), status),
        "all",
        Some(everyone),
    );
    report.add(
        name,
        "public push: latency over agents",
        public.summary(),
        "p99 ≤ 200 ms",
        Some(everyone && public.percentile(99.0) <= 200.0),
    );

    drop(pool);
    a.stop();
    if let Some(b) = b {
        b.stop();
    }
    store.close().await;
    delete_redis_prefix(&ctx.options.redis, &prefix).await;
    db.drop_database().await;
    Ok(())
}
