//! The OCI actor: every replica sees every recorded event; the one that holds a tunnel of an
//! agent asks that agent's Flux to reconcile the OCIRepository objects an image push moved.
//!
//! Three ways an (agent, push) pair gets acted on, all through `act_once`:
//! - **at once**: a recorded image push is handed to the actor (it is a `LocalDelivery`) and
//!   paired with the agents this replica holds tunnels of;
//! - **late agents**: an agent whose tunnel appears here (it connected, or this replica
//!   restarted) is paired with the image pushes of the replay window the action log has no mark
//!   for;
//! - **again**: a pair that failed for a passing reason (tunnel lost, cluster slow) or that
//!   another replica was acting on is retried every few seconds until it is marked, so a replica
//!   killed mid-action is made up for by the survivors.
//!
//! A short engine claim per agent and event keeps two replicas that both hold tunnels of the
//! agent from both acting; the mark in the database keeps it done across restarts.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::oci::{self, OciRepository, Pushed};
use crate::agentcfg::AgentConfigFile;
use crate::agentcfg::source::ConfigSource;
use crate::clock::Clock;
use crate::domain::{AgentId, EventKind, EventNotice};
use crate::engine::{LocalDelivery, OnceActions, OnceClaim};
use crate::identity::{AgentDirectory, AgentIdentity};
use crate::metrics::Metrics;
use crate::store::{ActionLog, ActionRecord};
use crate::tunnel::{KubeRequest, Purpose, TunnelError, Tunnels};

/// Image pushes read per query when pairing a late agent with the replay window.
const WINDOW_PAGE: i64 = 1000;
/// How often new agents and pairs to retry are looked at.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Fresh pushes waiting to be paired; beyond this the window is read instead (nothing is lost:
/// the pushes are in the event log).
const QUEUE: usize = 10_000;
/// Actions in flight on this replica at once.
const CONCURRENCY: usize = 32;
/// How long an agent's `kas.oci.enabled` is trusted before its configuration is read again
/// (in GitLab mode each read is a GitLab API call).
const OPT_IN_TTL: Duration = Duration::from_secs(30);
/// How often old action marks are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(600);

/// Settings of the OCI actor.
#[derive(Debug, Clone)]
pub struct OciSettings {
    /// The registry host OCIRepository URLs name; `None` takes each event's own.
    pub registry_host: Option<String>,
    /// How far back an agent that connects late still gets its reconcile.
    pub replay_window: Duration,
    /// How long action marks are kept (the event retention).
    pub retention: Duration,
    /// Longest one action may take (its calls included) before another replica may redo it.
    pub action_timeout: Duration,
    /// Largest OCIRepository list read from a cluster.
    pub max_list_bytes: usize,
}

/// What one action ended in.
struct Outcome {
    result: &'static str,
    detail: String,
}

impl Outcome {
    fn new(result: &'static str, detail: impl Into<String>) -> Self {
        Self { result, detail: detail.into() }
    }
}

/// Reconciles OCIRepository objects for image pushes; see the module documentation.
pub struct OciActions {
    tunnels: Arc<Tunnels>,
    log: Arc<dyn ActionLog>,
    configs: Arc<dyn ConfigSource>,
    directory: Arc<dyn AgentDirectory>,
    once: Arc<dyn OnceActions>,
    metrics: Arc<Metrics>,
    clock: Clock,
    settings: OciSettings,
    wake: Notify,
    /// Fresh image pushes, from `deliver`.
    fresh: Mutex<Vec<Arc<EventNotice>>>,
    /// Set when `fresh` overflowed: pair every agent with the whole window next time.
    overflowed: std::sync::atomic::AtomicBool,
    /// Whether each agent opted in, and when that was read.
    opted_in: Mutex<HashMap<AgentId, (bool, tokio::time::Instant)>>,
    /// Pairs to try again (passing failure, or another replica was acting).
    retry: Mutex<HashMap<(AgentId, i64), Arc<EventNotice>>>,
    /// Agents paired with the window already (reset when their tunnels leave this replica).
    known_agents: Mutex<HashSet<AgentId>>,
    /// (agent, event) pairs being acted on here, so they are not started twice.
    in_flight: Mutex<HashSet<(AgentId, i64)>>,
    permits: Arc<Semaphore>,
}

/// What the OCI actor works with.
pub struct OciParts {
    /// Calls into clusters.
    pub tunnels: Arc<Tunnels>,
    /// Image pushes and the marks of what was done.
    pub log: Arc<dyn ActionLog>,
    /// Agents' configuration files (the `kas:` section).
    pub configs: Arc<dyn ConfigSource>,
    /// The access rule.
    pub directory: Arc<dyn AgentDirectory>,
    /// Claims across replicas.
    pub once: Arc<dyn OnceActions>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Times patches and marks.
    pub clock: Clock,
}

impl OciActions {
    /// An actor with nothing in flight.
    pub fn new(parts: OciParts, settings: OciSettings) -> Arc<Self> {
        Arc::new(Self {
            tunnels: parts.tunnels,
            log: parts.log,
            configs: parts.configs,
            directory: parts.directory,
            once: parts.once,
            metrics: parts.metrics,
            clock: parts.clock,
            settings,
            wake: Notify::new(),
            fresh: Mutex::default(),
            overflowed: Default::default(),
            opted_in: Mutex::default(),
            retry: Mutex::default(),
            known_agents: Mutex::default(),
            in_flight: Mutex::default(),
            permits: Arc::new(Semaphore::new(CONCURRENCY)),
        })
    }

    /// Works until `stop`, on the server's task tracker.
    pub fn start(self: &Arc<Self>, stop: CancellationToken, tasks: &TaskTracker) {
        let actor = self.clone();
        let work = tasks.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            let mut prune = tokio::time::interval(PRUNE_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = actor.wake.notified() => actor.pair_fresh(&work).await,
                    _ = tick.tick() => actor.sweep(&work).await,
                    _ = prune.tick() => actor.prune().await,
                }
            }
        });
    }

    /// Pairs fresh pushes with the agents this replica holds tunnels of.
    async fn pair_fresh(self: &Arc<Self>, tasks: &TaskTracker) {
        let fresh = std::mem::take(&mut *self.fresh.lock().expect("fresh lock"));
        let agents = self.tunnels.registry().agents();
        if self.overflowed.swap(false, Ordering::AcqRel) {
            // Fresh pushes were dropped from the queue: the window has them.
            self.pair_window(&agents, tasks).await;
            return;
        }
        for event in fresh {
            for agent in &agents {
                self.consider(agent, &event, tasks).await;
            }
        }
    }

    /// Pairs agents new on this replica with the window, and retries what is due.
    async fn sweep(self: &Arc<Self>, tasks: &TaskTracker) {
        let agents = self.tunnels.registry().agents();
        let new: Vec<AgentIdentity> = {
            let mut known = self.known_agents.lock().expect("known lock");
            known.retain(|id| agents.iter().any(|a| a.id == *id));
            agents.iter().filter(|a| known.insert(a.id)).cloned().collect()
        };
        if !new.is_empty() {
            self.pair_window(&new, tasks).await;
        }
        let not_before = self.clock.now_ms() - self.settings.replay_window.as_millis() as i64;
        let due: Vec<((AgentId, i64), Arc<EventNotice>)> = {
            let mut retry = self.retry.lock().expect("retry lock");
            retry.retain(|_, e| e.received_at >= not_before);
            retry.drain().collect()
        };
        for ((agent_id, _), event) in due {
            if let Some(agent) = agents.iter().find(|a| a.id == agent_id) {
                self.consider(agent, &event, tasks).await;
            }
        }
    }

    /// Pairs `agents` with every image push of the replay window they have no mark for.
    async fn pair_window(self: &Arc<Self>, agents: &[AgentIdentity], tasks: &TaskTracker) {
        if agents.is_empty() {
            return;
        }
        let not_before = self.clock.now_ms() - self.settings.replay_window.as_millis() as i64;
        let mut after = 0;
        loop {
            let page = match self.log.events_of_kind(EventKind::ImagePush, not_before, after, WINDOW_PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read image pushes; will try again");
                    self.forget(agents);
                    return;
                }
            };
            let Some(last) = page.last() else { return };
            after = last.seq;
            let seqs: Vec<i64> = page.iter().map(|e| e.seq).collect();
            let done: HashSet<(AgentId, i64)> = match self.log.actions_done(&seqs).await {
                Ok(done) => done.into_iter().collect(),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read cluster action marks; will try again");
                    self.forget(agents);
                    return;
                }
            };
            let full = page.len() as i64 == WINDOW_PAGE;
            for event in page {
                let event = Arc::new(event);
                for agent in agents.iter().filter(|a| !done.contains(&(a.id, event.seq))) {
                    self.consider(agent, &event, tasks).await;
                }
            }
            if !full {
                return;
            }
        }
    }

    /// Makes the next sweep pair these agents with the window again.
    fn forget(&self, agents: &[AgentIdentity]) {
        let mut known = self.known_agents.lock().expect("known lock");
        for a in agents {
            known.remove(&a.id);
        }
    }

    /// Starts acting for `agent` on `event` if the access rule lets it hear about the project.
    async fn consider(self: &Arc<Self>, agent: &AgentIdentity, event: &Arc<EventNotice>, tasks: &TaskTracker) {
        let pair = (agent.id, event.seq);
        if event.image.is_none() || self.in_flight.lock().expect("in-flight lock").contains(&pair) {
            return;
        }
        // The access rule, as for Git pushes: nothing about a project the agent may not see
        // ever reaches its cluster.
        let path = event.project_path.as_str();
        if !self.directory.could_notify(agent, path, event.world_readable) {
            return;
        }
        match self.directory.may_notify(agent, path, event.world_readable).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::debug!(error = %e, agent = agent.id, "cannot check access for an image push; later");
                self.retry.lock().expect("retry lock").insert(pair, event.clone());
                return;
            }
        }
        // Agents that did not opt in are left alone without a mark: a file that turns the switch
        // on later serves the pushes still in the window.
        if !self.opted_in(agent).await {
            return;
        }
        let Ok(permit) = self.permits.clone().acquire_owned().await else { return };
        self.in_flight.lock().expect("in-flight lock").insert(pair);
        let actor = self.clone();
        let (agent, event) = (agent.clone(), event.clone());
        tasks.spawn(async move {
            if !actor.act_once(&agent, &event).await {
                actor.retry.lock().expect("retry lock").insert((agent.id, event.seq), event.clone());
            }
            actor.in_flight.lock().expect("in-flight lock").remove(&(agent.id, event.seq));
            drop(permit);
        });
    }

    /// Acts for `agent` on `event` unless another replica does or did.
    /// Whether the agent's configuration file sets `kas.oci.enabled`, read at most every
    /// [`OPT_IN_TTL`]; unreadable counts as off (the next read may say otherwise).
    async fn opted_in(&self, agent: &AgentIdentity) -> bool {
        let now = tokio::time::Instant::now();
        if let Some((enabled, at)) = self.opted_in.lock().expect("opt-in lock").get(&agent.id)
            && now.duration_since(*at) < OPT_IN_TTL
        {
            return *enabled;
        }
        let enabled = match self.configs.load(agent).await {
            Ok(snapshot) => AgentConfigFile::parse(&snapshot.text).is_ok_and(|f| f.kas_section().oci.enabled),
            Err(e) => {
                tracing::debug!(error = %e, agent = agent.id, "cannot read the agent's configuration; OCI off for now");
                false
            }
        };
        let mut cache = self.opted_in.lock().expect("opt-in lock");
        cache.retain(|_, (_, at)| now.duration_since(*at) < OPT_IN_TTL);
        cache.insert(agent.id, (enabled, now));
        enabled
    }

    /// Acts for `agent` on `event` unless another replica does or did; false when it should be
    /// tried again (a passing failure, or another replica's claim that may yet expire).
    async fn act_once(&self, agent: &AgentIdentity, event: &EventNotice) -> bool {
        let key = format!("oci:{}:{}", event.seq, agent.id);
        match self.once.claim_once(&key, self.settings.action_timeout).await {
            Ok(OnceClaim::Won) => {}
            Ok(OnceClaim::Done) => return true,
            Ok(OnceClaim::Running) => return false,
            Err(e) => {
                tracing::debug!(error = %e, "cannot claim an OCI action; later");
                return false;
            }
        }
        let Some(outcome) = self.reconcile(agent, event).await else {
            // A passing failure: the claim expires and a later sweep (here or elsewhere) redoes it.
            self.metrics.oci_reconcile("retry");
            return false;
        };
        self.metrics.oci_reconcile(outcome.result);
        if outcome.result == "ok" {
            let waited = (self.clock.now_ms() - event.received_at).max(0) as f64 / 1000.0;
            self.metrics.registry_push_to_patch_seconds.observe(waited);
        }
        tracing::info!(agent = agent.id, seq = event.seq, project = %event.project_path, result = outcome.result, detail = %outcome.detail, "OCI reconcile");
        let record = ActionRecord {
            agent: agent.id,
            seq: event.seq,
            outcome: outcome.result.into(),
            detail: outcome.detail,
            done_at: self.clock.now_ms(),
        };
        if let Err(e) = self.log.record_action(&record).await {
            tracing::warn!(error = %e, "cannot record an OCI action; it may be done again");
        }
        if let Err(e) = self.once.finish_once(&key, self.settings.replay_window).await {
            tracing::debug!(error = %e, "cannot mark an OCI action done in the engine");
        }
        true
    }

    /// Lists the agent's OCIRepository objects and patches those the push moved. `None` when
    /// the cluster could not be reached (try again later).
    async fn reconcile(&self, agent: &AgentIdentity, event: &EventNotice) -> Option<Outcome> {
        let image = event.image.as_ref()?;
        let Some(host) = self.settings.registry_host.as_deref().or(image.host.as_deref()) else {
            return Some(Outcome::new(
                "failed",
                "no registry host: the event names none and KAS_REGISTRY_HOST is unset",
            ));
        };
        let pushed = Pushed { host, repository: &image.repository, tag: image.tag.as_deref() };
        for version in oci::VERSIONS {
            let listed = self.tunnels.call(agent.id, Purpose::Oci, KubeRequest::get(&oci::list_path(version))).await;
            let response = match listed {
                Ok(r) => r,
                Err(e) => return settled(e),
            };
            match response.status {
                404 => continue,
                401 | 403 => {
                    return Some(Outcome::new(
                        "forbidden",
                        format!("listing OCIRepository {version}: {}", response.status),
                    ));
                }
                s if s >= 400 => return Some(Outcome::new("failed", format!("listing OCIRepository {version}: {s}"))),
                _ => {}
            }
            let body = match response.body.collect(self.settings.max_list_bytes).await {
                Ok(body) => body,
                Err(e) => return settled(e),
            };
            let targets = match oci::matching(&body, pushed) {
                Ok(t) => t,
                Err(e) => return Some(Outcome::new("failed", format!("unreadable OCIRepository list: {e}"))),
            };
            if targets.is_empty() {
                return Some(Outcome::new(
                    "no_match",
                    format!("no OCIRepository follows oci://{host}/{}", image.repository),
                ));
            }
            return self.patch_all(agent, version, &targets).await;
        }
        Some(Outcome::new("no_match", "the cluster serves no OCIRepository API (is Flux installed?)"))
    }

    async fn patch_all(&self, agent: &AgentIdentity, version: &str, targets: &[OciRepository]) -> Option<Outcome> {
        let requested_at = crate::clock::rfc3339_ms(self.clock.now_ms());
        let mut patched = Vec::new();
        for target in targets {
            let request = KubeRequest {
                method: "PATCH".into(),
                path: target.path(version),
                headers: vec![("Content-Type".into(), "application/merge-patch+json".into())],
                body: oci::reconcile_patch(&requested_at),
                ..Default::default()
            };
            let name = format!("{}/{}", target.namespace, target.name);
            match self.tunnels.call(agent.id, Purpose::Oci, request).await {
                Ok(r) if r.status < 300 => patched.push(name),
                Ok(r) if matches!(r.status, 401 | 403) => {
                    return Some(Outcome::new("forbidden", format!("patching {name}: {}", r.status)));
                }
                Ok(r) => return Some(Outcome::new("failed", format!("patching {name}: {}", r.status))),
                // Patched ones stay patched; the rest is retried (a repeated patch only asks
                // Flux for one more reconcile).
                Err(e) => return settled(e),
            }
        }
        Some(Outcome::new("ok", format!("reconcile requested: {}", patched.join(", "))))
    }

    async fn prune(&self) {
        let before = self.clock.now_ms() - self.settings.retention.as_millis() as i64;
        if let Err(e) = self.log.prune_actions(before).await {
            tracing::warn!(error = %e, "cannot prune cluster action marks");
        }
    }
}

/// A tunnel error as an outcome: final for refusals kas or the agent's configuration decide,
/// `None` (do it again later) for what passes.
fn settled(e: TunnelError) -> Option<Outcome> {
    match e {
        TunnelError::NotOptedIn { .. } => Some(Outcome::new("not_opted_in", e.to_string())),
        TunnelError::Refused(_) | TunnelError::RequestTooLarge(_) | TunnelError::ResponseTooLarge(_) => {
            Some(Outcome::new("failed", e.to_string()))
        }
        other => {
            tracing::info!(error = %other, "OCI reconcile not done now; will try again");
            None
        }
    }
}

impl LocalDelivery for OciActions {
    fn deliver(&self, notices: &[EventNotice]) {
        let images: Vec<Arc<EventNotice>> =
            notices.iter().filter(|n| n.kind == EventKind::ImagePush).map(|n| Arc::new(n.clone())).collect();
        if images.is_empty() {
            return;
        }
        {
            let mut fresh = self.fresh.lock().expect("fresh lock");
            if fresh.len() + images.len() > QUEUE {
                self.overflowed.store(true, Ordering::Release);
            } else {
                fresh.extend(images);
            }
        }
        self.wake.notify_one();
    }
}
