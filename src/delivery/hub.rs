//! The index from project path to open streams, and the bookkeeping around it: replay at
//! open, delivery positions, token re-checks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::pending::Pending;
use super::stream::{EndSignal, ReconcileStream, StreamEnd};
use crate::clock::now_ms;
use crate::domain::{DeliveryPosition, EventNotice};
use crate::engine::{ConnectionRecord, Engine, LocalDelivery};
use crate::identity::{AgentDirectory, AgentIdentity, Rechecked};
use crate::metrics::Metrics;
use crate::store::Store;

/// Events replayed from the log per query.
const REPLAY_PAGE: i64 = 5000;
/// Project paths per replay query: a large project set is read in chunks, each filtered in SQL
/// through the (project_path, received_at) index, so opening a stream never scans the window.
const REPLAY_PATHS_PER_QUERY: usize = 500;
/// Sequence numbers remembered as delivered here, so an event that arrives twice (the outbox's
/// sweep, a catch-up after a Redis outage) is queued once.
const REMEMBERED: usize = 200_000;
/// How often delivery positions of open streams are saved.
const POSITION_SAVE_EVERY: Duration = Duration::from_secs(5);

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

/// State shared between the hub and one open stream.
pub(super) struct StreamShared {
    pub id: u64,
    pub agent: AgentIdentity,
    pub projects: Vec<Arc<str>>,
    pub pending: Mutex<Pending>,
    pub wake: tokio::sync::Notify,
    /// Ends the stream when its credential stops working or cannot be verified any more.
    pub revoked: Arc<EndSignal>,
    /// Last position saved, to skip saving an unchanged one.
    pub saved_seq: AtomicI64,
}

/// One agent already holds as many long streams on this replica as it may.
#[derive(Debug, thiserror::Error)]
#[error("agent {agent} already has {limit} streams open on this replica")]
pub struct TooManyStreams {
    /// The agent.
    pub agent: i64,
    /// The limit it reached.
    pub limit: usize,
}

/// Watches one credential for the lifetime of a non-ReconcileProjects stream; `revoked` fires
/// when the credential stops working. Dropping it stops the watch.
pub struct CredentialGuard {
    hub: Arc<Hub>,
    id: u64,
    agent: i64,
    /// Ends when the credential is revoked or cannot be verified any more.
    pub revoked: Arc<EndSignal>,
}

impl Drop for CredentialGuard {
    fn drop(&mut self) {
        self.hub.watched.lock().expect("watched lock").remove(&self.id);
        self.hub.release(self.agent);
    }
}

/// Every open stream of this replica, indexed by project path.
pub struct Hub {
    index: RwLock<HashMap<Arc<str>, Vec<Arc<StreamShared>>>>,
    streams: Mutex<HashMap<u64, Arc<StreamShared>>>,
    agents: Mutex<HashMap<i64, usize>>,
    next_id: AtomicU64,
    /// Highest sequence number handed to the index so far.
    max_seq: AtomicI64,
    seen: Mutex<Seen>,
    /// Credentials of other long streams (configuration, tunnel), re-checked like the streams'.
    watched: Mutex<HashMap<u64, (i64, Arc<EndSignal>)>>,
    /// Long streams held per agent (all kinds), against `max_streams_per_agent`.
    held: Mutex<HashMap<i64, usize>>,
    /// When each held credential was last known good (authenticated or re-checked).
    verified_at: Mutex<HashMap<i64, tokio::time::Instant>>,
    pub(super) directory: Arc<dyn AgentDirectory>,
    pub(super) store: Arc<dyn Store>,
    pub(super) engine: Arc<dyn Engine>,
    pub(super) metrics: Arc<Metrics>,
    config: HubConfig,
    /// The server's background tasks: shutdown waits for them (final position saves included)
    /// before the database closes.
    tasks: TaskTracker,
}

impl Hub {
    /// A hub with no streams.
    pub fn new(
        directory: Arc<dyn AgentDirectory>,
        store: Arc<dyn Store>,
        engine: Arc<dyn Engine>,
        metrics: Arc<Metrics>,
        config: HubConfig,
        tasks: TaskTracker,
    ) -> Arc<Self> {
        Arc::new(Self {
            index: RwLock::default(),
            streams: Mutex::default(),
            agents: Mutex::default(),
            next_id: AtomicU64::new(1),
            max_seq: AtomicI64::new(0),
            seen: Mutex::default(),
            watched: Mutex::default(),
            verified_at: Mutex::default(),
            held: Mutex::default(),
            directory,
            store,
            engine,
            metrics,
            config,
            tasks,
        })
    }

    /// Starts the periodic position saving and token re-checks; they stop with `stop`, the
    /// saving after one last round.
    pub async fn start(self: &Arc<Self>, stop: CancellationToken) {
        // Streams opened before any event arrived need a starting point for their position.
        if let Ok(seq) = self.store.last_seq().await {
            self.max_seq.fetch_max(seq, Ordering::AcqRel);
        }
        let hub = self.clone();
        let stop_saving = stop.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(POSITION_SAVE_EVERY);
            loop {
                tokio::select! {
                    _ = stop_saving.cancelled() => break,
                    _ = tick.tick() => hub.save_positions().await,
                }
            }
            // Streams still open at shutdown save theirs as they close; these are the others'.
            hub.save_positions().await;
        });
        let hub = self.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(hub.config.token_recheck);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => hub.recheck_credentials().await,
                }
            }
        });
    }

    /// Counts one more long stream for `agent`, unless it holds as many as it may.
    fn admit(&self, agent: i64) -> Result<(), TooManyStreams> {
        let limit = self.config.max_streams_per_agent;
        let mut held = self.held.lock().expect("held lock");
        let n = held.entry(agent).or_default();
        if *n >= limit {
            return Err(TooManyStreams { agent, limit });
        }
        *n += 1;
        Ok(())
    }

    /// Counts one long stream of `agent` less.
    fn release(&self, agent: i64) {
        let mut held = self.held.lock().expect("held lock");
        if let Some(n) = held.get_mut(&agent) {
            *n -= 1;
            if *n == 0 {
                held.remove(&agent);
            }
        }
    }

    /// Opens a stream for `agent` over `projects`: registers it, then queues what the agent
    /// missed since its last position. The stream ends with OK when `closing` fires.
    pub async fn open(
        self: &Arc<Self>,
        agent: AgentIdentity,
        projects: Vec<String>,
        closing: CancellationToken,
    ) -> Result<ReconcileStream, TooManyStreams> {
        self.admit(agent.id)?;
        let shared = self.register(agent, projects);
        // The stream owns the registration from here: if the caller goes away during the awaits
        // below (a reset call), dropping it unregisters and gives the agent's slot back.
        let stream = ReconcileStream::new(self.clone(), shared.clone(), closing);
        self.engine
            .connection_opened(ConnectionRecord {
                id: self.connection_id(&shared),
                replica: self.config.replica.clone(),
                agent_id: shared.agent.id,
                agent_name: shared.agent.name.clone(),
                rpc: "reconcile_projects".into(),
                connected_at: now_ms(),
                projects: shared.projects.len(),
            })
            .await;
        // Registered first, replayed second: an event recorded in between is queued twice at
        // worst, and the pending set folds the two into one.
        self.replay(&shared).await;
        // A starting point right away, in the database too: if this replica dies (even the only
        // one, with the in-process engine) before the periodic save, the agent still gets what
        // it misses when it reconnects, here after a restart or elsewhere.
        let position = self.position_of(&shared);
        self.save_position(shared.agent.id, position, true).await;
        shared.saved_seq.store(position.seq, Ordering::Relaxed);
        Ok(stream)
    }

    fn connection_id(&self, shared: &StreamShared) -> String {
        format!("{}/{}", self.config.replica, shared.id)
    }

    fn register(&self, agent: AgentIdentity, projects: Vec<String>) -> Arc<StreamShared> {
        let agent_id = agent.id;
        let shared = {
            let mut index = self.index.write().expect("index lock");
            // Paths are shared with the index, so a public project watched by 10,000 agents is
            // stored once.
            let mut seen = std::collections::HashSet::with_capacity(projects.len());
            let mut interned: Vec<Arc<str>> = Vec::with_capacity(projects.len());
            for p in projects {
                if seen.insert(p.clone()) {
                    interned.push(index.get_key_value(p.as_str()).map(|(k, _)| k.clone()).unwrap_or_else(|| p.into()));
                }
            }
            let shared = Arc::new(StreamShared {
                id: self.next_id.fetch_add(1, Ordering::Relaxed),
                agent,
                projects: interned,
                pending: Mutex::default(),
                wake: tokio::sync::Notify::new(),
                revoked: Arc::default(),
                saved_seq: AtomicI64::new(i64::MIN),
            });
            for path in &shared.projects {
                index.entry(path.clone()).or_default().push(shared.clone());
            }
            shared
        };
        self.streams.lock().expect("streams lock").insert(shared.id, shared.clone());
        self.verified(shared.agent.credential);
        let mut agents = self.agents.lock().expect("agents lock");
        *agents.entry(agent_id).or_default() += 1;
        self.metrics.connected_agents.set(agents.len() as i64);
        shared
    }

    /// Removes a closed stream and saves its final position.
    pub(super) fn close(self: &Arc<Self>, shared: &Arc<StreamShared>) {
        {
            let mut index = self.index.write().expect("index lock");
            for path in &shared.projects {
                if let Some(list) = index.get_mut(path) {
                    list.retain(|s| s.id != shared.id);
                    if list.is_empty() {
                        index.remove(path);
                    }
                }
            }
        }
        self.streams.lock().expect("streams lock").remove(&shared.id);
        self.release(shared.agent.id);
        {
            let mut agents = self.agents.lock().expect("agents lock");
            if let Some(n) = agents.get_mut(&shared.agent.id) {
                *n -= 1;
                if *n == 0 {
                    agents.remove(&shared.agent.id);
                }
            }
            self.metrics.connected_agents.set(agents.len() as i64);
        }
        let position = self.position_of(shared);
        let hub = self.clone();
        let agent = shared.agent.id;
        let id = self.connection_id(shared);
        if tokio::runtime::Handle::try_current().is_ok() {
            self.tasks.spawn(async move {
                hub.engine.connection_closed(&id).await;
                hub.save_position(agent, position, true).await
            });
        }
    }

    /// Where `shared`'s notifications got: everything up to the returned sequence number has
    /// been sent or did not concern it.
    fn position_of(&self, shared: &StreamShared) -> DeliveryPosition {
        // Read the high-water mark before looking at the pending set: an event counted in it
        // was queued before the mark moved, so it is either pending or sent.
        let high = self.max_seq.load(Ordering::Acquire);
        let pending_min = shared.pending.lock().expect("pending lock").min_seq();
        let seq = match pending_min {
            Some(min) => (min - 1).min(high),
            None => high,
        };
        DeliveryPosition { seq, at: now_ms() }
    }

    async fn save_position(&self, agent: i64, position: DeliveryPosition, durable: bool) {
        if let Err(e) = self.engine.save_position(agent, position).await {
            tracing::debug!(error = %e, agent, "cannot save delivery position in the engine");
        }
        // The database copy outlives the engine (a restarted single replica, a flushed Redis).
        if durable && let Err(e) = self.store.save_position(agent, position).await {
            tracing::warn!(error = %e, agent, "cannot save delivery position");
        }
    }

    /// Saves the position of every agent with an open stream that moved since the last save,
    /// in the engine (for other replicas) and in the database (for a crash of this one).
    async fn save_positions(&self) {
        let streams: Vec<Arc<StreamShared>> = self.streams.lock().expect("streams lock").values().cloned().collect();
        // One position per agent: the least advanced of its streams.
        let mut per_agent: HashMap<i64, (DeliveryPosition, Vec<&Arc<StreamShared>>)> = HashMap::new();
        for s in &streams {
            let p = self.position_of(s);
            let entry = per_agent.entry(s.agent.id).or_insert((p, Vec::new()));
            if p.seq < entry.0.seq {
                entry.0 = p;
            }
            entry.1.push(s);
        }
        let mut moved = Vec::new();
        for (agent, (position, owners)) in per_agent {
            if owners.iter().all(|s| s.saved_seq.load(Ordering::Relaxed) == position.seq) {
                continue;
            }
            self.save_position(agent, position, false).await;
            moved.push((agent, position, owners));
        }
        if moved.is_empty() {
            return;
        }
        let mut rows: Vec<(i64, DeliveryPosition)> = moved.iter().map(|(a, p, _)| (*a, *p)).collect();
        // In agent order: replicas saving overlapping agents lock rows in one order (no deadlock).
        rows.sort_unstable_by_key(|(a, _)| *a);
        match self.store.save_positions(&rows).await {
            Ok(()) => {
                for (_, position, owners) in moved {
                    for s in owners {
                        s.saved_seq.store(position.seq, Ordering::Relaxed);
                    }
                }
            }
            // Not marked saved: the next round tries again.
            Err(e) => tracing::warn!(error = %e, agents = rows.len(), "cannot save delivery positions"),
        }
    }

    async fn load_position(&self, agent: i64) -> Option<DeliveryPosition> {
        match self.engine.load_position(agent).await {
            Ok(Some(p)) => return Some(p),
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, agent, "engine has no position; reading the database")
            }
        }
        self.store.load_position(agent).await.ok().flatten()
    }

    async fn replay(&self, shared: &Arc<StreamShared>) {
        let Some(position) = self.load_position(shared.agent.id).await else {
            return;
        };
        let now = now_ms();
        let not_before = now - self.config.replay_window.as_millis() as i64;
        let first_overlap = position.at - self.config.replay_overlap.as_millis() as i64;
        let wanted: HashMap<&str, &Arc<str>> = shared.projects.iter().map(|p| (&**p, p)).collect();
        let mut replayed = 0u64;
        for chunk in shared.projects.chunks(REPLAY_PATHS_PER_QUERY) {
            let filter: Vec<String> = chunk.iter().map(|p| p.to_string()).collect();
            let (mut after, mut overlap_from) = (position.seq, first_overlap);
            loop {
                let page = match self.store.pushes_since(after, overlap_from, not_before, &filter, REPLAY_PAGE).await {
                    Ok(page) => page,
                    Err(e) => {
                        tracing::warn!(error = %e, agent = shared.agent.id, "cannot replay missed events");
                        return;
                    }
                };
                for n in &page {
                    if let Some(path) = wanted.get(n.project_path.as_str()) {
                        replayed += u64::from(self.offer(shared, path, n));
                    }
                }
                match page.last() {
                    Some(last) if page.len() as i64 == REPLAY_PAGE => {
                        after = last.seq;
                        overlap_from = i64::MAX;
                    }
                    _ => break,
                }
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

    /// Queues `n` for `path` (one of `shared`'s projects) if the agent may see it; true when
    /// newly queued, false when coalesced or not allowed.
    fn offer(&self, shared: &StreamShared, path: &Arc<str>, n: &EventNotice) -> bool {
        if !self.directory.could_notify(&shared.agent, path, n.world_readable) {
            return false;
        }
        let added = shared.pending.lock().expect("pending lock").add(path, n.seq, n.world_readable, n.received_at);
        if added {
            shared.wake.notify_one();
        } else {
            self.metrics.notifications_coalesced.inc();
        }
        added
    }

    /// A credential was just authenticated.
    fn verified(&self, credential: i64) {
        self.verified_at.lock().expect("verified lock").insert(credential, tokio::time::Instant::now());
    }

    async fn recheck_credentials(&self) {
        let streams: Vec<Arc<StreamShared>> = self.streams.lock().expect("streams lock").values().cloned().collect();
        let watched: Vec<(i64, Arc<EndSignal>)> =
            self.watched.lock().expect("watched lock").values().cloned().collect();
        let held = streams.iter().map(|s| (s.agent.credential, &s.revoked)).chain(watched.iter().map(|(c, e)| (*c, e)));
        let held: Vec<(i64, &Arc<EndSignal>)> = held.collect();
        let mut credentials: Vec<i64> = held.iter().map(|(c, _)| *c).collect();
        credentials.sort_unstable();
        credentials.dedup();
        let answer = match self.directory.recheck(&credentials).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-check agent tokens; streams keep serving within the credential grace");
                Rechecked { valid: Vec::new(), unverified: credentials.clone() }
            }
        };
        let valid: std::collections::HashSet<i64> = answer.valid.into_iter().collect();
        let unverified: std::collections::HashSet<i64> = answer.unverified.into_iter().collect();
        let now = tokio::time::Instant::now();
        let expired: std::collections::HashSet<i64> = {
            let mut verified_at = self.verified_at.lock().expect("verified lock");
            // Forget credentials nobody holds (one that was just authenticated is recent).
            let grace = self.config.credential_grace;
            verified_at.retain(|c, at| credentials.binary_search(c).is_ok() || now.duration_since(*at) < grace);
            for c in &valid {
                verified_at.insert(*c, now);
            }
            unverified
                .iter()
                .filter(|c| verified_at.get(c).is_none_or(|at| now.duration_since(*at) > self.config.credential_grace))
                .copied()
                .collect()
        };
        for (credential, end) in held {
            if end.is_ended() {
                continue;
            }
            if expired.contains(&credential) {
                tracing::warn!(
                    credential,
                    grace = ?self.config.credential_grace,
                    "agent token could not be re-checked within the credential grace; ending its stream (UNAVAILABLE)"
                );
                end.end(StreamEnd::Unverified);
            } else if !valid.contains(&credential) && !unverified.contains(&credential) {
                tracing::info!(credential, "agent token revoked; closing its stream");
                end.end(StreamEnd::Revoked);
            }
        }
    }

    /// Counts a long stream of `agent` and watches its credential until the guard is dropped.
    pub fn watch_credential(self: &Arc<Self>, agent: &AgentIdentity) -> Result<CredentialGuard, TooManyStreams> {
        self.admit(agent.id)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let revoked = Arc::<EndSignal>::default();
        self.verified(agent.credential);
        self.watched.lock().expect("watched lock").insert(id, (agent.credential, revoked.clone()));
        Ok(CredentialGuard { hub: self.clone(), id, agent: agent.id, revoked })
    }
}

impl LocalDelivery for Hub {
    fn deliver(&self, notices: &[EventNotice]) {
        let fresh: Vec<&EventNotice> = {
            let mut seen = self.seen.lock().expect("seen lock");
            notices.iter().filter(|n| seen.insert(n.seq)).collect()
        };
        for n in fresh {
            {
                let index = self.index.read().expect("index lock");
                if let Some((path, streams)) = index.get_key_value(n.project_path.as_str()) {
                    for s in streams {
                        self.offer(s, path, n);
                    }
                }
            }
            // After queueing: see `position_of`.
            self.max_seq.fetch_max(n.seq, Ordering::AcqRel);
        }
    }
}

/// A bounded memory of sequence numbers already delivered to local streams.
#[derive(Default)]
struct Seen {
    set: std::collections::HashSet<i64>,
    order: std::collections::VecDeque<i64>,
}

impl Seen {
    /// Remembers `seq`; false when it was already remembered.
    fn insert(&mut self, seq: i64) -> bool {
        if !self.set.insert(seq) {
            return false;
        }
        self.order.push_back(seq);
        if self.order.len() > REMEMBERED
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_set_is_bounded_and_remembers_recent() {
        let mut d = Seen::default();
        assert!(d.insert(1));
        assert!(!d.insert(1));
        for i in 2..(REMEMBERED as i64 + 10) {
            d.insert(i);
        }
        assert!(d.set.len() <= REMEMBERED);
        assert!(d.insert(1), "the oldest was forgotten");
        assert!(!d.insert(REMEMBERED as i64 + 5));
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

    use super::*;
    use crate::domain::ProjectPath;
    use crate::engine::MemoryEngine;
    use crate::identity::RegistryDirectory;

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
        let hub = Hub::new(
            directory,
            store,
            Arc::new(MemoryEngine::default()),
            Arc::new(Metrics::new()),
            config,
            TaskTracker::new(),
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
                        received_at: now_ms(),
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
            for shared in hub.streams.lock().unwrap().values() {
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
