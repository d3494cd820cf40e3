//! Tells open configuration streams that their agent's configuration changed. Each replica
//! checks the versions of the agents it has streams for (as often as the source allows) and,
//! since a push to a configuration project may change its file, checks an agent at once when
//! its configuration project is pushed. So a change reaches every open stream on every replica.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::source::ConfigSource;
use crate::domain::AgentId;
use crate::domain::EventNotice;
use crate::engine::LocalDelivery;
use crate::identity::AgentIdentity;

struct Watched {
    version: watch::Sender<String>,
    agent: AgentIdentity,
    subscribers: usize,
}

/// Watched agents, and an index from configuration project to them so a push finds its
/// agents without scanning all of them.
#[derive(Default)]
struct Watches {
    agents: HashMap<AgentId, Watched>,
    by_project: HashMap<String, HashSet<AgentId>>,
}

/// Version watchers per agent.
pub struct ConfigWatch {
    source: Arc<dyn ConfigSource>,
    watches: Mutex<Watches>,
    /// The server's background tasks.
    tasks: TaskTracker,
}

/// A stream's subscription; dropping it unsubscribes.
pub struct ConfigSubscription {
    watch: Arc<ConfigWatch>,
    agent: AgentId,
    /// Receives the new version on every change.
    pub changes: watch::Receiver<String>,
}

impl ConfigWatch {
    /// A watch over `source`; its tasks join `tasks`, which shutdown waits for.
    pub fn new(source: Arc<dyn ConfigSource>, tasks: TaskTracker) -> Arc<Self> {
        Arc::new(Self { source, watches: Mutex::default(), tasks })
    }

    /// The source the watch reads.
    pub fn source(&self) -> &Arc<dyn ConfigSource> {
        &self.source
    }

    /// Polls until `stop`.
    pub fn start(self: &Arc<Self>, stop: CancellationToken) {
        let watch = self.clone();
        self.tasks.spawn(async move {
            let mut tick = tokio::time::interval(watch.source.poll_interval());
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {
                        let agents: Vec<AgentIdentity> =
                            watch.watches.lock().expect("watch lock").agents.values().map(|w| w.agent.clone()).collect();
                        watch.check(&agents).await;
                    }
                }
            }
        });
    }

    async fn check(&self, agents: &[AgentIdentity]) {
        if agents.is_empty() {
            return;
        }
        for (agent, version) in self.source.versions(agents).await {
            self.announce(agent, version);
        }
    }

    /// Records that `agent`'s configuration is at `version`, waking its streams if that is new.
    pub fn announce(&self, agent: AgentId, version: String) {
        if let Some(w) = self.watches.lock().expect("watch lock").agents.get(&agent) {
            set_version(&w.version, version);
        }
    }

    /// Subscribes to `agent`'s changes, starting from the `version` the caller has seen.
    pub fn subscribe(self: &Arc<Self>, agent: &AgentIdentity, version: String) -> ConfigSubscription {
        let mut watches = self.watches.lock().expect("watch lock");
        watches.by_project.entry(agent.config_project.clone()).or_default().insert(agent.id);
        let entry = watches.agents.entry(agent.id).or_insert_with(|| Watched {
            version: watch::channel(version).0,
            agent: agent.clone(),
            subscribers: 0,
        });
        entry.subscribers += 1;
        let mut changes = entry.version.subscribe();
        changes.mark_unchanged();
        ConfigSubscription { watch: self.clone(), agent: agent.id, changes }
    }
}

/// Stores `version`, waking the subscribers only when it differs from the one they saw.
fn set_version(tx: &watch::Sender<String>, version: String) {
    tx.send_if_modified(|v| {
        let changed = *v != version;
        *v = version;
        changed
    });
}

impl LocalDelivery for ConfigWatch {
    /// A push to a watched agent's configuration project may have changed its file.
    fn deliver(&self, notices: &[EventNotice]) {
        let pushed: Vec<(AgentIdentity, watch::Sender<String>)> = {
            let watches = self.watches.lock().expect("watch lock");
            notices
                .iter()
                // Only a Git push can change a configuration file.
                .filter(|n| n.kind.is_git())
                .filter_map(|n| watches.by_project.get(n.project_path.as_str()))
                .flatten()
                .collect::<HashSet<_>>()
                .into_iter()
                .filter_map(|id| watches.agents.get(id).map(|w| (w.agent.clone(), w.version.clone())))
                .collect()
        };
        if pushed.is_empty() {
            return;
        }
        let source = self.source.clone();
        self.tasks.spawn(async move {
            let agents: Vec<AgentIdentity> = pushed.iter().map(|(a, _)| a.clone()).collect();
            for (agent, version) in source.versions(&agents).await {
                if let Some((_, tx)) = pushed.iter().find(|(a, _)| a.id == agent) {
                    set_version(tx, version);
                }
            }
        });
    }
}

impl Drop for ConfigSubscription {
    fn drop(&mut self) {
        let mut watches = self.watch.watches.lock().expect("watch lock");
        let Some(entry) = watches.agents.get_mut(&self.agent) else { return };
        entry.subscribers -= 1;
        if entry.subscribers > 0 {
            return;
        }
        let project = entry.agent.config_project.clone();
        watches.agents.remove(&self.agent);
        if let Some(ids) = watches.by_project.get_mut(&project) {
            ids.remove(&self.agent);
            if ids.is_empty() {
                watches.by_project.remove(&project);
            }
        }
    }
}
