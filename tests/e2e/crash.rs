//! Crash safety: `kill -9` of the only replica at any moment loses no accepted push. Every push
//! that got a 2xx reaches the agent that may see it when it reconnects within the replay window,
//! including pushes accepted after the restart but before the agent came back.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::TestDb;
use crate::support::agent::TestAgent;
use crate::support::process::ProcessReplica;

const PROJECTS: usize = 240;

fn project(i: usize) -> String {
    format!("crash/p{i}")
}

/// Reads a stream into `into` until it ends or fails.
fn collect(
    mut stream: tonic::Streaming<kas::proto::flux::rpc::ReconcileProjectsResponse>,
    into: Arc<Mutex<HashSet<String>>>,
) {
    tokio::spawn(async move {
        while let Ok(Some(r)) = stream.message().await {
            into.lock().unwrap().insert(r.project.unwrap().id);
        }
    });
}

async fn push(client: &reqwest::Client, http: std::net::SocketAddr, secret: &str, i: usize) -> bool {
    let body = serde_json::json!({"object_kind": "push", "project": {"id": i + 1, "path_with_namespace": project(i), "visibility_level": 20}});
    let sent = client
        .post(format!("http://{http}/webhooks/gitlab"))
        .header("X-Gitlab-Token", secret)
        .header("X-Gitlab-Event", "Push Hook")
        .body(body.to_string())
        .send()
        .await;
    matches!(sent, Ok(r) if r.status().is_success())
}

async fn crash_story(db: TestDb, env: Vec<(&'static str, String)>) {
    crate::support::init();
    let store = db.open_store().await;
    let token = kas::domain::AgentToken::generate();
    store
        .create_agent(
            &kas::domain::AgentName::parse("survivor").unwrap(),
            &kas::domain::ProjectPath::parse("crash/config").unwrap(),
            &token.digest(),
            None,
            kas::clock::now_ms(),
        )
        .await
        .unwrap();
    let paths: Vec<String> = (0..PROJECTS).map(project).collect();
    let paths: Vec<&str> = paths.iter().map(String::as_str).collect();
    let received = Arc::new(Mutex::new(HashSet::new()));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();

    let mut first = ProcessReplica::spawn(&db, &env);
    let secret = std::fs::read_to_string(db.data_dir().join("webhook-secret")).unwrap().trim().to_owned();
    let agent = TestAgent::connect(first.agent, token.expose()).await;
    collect(agent.open(&paths).await.unwrap(), received.clone());
    // Pushes in flight, eight at a time; the replica dies somewhere in the middle.
    let mut seed = [0u8; 1];
    getrandom::fill(&mut seed).unwrap();
    let kill_after = 60 + usize::from(seed[0]) % 80;
    let mut accepted = Vec::new();
    let mut next = 0;
    while next < 160 {
        let wave: Vec<usize> = (next..(next + 8).min(160)).collect();
        next += wave.len();
        let calls = wave.iter().map(|i| push(&client, first.http, &secret, *i));
        if next >= kill_after && next - wave.len() < kill_after {
            // Kill while this wave is in flight.
            let (oks, ()) = tokio::join!(futures::future::join_all(calls), async {
                tokio::time::sleep(Duration::from_millis(2)).await;
                first.kill();
            });
            accepted.extend(wave.iter().zip(oks).filter(|(_, ok)| *ok).map(|(i, _)| *i));
            break;
        }
        let oks = futures::future::join_all(calls).await;
        accepted.extend(wave.iter().zip(oks).filter(|(_, ok)| *ok).map(|(i, _)| *i));
    }
    drop(agent);

    // Back up; GitLab goes on pushing before the agent has reconnected.
    let second = ProcessReplica::spawn(&db, &env);
    for i in 200..PROJECTS {
        assert!(push(&client, second.http, &secret, i).await, "the restarted replica accepts pushes");
        accepted.push(i);
    }
    let agent = TestAgent::connect(second.agent, token.expose()).await;
    collect(agent.open(&paths).await.unwrap(), received.clone());
    let want: HashSet<String> = accepted.iter().map(|i| project(*i)).collect();
    let all_there =
        crate::support::eventually(Duration::from_secs(20), || async { want.is_subset(&received.lock().unwrap()) })
            .await;
    let missing: Vec<&String> = want.iter().filter(|p| !received.lock().unwrap().contains(*p)).collect();
    assert!(
        all_there,
        "killed after {kill_after}: {} of {} accepted pushes never delivered: {missing:?}",
        missing.len(),
        want.len()
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_sqlite() {
    let db = TestDb::sqlite();
    crash_story(db.clone(), Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_postgres() {
    let db = TestDb::postgres().await;
    crash_story(db.clone(), Vec::new()).await;
    db.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_nothing_postgres_redis() {
    let db = TestDb::postgres().await;
    let prefix = crate::support::redis::prefix();
    let env = vec![("KAS_REDIS_URL", crate::support::redis::SHARED.to_owned()), ("KAS_REDIS_PREFIX", prefix.clone())];
    crash_story(db.clone(), env).await;
    crate::support::redis::cleanup(&prefix).await;
    db.cleanup().await;
}
