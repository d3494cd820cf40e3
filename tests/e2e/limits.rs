//! What one agent token can hold: streams per agent, projects and bytes per ReconcileProjects
//! request, GitLab's segment length. Each limit answers with a clear gRPC code and frees up
//! when the agent lets go.

use std::time::Duration;

use crate::support::agent::TestAgent;
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
