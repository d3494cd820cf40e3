//! Delivery to this replica's streams, put together: the project index, the duplicate filter,
//! positions and replay, credential re-checks and the per-agent stream limit, each in its own
//! file; the hub opens streams, hands them events, and saves what closed streams leave behind.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::index::{ProjectIndex, StreamShared};
use super::limits::{StreamLimit, TooManyStreams};
use super::positions::Positions;
use super::revocation::{CredentialWatch, Credentials};
use super::seen::Seen;
use super::stream::{ReconcileStream, StreamParts};
use crate::clock::Clock;
use crate::domain::{AgentId, DeliveryPosition, EventNotice};
use crate::engine::{ConnectionRecord, LocalDelivery, PositionCache, Presence};
use crate::identity::{AgentDirectory, AgentIdentity};
use crate::metrics::Metrics;
use crate::store::{EventLog, LogReplay, PositionStore, replay_log};

/// Events replayed from the log per query.
const REPLAY_PAGE: i64 = 5000;
/// Project paths per replay query: a large project set is read in chunks, each filtered in SQL
/// through the (project_path, received_at) index, so opening a stream never scans the window.
const REPLAY_PATHS_PER_QUERY: usize = 500;
/// How often delivery positions of open streams are saved.
const POSITION_SAVE_EVERY: Duration = Duration::from_secs(5);
/// At shutdown, how often the saver looks whether every stream has closed.
const DRAIN_POLL: Duration = Duration::from_millis(50);

/// Delivery settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// How far back a reconnecting agent is replayed.
    pub replay_window: Duration,
    /// Events received this long before an agent's position was saved are replayed too: a
    /// connection that died silently may have swallowed the last sends before it was noticed
    /// (keepalive detects a dead peer within about 80 s), and replicas may publish slightly out
    /// of sequence order.
    pub replay_overlap: Duration,
    /// How often open streams' credentials are re-checked.
    pub token_recheck: Duration,
    /// How long a stream keeps serving while its credential cannot be re-checked.
    pub credential_grace: Duration,
    /// Most long streams (ReconcileProjects, configuration, tunnel) one agent may hold open on
    /// this replica.
    pub max_streams_per_agent: usize,
    /// This replica's name, in connection records.
    pub replica: String,
}

/// What the hub works with: each the one role it needs.
pub struct HubParts {
    /// Who may hear about what; re-checks credentials.
    pub directory: Arc<dyn AgentDirectory>,
    /// The event log, for replay.
    pub log: Arc<dyn EventLog>,
    /// Where positions outlive this replica and Redis.
    pub durable_positions: Arc<dyn PositionStore>,
    /// The connection table across replicas.
    pub presence: Arc<dyn Presence>,
    /// Positions every replica reads.
    pub positions: Arc<dyn PositionCache>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The server's background tasks: shutdown waits for them (final position saves included)
    /// before the database closes.
    pub tasks: TaskTracker,
    /// Positions and connection records are timed by it.
    pub clock: Clock,
}

/// A stream that closed: what the saver task records for it.
struct Closed {
    agent: AgentId,
    position: DeliveryPosition,
    connection: String,
}

/// Watches one credential for the lifetime of a non-ReconcileProjects stream (configuration,
/// tunnel) and holds its place under the per-agent limit; dropping it ends both.
pub struct CredentialGuard {
    /// Ends when the credential is revoked or cannot be verified any more.
    pub revoked: Arc<super::EndSignal>,
    _slot: super::limits::Slot,
    _watch: CredentialWatch,
}

/// Every open stream of this replica, and what delivering to them takes.
pub struct Hub {
    pub(super) index: ProjectIndex,
    seen: Mutex<Seen>,
    positions: Positions,
    credentials: Arc<Credentials>,
    limit: Arc<StreamLimit>,
    /// Closed streams, for the saver task: a stream closes in `Drop`, which cannot wait.
    closed_tx: mpsc::UnboundedSender<Closed>,
    closed_rx: Mutex<Option<mpsc::UnboundedReceiver<Closed>>>,
    directory: Arc<dyn AgentDirectory>,
    log: Arc<dyn EventLog>,
    presence: Arc<dyn Presence>,
    metrics: Arc<Metrics>,
    config: HubConfig,
    tasks: TaskTracker,
    clock: Clock,
}

impl Hub {
    /// A hub with no streams.
    pub fn new(parts: HubParts, config: HubConfig) -> Arc<Self> {
        let (closed_tx, closed_rx) = mpsc::unbounded_channel();
        Arc::new(Self {
            index: ProjectIndex::default(),
            seen: Mutex::default(),
            positions: Positions::new(parts.positions, parts.durable_positions, parts.clock.clone()),
            credentials: Credentials::new(parts.directory.clone(), config.credential_grace),
            limit: StreamLimit::new(config.max_streams_per_agent),
            closed_tx,
            closed_rx: Mutex::new(Some(closed_rx)),
            directory: parts.directory,
            log: parts.log,
            presence: parts.presence,
            metrics: parts.metrics,
            config,
            tasks: parts.tasks,
            clock: parts.clock,
        })
    }

    /// Starts the position saver and the credential re-checks on the server's task tracker;
    /// they stop with `stop`, the saver once every stream has closed and saved.
    pub async fn start(self: &Arc<Self>, stop: CancellationToken) {
        // Streams opened before any event arrives need a starting point for their position.
        if let Ok(seq) = self.log.last_seq().await {
            self.positions.observe(seq);
        }
        let closed = self.closed_rx.lock().expect("closed lock").take().expect("the hub starts once");
        self.tasks.spawn(self.clone().save_positions(closed, stop.clone()));
        self.tasks.spawn(self.credentials.clone().run(self.config.token_recheck, stop));
    }

    /// Saves open streams' positions every few seconds and closed streams' as they close; after
    /// `stop`, goes on until every stream has closed, then saves once more.
    async fn save_positions(self: Arc<Self>, mut closed: mpsc::UnboundedReceiver<Closed>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(POSITION_SAVE_EVERY);
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => self.positions.save_open(&self.index.streams()).await,
                n = closed.recv_many(&mut batch, 1024) => {
                    if n == 0 {
                        return;
                    }
                    self.record_closed(&mut batch).await;
                }
            }
        }
        // Streams end as their connections drain; the server waits for this task, within its
        // shutdown grace, before the database closes.
        while !self.index.is_empty() || !closed.is_empty() {
            if let Ok(n) = tokio::time::timeout(DRAIN_POLL, closed.recv_many(&mut batch, 1024)).await
                && n > 0
            {
                self.record_closed(&mut batch).await;
            }
        }
        self.positions.save_open(&self.index.streams()).await;
    }

    async fn record_closed(&self, batch: &mut Vec<Closed>) {
        for c in batch.iter() {
            self.presence.connection_closed(&c.connection).await;
        }
        let rows: Vec<(AgentId, DeliveryPosition)> = batch.iter().map(|c| (c.agent, c.position)).collect();
        self.positions.save_closed(&rows).await;
        batch.clear();
    }

    /// Opens a stream for `agent` over `projects`: registers it, then queues what the agent
    /// missed since its last position. The stream ends with OK when `closing` fires.
    pub async fn open(
        self: &Arc<Self>,
        agent: AgentIdentity,
        projects: Vec<String>,
        closing: CancellationToken,
    ) -> Result<ReconcileStream, TooManyStreams> {
        let slot = self.limit.admit(agent.id)?;
        let credential = self.credentials.watch(agent.credential);
        let (shared, agents) = self.index.insert(agent, projects, credential.revoked.clone());
        self.metrics.connected_agents.set(agents as i64);
        // The stream owns the registration from here: if the caller goes away during the awaits
        // below (a reset call), dropping it unregisters and gives the agent's slot back.
        let hub = self.clone();
        let parts = StreamParts {
            directory: self.directory.clone(),
            metrics: self.metrics.clone(),
            clock: self.clock.clone(),
            slot,
            credential,
            on_close: Box::new(move |shared| hub.close(shared)),
        };
        let stream = ReconcileStream::new(shared.clone(), parts, closing);
        self.presence
            .connection_opened(ConnectionRecord {
                id: self.connection_id(&shared),
                replica: self.config.replica.clone(),
                agent_id: shared.agent.id,
                agent_name: shared.agent.name.clone(),
                rpc: "reconcile_projects".into(),
                connected_at: self.clock.now_ms(),
                projects: shared.projects.len(),
            })
            .await;
        // Registered first, replayed second: an event recorded in between is queued twice at
        // worst, and the pending set folds the two into one.
        self.replay(&shared).await;
        // A starting point right away, in the database too: if this replica dies (even the only
        // one, with the in-process engine) before the periodic save, the agent still gets what
        // it misses when it reconnects, here after a restart or elsewhere.
        let position = self.positions.position_of(&shared);
        self.positions.save(shared.agent.id, position, true).await;
        shared.saved_seq.store(position.seq, std::sync::atomic::Ordering::Relaxed);
        Ok(stream)
    }

    fn connection_id(&self, shared: &StreamShared) -> String {
        format!("{}/{}", self.config.replica, shared.id)
    }

    /// Unregisters a closed stream and hands its final position to the saver.
    fn close(&self, shared: &Arc<StreamShared>) {
        let agents = self.index.remove(shared);
        self.metrics.connected_agents.set(agents as i64);
        let closed = Closed {
            agent: shared.agent.id,
            position: self.positions.position_of(shared),
            connection: self.connection_id(shared),
        };
        // Fails only once the saver has stopped, when nothing is left to save into.
        let _ = self.closed_tx.send(closed);
    }

    /// Queues what `shared`'s agent missed since its saved position, within the replay window.
    async fn replay(&self, shared: &Arc<StreamShared>) {
        let Some(position) = self.positions.load(shared.agent.id).await else {
            return;
        };
        let not_before = self.clock.now_ms() - self.config.replay_window.as_millis() as i64;
        let wanted: HashMap<&str, &Arc<str>> = shared.projects.iter().map(|p| (&**p, p)).collect();
        let mut replayed = 0u64;
        for chunk in shared.projects.chunks(REPLAY_PATHS_PER_QUERY) {
            let filter: Vec<String> = chunk.iter().map(|p| p.to_string()).collect();
            let query = LogReplay {
                after_seq: position.seq,
                overlap_from: position.at - self.config.replay_overlap.as_millis() as i64,
                not_before,
                projects: &filter,
                page: REPLAY_PAGE,
            };
            let offered = replay_log(&*self.log, query, |page| {
                for n in page {
                    if let Some(path) = wanted.get(n.project_path.as_str()) {
                        replayed += u64::from(shared.offer(&*self.directory, &self.metrics, path, n));
                    }
                }
            })
            .await;
            if let Err(e) = offered {
                tracing::warn!(error = %e, agent = shared.agent.id, "cannot replay missed events");
                return;
            }
        }
        if replayed > 0 {
            self.metrics.notifications_replayed.inc_by(replayed);
            tracing::info!(
                agent = shared.agent.id,
                projects = replayed,
                "replaying projects pushed while the agent was away"
            );
        }
    }

    /// Counts a long stream of `agent` and watches its credential until the guard is dropped.
    pub fn watch_credential(&self, agent: &AgentIdentity) -> Result<CredentialGuard, TooManyStreams> {
        let slot = self.limit.admit(agent.id)?;
        let watch = self.credentials.watch(agent.credential);
        Ok(CredentialGuard { revoked: watch.revoked.clone(), _slot: slot, _watch: watch })
    }
}

impl LocalDelivery for Hub {
    fn deliver(&self, notices: &[EventNotice]) {
        let fresh: Vec<&EventNotice> = {
            let mut seen = self.seen.lock().expect("seen lock");
            notices.iter().filter(|n| seen.insert(n.seq)).collect()
        };
        for n in fresh {
            self.index.for_path(n.project_path.as_str(), |path, s| {
                s.offer(&*self.directory, &self.metrics, path, n);
            });
            // After queueing: see `Positions::position_of`.
            self.positions.observe(n.seq);
        }
    }
}

/// Coalescing, checked on random stream sets and push sequences through the real hub (in-process
/// engine, SQLite store): a stream's pending set never holds a path outside its project set, and
/// every push a stream may hear about is followed by a send of its project.
#[cfg(test)]
mod properties {
    use std::collections::HashSet;
    use std::sync::OnceLock;

    use futures::FutureExt;
    use proptest::prelude::*;

    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;
    use crate::domain::ProjectPath;
    use crate::engine::MemoryEngine;
    use crate::identity::RegistryDirectory;
    use crate::store::Store;

    const PATHS: [&str; 6] = ["g/a", "g/b", "g/c", "h/a", "h/b", "g/a/sub"];

    #[derive(Debug, Clone)]
    enum Op {
        /// A push to `PATHS[i]`.
        Push(usize),
        /// The same notice again (the outbox sweep, a catch-up after a Redis outage).
        Again(usize),
        /// The stream asks for its next project.
        Poll(usize),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                (0..PATHS.len()).prop_map(Op::Push),
                (0..8usize).prop_map(Op::Again),
                (0..4usize).prop_map(Op::Poll),
            ],
            0..80,
        )
    }

    /// One runtime and one migrated SQLite store for every case.
    fn shared() -> &'static (tokio::runtime::Runtime, Arc<dyn Store>, tempfile::TempDir) {
        static SHARED: OnceLock<(tokio::runtime::Runtime, Arc<dyn Store>, tempfile::TempDir)> = OnceLock::new();
        SHARED.get_or_init(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}", dir.path().join("kas.db").display());
            let store: Arc<dyn Store> = rt.block_on(async {
                let store = crate::store::SqliteStore::open(&url, dir.path()).await.unwrap();
                let store: Arc<dyn Store> = Arc::new(store);
                store.migrate().await.unwrap();
                store
            });
            (rt, store, dir)
        })
    }

    /// Stream `i`'s next send, if one is ready now.
    fn poll(stream: &mut ReconcileStream) -> Option<Arc<str>> {
        match stream.next().now_or_never() {
            Some(Some(Ok(path))) => Some(path),
            Some(other) => panic!("stream ended: {other:?}"),
            None => None,
        }
    }

    async fn run(streams: Vec<(usize, Vec<usize>)>, public: Vec<bool>, ops: Vec<Op>) -> Result<(), TestCaseError> {
        static NEXT_AGENT: AtomicI64 = AtomicI64::new(1_000_000);
        let store = shared().1.clone();
        let config = HubConfig {
            replay_window: Duration::from_secs(3600),
            replay_overlap: Duration::ZERO,
            token_recheck: Duration::from_secs(3600),
            credential_grace: Duration::from_secs(3600),
            max_streams_per_agent: usize::MAX,
            replica: "properties".into(),
        };
        let directory = Arc::new(RegistryDirectory::new(store.clone()));
        let engine = Arc::new(MemoryEngine::default());
        let hub = Hub::new(
            HubParts {
                directory,
                log: store.clone(),
                durable_positions: store,
                presence: engine.clone(),
                positions: engine,
                metrics: Arc::new(Metrics::new()),
                tasks: TaskTracker::new(),
                clock: Clock::system(),
            },
            config,
        );
        let mut open = Vec::new();
        for (own, projects) in &streams {
            let agent = AgentIdentity {
                id: NEXT_AGENT.fetch_add(1, Ordering::Relaxed),
                name: "agent".into(),
                config_project: PATHS[*own].into(),
                config_project_id: None,
                default_branch: None,
                credential: 1,
            };
            let projects = projects.iter().map(|p| PATHS[*p].to_owned()).collect();
            open.push(hub.open(agent, projects, CancellationToken::new()).await.expect("no stream limit"));
        }
        let allowed = |s: usize, p: &str| {
            let (own, projects) = &streams[s];
            let i = PATHS.iter().position(|x| *x == p).unwrap();
            projects.contains(&i) && (PATHS[*own] == p || public[i])
        };
        let mut notices: Vec<EventNotice> = Vec::new();
        // (step, path) of every push, and of every send per stream.
        let mut pushes: Vec<(usize, &str)> = Vec::new();
        let mut sends: Vec<Vec<(usize, Arc<str>)>> = vec![Vec::new(); open.len()];
        for (step, op) in ops.iter().enumerate() {
            match *op {
                Op::Push(p) => {
                    let n = EventNotice {
                        seq: notices.len() as i64 + 1,
                        project_id: p as i64 + 1,
                        project_path: ProjectPath::parse(PATHS[p]).unwrap(),
                        world_readable: public[p],
                        received_at: crate::clock::now_ms(),
                        kind: crate::domain::EventKind::Push,
                        image: None,
                    };
                    hub.deliver(std::slice::from_ref(&n));
                    notices.push(n);
                    pushes.push((step, PATHS[p]));
                }
                Op::Again(back) => {
                    if let Some(n) = notices.iter().rev().nth(back) {
                        hub.deliver(std::slice::from_ref(n));
                    }
                }
                Op::Poll(s) => {
                    if let Some(stream) = open.get_mut(s)
                        && let Some(path) = poll(stream)
                    {
                        sends[s].push((step, path));
                    }
                }
            }
            for shared in hub.index.streams() {
                let projects: HashSet<&str> = shared.projects.iter().map(|p| &**p).collect();
                let pending = shared.pending.lock().unwrap().paths();
                prop_assert!(pending.len() <= projects.len(), "pending {pending:?} over {projects:?}");
                prop_assert!(pending.iter().all(|p| projects.contains(&**p)), "pending {pending:?} over {projects:?}");
            }
        }
        let end = ops.len();
        for (s, stream) in open.iter_mut().enumerate() {
            while let Some(path) = poll(stream) {
                sends[s].push((end, path));
            }
        }
        for (s, sent) in sends.iter().enumerate() {
            for (_, path) in sent {
                prop_assert!(allowed(s, path), "stream {s} was sent {path}, which it may not hear about");
                let pushed = pushes.iter().filter(|(_, p)| *p == &**path).count();
                let sent_n = sent.iter().filter(|(_, p)| p == path).count();
                prop_assert!(sent_n <= pushed, "{path}: {sent_n} sends for {pushed} pushes");
            }
            for (step, path) in pushes.iter().filter(|(_, p)| allowed(s, p)) {
                prop_assert!(
                    sent.iter().any(|(at, p)| at > step && &**p == *path),
                    "stream {s}: the push to {path} at step {step} was never followed by a send"
                );
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn pending_stays_within_the_project_set_and_every_push_is_sent(
            streams in prop::collection::vec((0..PATHS.len(), prop::collection::vec(0..PATHS.len(), 0..8)), 1..4),
            public in prop::collection::vec(any::<bool>(), PATHS.len()),
            ops in ops(),
        ) {
            shared().0.block_on(run(streams, public, ops))?;
        }
    }
}
