//! One story both storage backends must tell the same way.

use kas::domain::{
    AgentName, AgentToken, EventKind, ProjectInfo, ProjectPath, PushEvent, RepositoryAccess, Visibility,
};
use kas::domain::{DeliveryPosition, EventSource, NewEvent, RecordOutcome};
use kas::store::StoreError;

use crate::support::TestDb;

fn name(s: &str) -> AgentName {
    AgentName::parse(s).unwrap()
}
fn path(s: &str) -> ProjectPath {
    ProjectPath::parse(s).unwrap()
}

pub fn push(key: &str, id: i64, p: &str, visibility: Option<Visibility>, at: i64) -> NewEvent {
    NewEvent {
        event: PushEvent {
            project_id: id,
            project_path: path(p),
            kind: EventKind::Push,
            git_ref: Some("refs/heads/main".into()),
            before: Some("a".repeat(40)),
            after: Some("b".repeat(40)),
            visibility,
        },
        image: None,
        idempotency_key: key.into(),
        source: EventSource::Webhook,
        received_at: at,
    }
}

pub async fn registry_story(db: TestDb) {
    let store = db.open_store().await;
    let t1 = AgentToken::generate();
    let (a, first) =
        store.create_agent(&name("alpha"), &path("g/config"), &t1.digest(), Some("flux: {}\n"), 1000).await.unwrap();
    assert_eq!(first.agent_id, a.id);
    // Same name in the same configuration project: refused. In another project: fine.
    let err = store
        .create_agent(&name("alpha"), &path("g/config"), &AgentToken::generate().digest(), None, 1)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let (b, _) = store
        .create_agent(&name("alpha"), &path("other/config"), &AgentToken::generate().digest(), None, 2)
        .await
        .unwrap();
    assert_eq!(store.agents_named(&name("alpha")).await.unwrap().len(), 2);
    assert_eq!(store.list_agents().await.unwrap().iter().map(|x| x.id).collect::<Vec<_>>(), vec![a.id, b.id]);

    // Authentication records use and finds the agent; an unknown token finds nothing.
    let auth = store.authenticate(&t1.digest(), 5000).await.unwrap().unwrap();
    assert_eq!(auth.agent, a);
    assert_eq!(auth.token_id, first.id);
    assert!(store.authenticate(&AgentToken::generate().digest(), 1).await.unwrap().is_none());
    assert_eq!(store.list_tokens(a.id).await.unwrap()[0].last_used_at, Some(5000));

    // At most two active tokens; revoking one makes room, and the revoked one stops working.
    let t2 = AgentToken::generate();
    let second = store.create_token(a.id, &t2.digest(), 6000).await.unwrap();
    let err = store.create_token(a.id, &AgentToken::generate().digest(), 7000).await.unwrap_err();
    assert!(matches!(err, StoreError::Limit(_)), "{err:?}");
    let revoked = store.revoke_token(first.id, 8000).await.unwrap().unwrap();
    assert_eq!(revoked.revoked_at, Some(8000));
    assert!(store.authenticate(&t1.digest(), 9000).await.unwrap().is_none());
    assert_eq!(store.active_tokens(&[first.id, second.id, 999_999]).await.unwrap(), vec![second.id]);
    store.create_token(a.id, &AgentToken::generate().digest(), 9000).await.unwrap();
    assert!(store.revoke_token(999_999, 1).await.unwrap().is_none());
    assert!(matches!(
        store.create_token(999_999, &AgentToken::generate().digest(), 1).await,
        Err(StoreError::NotFound(_))
    ));

    // Projects: set, read back by path; a rename moves the path.
    let info = ProjectInfo {
        id: 7,
        path: path("g/app"),
        visibility: Some(Visibility::Public),
        repository_access: RepositoryAccess::Members,
    };
    store.set_project(&info, 1).await.unwrap();
    assert_eq!(store.project_by_path(&path("g/app")).await.unwrap(), Some(info.clone()));
    store.set_project(&ProjectInfo { path: path("g/renamed"), ..info.clone() }, 2).await.unwrap();
    assert!(store.project_by_path(&path("g/app")).await.unwrap().is_none());

    // Configuration files: stored with the agent, replaced with a new version each time.
    assert_eq!(store.agent_config(a.id).await.unwrap(), Some((Some("flux: {}\n".into()), 1)));
    assert_eq!(store.agent_config(b.id).await.unwrap(), Some((None, 0)));
    assert_eq!(store.set_agent_config(b.id, Some("observability: {}\n")).await.unwrap(), 1);
    assert_eq!(store.set_agent_config(b.id, None).await.unwrap(), 2);
    assert_eq!(store.agent_config(b.id).await.unwrap(), Some((None, 2)));
    let mut versions = store.config_versions(&[a.id, b.id, 999]).await.unwrap();
    versions.sort();
    assert_eq!(versions, vec![(a.id, 1), (b.id, 2)]);
    assert!(matches!(store.set_agent_config(999, None).await, Err(StoreError::NotFound(_))));
    assert!(store.agent_config(999).await.unwrap().is_none());
    // The configuration project's id comes from the project registry once it knows the path.
    assert_eq!(a.config_project_id, None);
    let config_project = ProjectInfo {
        id: 55,
        path: path("g/config"),
        visibility: Some(Visibility::Private),
        repository_access: RepositoryAccess::Everyone,
    };
    store.set_project(&config_project, 3).await.unwrap();
    assert_eq!(store.agent(a.id).await.unwrap().unwrap().config_project_id, Some(55));

    // Deleting an agent takes its tokens with it.
    assert!(store.delete_agent(a.id).await.unwrap());
    assert!(!store.delete_agent(a.id).await.unwrap());
    assert!(store.authenticate(&t2.digest(), 1).await.unwrap().is_none());
    assert!(store.list_tokens(a.id).await.unwrap().is_empty());
    store.close().await;
}
crate::both_backends!(registry, registry_story);

async fn event_log_story(db: TestDb) {
    let store = db.open_store().await;
    assert_eq!(store.last_seq().await.unwrap(), 0);
    // A batch with a repeated key: the first wins, the repeat is a duplicate.
    let out = store
        .record_pushes(&[
            push("k1", 1, "g/public", Some(Visibility::Public), 100),
            push("k2", 2, "g/private", Some(Visibility::Private), 100),
            push("k1", 1, "g/public", Some(Visibility::Public), 100),
        ])
        .await
        .unwrap();
    let RecordOutcome::Recorded(n1) = &out[0] else { panic!("{out:?}") };
    let RecordOutcome::Recorded(n2) = &out[1] else { panic!("{out:?}") };
    assert_eq!(out[2], RecordOutcome::Duplicate);
    assert!(n1.world_readable, "public + default repository access is world readable");
    assert!(!n2.world_readable);
    assert!(n2.seq > n1.seq);
    // A redelivery in a later batch is a duplicate too.
    assert_eq!(
        store.record_pushes(&[push("k2", 2, "g/private", None, 200)]).await.unwrap(),
        vec![RecordOutcome::Duplicate]
    );
    // The push refreshed the registry; a push without visibility keeps what is known.
    let p = store.project_by_path(&path("g/public")).await.unwrap().unwrap();
    assert_eq!((p.id, p.visibility), (1, Some(Visibility::Public)));
    let out = store.record_pushes(&[push("k3", 1, "g/public", None, 300)]).await.unwrap();
    let RecordOutcome::Recorded(n3) = &out[0] else { panic!() };
    assert!(n3.world_readable);
    // Members-only repository: not world readable, and the push must not reset that.
    store
        .set_project(
            &ProjectInfo {
                id: 1,
                path: path("g/public"),
                visibility: Some(Visibility::Public),
                repository_access: RepositoryAccess::Members,
            },
            301,
        )
        .await
        .unwrap();
    let out = store.record_pushes(&[push("k4", 1, "g/public", Some(Visibility::Public), 400)]).await.unwrap();
    let RecordOutcome::Recorded(n4) = &out[0] else { panic!() };
    assert!(!n4.world_readable);
    assert_eq!(
        store.project_by_path(&path("g/public")).await.unwrap().unwrap().repository_access,
        RepositoryAccess::Members
    );

    // Outbox: claims are exclusive while leased, published events are not claimed again.
    let claimed = store.claim_unpublished(250, 1000, 5000, 10).await.unwrap();
    assert_eq!(claimed.iter().map(|n| n.seq).collect::<Vec<_>>(), vec![n1.seq, n2.seq]);
    assert!(store.claim_unpublished(250, 1001, 5000, 10).await.unwrap().is_empty(), "leased");
    let again = store.claim_unpublished(250, 7000, 5000, 10).await.unwrap();
    assert_eq!(again.len(), 2, "an expired lease is claimable again");
    store.mark_published(&[n1.seq, n2.seq], 7001).await.unwrap();
    assert!(store.claim_unpublished(10_000, 20_000, 5000, 10).await.unwrap().iter().all(|n| n.seq > n2.seq));

    // Replay reads: after a sequence number, or within the overlap, never before the window.
    let since = store.pushes_since(n2.seq, i64::MAX, 0, &[], 100).await.unwrap();
    assert_eq!(since.iter().map(|n| n.seq).collect::<Vec<_>>(), vec![n3.seq, n4.seq]);
    let overlap = store.pushes_since(n4.seq, 300, 0, &[], 100).await.unwrap();
    assert_eq!(overlap.iter().map(|n| n.seq).collect::<Vec<_>>(), vec![n3.seq, n4.seq]);
    assert!(store.pushes_since(0, i64::MAX, 350, &[], 100).await.unwrap().iter().all(|n| n.seq == n4.seq));
    // Filtered by project.
    assert!(
        store
            .pushes_since(0, i64::MAX, 0, &["g/private".into()], 100)
            .await
            .unwrap()
            .iter()
            .all(|n| n.project_path.as_str() == "g/private")
    );
    assert_eq!(store.pushes_since(0, i64::MAX, 0, &["g/none".into(), "g/private".into()], 100).await.unwrap().len(), 1);
    // Visibility is read as the registry says now.
    assert!(since.iter().all(|n| !n.world_readable));

    let logged = store.recent_pushes(10).await.unwrap();
    assert_eq!(logged.len(), 4);
    assert_eq!(logged[0].seq, n4.seq);
    assert_eq!(logged.iter().find(|l| l.seq == n1.seq).unwrap().published_at, Some(7001));
    assert_eq!(store.last_seq().await.unwrap(), n4.seq);

    // Retention.
    assert_eq!(store.prune_pushes(250, 1).await.unwrap(), 1);
    assert_eq!(store.prune_pushes(250, 100).await.unwrap(), 1);
    assert_eq!(store.recent_pushes(10).await.unwrap().len(), 2);
    // An event the outbox has not published is kept, however old.
    assert_eq!(store.prune_pushes(i64::MAX, 100).await.unwrap(), 0);
    assert_eq!(store.recent_pushes(10).await.unwrap().len(), 2);

    // Positions.
    assert!(store.load_position(42).await.unwrap().is_none());
    store.save_position(42, DeliveryPosition { seq: 5, at: 10 }).await.unwrap();
    store.save_position(42, DeliveryPosition { seq: 9, at: 20 }).await.unwrap();
    assert_eq!(store.load_position(42).await.unwrap(), Some(DeliveryPosition { seq: 9, at: 20 }));
    store.close().await;
}
crate::both_backends!(event_log, event_log_story);

async fn large_batch_story(db: TestDb) {
    let store = db.open_store().await;
    let batch: Vec<_> = (0..500)
        .map(|i| push(&format!("key-{i}"), 1 + i % 7, &format!("g/p{}", i % 7), Some(Visibility::Internal), i))
        .collect();
    let out = store.record_pushes(&batch).await.unwrap();
    let seqs: Vec<i64> = out
        .iter()
        .map(|o| match o {
            RecordOutcome::Recorded(n) => n.seq,
            RecordOutcome::Duplicate => panic!(),
        })
        .collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 500, "every push got its own sequence number");
    store.close().await;
}
crate::both_backends!(large_batch, large_batch_story);

/// Commit statuses posted for Flux results: once per (project, sha, name, state); the last
/// state per agent and Kustomization replaced in place; the first push of a commit; pruning.
async fn status_log_story(db: TestDb) {
    use kas::store::{KustomizationState, PostedStatus};
    let store = db.open_store().await;
    let sha = "b".repeat(40);
    let posted = |state: &str, at| PostedStatus {
        project: "g/p".into(),
        sha: sha.clone(),
        name: "flux/prod/flux-system/apps".into(),
        state: state.into(),
        agent: 7,
        posted_at: at,
    };
    assert!(!store.status_posted("g/p", &sha, "flux/prod/flux-system/apps", "running").await.unwrap());
    assert!(store.record_status(&posted("running", 1000)).await.unwrap());
    assert!(!store.record_status(&posted("running", 2000)).await.unwrap(), "recorded twice");
    assert!(store.record_status(&posted("success", 3000)).await.unwrap());
    assert!(store.status_posted("g/p", &sha, "flux/prod/flux-system/apps", "running").await.unwrap());
    assert!(!store.status_posted("g/p", &sha, "flux/other/flux-system/apps", "running").await.unwrap());

    let mut k = KustomizationState {
        agent: 7,
        namespace: "flux-system".into(),
        name: "apps".into(),
        revision: format!("main@sha1:{sha}"),
        state: "running".into(),
        project: Some("g/p".into()),
        sha: Some(sha.clone()),
        message: "Reconciliation in progress".into(),
        reported: "queued".into(),
        updated_at: 1000,
    };
    store.set_kustomization(&k).await.unwrap();
    k.state = "success".into();
    k.project = None;
    k.updated_at = 2000;
    store.set_kustomization(&k).await.unwrap();
    assert_eq!(store.kustomizations(10).await.unwrap(), vec![k]);

    assert_eq!(store.push_received("g/p", &sha).await.unwrap(), None);
    store.record_pushes(&[push("k1", 1, "g/p", None, 500), push("k2", 1, "g/p", None, 400)]).await.unwrap();
    assert_eq!(store.push_received("g/p", &sha).await.unwrap(), Some(400));
    assert_eq!(store.push_received("g/other", &sha).await.unwrap(), None);

    assert_eq!(store.prune_statuses(2000).await.unwrap(), 1);
    assert!(!store.status_posted("g/p", &sha, "flux/prod/flux-system/apps", "running").await.unwrap());
    store.close().await;
}
crate::both_backends!(status_log, status_log_story);
