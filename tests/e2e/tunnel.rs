//! Calls into an agent's cluster through agentk's reverse tunnel: an agent-side double speaking
//! agentk's side of the tunnel, forwarding to a stand-in Kubernetes API; the library API
//! (`App::tunnels`), `GET /cluster` and `kas cluster get`; relays between replicas through Redis;
//! the once-only primitive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kas::clock::now_ms;
use kas::tunnel::{KubeRequest, Once, Purpose, TunnelError};

use crate::support::agentk::{Transport, connect};
use crate::support::kube::{self, KubeApi};
use crate::support::redis as test_redis;
use crate::support::tunnel::{Behaviour, HEADER_EXTRA, MAKE_REQUEST, TunnelAgent};
use crate::support::{TestApp, TestDb, eventually};

const SOON: Duration = Duration::from_secs(10);
const OPTED_IN: &str = "kas:\n  cluster_read: true\n  oci:\n    enabled: true\n";

/// An agent with `config`, and the double opening `slots` tunnels to `app`.
async fn agent_with_tunnels(
    app: &TestApp,
    name: &str,
    config: &str,
    kube: &KubeApi,
    slots: usize,
    behaviour: Behaviour,
) -> (i64, String, TunnelAgent) {
    let (agent, token) = app.create_agent(name, &format!("team/{name}")).await;
    app.store.set_agent_config(agent.id, Some(config)).await.unwrap();
    let (channel, _) = connect(app.agent, Transport::Plain).await;
    let double = TunnelAgent::start(channel, &token, kube.base(), slots, behaviour);
    let tunnels = app.state.tunnels.clone();
    assert!(eventually(SOON, || async { tunnels.registry().holds(agent.id) }).await, "tunnels registered");
    (agent.id, token, double)
}

async fn cluster_get(app: &TestApp, agent: &str, path: &str) -> reqwest::Response {
    app.client
        .get(app.url("/cluster"))
        .query(&[("agent", agent), ("path", path)])
        .bearer_auth(&app.admin_secret)
        .header("cookie", "session=operator")
        .send()
        .await
        .unwrap()
}

fn kas_cli(db: &TestDb, app: &TestApp, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kas"))
        .args(args)
        .args(["--addr", &format!("http://{}", app.http), "--data-dir"])
        .arg(db.data_dir())
        .output()
        .unwrap()
}

/// The call works through the library, `GET /cluster` and `kas cluster get`; the wire is
/// agentk's; no credential reaches the cluster; a 403 from the cluster comes back as such and
/// is counted; an answer over the limit is refused; tunnel counts are listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_reach_the_cluster_as_agentk_without_credentials() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |_| {}).await;
    let kube = KubeApi::start().await;
    let (agent, _, double) = agent_with_tunnels(&app, "prod", OPTED_IN, &kube, 2, Behaviour::Answer).await;

    let answer = cluster_get(&app, "prod", "/version").await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["kas-cluster-status"], "200");
    assert_eq!(answer.headers()["content-type"], "application/json");
    let version: serde_json::Value = answer.json().await.unwrap();
    assert_eq!(version["gitVersion"], "v1.31.2");

    // The library call, with credentials a careless caller might pass along.
    let request = KubeRequest {
        method: "GET".into(),
        path: kube::OCI_REPOSITORIES.into(),
        query: vec![("limit".into(), "10".into())],
        headers: vec![
            ("Authorization".into(), "Bearer not-for-the-cluster".into()),
            ("Cookie".into(), "a=b".into()),
            ("Impersonate-User".into(), "system:admin".into()),
            ("Accept".into(), "application/json".into()),
        ],
        body: Vec::new(),
    };
    let response = app.state.tunnels.call(agent, Purpose::Oci, request).await.unwrap();
    assert_eq!(response.status, 200);
    let body = response.body.collect(1 << 20).await.unwrap();
    let list: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(list["items"][1]["metadata"]["name"], "podinfo");

    let received = double.received();
    assert_eq!(received.len(), 2, "one request per call");
    for r in &received {
        assert_eq!(r.method_name, MAKE_REQUEST);
        assert_eq!(r.method, "GET");
        assert_eq!(r.extra_type_url, HEADER_EXTRA);
        let imp = r.imp_config.clone().expect("imp_config present");
        assert!(imp.username.is_empty() && imp.groups.is_empty() && imp.uid.is_empty(), "no impersonation");
        for name in r.header.keys() {
            let n = name.to_ascii_lowercase();
            assert!(n != "authorization" && n != "cookie" && !n.starts_with("impersonate-"), "{name} forwarded");
        }
    }
    assert_eq!(received[1].url_path, kube::OCI_REPOSITORIES);
    assert_eq!(received[1].query["limit"], ["10"]);
    assert_eq!(received[1].header["Accept"], ["application/json"]);
    for seen in kube.seen() {
        for (name, _) in &seen.headers {
            assert!(
                name != "authorization" && name != "cookie" && !name.starts_with("impersonate-"),
                "{name} reached the cluster"
            );
        }
    }

    // A 403 from the cluster: passed back as the cluster's, logged and counted, not retried.
    let before = kube.seen().len();
    let forbidden = cluster_get(&app, "prod", kube::FORBIDDEN).await;
    assert_eq!(forbidden.status(), 403);
    assert_eq!(forbidden.headers()["kas-cluster-status"], "403");
    assert_eq!(kube.seen().len(), before + 1, "asked once");
    let metrics = app.metrics_text().await;
    assert!(metrics.contains("kas_tunnel_calls_total{result=\"forbidden\"} 1"), "{metrics}");
    assert!(metrics.contains("kas_tunnel_calls_total{result=\"ok\"} 2"), "{metrics}");
    assert!(metrics.contains("kas_tunnel_call_seconds_count"), "{metrics}");

    // The answer is bounded (4 MiB by default).
    let huge = app.state.tunnels.call(agent, Purpose::ClusterRead, KubeRequest::get(kube::HUGE)).await.unwrap();
    assert_eq!(huge.body.collect(usize::MAX).await, Err(TunnelError::ResponseTooLarge(4 << 20)));

    // The operator's view: tunnel counts per agent and replica, and the command line.
    let tunnels = app.state.tunnels.clone();
    let listed = eventually(SOON, || async {
        let body: serde_json::Value = app
            .client
            .get(app.url("/agents"))
            .bearer_auth(&app.admin_secret)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["tunnels"].as_array().is_some_and(|t| {
            t.len() == 1
                && t[0]["agent_id"] == agent
                && t[0]["agent_name"] == "prod"
                && t[0]["idle"].as_u64() == Some(2)
                && t[0]["methods"] == serde_json::json!(["gitlab.agent.kubernetes_api.rpc.KubernetesApi/MakeRequest"])
        })
    })
    .await;
    assert!(listed && tunnels.registry().holds(agent), "tunnel counts listed");
    let out = kas_cli(&db, &app, &["agents"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("TUNNELS") && table.lines().any(|l| l.contains("prod") && l.contains(" 2 ")), "{table}");

    let out = kas_cli(&db, &app, &["cluster", "get", "prod", kube::GIT_REPOSITORIES]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("GitRepositoryList"));
    let out = kas_cli(&db, &app, &["cluster", "get", &agent.to_string(), kube::FORBIDDEN]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("403") && stderr.contains("secrets is forbidden"), "{stderr}");

    // Once-only actions on the in-process engine: the first sighting acts, a repeat does not.
    let ran = app.state.tunnels.run_once(agent, "event-1", SOON, || async { 7 }).await.unwrap();
    assert_eq!(ran, Once::Ran(7));
    let again = app.state.tunnels.run_once(agent, "event-1", SOON, || async { 8 }).await.unwrap();
    assert_eq!(again, Once::Elsewhere);

    double.stop().await;
    app.stop().await;
}

/// Refusals: an agent that did not opt in, a method the purpose never sends, no tunnel at all
/// (a bounded wait, then a clear error), a wrong admin secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clear_and_waits_bounded() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |s| s.tunnel_wait = Some("600ms".into())).await;
    let kube = KubeApi::start().await;
    let (staging, _, double) = agent_with_tunnels(&app, "staging", "flux: {}\n", &kube, 1, Behaviour::Answer).await;

    let refused = cluster_get(&app, "staging", "/version").await;
    assert_eq!(refused.status(), 403);
    assert!(!refused.headers().contains_key("kas-cluster-status"), "kas's refusal, not the cluster's");
    let text = refused.text().await.unwrap();
    assert!(text.contains("kas.cluster_read"), "{text}");
    let out = kas_cli(&db, &app, &["cluster", "get", "staging", "/version"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("kas refused (403"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let oci = app.state.tunnels.call(staging, Purpose::Oci, KubeRequest::get("/version")).await;
    assert!(matches!(oci, Err(TunnelError::NotOptedIn { .. })), "{:?}", oci.err());
    assert!(double.received().is_empty(), "nothing reached the cluster");

    let patch = KubeRequest { method: "PATCH".into(), path: "/apis/x".into(), ..Default::default() };
    let refused = app.state.tunnels.call(staging, Purpose::ClusterRead, patch).await;
    assert!(matches!(refused, Err(TunnelError::Refused(_))), "{:?}", refused.err());

    // agentk cannot reach its API server: its error comes back as such.
    let (broken, _, unreachable) = agent_with_tunnels(&app, "broken", OPTED_IN, &kube, 1, Behaviour::Unreachable).await;
    let failed = app.state.tunnels.call(broken, Purpose::ClusterRead, KubeRequest::get("/version")).await;
    match failed {
        Err(TunnelError::Agent { code, message }) => assert!(code == 14 && message.contains("connection refused")),
        other => panic!("{:?}", other.err()),
    }
    let bad_gateway = cluster_get(&app, "broken", "/version").await;
    assert_eq!(bad_gateway.status(), 502);
    assert!(bad_gateway.text().await.unwrap().contains("connection refused"));
    unreachable.stop().await;

    // An opted-in agent whose agentk is not connected.
    let (away, _) = app.create_agent("away", "team/away").await;
    app.store.set_agent_config(away.id, Some(OPTED_IN)).await.unwrap();
    let started = Instant::now();
    let none = app.state.tunnels.call(away.id, Purpose::ClusterRead, KubeRequest::get("/version")).await;
    assert!(matches!(none, Err(TunnelError::NoTunnel { .. })), "{:?}", none.err());
    assert!(started.elapsed() >= Duration::from_millis(550) && started.elapsed() < Duration::from_secs(5));
    let timed_out = cluster_get(&app, "away", "/version").await;
    assert_eq!(timed_out.status(), 504);
    assert!(timed_out.text().await.unwrap().contains("no tunnel"));
    let unknown = cluster_get(&app, "nobody", "/version").await;
    assert_eq!(unknown.status(), 404);
    let bad =
        app.client.get(app.url("/cluster?agent=staging&path=/version")).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(bad.status(), 401);

    double.stop().await;
    app.stop().await;
}

/// A tunnel lost in the middle of an answer fails the call (never a truncated body as if
/// complete); a revoked token drops the agent's idle tunnels at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_tunnels_fail_calls_and_revocation_drops_tunnels() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |s| s.token_recheck = Some("200ms".into())).await;
    let kube = KubeApi::start().await;
    let (dying, _, double) = agent_with_tunnels(&app, "dying", OPTED_IN, &kube, 1, Behaviour::DieMidAnswer).await;
    let response =
        app.state.tunnels.call(dying, Purpose::ClusterRead, KubeRequest::get(kube::GIT_REPOSITORIES)).await.unwrap();
    assert_eq!(response.status, 200, "the header arrived");
    let body = tokio::time::timeout(SOON, response.body.collect(1 << 20)).await.unwrap();
    assert!(matches!(body, Err(TunnelError::Lost(_))), "{body:?}");
    let metrics = app.metrics_text().await;
    assert!(metrics.contains("kas_tunnels_open{state=\"busy\"} 0"), "the lost tunnel is not held: {metrics}");
    double.stop().await;

    let (agent, _, double) = agent_with_tunnels(&app, "revoked", OPTED_IN, &kube, 3, Behaviour::Answer).await;
    let token_id = app.store.list_tokens(agent).await.unwrap()[0].id;
    app.store.revoke_token(token_id, now_ms()).await.unwrap();
    let tunnels = app.state.tunnels.clone();
    assert!(eventually(SOON, || async { !tunnels.registry().holds(agent) }).await, "tunnels dropped");
    assert!(double.errors().contains(&tonic::Code::Unauthenticated), "{:?}", double.errors());
    let call = app.state.tunnels.call(agent, Purpose::ClusterRead, KubeRequest::get("/version")).await;
    assert!(call.is_err());
    double.stop().await;
    app.stop().await;
}

fn with_redis(prefix: String, wait: &'static str) -> impl Fn(&mut kas::config::Settings) {
    move |s| {
        s.redis_url = Some(test_redis::SHARED.into());
        s.redis_prefix = Some(prefix.clone());
        s.tunnel_wait = Some(wait.into());
        // Short, so an abandoned once-only claim expires within the test (twice this plus the wait).
        s.tunnel_timeout = Some("1s".into());
    }
}

/// With Redis, a call made on a replica without a tunnel is relayed to the replica holding one;
/// an action runs once across replicas, on the one holding a tunnel, and waits (bounded) for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_replica_calls_and_one_replica_acts() {
    let db = TestDb::postgres().await;
    let prefix = test_redis::prefix();
    let a = TestApp::spawn(&db, with_redis(prefix.clone(), "3s")).await;
    let b = TestApp::spawn(&db, with_redis(prefix.clone(), "3s")).await;
    let kube = KubeApi::start().await;
    let (agent, _, double) = agent_with_tunnels(&b, "prod", OPTED_IN, &kube, 2, Behaviour::Answer).await;
    // A learns of B's tunnels through the presence table.
    let holders = a.state.engine.clone();
    assert!(eventually(SOON, || async { !holders.tunnel_holders(agent).await.unwrap().is_empty() }).await);
    assert!(!a.state.tunnels.registry().holds(agent));

    let answer = cluster_get(&a, "prod", kube::OCI_REPOSITORIES).await;
    assert_eq!(answer.status(), 200);
    assert!(answer.text().await.unwrap().contains("podinfo"));
    let request = KubeRequest {
        headers: vec![("Authorization".into(), "Bearer not-for-the-cluster".into())],
        ..KubeRequest::get("/version")
    };
    let relayed = a.state.tunnels.call(agent, Purpose::ClusterRead, request).await.unwrap();
    assert_eq!(relayed.status, 200);
    assert!(String::from_utf8(relayed.body.collect(1 << 20).await.unwrap()).unwrap().contains("v1.31.2"));
    assert_eq!(double.received().len(), 2);
    assert!(kube.seen().iter().all(|s| s.headers.iter().all(|(n, _)| n != "authorization")));
    let forbidden = a.state.tunnels.call(agent, Purpose::ClusterRead, KubeRequest::get(kube::FORBIDDEN)).await.unwrap();
    assert_eq!(forbidden.status, 403, "the cluster's refusal, relayed");
    let no_tunnel = {
        let (other, _) = a.create_agent("other", "team/other").await;
        a.state.tunnels.call(other.id, Purpose::ClusterRead, KubeRequest::get("/version")).await
    };
    assert!(matches!(no_tunnel, Err(TunnelError::NoTunnel { .. })), "{:?}", no_tunnel.err());

    // Tunnel counts of B, listed from A.
    let listed: serde_json::Value =
        a.client.get(a.url("/agents")).bearer_auth(&a.admin_secret).send().await.unwrap().json().await.unwrap();
    let t = &listed["tunnels"][0];
    assert_eq!((t["agent_id"].as_i64(), t["agent_name"].as_str()), (Some(agent), Some("prod")));
    assert!(t["replica"].as_str().unwrap().starts_with(&b.state.config.replica_name), "{t}");

    // Once per event: both replicas see it, the one holding the tunnel acts, exactly once.
    let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let once = |app: &TestApp, key: &'static str, wait: Duration| {
        let tunnels = app.state.tunnels.clone();
        let ran = ran.clone();
        let replica = app.state.config.replica_name.clone();
        async move {
            tunnels
                .run_once(agent, key, wait, || async move {
                    ran.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    replica
                })
                .await
        }
    };
    let (on_a, on_b) = tokio::join!(once(&a, "push-1", SOON), once(&b, "push-1", SOON));
    assert_eq!(on_b.unwrap(), Once::Ran(b.state.config.replica_name.clone()));
    assert_eq!(on_a.unwrap(), Once::Elsewhere);
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Seen again later (a redelivery): done already.
    assert_eq!(once(&b, "push-1", SOON).await.unwrap(), Once::Elsewhere);

    // No tunnel anywhere: the action waits until one appears, on whichever replica.
    double.stop().await;
    let gone = b.state.tunnels.clone();
    assert!(eventually(SOON, || async { !gone.registry().holds(agent) }).await);
    let waiting = tokio::spawn(once(&a, "push-2", Duration::from_secs(20)));
    let waiting_b = tokio::spawn(once(&b, "push-2", Duration::from_secs(20)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished() && !waiting_b.is_finished(), "waiting for a tunnel");
    let token = {
        let t = kas::domain::AgentToken::generate();
        a.store.create_token(agent, &t.digest(), now_ms()).await.unwrap();
        t.expose().to_owned()
    };
    let (channel, _) = connect(a.agent, Transport::Plain).await;
    let back = TunnelAgent::start(channel, &token, kube.base(), 1, Behaviour::Answer);
    assert_eq!(waiting.await.unwrap().unwrap(), Once::Ran(a.state.config.replica_name.clone()));
    assert_eq!(waiting_b.await.unwrap().unwrap(), Once::Elsewhere);
    assert_eq!(ran.load(std::sync::atomic::Ordering::SeqCst), 2);
    // A replica that claimed an event and died without finishing: the claim expires and a replica
    // still waiting acts.
    let claimed = b.state.engine.claim_once("push-4", Duration::from_secs(2)).await.unwrap();
    assert_eq!(claimed, kas::engine::OnceClaim::Won);
    let started = Instant::now();
    assert_eq!(once(&a, "push-4", SOON).await.unwrap(), Once::Ran(a.state.config.replica_name.clone()));
    assert!(started.elapsed() >= Duration::from_millis(1500), "waited for the dead claim to expire");

    // Whoever can publish to Redis cannot make a replica call a cluster.
    let before = back.received().len();
    let forged = serde_json::json!({
        "kind": "call", "id": "forged", "from": b.state.engine.instance(), "agent": agent,
        "purpose": "cluster_read", "request": {"method": "GET", "path": "/version"}, "wait_ms": 1000,
    });
    let envelope =
        serde_json::json!({"t": a.state.engine.instance(), "a": now_ms(), "b": forged.to_string(), "m": "00"});
    let client = redis::Client::open(test_redis::SHARED).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let channel = format!("{{{prefix}}}:direct:{}", a.state.engine.instance());
    let receivers: i64 =
        redis::cmd("PUBLISH").arg(&channel).arg(envelope.to_string()).query_async(&mut conn).await.unwrap();
    assert_eq!(receivers, 1, "A listens on its direct channel");
    assert!(
        eventually(SOON, || async { a.metrics_text().await.contains("kas_engine_forgeries_total 1") }).await,
        "counted as a forgery"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(back.received().len(), before, "nothing reached the cluster");

    // And with none at all, the wait is bounded.
    back.stop().await;
    let gone = a.state.tunnels.clone();
    assert!(eventually(SOON, || async { !gone.registry().holds(agent) }).await);
    let none = once(&b, "push-3", Duration::from_millis(300)).await;
    assert!(matches!(none, Err(TunnelError::NoTunnel { .. })), "{none:?}");

    a.stop().await;
    b.stop().await;
    test_redis::cleanup(&prefix).await;
    db.cleanup().await;
}

/// `ConfigurationResponse` with the configuration kept as raw bytes: every field kas sends, known
/// to the test or not.
#[derive(Clone, PartialEq, prost::Message)]
struct RawConfigurationResponse {
    #[prost(bytes = "vec", tag = "1")]
    configuration: Vec<u8>,
    #[prost(string, tag = "2")]
    commit_id: String,
}

/// The `kas:` section is read by kas and never sent: agentk gets byte for byte the configuration
/// it gets without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kas_section_never_reaches_agentk() {
    use crate::support::wire;
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |_| {}).await;
    let base = "flux:\n  webhook_receiver_url: http://receiver.flux-system.svc\n";
    let mut sent = Vec::new();
    for (name, text) in [
        ("plain", base.to_owned()),
        ("optin", format!("{base}{OPTED_IN}  sync_status:\n    enabled: true\n    projects: [team/app]\n")),
    ] {
        // Same configuration project, so everything else kas sends is the same.
        let (agent, token) = app.create_agent(name, "team/config").await;
        app.store.set_agent_config(agent.id, Some(&text)).await.unwrap();
        let (channel, _) = connect(app.agent, Transport::Plain).await;
        let request = wire::ConfigurationRequest17 { commit_id: String::new() };
        let mut stream = wire::server_streaming::<_, RawConfigurationResponse>(
            &channel,
            wire::GET_CONFIGURATION,
            crate::support::agentk::as_agent(&token, request),
        )
        .await
        .unwrap();
        let first = tokio::time::timeout(SOON, stream.message()).await.unwrap().unwrap().unwrap();
        sent.push((agent.id, first.configuration));
    }
    // Only the agent id (field 4) differs: re-encode each with the other's id removed.
    let strip = |(id, bytes): &(i64, Vec<u8>)| {
        let mut c = <crate::support::wire::AgentConfiguration as prost::Message>::decode(bytes.as_slice()).unwrap();
        assert_eq!(c.agent_id, *id);
        c.agent_id = 0;
        let known = prost::Message::encode_to_vec(&c);
        assert_eq!(
            known.len() + prost::Message::encoded_len(&RawId { agent_id: *id }),
            bytes.len(),
            "no field beyond the known ones"
        );
        known
    };
    assert_eq!(strip(&sent[0]), strip(&sent[1]));
    app.stop().await;
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawId {
    #[prost(int64, tag = "4")]
    agent_id: i64,
}
