//! Regressions from the attacker review: an event announced while this replica's database
//! blinked is caught up, not lost; a ReconcileProjects call reset while it opens gives its
//! stream slot back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::support::TestDb;
use crate::support::agent::{TestAgent, drain, next_project};

/// A TCP proxy to PostgreSQL; while `down`, existing connections are cut and new ones closed.
async fn proxy(down: Arc<AtomicBool>, cut: Arc<tokio::sync::Notify>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut inbound, _) = listener.accept().await.unwrap();
            if down.load(Ordering::SeqCst) {
                drop(inbound);
                continue;
            }
            let cut = cut.clone();
            tokio::spawn(async move {
                let mut outbound = TcpStream::connect("127.0.0.1:5432").await.unwrap();
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = cut.notified() => {}
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_event_lost_after_db_blip() {
    let db = TestDb::postgres().await;
    let prefix = crate::support::redis::prefix();
    let down = Arc::new(AtomicBool::new(false));
    let cut = Arc::new(tokio::sync::Notify::new());
    let port = proxy(down.clone(), cut.clone()).await;
    let redis = |s: &mut kas::config::Settings| {
        s.redis_url = Some(crate::support::redis::SHARED.into());
        s.redis_prefix = Some(prefix.clone());
    };
    let a = crate::support::TestApp::spawn(&db, redis).await;
    let proxied = db.url().replace(":5432/", &format!(":{port}/"));
    assert_ne!(proxied, db.url());
    let b = crate::support::TestApp::spawn(&db, |s: &mut kas::config::Settings| {
        redis(s);
        s.database_url = Some(proxied.clone());
    })
    .await;
    let (_agent, token) = a.create_agent("watcher", "own/config").await;
    let agent = TestAgent::connect(b.agent, &token).await;
    let mut s = agent.open(&["pub/app", "pub/other", "own/config"]).await.unwrap();
    // Warm-up: B hears about A's pushes.
    assert_eq!(a.push(1, "pub/other", 20).await.status(), 202);
    assert_eq!(next_project(&mut s, Duration::from_secs(5)).await.as_deref(), Some("pub/other"));

    // B's database connection drops for 5 s (a PostgreSQL restart or failover).
    down.store(true, Ordering::SeqCst);
    cut.notify_waiters();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.push(2, "pub/app", 20).await.status(), 202);
    tokio::time::sleep(Duration::from_secs(5)).await;
    down.store(false, Ordering::SeqCst);

    // B is healthy again: a later push arrives...
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(a.push(3, "own/config", 0).await.status(), 202);
    let got = drain(&mut s, Duration::from_secs(6)).await;
    println!("B's agent got: {got:?}");
    println!(
        "{}",
        b.metrics_text()
            .await
            .lines()
            .filter(|l| l.contains("engine_errors") || l.contains("received_remote"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(got.iter().any(|p| p == "own/config"), "later push must arrive: {got:?}");
    assert!(got.iter().any(|p| p == "pub/app"), "push to pub/app during the blip was lost: {got:?}");
    a.stop().await;
    b.stop().await;
    crate::support::redis::cleanup(&prefix).await;
    db.cleanup().await;
}

/// An agent that resets its ReconcileProjects call while kas is still replaying leaves the stream
/// registered: after max_streams_per_agent such resets, the agent is locked out of the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_during_open_leaks_stream_slots() {
    let db = TestDb::sqlite();
    let app = crate::support::TestApp::spawn(&db, |s: &mut kas::config::Settings| {
        s.max_streams_per_agent = Some("4".into());
    })
    .await;
    let (_agent, token) = app.create_agent("a", "own/config").await;
    let projects: Vec<String> = (0..10_000).map(|i| format!("pub/p{i}")).collect();
    let projects: Vec<&str> = projects.iter().map(String::as_str).collect();
    {
        let agent = TestAgent::connect(app.agent, &token).await;
        let s = agent.open(&projects).await.unwrap();
        drop(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let agent = TestAgent::connect(app.agent, &token).await;
    let mut resets = 0;
    for i in 0..200u64 {
        let wait = Duration::from_millis(1 + i % 40);
        if tokio::time::timeout(wait, agent.open(&projects)).await.is_err() {
            resets += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let probe = TestAgent::connect(app.agent, &token).await;
        match probe.open(&["own/config"]).await {
            Ok(s) => drop(s),
            Err(status) => {
                println!("after {resets} resets ({} attempts): {status:?}", i + 1);
                tokio::time::sleep(Duration::from_secs(8)).await;
                let again = TestAgent::connect(app.agent, &token).await;
                println!("8 s later: {:?}", again.open(&["own/config"]).await.err().map(|s| s.message().to_owned()));
                panic!("agent locked out by its own cancelled calls: {}", status.message());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("no lockout after {resets} resets");
    app.stop().await;
}
