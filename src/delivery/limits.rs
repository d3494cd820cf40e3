//! How many long streams (ReconcileProjects, configuration, tunnel) one agent may hold open on
//! this replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::domain::AgentId;

/// One agent already holds as many long streams on this replica as it may.
#[derive(Debug, thiserror::Error)]
#[error("agent {agent} already has {limit} streams open on this replica")]
pub struct TooManyStreams {
    /// The agent.
    pub agent: AgentId,
    /// The limit it reached.
    pub limit: usize,
}

/// Long streams held per agent, against one limit.
pub(super) struct StreamLimit {
    limit: usize,
    held: Mutex<HashMap<AgentId, usize>>,
}

/// One admitted stream; dropping it gives the agent's slot back.
pub(super) struct Slot {
    limit: Arc<StreamLimit>,
    agent: AgentId,
}

impl StreamLimit {
    /// At most `limit` streams per agent.
    pub(super) fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self { limit, held: Mutex::default() })
    }

    /// Counts one more stream for `agent`, unless it holds as many as it may.
    pub(super) fn admit(self: &Arc<Self>, agent: AgentId) -> Result<Slot, TooManyStreams> {
        let mut held = self.held.lock().expect("held lock");
        let n = held.entry(agent).or_default();
        if *n >= self.limit {
            return Err(TooManyStreams { agent, limit: self.limit });
        }
        *n += 1;
        Ok(Slot { limit: self.clone(), agent })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = self.limit.held.lock().expect("held lock");
        if let Some(n) = held.get_mut(&self.agent) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.agent);
            }
        }
    }
}
