//! The index from project path to the open streams that asked for it, so one event costs work
//! proportional to the streams that want it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::pending::Pending;
use super::revocation::EndSignal;
use crate::domain::{AgentId, EventNotice};
use crate::identity::{AgentDirectory, AgentIdentity};
use crate::metrics::Metrics;

/// One open stream, as delivery shares it between the index and the stream itself.
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

impl StreamShared {
    /// Queues `n` for `path` (one of this stream's projects) if the agent may see it; true when
    /// newly queued, false when coalesced or not allowed.
    pub(super) fn offer(
        &self,
        directory: &dyn AgentDirectory,
        metrics: &Metrics,
        path: &Arc<str>,
        n: &EventNotice,
    ) -> bool {
        // agentk reconciles Git repositories; image pushes are for cluster actions.
        if !n.kind.is_git() || !directory.could_notify(&self.agent, path, n.world_readable) {
            return false;
        }
        let added = self.pending.lock().expect("pending lock").add(path, n.seq, n.world_readable, n.received_at);
        if added {
            self.wake.notify_one();
        } else {
            metrics.notifications_coalesced.inc();
        }
        added
    }
}

/// Every open stream of this replica, by id and by project path.
#[derive(Default)]
pub(super) struct ProjectIndex {
    by_path: RwLock<HashMap<Arc<str>, Vec<Arc<StreamShared>>>>,
    by_id: Mutex<HashMap<u64, Arc<StreamShared>>>,
    /// Open streams per agent, for the connected-agents gauge.
    agents: Mutex<HashMap<AgentId, usize>>,
    next_id: AtomicU64,
}

impl ProjectIndex {
    /// Adds a stream of `agent` over `projects` (duplicates dropped); returns it and the number
    /// of agents with an open stream.
    pub(super) fn insert(
        &self,
        agent: AgentIdentity,
        projects: Vec<String>,
        revoked: Arc<EndSignal>,
    ) -> (Arc<StreamShared>, usize) {
        let agent_id = agent.id;
        let shared = {
            let mut by_path = self.by_path.write().expect("index lock");
            // Paths are shared with the index, so a public project watched by 10,000 agents is
            // stored once.
            let mut seen = HashSet::with_capacity(projects.len());
            let mut interned: Vec<Arc<str>> = Vec::with_capacity(projects.len());
            for p in projects {
                if seen.insert(p.clone()) {
                    interned
                        .push(by_path.get_key_value(p.as_str()).map(|(k, _)| k.clone()).unwrap_or_else(|| p.into()));
                }
            }
            let shared = Arc::new(StreamShared {
                id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
                agent,
                projects: interned,
                pending: Mutex::default(),
                wake: tokio::sync::Notify::new(),
                revoked,
                saved_seq: AtomicI64::new(i64::MIN),
            });
            for path in &shared.projects {
                by_path.entry(path.clone()).or_default().push(shared.clone());
            }
            shared
        };
        self.by_id.lock().expect("streams lock").insert(shared.id, shared.clone());
        let mut agents = self.agents.lock().expect("agents lock");
        *agents.entry(agent_id).or_default() += 1;
        (shared, agents.len())
    }

    /// Removes a stream; returns the number of agents with an open stream.
    pub(super) fn remove(&self, shared: &StreamShared) -> usize {
        {
            let mut by_path = self.by_path.write().expect("index lock");
            for path in &shared.projects {
                if let Some(list) = by_path.get_mut(path) {
                    list.retain(|s| s.id != shared.id);
                    if list.is_empty() {
                        by_path.remove(path);
                    }
                }
            }
        }
        self.by_id.lock().expect("streams lock").remove(&shared.id);
        let mut agents = self.agents.lock().expect("agents lock");
        if let Some(n) = agents.get_mut(&shared.agent.id) {
            *n -= 1;
            if *n == 0 {
                agents.remove(&shared.agent.id);
            }
        }
        agents.len()
    }

    /// Calls `each` with the indexed path and every stream that asked for `path`.
    pub(super) fn for_path(&self, path: &str, mut each: impl FnMut(&Arc<str>, &Arc<StreamShared>)) {
        let by_path = self.by_path.read().expect("index lock");
        if let Some((path, streams)) = by_path.get_key_value(path) {
            for s in streams {
                each(path, s);
            }
        }
    }

    /// Every open stream.
    pub(super) fn streams(&self) -> Vec<Arc<StreamShared>> {
        self.by_id.lock().expect("streams lock").values().cloned().collect()
    }

    /// Whether no stream is open.
    pub(super) fn is_empty(&self) -> bool {
        self.by_id.lock().expect("streams lock").is_empty()
    }
}
