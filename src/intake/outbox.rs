//! The outbox: every recorded event is delivered to this replica's streams and broadcast to
//! the other replicas, and marked published only once the broadcast succeeded. Whatever the
//! fast path could not finish (engine down, queue full, replica crashed) stays unpublished in
//! the log, and the sweeper, on any replica, claims it with a lease and tries again until it
//! succeeds. Old events are pruned after the retention period.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::domain::EventNotice;
use crate::engine::{Broadcast, LocalDelivery};
use crate::metrics::Metrics;
use crate::store::EventLog;

/// Batches waiting for the publisher; beyond this, events wait in the log for the sweeper.
const QUEUE: usize = 4096;
/// How often the sweeper looks for unpublished events.
const SWEEP_EVERY: Duration = Duration::from_millis(1000);
/// Events younger than this belong to the fast path; the sweeper leaves them alone.
const SWEEP_AFTER_MS: i64 = 5_000;
/// How long a sweeper's claim keeps other sweepers away.
const LEASE_MS: i64 = 15_000;
/// Events claimed per sweep.
const SWEEP_BATCH: i64 = 1000;
/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Rows deleted per statement, so pruning never holds long locks.
const PRUNE_BATCH: i64 = 10_000;

/// Publishes recorded events; see the module documentation.
pub struct Outbox {
    queue: mpsc::Sender<Vec<EventNotice>>,
    metrics: Arc<Metrics>,
}

/// The outbox's background tasks and how to stop them.
pub struct OutboxTasks {
    stop: CancellationToken,
    tracker: TaskTracker,
}

struct Shared {
    log: Arc<dyn EventLog>,
    engine: Arc<dyn Broadcast>,
    local: Arc<dyn LocalDelivery>,
    metrics: Arc<Metrics>,
    clock: Clock,
}

impl Outbox {
    /// Starts the publisher, the sweeper and retention.
    pub fn start(
        log: Arc<dyn EventLog>,
        engine: Arc<dyn Broadcast>,
        local: Arc<dyn LocalDelivery>,
        metrics: Arc<Metrics>,
        retention: Duration,
        clock: Clock,
    ) -> (Arc<Self>, OutboxTasks) {
        let (queue, rx) = mpsc::channel(QUEUE);
        let shared = Arc::new(Shared { log, engine, local, metrics: metrics.clone(), clock });
        let stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        tracker.spawn(publish_queued(rx, shared.clone()));
        tracker.spawn(sweep(shared.clone(), stop.clone()));
        tracker.spawn(prune(shared, retention, stop.clone()));
        tracker.close();
        (Arc::new(Self { queue, metrics }), OutboxTasks { stop, tracker })
    }

    /// Queues freshly recorded events. Never waits: when the queue is full the events stay
    /// unpublished in the log and the sweeper publishes them.
    pub fn publish(&self, notices: Vec<EventNotice>) {
        if notices.is_empty() {
            return;
        }
        if self.queue.try_send(notices).is_err() {
            self.metrics.publish_failures.inc();
            tracing::warn!("outbox queue full; the sweeper will publish from the event log");
        }
    }
}

impl OutboxTasks {
    /// Publishes what is queued (the caller has stopped recording), then stops every task.
    pub async fn shutdown(self, outbox: Arc<Outbox>) {
        drop(outbox);
        self.stop.cancel();
        self.tracker.wait().await;
    }
}

async fn publish_queued(mut rx: mpsc::Receiver<Vec<EventNotice>>, shared: Arc<Shared>) {
    while let Some(mut batch) = rx.recv().await {
        while batch.len() < SWEEP_BATCH as usize {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        shared.publish(batch, false).await;
    }
}

async fn sweep(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        loop {
            let now = shared.clock.now_ms();
            let claimed = match shared.log.claim_unpublished(now - SWEEP_AFTER_MS, now, LEASE_MS, SWEEP_BATCH).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "outbox sweep cannot read the event log");
                    break;
                }
            };
            let full = claimed.len() as i64 == SWEEP_BATCH;
            if claimed.is_empty() {
                break;
            }
            tracing::info!(events = claimed.len(), "outbox publishing events left unpublished");
            if !shared.publish(claimed, true).await || !full || stop.is_cancelled() {
                break;
            }
        }
    }
}

impl Shared {
    /// Delivers locally (local delivery ignores events it already has), broadcasts, marks
    /// published; returns whether the broadcast succeeded.
    async fn publish(&self, batch: Vec<EventNotice>, from_sweep: bool) -> bool {
        self.local.deliver(&batch);
        match self.engine.broadcast(&batch).await {
            Ok(()) => {
                let seqs: Vec<i64> = batch.iter().map(|n| n.seq).collect();
                self.metrics.events_published.inc_by(seqs.len() as u64);
                if let Err(e) = self.log.mark_published(&seqs, self.clock.now_ms()).await {
                    // Harmless: the sweeper will publish them again (at least once).
                    tracing::warn!(error = %e, "cannot mark events published");
                }
                true
            }
            Err(e) => {
                self.metrics.publish_failures.inc();
                tracing::warn!(error = %e, events = batch.len(), from_sweep, engine = self.engine.name(),
                    "cannot publish to other replicas yet; the outbox retries from the event log");
                false
            }
        }
    }
}

async fn prune(shared: Arc<Shared>, retention: Duration, stop: CancellationToken) {
    loop {
        let before = shared.clock.now_ms() - retention.as_millis() as i64;
        loop {
            match shared.log.prune_pushes(before, PRUNE_BATCH).await {
                Ok(n) => {
                    shared.metrics.events_pruned.inc_by(n);
                    if n > 0 {
                        tracing::info!(events = n, "pruned events past retention");
                    }
                    if n < PRUNE_BATCH as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prune the event log");
                    break;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
        }
    }
}
