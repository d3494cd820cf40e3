//! What one agent token can hold: streams per agent, projects and bytes per ReconcileProjects
//! request, GitLab's segment length, registered pods and their metadata. Each limit answers with a clear gRPC code and frees up
//! when the agent lets go.

use std::time::Duration;

use tonic::Streaming;
use tonic::transport::Channel;

use crate::support::agent::TestAgent;
use crate::support::agentk::{Transport, as_agent, connect};
use crate::support::wire::{
    self, AgentMeta16, ConfigurationRequest16, ConfigurationResponse, Empty, RegisterRequest16,
};
use crate::support::{TestApp, TestDb, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_holds_bounded_streams_and_requests() {
    let db = TestDb::sqlite();
    let app = TestApp::spawn(&db, |s| {
        s.max_streams_per_agent = Some("3".into());
        s.max_projects_per_stream = Some("50".into());
        s.max_reconcile_request = Some("2KiB".into());
    })
    .await;
    let (_, token) = app.create_agent("greedy", "g/config").await;
    let (_, other_token) = app.create_agent("modest", "g/other").await;
    let agent = TestAgent::connect(app.agent, &token).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(agent.open(&["g/config"]).await.unwrap());
    }
    let refused = agent.open(&["g/config"]).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("3 streams"), "{}", refused.message());
    // Another agent is not affected.
    let other = TestAgent::connect(app.agent, &other_token).await;
    let _other_stream = other.open(&["g/other"]).await.unwrap();
    // Letting go of one frees its place.
    held.pop();
    let freed = eventually(Duration::from_secs(5), || async { agent.open(&["g/config"]).await.is_ok() }).await;
    assert!(freed, "a closed stream gives its place back");

    // Requests: too many projects, too many bytes, a segment longer than GitLab allows.
    drop(held);
    let many: Vec<String> = (0..51).map(|i| format!("g/p{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let wait_for_room =
        || async { eventually(Duration::from_secs(5), || async { agent.open(&["g/config"]).await.is_ok() }).await };
    assert!(wait_for_room().await);
    assert_eq!(agent.open(&many).await.unwrap_err().code(), tonic::Code::ResourceExhausted);
    let long: Vec<String> = (0..40).map(|i| format!("g/{}{i}", "x".repeat(60))).collect();
    let long: Vec<&str> = long.iter().map(String::as_str).collect();
    // Refused before it is decoded: RESOURCE_EXHAUSTED gzip-compressed (as agentk sends),
    // OUT_OF_RANGE uncompressed (tonic's codes).
    let too_big = agent.open(&long).await.unwrap_err();
    assert!(matches!(too_big.code(), tonic::Code::ResourceExhausted | tonic::Code::OutOfRange), "{too_big:?}");
    let segment = format!("g/{}", "x".repeat(256));
    assert_eq!(agent.open(&[&segment]).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    app.stop().await;
}

fn meta(pod: &str) -> AgentMeta16 {
    AgentMeta16 {
        version: "v18.2.1".into(),
        commit_id: "def456".into(),
        pod_namespace: "gitlab-agent".into(),
        pod_name: pod.into(),
        kubernetes_version: None,
    }
}

/// Pods an agent registers, through `a` and `b` (two replicas, or one twice): at most 3 live
/// registrations (a refresh is never refused, an unregistered pod frees its place), metadata
/// at most 1 KiB, on Register and on agentk 16's registering configuration stream alike; a
/// refused registration changes nothing.
async fn pods_and_metadata_are_bounded(a: &TestApp, b: &TestApp) -> (i64, String) {
    let (agent, token) = a.create_agent("podded", "g/config").await;
    let (on_a, _) = connect(a.agent, Transport::Plain).await;
    let (on_b, _) = connect(b.agent, Transport::Plain).await;
    let register = |channel: &Channel, pod_id: i64, meta: AgentMeta16| {
        let request = as_agent(&token, RegisterRequest16 { agent_meta: Some(meta), pod_id });
        let channel = channel.clone();
        async move { wire::unary::<_, Empty>(&channel, wire::REGISTER, request, true).await }
    };
    let pods = || async {
        let mut ids: Vec<i64> = crate::agentk::connected18(b, wire::BY_AGENT_IDS[1], &[agent.id])
            .await
            .iter()
            .map(|p| p.connection_id)
            .collect();
        ids.sort();
        ids
    };
    for pod in 1..=3 {
        register(&on_a, pod, meta("agentk")).await.unwrap();
    }
    let refused = register(&on_b, 4, meta("agentk")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("3 pods"), "{}", refused.message());
    assert_eq!(pods().await, [1, 2, 3], "nothing changed");
    register(&on_b, 2, meta("agentk")).await.expect("a refresh is never refused");
    wire::unary::<_, Empty>(
        &on_b,
        wire::UNREGISTER,
        as_agent(&token, RegisterRequest16 { agent_meta: None, pod_id: 1 }),
        true,
    )
    .await
    .unwrap();
    register(&on_a, 4, meta("agentk")).await.expect("an unregistered pod frees its place");
    assert_eq!(pods().await, [2, 3, 4]);

    // agentk 16 asking kas to register it on its configuration stream: refused on the stream.
    let request =
        ConfigurationRequest16 { commit_id: String::new(), agent_meta: Some(meta("agentk")), skip_register: false };
    let mut stream: Streaming<ConfigurationResponse> =
        wire::server_streaming(&on_a, wire::GET_CONFIGURATION, as_agent(&token, request)).await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), stream.message()).await.unwrap().unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused:?}");

    // Metadata over 1 KiB: refused on both doors, nothing registered.
    wire::unary::<_, Empty>(
        &on_a,
        wire::UNREGISTER,
        as_agent(&token, RegisterRequest16 { agent_meta: None, pod_id: 4 }),
        true,
    )
    .await
    .unwrap();
    let huge = meta(&"x".repeat(1100));
    let refused = register(&on_b, 5, huge.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("1024"), "{}", refused.message());
    let request = ConfigurationRequest16 { commit_id: String::new(), agent_meta: Some(huge), skip_register: false };
    let refused =
        wire::server_streaming::<_, ConfigurationResponse>(&on_a, wire::GET_CONFIGURATION, as_agent(&token, request))
            .await
            .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert_eq!(pods().await, [2, 3]);
    register(&on_b, 5, meta("agentk")).await.unwrap();
    (agent.id, token.clone())
}

fn pod_limits(s: &mut kas::config::Settings) {
    s.max_pods_per_agent = Some("3".into());
    s.max_agent_meta = Some("1KiB".into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_per_agent_are_bounded_in_memory() {
    let db = TestDb::sqlite();
    let secret = crate::intake::write_gitlab_secret(&db);
    let app = TestApp::spawn(&db, |s| {
        pod_limits(s);
        s.gitlab_secret_file = Some(secret);
    })
    .await;
    pods_and_metadata_are_bounded(&app, &app).await;
    app.stop().await;
}

/// Across replicas through Redis: the limit counts every replica's registrations, and an expired
/// registration left in Redis (a pod that stopped without unregistering) is removed, not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_per_agent_are_bounded_across_replicas() {
    let db = TestDb::postgres().await;
    let prefix = crate::support::redis::prefix();
    let secret = crate::intake::write_gitlab_secret(&db);
    let settings = |s: &mut kas::config::Settings| {
        pod_limits(s);
        s.gitlab_secret_file = Some(secret.clone());
        s.redis_url = Some(crate::support::redis::SHARED.into());
        s.redis_prefix = Some(prefix.clone());
    };
    let a = TestApp::spawn(&db, settings).await;
    let b = TestApp::spawn(&db, settings).await;
    let (agent_id, token) = pods_and_metadata_are_bounded(&a, &b).await;

    // Pods 2, 3, 5 are live; a stale registration of pod 9 is left in the agent's table.
    let key = format!("{{{prefix}}}:pods:agent:{agent_id}");
    let stale = kas::engine::PodRecord {
        agent_id,
        project_id: 0,
        pod_id: 9,
        meta: Default::default(),
        connected_at: 1,
        replica: "gone".into(),
        expires_at: 2,
    };
    let mut redis =
        redis::Client::open(crate::support::redis::SHARED).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg(9)
        .arg(serde_json::to_string(&stale).unwrap())
        .query_async(&mut redis)
        .await
        .unwrap();
    let (channel, _) = connect(b.agent, Transport::Plain).await;
    let call = |path: &'static str, pod_id: i64| {
        let request = as_agent(&token, RegisterRequest16 { agent_meta: Some(meta("agentk")), pod_id });
        let channel = channel.clone();
        async move { wire::unary::<_, Empty>(&channel, path, request, true).await }
    };
    call(wire::UNREGISTER, 5).await.unwrap();
    call(wire::REGISTER, 6).await.expect("two live pods and an expired one: room for a third");
    let stale_left: bool = redis::cmd("HEXISTS").arg(&key).arg(9).query_async(&mut redis).await.unwrap();
    assert!(!stale_left, "the expired registration was removed");
    let refused = call(wire::REGISTER, 7).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    a.stop().await;
    b.stop().await;
    crate::support::redis::cleanup(&prefix).await;
    db.cleanup().await;
}
