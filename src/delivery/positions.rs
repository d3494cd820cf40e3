//! Delivery positions: how far each agent's notifications got, in the engine (read by every
//! replica) and in the database (which outlives a crash of this replica or a flushed Redis).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use super::index::StreamShared;
use crate::clock::Clock;
use crate::domain::{AgentId, DeliveryPosition};
use crate::engine::PositionCache;
use crate::store::PositionStore;

/// Positions of this replica's agents.
pub(super) struct Positions {
    /// Highest sequence number handed to the index so far.
    max_seq: AtomicI64,
    cache: Arc<dyn PositionCache>,
    durable: Arc<dyn PositionStore>,
    clock: Clock,
}

impl Positions {
    pub(super) fn new(cache: Arc<dyn PositionCache>, durable: Arc<dyn PositionStore>, clock: Clock) -> Self {
        Self { max_seq: AtomicI64::new(0), cache, durable, clock }
    }

    /// Event `seq` was handed to the index (call after queueing it: see `position_of`).
    pub(super) fn observe(&self, seq: i64) {
        self.max_seq.fetch_max(seq, Ordering::AcqRel);
    }

    /// Where `shared`'s notifications got: everything up to the returned sequence number has
    /// been sent or did not concern it.
    pub(super) fn position_of(&self, shared: &StreamShared) -> DeliveryPosition {
        // Read the high-water mark before looking at the pending set: an event counted in it
        // was queued before the mark moved, so it is either pending or sent.
        let high = self.max_seq.load(Ordering::Acquire);
        let pending_min = shared.pending.lock().expect("pending lock").min_seq();
        let seq = match pending_min {
            Some(min) => (min - 1).min(high),
            None => high,
        };
        DeliveryPosition { seq, at: self.clock.now_ms() }
    }

    /// Saves one agent's position in the engine, and in the database when `durable`.
    pub(super) async fn save(&self, agent: AgentId, position: DeliveryPosition, durable: bool) {
        if let Err(e) = self.cache.save_position(agent, position).await {
            tracing::debug!(error = %e, agent, "cannot save delivery position in the engine");
        }
        // The database copy outlives the engine (a restarted single replica, a flushed Redis).
        if durable && let Err(e) = self.durable.save_position(agent, position).await {
            tracing::warn!(error = %e, agent, "cannot save delivery position");
        }
    }

    /// Saves the position of every agent with an open stream that moved since the last save,
    /// in the engine (for other replicas) and in the database (for a crash of this one).
    pub(super) async fn save_open(&self, streams: &[Arc<StreamShared>]) {
        // One position per agent: the least advanced of its streams.
        let mut per_agent: HashMap<AgentId, (DeliveryPosition, Vec<&Arc<StreamShared>>)> = HashMap::new();
        for s in streams {
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
            self.save(agent, position, false).await;
            moved.push((agent, position, owners));
        }
        if moved.is_empty() {
            return;
        }
        let mut rows: Vec<(AgentId, DeliveryPosition)> = moved.iter().map(|(a, p, _)| (*a, *p)).collect();
        // In agent order: replicas saving overlapping agents lock rows in one order (no deadlock).
        rows.sort_unstable_by_key(|(a, _)| *a);
        match self.durable.save_positions(&rows).await {
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

    /// Saves the final positions of closed streams, in the engine and the database.
    pub(super) async fn save_closed(&self, closed: &[(AgentId, DeliveryPosition)]) {
        // One row per agent, the least advanced, so a batch never skips what one stream missed.
        let mut per_agent: HashMap<AgentId, DeliveryPosition> = HashMap::new();
        for (agent, p) in closed {
            let entry = per_agent.entry(*agent).or_insert(*p);
            if p.seq < entry.seq {
                *entry = *p;
            }
        }
        let mut rows: Vec<(AgentId, DeliveryPosition)> = per_agent.into_iter().collect();
        rows.sort_unstable_by_key(|(a, _)| *a);
        for (agent, position) in &rows {
            if let Err(e) = self.cache.save_position(*agent, *position).await {
                tracing::debug!(error = %e, agent, "cannot save delivery position in the engine");
            }
        }
        if let Err(e) = self.durable.save_positions(&rows).await {
            tracing::warn!(error = %e, agents = rows.len(), "cannot save delivery positions of closed streams");
        }
    }

    /// An agent's saved position: the engine's, else the database's.
    pub(super) async fn load(&self, agent: AgentId) -> Option<DeliveryPosition> {
        match self.cache.load_position(agent).await {
            Ok(Some(p)) => return Some(p),
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(error = %e, agent, "engine has no position; reading the database")
            }
        }
        self.durable.load_position(agent).await.ok().flatten()
    }
}
