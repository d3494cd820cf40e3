//! Micro-benchmarks of the hot paths: webhook parse + validate, the access rule, the path index
//! lookup, and fan-out of one event to 10,000 streams. `cargo bench`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use kas::config::{Secret, StoreConfig};
use kas::delivery::{Hub, HubConfig, HubParts};
use kas::domain::EventNotice;
use kas::domain::{ProjectPath, access};
use kas::engine::{LocalDelivery, MemoryEngine};
use kas::identity::{AgentIdentity, RegistryDirectory};
use kas::intake::webhook;
use kas::metrics::Metrics;
use tokio_util::sync::CancellationToken;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn parse(c: &mut Criterion) {
    let push = fixture("project-hook-push.json");
    let system = fixture("system-hook-push.json");
    c.bench_function("webhook parse + validate (project hook, 2 commits)", |b| {
        b.iter(|| webhook::parse(Some("Push Hook"), std::hint::black_box(&push)).unwrap())
    });
    c.bench_function("webhook parse + validate (system hook)", |b| {
        b.iter(|| webhook::parse(Some("System Hook"), std::hint::black_box(&system)).unwrap())
    });
}

fn access_rule(c: &mut Criterion) {
    c.bench_function("access rule", |b| {
        b.iter(|| {
            access::may_notify(std::hint::black_box("group/sub/config"), std::hint::black_box("group/sub/app"), false)
        })
    });
}

/// A hub with `streams` open streams; stream i watches `own(i)` and `shared`.
fn hub_with(
    rt: &tokio::runtime::Runtime,
    streams: usize,
    own: impl Fn(usize) -> String,
    shared: &str,
) -> (Arc<Hub>, Vec<kas::delivery::ReconcileStream>, tempfile::TempDir) {
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            database_url: Secret::new(format!("sqlite://{}/kas.db", dir.path().display())),
            data_dir: dir.path().to_owned(),
        };
        let store = kas::store::open(&config).await.unwrap();
        store.migrate().await.unwrap();
        let engine = Arc::new(MemoryEngine::default());
        let parts = HubParts {
            directory: Arc::new(RegistryDirectory::new(store.clone())),
            log: store.clone(),
            durable_positions: store,
            presence: engine.clone(),
            positions: engine,
            metrics: Arc::new(Metrics::new()),
            tasks: tokio_util::task::TaskTracker::new(),
            clock: kas::clock::Clock::system(),
        };
        let hub = Hub::new(
            parts,
            HubConfig {
                replay_window: Duration::from_secs(900),
                replay_overlap: Duration::from_secs(120),
                token_recheck: Duration::from_secs(3600),
                credential_grace: Duration::from_secs(300),
                max_streams_per_agent: usize::MAX,
                replica: "bench".into(),
            },
        );
        let mut open = Vec::with_capacity(streams);
        for i in 0..streams {
            let agent = AgentIdentity {
                id: i as i64,
                name: format!("a{i}"),
                config_project: own(i),
                config_project_id: None,
                default_branch: None,
                credential: i as i64,
            };
            open.push(hub.open(agent, vec![own(i), shared.to_owned()], CancellationToken::new()).await.unwrap());
        }
        (hub, open, dir)
    })
}

fn notice(seq: i64, path: &str, world_readable: bool) -> EventNotice {
    EventNotice {
        seq,
        project_id: 1,
        project_path: ProjectPath::parse(path).unwrap(),
        world_readable,
        received_at: 0,
        kind: kas::domain::EventKind::Push,
        image: None,
    }
}

fn fan_out(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (hub, _streams, _dir) = hub_with(&rt, 10_000, |i| format!("load/a{i}"), "load/public");
    let mut seq = 0;
    c.bench_function("index lookup + queue: one event, one of 10,000 streams", |b| {
        b.iter_batched(
            || {
                seq += 1;
                notice(seq, &format!("load/a{}", seq % 10_000), false)
            },
            |n| hub.deliver(&[n]),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("index lookup: event for a path nobody watches", |b| {
        b.iter_batched(
            || {
                seq += 1;
                notice(seq, "nobody/watches", true)
            },
            |n| hub.deliver(&[n]),
            BatchSize::SmallInput,
        )
    });
    let mut group = c.benchmark_group("fan-out");
    group.sample_size(20);
    group.bench_function("one public event to 10,000 streams", |b| {
        b.iter_batched(
            || {
                seq += 1;
                notice(seq, "load/public", true)
            },
            |n| hub.deliver(&[n]),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, parse, access_rule, fan_out);
criterion_main!(benches);
