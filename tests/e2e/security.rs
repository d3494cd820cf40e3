//! The security boundary under attack and under races (docs/security.md): visibility merging,
//! scoped hook secrets, the admin secret, a hostile Redis, revocation while the directory is
//! down, and randomized isolation runs through both doors.

use std::time::Duration;

use kas::domain::{ProjectPath, ProjectUpdate, Visibility, merged_visibility};
use kas::store::RecordOutcome;

use crate::store_story::push;
use crate::support::TestDb;

fn path(s: &str) -> ProjectPath {
    ProjectPath::parse(s).unwrap()
}

/// What the registry says about project `id` after recording `batch` in one transaction.
async fn record(store: &dyn kas::store::Store, batch: Vec<kas::store::NewPush>) -> Vec<bool> {
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
    grpc.source = kas::store::PushSource::GitPushEvent;
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
