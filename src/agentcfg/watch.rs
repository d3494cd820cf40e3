//! Tells open configuration streams that their agent's configuration changed. Each replica
//! polls the versions of the agents it has streams for, so a change made anywhere (the CLI
//! writes the database directly) reaches every open stream on every replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::domain::AgentId;
use crate::store::Store;

/// Version watchers per agent.
pub struct ConfigWatch {
    store: Arc<dyn Store>,
    interval: Duration,
    agents: Mutex<HashMap<AgentId, (watch::Sender<i64>, usize)>>,
}

/// A stream's subscription; dropping it unsubscribes.
pub struct ConfigSubscription {
    watch: Arc<ConfigWatch>,
    agent: AgentId,
    /// Receives the new version on every change.
    pub changes: watch::Receiver<i64>,
}

impl ConfigWatch {
    /// A watch polling `store` every `interval`.
    pub fn new(store: Arc<dyn Store>, interval: Duration) -> Arc<Self> {
        Arc::new(Self { store, interval, agents: Mutex::default() })
    }

    /// Polls until `stop`.
    pub fn start(self: &Arc<Self>, stop: CancellationToken) {
        let watch = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(watch.interval);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => watch.poll().await,
                }
            }
        });
    }

    async fn poll(&self) {
        let ids: Vec<AgentId> = self.agents.lock().expect("watch lock").keys().copied().collect();
        if ids.is_empty() {
            return;
        }
        match self.store.config_versions(&ids).await {
            Ok(versions) => {
                for (agent, version) in versions {
                    self.announce(agent, version);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot check agent configuration versions"),
        }
    }

    /// Records that `agent`'s configuration is at `version`, waking its streams if that is new.
    pub fn announce(&self, agent: AgentId, version: i64) {
        if let Some((tx, _)) = self.agents.lock().expect("watch lock").get(&agent) {
            tx.send_if_modified(|v| {
                let changed = *v != version;
                *v = version;
                changed
            });
        }
    }

    /// Subscribes to `agent`'s changes, starting from the `version` the caller has seen.
    pub fn subscribe(self: &Arc<Self>, agent: AgentId, version: i64) -> ConfigSubscription {
        let mut agents = self.agents.lock().expect("watch lock");
        let entry = agents.entry(agent).or_insert_with(|| (watch::channel(version).0, 0));
        entry.1 += 1;
        let mut changes = entry.0.subscribe();
        changes.mark_unchanged();
        ConfigSubscription { watch: self.clone(), agent, changes }
    }
}

impl Drop for ConfigSubscription {
    fn drop(&mut self) {
        let mut agents = self.watch.agents.lock().expect("watch lock");
        if let Some(entry) = agents.get_mut(&self.agent) {
            entry.1 -= 1;
            if entry.1 == 0 {
                agents.remove(&self.agent);
            }
        }
    }
}
