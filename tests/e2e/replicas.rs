//! Several replicas sharing PostgreSQL and Redis act as one service.

use std::time::Duration;

use kas::config::Settings;

use crate::support::agent::{TestAgent, drain, next_project};
use crate::support::process::ProcessReplica;
use crate::support::redis::{self as test_redis, PrivateCluster, PrivateRedis, PrivateSentinel};
use crate::support::{TestApp, TestDb, eventually};

const SOON: Duration = Duration::from_secs(10);
const QUIET: Duration = Duration::from_millis(800);

fn with_redis(url: String, prefix: String) -> impl Fn(&mut Settings) {
    move |s| {
        s.redis_url = Some(url.clone());
        s.redis_prefix = Some(prefix.clone());
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Three replicas: each agent gets exactly the projects it may see, whichever replica took the
/// push and whichever one the agent is connected to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_act_as_one() {
    let db = TestDb::postgres().await;
    let prefix = test_redis::prefix();
    let settings = with_redis(test_redis::SHARED.into(), prefix.clone());
    let a = TestApp::spawn(&db, &settings).await;
    let b = TestApp::spawn(&db, &settings).await;
    let c = TestApp::spawn(&db, &settings).await;
    let (_, x_token) = a.create_agent("x", "g/x").await;
    let (_, y_token) = a.create_agent("y", "g/y").await;
    let (_, z_token) = a.create_agent("z", "g/z").await;
    let x = TestAgent::connect(a.agent, &x_token).await;
    let y = TestAgent::connect(b.agent, &y_token).await;
    let z = TestAgent::connect(c.agent, &z_token).await;
    let every = ["g/x", "g/y", "g/z", "g/pub"];
    let mut xs = x.open(&every).await.unwrap();
    let mut ys = y.open(&every).await.unwrap();
    let mut zs = z.open(&every).await.unwrap();

    assert_eq!(b.push(1, "g/x", 0).await.status(), 202); // x's private project, pushed on B
    assert_eq!(c.push(2, "g/y", 10).await.status(), 202); // y's internal project, pushed on C
    assert_eq!(a.push(4, "g/pub", 20).await.status(), 202); // public, pushed on A
    assert_eq!(a.push(3, "g/z", 0).await.status(), 202); // z's private project, pushed on A

    assert_eq!(sorted(drain(&mut xs, QUIET).await), ["g/pub", "g/x"]);
    assert_eq!(sorted(drain(&mut ys, QUIET).await), ["g/pub", "g/y"]);
    assert_eq!(sorted(drain(&mut zs, QUIET).await), ["g/pub", "g/z"]);

    // The connection state lists every agent, each on its replica, from any replica.
    let listed = eventually(SOON, || async {
        let body: serde_json::Value =
            b.client.get(b.url("/agents")).bearer_auth(&b.admin_secret).send().await.unwrap().json().await.unwrap();
        body["connections"].as_array().map(|c| c.len()) == Some(3)
    })
    .await;
    assert!(listed, "3 connections across replicas");
    let unauthorized = b.client.get(b.url("/agents")).send().await.unwrap();
    assert_eq!(unauthorized.status(), 401);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(["agents", "--addr", &format!("http://{}", c.http), "--data-dir"])
        .arg(db.data_dir())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for name in ["x", "y", "z"] {
        assert!(table.lines().any(|l| l.split_whitespace().nth(1) == Some(name)), "{name} in\n{table}");
    }
    let ready: serde_json::Value = a.client.get(a.url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["checks"]["redis"], "ok");

    for app in [a, b, c] {
        app.stop().await;
    }
    test_redis::cleanup(&prefix).await;
    db.cleanup().await;
}

/// Redis goes away and comes back: intake keeps recording, local agents keep being served, new
/// agents are not refused, and what was recorded meanwhile reaches the other replica afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_loses_nothing() {
    let db = TestDb::postgres().await;
    let mut redis = PrivateRedis::start().await;
    let settings = with_redis(redis.url(), "kas".into());
    let a = TestApp::spawn(&db, &settings).await;
    let b = TestApp::spawn(&db, &settings).await;
    let (_, far_token) = a.create_agent("far", "g/far").await;
    let (_, near_token) = a.create_agent("near", "g/near").await;
    let far = TestAgent::connect(b.agent, &far_token).await;
    let mut far_s = far.open(&["g/far"]).await.unwrap();
    assert_eq!(a.push(1, "g/far", 0).await.status(), 202);
    assert_eq!(next_project(&mut far_s, SOON).await.as_deref(), Some("g/far"));

    redis.stop();
    // Intake on A keeps recording and answering.
    assert_eq!(a.push(1, "g/far", 0).await.status(), 202);
    // /readyz names Redis as failing.
    let failing = eventually(SOON, || async {
        let r = a.client.get(a.url("/readyz")).send().await.unwrap();
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap();
        status == 503 && body["checks"]["redis"].as_str().unwrap_or("").starts_with("failing")
    })
    .await;
    assert!(failing, "readyz reports Redis");
    // An agent connecting during the outage is served, and local events reach it.
    let near = TestAgent::connect(a.agent, &near_token).await;
    let mut near_s = tokio::time::timeout(SOON, near.open(&["g/near"])).await.expect("not held up by Redis").unwrap();
    assert_eq!(a.push(2, "g/near", 0).await.status(), 202);
    assert_eq!(next_project(&mut near_s, SOON).await.as_deref(), Some("g/near"));
    // The far agent has not heard of the outage-time push yet.
    assert!(next_project(&mut far_s, QUIET).await.is_none());

    redis.resume().await;
    // Once Redis is back, the push recorded during the outage reaches the other replica, once.
    assert_eq!(next_project(&mut far_s, Duration::from_secs(20)).await.as_deref(), Some("g/far"));
    assert!(next_project(&mut far_s, Duration::from_secs(2)).await.is_none(), "once");
    assert!(next_project(&mut near_s, QUIET).await.is_none());
    let ready =
        eventually(SOON, || async { a.client.get(a.url("/readyz")).send().await.unwrap().status() == 200 }).await;
    assert!(ready, "ready again");
    // And fan-out works again.
    assert_eq!(a.push(1, "g/far", 0).await.status(), 202);
    assert_eq!(next_project(&mut far_s, SOON).await.as_deref(), Some("g/far"));
    a.stop().await;
    b.stop().await;
    db.cleanup().await;
}

/// A replica dies with an agent connected: the agent reconnects to another replica and gets
/// what it missed; the dead replica's connections disappear from the connection state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_replica_agents_reconnect_elsewhere_and_replay() {
    let db = TestDb::postgres().await;
    let prefix = test_redis::prefix();
    let settings = with_redis(test_redis::SHARED.into(), prefix.clone());
    let survivor = TestApp::spawn(&db, &settings).await;
    let (_, token) = survivor.create_agent("wanderer", "g/app").await;
    let mut doomed = ProcessReplica::spawn(
        &db,
        &[
            ("KAS_REDIS_URL", test_redis::SHARED.into()),
            ("KAS_REDIS_PREFIX", prefix.clone()),
            ("KAS_REPLICA_NAME", "doomed".into()),
        ],
    );
    let agent = TestAgent::connect(doomed.agent, &token).await;
    let mut stream = agent.open(&["g/app"]).await.unwrap();
    assert_eq!(survivor.push(1, "g/app", 0).await.status(), 202);
    assert_eq!(next_project(&mut stream, SOON).await.as_deref(), Some("g/app"));
    let on_doomed = || async {
        let body: serde_json::Value = survivor
            .client
            .get(survivor.url("/agents"))
            .bearer_auth(&survivor.admin_secret)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["connections"].as_array().unwrap().iter().any(|c| c["replica"] == "doomed")
    };
    assert!(eventually(SOON, on_doomed).await, "listed on the doomed replica");

    doomed.kill();
    assert!(tokio::time::timeout(SOON, stream.message()).await.expect("stream breaks").is_err());
    // Pushed while the agent has no replica.
    assert_eq!(survivor.push(1, "g/app", 0).await.status(), 202);
    // The agent reconnects through the load balancer, to the survivor, and is replayed the push.
    let agent = TestAgent::connect(survivor.agent, &token).await;
    let mut stream = agent.open(&["g/app"]).await.unwrap();
    assert_eq!(drain(&mut stream, QUIET).await, ["g/app"]);
    // The dead replica's connections expire on their own.
    let gone = eventually(Duration::from_secs(40), || async { !on_doomed().await }).await;
    assert!(gone, "the dead replica's connections expired");
    survivor.stop().await;
    test_redis::cleanup(&prefix).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_through_a_redis_cluster() {
    let cluster = PrivateCluster::start().await;
    let db = TestDb::postgres().await;
    let settings = with_redis(cluster.url(), "kas".into());
    let a = TestApp::spawn(&db, &settings).await;
    let b = TestApp::spawn(&db, &settings).await;
    let (_, token) = a.create_agent("clustered", "g/c").await;
    let (_, other) = a.create_agent("bystander", "g/other").await;
    let agent = TestAgent::connect(b.agent, &token).await;
    let bystander = TestAgent::connect(a.agent, &other).await;
    let mut s = agent.open(&["g/c", "g/pub"]).await.unwrap();
    let mut bs = bystander.open(&["g/c", "g/pub"]).await.unwrap();
    assert_eq!(a.push(1, "g/c", 0).await.status(), 202);
    assert_eq!(a.push(2, "g/pub", 20).await.status(), 202);
    assert_eq!(sorted(drain(&mut s, QUIET).await), ["g/c", "g/pub"]);
    assert_eq!(drain(&mut bs, QUIET).await, ["g/pub"]);
    let listed = eventually(SOON, || async {
        let body: serde_json::Value =
            a.client.get(a.url("/agents")).bearer_auth(&a.admin_secret).send().await.unwrap().json().await.unwrap();
        body["connections"].as_array().map(|c| c.len()) == Some(2)
    })
    .await;
    assert!(listed);
    a.stop().await;
    b.stop().await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_through_sentinel() {
    let sentinel = PrivateSentinel::start().await;
    let db = TestDb::postgres().await;
    let settings = with_redis(sentinel.url(), "kas".into());
    let a = TestApp::spawn(&db, &settings).await;
    let b = TestApp::spawn(&db, &settings).await;
    let (_, token) = a.create_agent("watched", "g/s").await;
    let agent = TestAgent::connect(b.agent, &token).await;
    let mut s = agent.open(&["g/s"]).await.unwrap();
    assert_eq!(a.push(1, "g/s", 0).await.status(), 202);
    assert_eq!(drain(&mut s, QUIET).await, ["g/s"]);
    let ready: serde_json::Value = a.client.get(a.url("/readyz")).send().await.unwrap().json().await.unwrap();
    assert_eq!(ready["checks"]["redis"], "ok");
    a.stop().await;
    b.stop().await;
    db.cleanup().await;
}

/// `rediss://`: Redis over TLS, the server's CA trusted through `SSL_CERT_FILE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_over_tls() {
    crate::support::init();
    let db = TestDb::postgres().await;
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("redis.crt"), dir.path().join("redis.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let port = test_redis::free_port();
    let (c, k) = (cert_path.display().to_string(), key_path.display().to_string());
    let _redis = PrivateRedis::start_tls(
        port,
        &[
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            &c,
            "--tls-key-file",
            &k,
            "--tls-ca-cert-file",
            &c,
            "--tls-auth-clients",
            "no",
        ],
    )
    .await;
    let url = format!("rediss://localhost:{port}");
    let env = |name: &str| {
        vec![
            ("KAS_REDIS_URL", url.clone()),
            ("KAS_REPLICA_NAME", name.to_owned()),
            ("SSL_CERT_FILE", cert_path.display().to_string()),
        ]
    };
    let a = ProcessReplica::spawn(&db, &env("tls-a"));
    let b = ProcessReplica::spawn(&db, &env("tls-b"));
    let store = db.open_store().await;
    let token = kas::domain::AgentToken::generate();
    let name = kas::domain::AgentName::parse("secure").unwrap();
    let project = kas::domain::ProjectPath::parse("g/tls").unwrap();
    store.create_agent(&name, &project, &token.digest(), None, kas::clock::now_ms()).await.unwrap();
    let client = reqwest::Client::new();
    let ready = eventually(SOON, || async {
        let r = client.get(format!("http://{}/readyz", a.http)).send().await.unwrap();
        let body: serde_json::Value = r.json().await.unwrap();
        body["checks"]["redis"] == "ok"
    })
    .await;
    assert!(ready, "replica A reaches Redis over TLS");
    let agent = TestAgent::connect(b.agent, token.expose()).await;
    let mut stream = agent.open(&["g/tls"]).await.unwrap();
    let secret = std::fs::read_to_string(db.data_dir().join("webhook-secret")).unwrap();
    let body = serde_json::json!({"object_kind": "push", "project": {"id": 1, "path_with_namespace": "g/tls", "visibility_level": 0}});
    let r = client
        .post(format!("http://{}/webhooks/gitlab", a.http))
        .header("X-Gitlab-Token", secret.trim())
        .header("X-Gitlab-Event", "Push Hook")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(next_project(&mut stream, SOON).await.as_deref(), Some("g/tls"), "through Redis over TLS");
    store.close().await;
    drop((a, b));
    db.cleanup().await;
}
