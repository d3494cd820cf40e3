//! The security boundary under attack and under races (docs/security.md): visibility merging,
//! scoped hook secrets, the admin secret, a hostile Redis, revocation while the directory is
//! down, and randomized isolation runs through both doors.

use std::time::Duration;

use kas::domain::RecordOutcome;
use kas::domain::{ProjectPath, ProjectUpdate, Visibility, merged_visibility};

use crate::store_story::push;
use crate::support::TestDb;

fn path(s: &str) -> ProjectPath {
    ProjectPath::parse(s).unwrap()
}

/// What the registry says about project `id` after recording `batch` in one transaction.
async fn record(store: &dyn kas::store::Store, batch: Vec<kas::domain::NewEvent>) -> Vec<bool> {
    store
        .record_pushes(&batch)
        .await
        .unwrap()
        .into_iter()
        .map(|o| match o {
            RecordOutcome::Recorded(n) => n.world_readable,
            RecordOutcome::Duplicate => panic!("unexpected duplicate"),
        })
        .collect()
}

/// The SQL merge of pushes into the registry agrees with `domain::merged_visibility`, and the
/// race the review found (a webhook saying private and a GitPushEvent in one batch) closes the
/// project instead of leaving it public.
async fn visibility_merge_story(db: TestDb) {
    let store = db.open_store().await;
    let s = &*store;
    // Public at first.
    assert_eq!(record(s, vec![push("k0", 1, "g/app", Some(Visibility::Public), 1000)]).await, [true]);
    // The webhook says private, GitLab's call (no visibility) comes last in the same batch.
    let mut grpc = push("k2", 1, "g/app", None, 1002);
    grpc.source = kas::domain::EventSource::GitPushEvent;
    let readable = record(s, vec![push("k1", 1, "g/app", Some(Visibility::Private), 1001), grpc]).await;
    assert_eq!(readable, [false, false], "neither push of the batch may be public");
    let info = s.project_by_path(&path("g/app")).await.unwrap().unwrap();
    assert_eq!(info.visibility, Some(Visibility::Private), "a push without visibility erased it");
    // A later push without visibility changes nothing.
    assert_eq!(record(s, vec![push("k3", 1, "g/app", None, 1003)]).await, [false]);
    // Two contradicting payloads in one batch: the most restrictive wins, whatever the order.
    let batch = vec![
        push("k4", 1, "g/app", Some(Visibility::Public), 1005),
        push("k5", 1, "g/app", Some(Visibility::Internal), 1004),
    ];
    assert_eq!(record(s, batch).await, [false, false]);
    assert_eq!(s.project_by_path(&path("g/app")).await.unwrap().unwrap().visibility, Some(Visibility::Internal));
    // Newer news opens it again; late older news can only close it.
    assert_eq!(record(s, vec![push("k6", 1, "g/app", Some(Visibility::Public), 2000)]).await, [true]);
    assert_eq!(record(s, vec![push("k7", 1, "g/app", Some(Visibility::Public), 1500)]).await, [true]);
    assert_eq!(record(s, vec![push("k8", 1, "g/app", Some(Visibility::Private), 1600)]).await, [false]);
    assert_eq!(s.project_by_path(&path("g/app")).await.unwrap().unwrap().visibility, Some(Visibility::Private));
    // A renamed project keeps the newest path; a push under the old path is not public, and a
    // move without visibility forgets what was known about the old path.
    assert_eq!(record(s, vec![push("k9", 1, "g/app", Some(Visibility::Public), 3000)]).await, [true]);
    let batch = vec![push("k10", 1, "g/renamed", None, 3002), push("k11", 1, "g/app", None, 3001)];
    assert_eq!(record(s, batch).await, [false, false]);
    let info = s.project_by_path(&path("g/renamed")).await.unwrap().unwrap();
    assert_eq!((info.path.as_str(), info.visibility), ("g/renamed", None));
    // A stale path never comes back from an older push.
    assert_eq!(record(s, vec![push("k12", 1, "g/app", Some(Visibility::Public), 2999)]).await, [false]);
    assert_eq!(s.project_by_path(&path("g/renamed")).await.unwrap().unwrap().id, 1);

    // The SQL and the domain model agree on every combination.
    let levels = [None, Some(Visibility::Private), Some(Visibility::Internal), Some(Visibility::Public)];
    let mut id = 100;
    for stored in levels {
        for incoming in levels {
            for (moved, at) in [(false, 5001), (true, 5001), (false, 4999), (true, 4999)] {
                id += 1;
                let home = format!("g/x{id}");
                let incoming_path = &if moved { format!("g/y{id}") } else { home.clone() };
                s.set_project(
                    &kas::domain::ProjectInfo {
                        id,
                        path: path(&home),
                        visibility: stored,
                        repository_access: kas::domain::RepositoryAccess::Everyone,
                    },
                    5000,
                )
                .await
                .unwrap();
                record(s, vec![push(&format!("m{id}"), id, incoming_path, incoming, at)]).await;
                let update = ProjectUpdate::new(id, path(incoming_path), incoming, at);
                let want = merged_visibility(Some((&path(&home), stored, 5000)), &update);
                let want_path = if at >= 5000 { incoming_path } else { &home };
                let got = s.project_by_path(&path(want_path)).await.unwrap().expect("row under the newest path");
                assert_eq!(got.id, id);
                assert_eq!(
                    got.visibility, want,
                    "stored {stored:?}, incoming {incoming:?} at {at} for {incoming_path}"
                );
            }
        }
    }
    store.close().await;
}
crate::both_backends!(visibility_merge, visibility_merge_story);

#[allow(dead_code)]
const SOON: Duration = Duration::from_secs(5);

fn with_redis(url: String, prefix: String, replica: Option<&str>) -> impl Fn(&mut kas::config::Settings) {
    let replica = replica.map(str::to_owned);
    move |s| {
        s.redis_url = Some(url.clone());
        s.redis_prefix = Some(prefix.clone());
        if let Some(r) = &replica {
            s.replica_name = Some(r.clone());
        }
    }
}

async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(crate::support::redis::SHARED).unwrap().get_multiplexed_async_connection().await.unwrap()
}

/// Whoever can publish to Redis cannot make an agent hear about a project the access rule
/// refuses, cannot move a replica's idea of the log forward so real events are dropped, and
/// cannot forge a delivery position that skips what an agent missed. Two replicas configured
/// with one name still hear each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_redis_cannot_open_or_skip() {
    use crate::support::agent::{TestAgent, drain, next_project};
    let db = TestDb::postgres().await;
    let prefix = crate::support::redis::prefix();
    // Same replica name on purpose.
    let a = crate::support::TestApp::spawn(
        &db,
        with_redis(crate::support::redis::SHARED.into(), prefix.clone(), Some("twin")),
    )
    .await;
    let b = crate::support::TestApp::spawn(
        &db,
        with_redis(crate::support::redis::SHARED.into(), prefix.clone(), Some("twin")),
    )
    .await;
    let (stranger, stranger_token) = a.create_agent("stranger", "other/config").await;
    // A private project the stranger asks for, known to the registry.
    assert_eq!(a.push(7, "secret/app", 0).await.status(), 202);
    let agent = TestAgent::connect(b.agent, &stranger_token).await;
    let mut s = agent.open(&["secret/app", "other/config", "pub/app"]).await.unwrap();

    let mut conn = redis_conn().await;
    let channel = format!("{{{prefix}}}:events");
    let now = kas::clock::now_ms();
    let last = a.store.last_seq().await.unwrap();
    for forged in [
        // Today's format with a number the log does not hold, and far ahead of it.
        serde_json::json!({"r": "attacker", "s": [last + 1, last + 2, 1_000_000_000]}),
        // The old format, which carried the path and "readable by everyone".
        serde_json::json!({"r": "attacker", "e": [[last + 1, 7, "secret/app", true, now]]}),
        // A real number: delivers the real event, under the access rule, nothing more.
        serde_json::json!({"r": "attacker", "s": [last]}),
        serde_json::json!("garbage"),
    ] {
        let _: i64 = redis::cmd("PUBLISH").arg(&channel).arg(forged.to_string()).query_async(&mut conn).await.unwrap();
    }
    assert_eq!(drain(&mut s, Duration::from_millis(800)).await, Vec::<String>::new(), "forged messages delivered");
    // Real events after the forgery still arrive (nothing moved the log forward), whichever twin
    // recorded them.
    assert_eq!(a.push(1, "other/config", 0).await.status(), 202);
    assert_eq!(next_project(&mut s, SOON).await.as_deref(), Some("other/config"));
    assert_eq!(a.push(2, "pub/app", 20).await.status(), 202);
    assert_eq!(next_project(&mut s, SOON).await.as_deref(), Some("pub/app"));
    assert!(b.metrics_text().await.contains("kas_events_unknown_announced_total 3"));

    // A forged position far ahead does not make the agent skip what it missed.
    drop(s);
    drop(agent);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let _: () = redis::cmd("SET")
        .arg(format!("{{{prefix}}}:pos:{}", stranger.id))
        .arg(format!("1000000000:{}", kas::clock::now_ms()))
        .query_async(&mut conn)
        .await
        .unwrap();
    let pos_keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{{{prefix}}}:pos*")).query_async(&mut conn).await.unwrap();
    assert!(!pos_keys.is_empty(), "the position key name is {pos_keys:?}");
    assert_eq!(a.push(1, "other/config", 0).await.status(), 202);
    let agent = TestAgent::connect(a.agent, &stranger_token).await;
    let mut s = agent.open(&["secret/app", "other/config", "pub/app"]).await.unwrap();
    // (pub/app may come again: replay overlaps the position by design, docs/delivery.md.)
    let replayed = drain(&mut s, Duration::from_millis(800)).await;
    assert!(replayed.iter().any(|p| p == "other/config"), "missed push replayed: {replayed:?}");
    assert!(!replayed.iter().any(|p| p == "secret/app"), "{replayed:?}");
    assert!(a.metrics_text().await.contains("kas_engine_forgeries_total 1"));

    a.stop().await;
    b.stop().await;
    crate::support::redis::cleanup(&prefix).await;
    db.cleanup().await;
}

/// Each secret does one job: a namespace-scoped hook secret speaks only for its namespace (by
/// path, and by the id's registered path), and no webhook secret opens an operator endpoint;
/// the admin secret opens them and submits nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_do_one_job() {
    let db = TestDb::sqlite();
    let file = db.data_dir().join("hooks");
    std::fs::write(&file, "system-hook-secret-0123456789\nteam-hook-secret-0123456789 team\n").unwrap();
    let path = file.display().to_string();
    let app = crate::support::TestApp::spawn(&db, |s| s.webhook_secret_file = Some(path)).await;
    let hook = |secret: &'static str, id: i64, path: &str, level: i64| {
        let body = serde_json::json!({"object_kind": "push", "project": {"id": id, "path_with_namespace": path, "visibility_level": level}});
        app.client
            .post(app.url("/webhooks/gitlab"))
            .header("X-Gitlab-Token", secret)
            .header("X-Gitlab-Event", "Push Hook")
            .body(body.to_string())
            .send()
    };
    let team = "team-hook-secret-0123456789";
    // The system hook's secret speaks for anyone: a private project elsewhere.
    assert_eq!(hook("system-hook-secret-0123456789", 9, "other/secret", 0).await.unwrap().status(), 202);
    // The team's secret speaks for its namespace, nested groups included...
    assert_eq!(hook(team, 1, "team/app", 20).await.unwrap().status(), 202);
    assert_eq!(hook(team, 2, "team/sub/app", 20).await.unwrap().status(), 202);
    let logged = app.store.recent_pushes(100).await.unwrap().len();
    // ...and for nothing else: not another namespace, not a look-alike prefix, and not another
    // namespace's project id under a path of its own.
    for (id, path) in [(3, "other/app"), (4, "teams/app"), (9, "team/looks-mine")] {
        let r = hook(team, id, path, 20).await.unwrap();
        assert_eq!(r.status(), 403, "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("under team"), "{body}");
    }
    assert_eq!(app.store.recent_pushes(100).await.unwrap().len(), logged, "a refused push was recorded");
    let other = app.store.project_by_id(9).await.unwrap().unwrap();
    assert_eq!((other.path.as_str(), other.visibility), ("other/secret", Some(kas::domain::Visibility::Private)));
    assert!(app.metrics_text().await.contains("kas_webhooks_total{result=\"forbidden\"} 3"));

    // Operator endpoints: the admin secret, and only it.
    let agents = |secret: String| app.client.get(app.url("/agents")).bearer_auth(secret).send();
    for hook_secret in ["system-hook-secret-0123456789", team] {
        assert_eq!(agents(hook_secret.into()).await.unwrap().status(), 401);
    }
    assert_eq!(agents(app.admin_secret.clone()).await.unwrap().status(), 200);
    // The admin secret submits nothing.
    let r = app
        .client
        .post(app.url("/webhooks/gitlab"))
        .header("X-Gitlab-Token", &app.admin_secret)
        .header("X-Gitlab-Event", "Push Hook")
        .body(r#"{"object_kind":"push","project":{"id":5,"path_with_namespace":"x/y","visibility_level":20}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // `kas agents` reads the admin secret from the data directory.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["agents", "--addr", &format!("http://{}", app.http), "--data-dir"])
        .arg(db.data_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    app.stop().await;
}

/// What kas writes is private from the start: the data directory 0700, the database and every
/// generated secret 0600; and /readyz tells strangers which part fails, never why.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let db = TestDb::sqlite();
    let data = db.data_dir().join("fresh/data");
    let dir = data.display().to_string();
    let url = format!("sqlite://{}/kas.db", data.display());
    let app = crate::support::TestApp::spawn(&db, |s| {
        s.data_dir = Some(dir.clone());
        s.database_url = Some(url.clone());
    })
    .await;
    assert_eq!(app.push(1, "g/a", 0).await.status(), 202);
    let mode = |p: std::path::PathBuf| std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(data.clone()), 0o700);
    for f in ["kas.db", "kas.db-wal", "webhook-secret", "admin-secret"] {
        assert_eq!(mode(data.join(f)), 0o600, "{f}");
    }
    app.stop().await;
}

/// While the directory cannot re-check a stream's credential, the stream keeps delivering
/// recorded events for the credential grace, then ends with UNAVAILABLE; the agent is judged
/// on fresh facts when it reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_fails_closed_after_the_grace() {
    use crate::support::agent::{TestAgent, next_project};
    let db = TestDb::sqlite();
    let app = crate::support::TestApp::spawn(&db, |s| {
        s.token_recheck = Some("100ms".into());
        s.credential_grace = Some("1500ms".into());
    })
    .await;
    let (_, token) = app.create_agent("own", "g/own").await;
    let agent = TestAgent::connect(app.agent, &token).await;
    let mut s = agent.open(&["g/own"]).await.unwrap();
    // The token table goes away: re-checks fail, recording does not.
    let pool = sqlx::SqlitePool::connect(&db.url()).await.unwrap();
    sqlx::query("ALTER TABLE agent_tokens RENAME TO agent_tokens_away").execute(&pool).await.unwrap();
    assert_eq!(app.push(1, "g/own", 0).await.status(), 202);
    assert_eq!(next_project(&mut s, SOON).await.as_deref(), Some("g/own"), "delivery goes on within the grace");
    let ended = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match s.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the stream ends after the grace");
    let status = ended.expect_err("ends with an error");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    // Reconnecting is judged on fresh facts: refused while the directory cannot answer...
    let refused = agent.open(&["g/own"]).await.expect_err("cannot authenticate now");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    // ...and served again once it can.
    sqlx::query("ALTER TABLE agent_tokens_away RENAME TO agent_tokens").execute(&pool).await.unwrap();
    assert!(agent.open(&["g/own"]).await.is_ok());
    pool.close().await;
    app.stop().await;
}

/// A small deterministic generator, so a failing run can be repeated from its printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Projects of the isolation run; each has an owner agent whose configuration project it is.
const ISOLATION_PROJECTS: i64 = 16;
/// Waves of the run; every project goes through one open-then-close trial per wave.
const ISOLATION_WAVES: usize = 13;

/// Randomized isolation through both doors at once, as a busy GitLab sends them: in every trial
/// a project is opened (webhook "public" racing a GitPushEvent), then closed (webhook "private"
/// or "internal" racing a GitPushEvent), for all projects concurrently. After each close,
/// further pushes through GitLab's door (no visibility) must reach the project's own agent and
/// no stranger. A project that is never public must never reach a stranger at all.
async fn isolation_run(apps: &[crate::support::TestApp], seed: u64) {
    use crate::support::agent::{TestAgent, drain};
    let mut rng = Rng(seed | 1);
    let first = &apps[0];
    let pick = |rng: &mut Rng| &apps[rng.below(apps.len() as u64) as usize];
    let path = |i: i64| format!("team{}/app{i}", i % 3);
    let every: Vec<String> = (1..=ISOLATION_PROJECTS).map(path).chain(["never/public".to_owned()]).collect();
    let every: Vec<&str> = every.iter().map(String::as_str).collect();
    let mut strangers = Vec::new();
    for n in 0..3 {
        let (_, token) = first.create_agent(&format!("stranger{n}"), &format!("strangers/config{n}")).await;
        let agent = TestAgent::connect(pick(&mut rng).agent, &token).await;
        let stream = agent.open(&every).await.unwrap();
        strangers.push((agent, stream));
    }
    let mut owners = Vec::new();
    for i in 1..=ISOLATION_PROJECTS {
        let (_, token) = first.create_agent(&format!("owner{i}"), &path(i)).await;
        let agent = TestAgent::connect(pick(&mut rng).agent, &token).await;
        let stream = agent.open(&[path(i).as_str()]).await.unwrap();
        owners.push((agent, stream));
    }
    let mut rails: Vec<_> = Vec::new();
    for app in apps {
        rails.push(crate::intake::grpc_client(app).await);
    }
    let quiet = Duration::from_millis(300);
    let mut breaches = Vec::new();
    let mut trials = 0;
    for wave in 0..ISOLATION_WAVES {
        // Open every project, both doors racing; then close every project, both doors racing.
        for level in [20, if rng.below(2) == 0 { 0 } else { 10 }] {
            let mut calls = Vec::new();
            for i in 1..=ISOLATION_PROJECTS {
                let (hook_app, rails_i) = (pick(&mut rng), rng.below(apps.len() as u64) as usize);
                let mut client = rails[rails_i].clone();
                let p = path(i);
                let webhook_first = rng.below(2) == 0;
                calls.push(async move {
                    let hook = async { assert_eq!(hook_app.push(i, &p, level).await.status(), 202) };
                    let grpc = crate::intake::send_git_push(&mut client, i, &p);
                    if webhook_first {
                        tokio::join!(hook, grpc);
                    } else {
                        tokio::join!(grpc, hook);
                    }
                });
            }
            // The never-public project is pushed all along, through both doors.
            let mut client = rails[0].clone();
            let never = async move {
                tokio::join!(
                    first.push(99, "never/public", 0),
                    crate::intake::send_git_push(&mut client, 99, "never/public")
                )
            };
            tokio::join!(futures::future::join_all(calls), never);
            if level == 20 {
                continue;
            }
            trials += ISOLATION_PROJECTS as usize;
            // What the racing pushes of the opened project queued may still arrive: let it.
            let heard = futures::future::join_all(strangers.iter_mut().map(|(_, s)| drain(s, quiet))).await;
            for (n, got) in heard.into_iter().enumerate() {
                if got.iter().any(|p| p == "never/public") {
                    breaches.push(format!("wave {wave}: stranger{n} heard never/public"));
                }
            }
            futures::future::join_all(owners.iter_mut().map(|(_, s)| drain(s, Duration::from_millis(50)))).await;
            // Closed now: GitLab's door (no visibility) reaches the owner and nobody else.
            for i in 1..=ISOLATION_PROJECTS {
                let r = rng.below(apps.len() as u64) as usize;
                crate::intake::send_git_push(&mut rails[r].clone(), i, &path(i)).await;
            }
            let heard = futures::future::join_all(strangers.iter_mut().map(|(_, s)| drain(s, quiet))).await;
            for (n, got) in heard.into_iter().enumerate() {
                for p in got {
                    breaches.push(format!("wave {wave}: stranger{n} heard {p} after it was closed"));
                }
            }
            let owned =
                futures::future::join_all(owners.iter_mut().map(|(_, s)| drain(s, Duration::from_millis(150)))).await;
            for (i, got) in owned.into_iter().enumerate() {
                assert!(got.iter().any(|p| *p == path(i as i64 + 1)), "wave {wave}: owner{} missed its push", i + 1);
            }
        }
    }
    assert!(trials >= 200, "{trials} trials");
    assert!(breaches.is_empty(), "seed {seed}: {} breaches in {trials} trials: {breaches:#?}", breaches.len());
}

fn isolation_seed() -> u64 {
    let seed = std::env::var("KAS_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).unwrap();
        u64::from_le_bytes(b)
    });
    eprintln!("isolation seed {seed} (KAS_TEST_SEED={seed} repeats it)");
    seed
}

async fn isolation_single_replica(db: TestDb) {
    let secret = crate::intake::write_gitlab_secret(&db);
    let app = crate::support::TestApp::spawn(&db, |s| s.gitlab_secret_file = Some(secret)).await;
    let apps = [app];
    isolation_run(&apps, isolation_seed()).await;
    let [app] = apps;
    app.stop().await;
}
crate::both_backends!(isolation_through_both_doors, isolation_single_replica);

/// The same run across two replicas sharing PostgreSQL and Redis: pushes and agents spread over
/// both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_through_both_doors_across_replicas() {
    let db = TestDb::postgres().await;
    let prefix = crate::support::redis::prefix();
    let secret = crate::intake::write_gitlab_secret(&db);
    let settings = {
        let redis = with_redis(crate::support::redis::SHARED.into(), prefix.clone(), None);
        move |s: &mut kas::config::Settings| {
            redis(s);
            s.gitlab_secret_file = Some(secret.clone());
        }
    };
    let a = crate::support::TestApp::spawn(&db, &settings).await;
    let b = crate::support::TestApp::spawn(&db, &settings).await;
    let apps = [a, b];
    isolation_run(&apps, isolation_seed()).await;
    for app in apps {
        app.stop().await;
    }
    crate::support::redis::cleanup(&prefix).await;
    db.cleanup().await;
}
