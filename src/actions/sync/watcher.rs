//! The watcher: every few seconds, for each agent this replica holds a tunnel of and whose
//! configuration turns on `kas.sync_status`, lists Flux's Kustomizations and their sources in
//! the agent's cluster, and hands each change of (revision, state) to the poster, where the
//! project is allowed. One replica at a time watches an agent: it holds an engine claim on the
//! agent for the current lease span (and takes the next span before this one ends, so a
//! healthy watcher keeps its agent); a replica that dies loses the agent at the next span.
//! What was posted is in the status log, so a new watcher (after a restart or a handover)
//! posts nothing twice.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::flux::{self, Observed, Sources, SyncState, Target};
use super::poster::{Job, Poster};
use crate::agentcfg::AgentConfigFile;
use crate::agentcfg::source::ConfigSource;
use crate::clock::Clock;
use crate::domain::{AgentId, ProjectPath, access};
use crate::engine::{OnceActions, OnceClaim};
use crate::gitlab::statuses::{CommitStatus, StatusClient};
use crate::identity::{AgentDirectory, AgentIdentity};
use crate::metrics::Metrics;
use crate::store::{KustomizationState, ProjectRegistry, StatusLog};
use crate::tunnel::{KubeRequest, Purpose, TunnelError, Tunnels};

/// Agents looked at in parallel on this replica.
const CONCURRENCY: usize = 16;
/// Longest wait for an agent's configuration file.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(10);
/// Kustomizations remembered per agent; more are still reported, just not remembered.
const MAX_REMEMBERED: usize = 10_000;
/// "Logged once" notes kept before they are forgotten (and may be logged again).
const MAX_NOTES: usize = 10_000;
/// How often posted-status marks older than the retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// How long an agent's `kas.sync_status` is used before its configuration file is read again
/// (in GitLab mode each read is a call to GitLab).
const CONFIG_REFRESH: Duration = Duration::from_secs(30);

/// Settings of the watcher.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// How often each watched cluster is listed.
    pub interval: Duration,
    /// The host (and port) of GitLab's external URL, lower case: Git URLs elsewhere are not
    /// GitLab's projects.
    pub gitlab_host: String,
    /// How long one engine claim on an agent lasts.
    pub lease: Duration,
    /// Largest list read from a cluster.
    pub max_list_bytes: usize,
    /// How long posted-status marks are kept.
    pub retention: Duration,
}

/// What the watcher works with.
pub struct SyncParts {
    /// Calls into clusters.
    pub tunnels: Arc<Tunnels>,
    /// Agents' configuration files (`kas.sync_status`).
    pub configs: Arc<dyn ConfigSource>,
    /// The access rule.
    pub directory: Arc<dyn AgentDirectory>,
    /// Projects' visibility for the access rule.
    pub projects: Arc<dyn ProjectRegistry>,
    /// What was posted; the last state per Kustomization.
    pub log: Arc<dyn StatusLog>,
    /// Claims across replicas.
    pub once: Arc<dyn OnceActions>,
    /// GitLab's commit statuses.
    pub client: Arc<StatusClient>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Time.
    pub clock: Clock,
}

/// When an agent's configuration was read, and the projects its statuses may go to (`None`:
/// not opted in).
type OptIn = (tokio::time::Instant, Option<Vec<String>>);

/// One watched agent on this replica.
#[derive(Default)]
struct Watch {
    /// Lease spans this replica holds the agent's claim for.
    spans: HashSet<i64>,
    /// (namespace, name) → the (revision, state) last handed on.
    last: HashMap<(String, String), (String, SyncState)>,
}

/// Follows Flux in opted-in clusters; see the module documentation.
pub struct SyncWatcher {
    parts: SyncParts,
    settings: SyncSettings,
    poster: Poster,
    watches: Mutex<HashMap<AgentId, Watch>>,
    in_flight: Mutex<HashSet<AgentId>>,
    /// What was logged once already: (agent, kustomization, what).
    noted: Mutex<HashSet<(AgentId, String, String)>>,
    /// Per agent: when its configuration was read, and the projects statuses may go to
    /// (`None`: not opted in).
    opt_ins: Mutex<HashMap<AgentId, OptIn>>,
    permits: Arc<Semaphore>,
}

impl SyncWatcher {
    /// Starts the watcher and its poster on `tasks`; both end with `stop`.
    pub fn start(parts: SyncParts, settings: SyncSettings, stop: CancellationToken, tasks: &TaskTracker) -> Arc<Self> {
        let poster = Poster::start(
            parts.client.clone(),
            parts.log.clone(),
            parts.metrics.clone(),
            parts.clock.clone(),
            stop.clone(),
            tasks,
        );
        let watcher = Arc::new(Self {
            parts,
            settings,
            poster,
            watches: Mutex::default(),
            in_flight: Mutex::default(),
            noted: Mutex::default(),
            opt_ins: Mutex::default(),
            permits: Arc::new(Semaphore::new(CONCURRENCY)),
        });
        let this = watcher.clone();
        let work = tasks.clone();
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(this.settings.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut prune = tokio::time::interval(PRUNE_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => this.round(&work, &stop),
                    _ = prune.tick() => this.prune().await,
                }
            }
        });
        watcher
    }

    /// Starts a look at every agent held here that is not being looked at already.
    fn round(self: &Arc<Self>, tasks: &TaskTracker, stop: &CancellationToken) {
        let agents = self.parts.tunnels.registry().agents();
        self.watches.lock().expect("watches lock").retain(|id, _| agents.iter().any(|a| a.id == *id));
        self.opt_ins.lock().expect("opt-ins lock").retain(|id, _| agents.iter().any(|a| a.id == *id));
        for agent in agents {
            if !self.in_flight.lock().expect("in-flight lock").insert(agent.id) {
                continue;
            }
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                self.in_flight.lock().expect("in-flight lock").remove(&agent.id);
                continue;
            };
            let this = self.clone();
            let stop = stop.clone();
            tasks.spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = this.look(&agent) => {}
                }
                this.in_flight.lock().expect("in-flight lock").remove(&agent.id);
                drop(permit);
            });
        }
    }

    /// One look at one agent's cluster, when it opted in and this replica holds its claim.
    async fn look(&self, agent: &AgentIdentity) {
        let Some(allowed) = self.opted_in(agent).await else { return };
        if !self.hold(agent.id).await {
            return;
        }
        let Some((kustomizations, sources)) = self.list(agent).await else { return };
        // Forget Kustomizations that are gone, so memory follows the cluster.
        {
            let present: HashSet<(String, String)> = kustomizations.iter().map(|k| k.key()).collect();
            if let Some(watch) = self.watches.lock().expect("watches lock").get_mut(&agent.id) {
                watch.last.retain(|key, _| present.contains(key));
            }
        }
        for k in &kustomizations {
            let Some(observed) = flux::observe(k, &sources, &self.settings.gitlab_host) else { continue };
            let key = (observed.namespace.clone(), observed.name.clone());
            let now = (observed.revision.clone(), observed.state);
            let changed = {
                let watches = self.watches.lock().expect("watches lock");
                watches.get(&agent.id).and_then(|w| w.last.get(&key)) != Some(&now)
            };
            if !changed {
                continue;
            }
            let (reported, handed_on) = self.report(agent, &allowed, &observed).await;
            if handed_on {
                let mut watches = self.watches.lock().expect("watches lock");
                let watch = watches.entry(agent.id).or_default();
                if watch.last.len() < MAX_REMEMBERED || watch.last.contains_key(&key) {
                    watch.last.insert(key, now);
                }
            }
            let target = observed.target.as_ref().ok();
            let state = KustomizationState {
                agent: agent.id,
                namespace: observed.namespace.clone(),
                name: observed.name.clone(),
                revision: observed.revision.clone(),
                state: observed.state.as_str().into(),
                project: target.map(|t| t.project.clone()),
                sha: target.map(|t| t.sha.clone()),
                message: flux::description(&observed.message),
                reported: reported.into(),
                updated_at: self.parts.clock.now_ms(),
            };
            if let Err(e) = self.parts.log.set_kustomization(&state).await {
                tracing::debug!(error = %e, "cannot record a Kustomization's state");
            }
        }
    }

    /// The projects statuses may go to when the agent turned sync status on; `None` otherwise.
    /// Read at most every `CONFIG_REFRESH` per agent.
    async fn opted_in(&self, agent: &AgentIdentity) -> Option<Vec<String>> {
        let cached = self.opt_ins.lock().expect("opt-ins lock").get(&agent.id).cloned();
        if let Some((at, projects)) = cached
            && at.elapsed() < CONFIG_REFRESH
        {
            return projects;
        }
        let projects = self.read_opt_in(agent).await;
        let now = tokio::time::Instant::now();
        self.opt_ins.lock().expect("opt-ins lock").insert(agent.id, (now, projects.clone()));
        projects
    }

    async fn read_opt_in(&self, agent: &AgentIdentity) -> Option<Vec<String>> {
        let snapshot = match tokio::time::timeout(CONFIG_TIMEOUT, self.parts.configs.load(agent)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(agent = agent.id, error = %e, "cannot read the agent configuration for sync status");
                return None;
            }
            Err(_) => return None,
        };
        let section = AgentConfigFile::parse(&snapshot.text).ok()?.kas_section().sync_status;
        if !section.enabled {
            return None;
        }
        Some(if section.projects.is_empty() { vec![agent.config_project.clone()] } else { section.projects })
    }

    /// Whether this replica holds the agent's claim for the current lease span, taking it when
    /// free (and the next span shortly before this one ends).
    async fn hold(&self, agent: AgentId) -> bool {
        let lease_ms = self.settings.lease.as_millis().max(1) as i64;
        let now = self.parts.clock.now_ms();
        let span = now / lease_ms;
        let ours =
            |span: i64| self.watches.lock().expect("watches lock").get(&agent).is_some_and(|w| w.spans.contains(&span));
        let held = ours(span) || self.claim(agent, span).await;
        if !held {
            // Another replica watches it: start afresh should it come back here.
            self.watches.lock().expect("watches lock").remove(&agent);
            return false;
        }
        let near_end = (span + 1) * lease_ms - now <= 2 * self.settings.interval.as_millis() as i64;
        if near_end && !ours(span + 1) {
            self.claim(agent, span + 1).await;
        }
        true
    }

    async fn claim(&self, agent: AgentId, span: i64) -> bool {
        let key = format!("sync:{agent}:{span}");
        match self.parts.once.claim_once(&key, self.settings.lease * 2).await {
            Ok(OnceClaim::Won) => {
                let mut watches = self.watches.lock().expect("watches lock");
                let watch = watches.entry(agent).or_default();
                watch.spans.retain(|s| *s >= span - 1);
                watch.spans.insert(span);
                true
            }
            Ok(_) => false,
            Err(e) => {
                tracing::debug!(error = %e, agent, "cannot claim an agent for sync status");
                false
            }
        }
    }

    /// The cluster's Kustomizations and sources; `None` when it cannot tell now.
    async fn list(&self, agent: &AgentIdentity) -> Option<(Vec<flux::Kustomization>, Sources)> {
        let kustomizations = match self.get(agent, flux::KUSTOMIZATIONS).await? {
            Some(body) => match flux::kustomizations(&body) {
                Ok(list) => list,
                Err(e) => {
                    self.note_once(agent, "", &format!("unreadable Kustomization list: {e}"));
                    return None;
                }
            },
            None => {
                self.note_once(agent, "", "the cluster serves no Kustomization API (is Flux installed?)");
                return None;
            }
        };
        let git = self.get(agent, flux::GIT_REPOSITORIES).await?.and_then(|b| flux::sources(&b).ok());
        let mut oci = None;
        for path in flux::OCI_REPOSITORIES {
            if let Some(body) = self.get(agent, path).await? {
                oci = flux::sources(&body).ok();
                break;
            }
        }
        Some((kustomizations, Sources::new(git.unwrap_or_default(), oci.unwrap_or_default())))
    }

    /// One GET through the tunnel: `Some(Some(body))`, `Some(None)` for 404 (no such API),
    /// `None` when the cluster cannot tell now (logged).
    async fn get(&self, agent: &AgentIdentity, path: &str) -> Option<Option<Vec<u8>>> {
        let response = match self.parts.tunnels.call(agent.id, Purpose::SyncStatus, KubeRequest::get(path)).await {
            Ok(r) => r,
            Err(TunnelError::NotOptedIn { .. }) => return None,
            Err(e) => {
                tracing::debug!(agent = agent.id, path, error = %e, "cannot list Flux objects now");
                return None;
            }
        };
        match response.status {
            404 => return Some(None),
            401 | 403 => {
                self.note_once(
                    agent,
                    "",
                    &format!("listing {path}: {} (agentk's service account may not)", response.status),
                );
                return None;
            }
            s if s >= 400 => {
                tracing::debug!(agent = agent.id, path, status = s, "cannot list Flux objects now");
                return None;
            }
            _ => {}
        }
        match response.body.collect(self.settings.max_list_bytes).await {
            Ok(body) => Some(Some(body)),
            Err(e) => {
                self.note_once(agent, "", &format!("listing {path}: {e}"));
                None
            }
        }
    }

    /// What becomes of one change: hands it to the poster where allowed. Returns what the
    /// operator sees and whether the change is settled (false: offer it again next time).
    async fn report(&self, agent: &AgentIdentity, allowed: &[String], o: &Observed) -> (&'static str, bool) {
        let kustomization = format!("{}/{}", o.namespace, o.name);
        let target = match &o.target {
            Ok(t) => t,
            Err(why) => {
                self.parts.metrics.sync_status("unmapped");
                self.note_once(agent, &kustomization, &format!("no GitLab commit for its revision ({})", why.as_str()));
                return ("unmapped", true);
            }
        };
        match self.may_post(agent, allowed, target).await {
            Ok(true) => {}
            Ok(false) => {
                self.parts.metrics.sync_status("not_allowed");
                self.note_once(
                    agent,
                    &kustomization,
                    &format!("project {} is not among the agent's kas.sync_status.projects or the agent may not see it; no status", target.project),
                );
                return ("not_allowed", true);
            }
            Err(()) => return ("pending", false),
        }
        let status = CommitStatus {
            project: target.project.clone(),
            sha: target.sha.clone(),
            state: o.state.as_str().into(),
            name: flux::status_name(&agent.name, &o.namespace, &o.name),
            description: flux::description(&o.message),
            git_ref: target.git_ref.clone(),
        };
        if self.poster.offer(Job { agent: agent.id, status }, &self.parts.metrics) {
            ("queued", true)
        } else {
            ("pending", false)
        }
    }

    /// Listed under `kas.sync_status.projects` AND visible to the agent by the access rule (a
    /// cluster controls its own objects, so a Kustomization may name any project). `Err` when
    /// the directory cannot answer now.
    async fn may_post(&self, agent: &AgentIdentity, allowed: &[String], target: &Target) -> Result<bool, ()> {
        let listed = allowed.iter().any(|p| p.trim_matches('/').eq_ignore_ascii_case(&target.project));
        if !listed {
            return Ok(false);
        }
        let Ok(path) = ProjectPath::parse(&target.project) else { return Ok(false) };
        let info = self.parts.projects.project_by_path(&path).await.map_err(|e| {
            tracing::debug!(error = %e, "cannot read a project's visibility; later");
        })?;
        let world_readable = access::is_world_readable(path.as_str(), info.as_ref());
        self.parts.directory.may_notify(agent, path.as_str(), world_readable).await.map_err(|e| {
            tracing::debug!(error = %e, "cannot check access for a commit status; later");
        })
    }

    /// Logs `what` about an agent's Kustomization once (until the notes overflow).
    fn note_once(&self, agent: &AgentIdentity, kustomization: &str, what: &str) {
        let mut noted = self.noted.lock().expect("noted lock");
        if noted.len() >= MAX_NOTES {
            noted.clear();
        }
        if noted.insert((agent.id, kustomization.to_owned(), what.to_owned())) {
            tracing::warn!(agent = agent.id, agent.name = %agent.name, kustomization, "sync status: {what}");
        }
    }

    async fn prune(&self) {
        let before = self.parts.clock.now_ms() - self.settings.retention.as_millis() as i64;
        if let Err(e) = self.parts.log.prune_statuses(before).await {
            tracing::warn!(error = %e, "cannot prune posted commit statuses");
        }
    }
}
