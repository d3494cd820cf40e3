//! The one path behind both doors: validate → record in the event log (batched, de-duplicated)
//! → acknowledge → hand to the outbox for publication.
//!
//! Concurrent pushes are written together: each writer takes whatever is queued (up to
//! `MAX_BATCH`) and records it in one transaction, so throughput grows with load instead of
//! paying one commit per push. A push is acknowledged only once its transaction committed.

pub mod outbox;
pub mod registry;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::domain::{EventSource, NewEvent, RecordOutcome};
use crate::domain::{ImageRef, PushEvent};
use crate::metrics::Metrics;
use crate::store::EventLog;

pub use outbox::Outbox;

/// Most pushes written in one transaction.
const MAX_BATCH: usize = 512;
/// Pushes waiting for a writer before callers are made to wait.
const QUEUE: usize = 16_384;
/// Longest a caller waits for its push to be recorded; GitLab gives up after 10 s.
const RECORD_TIMEOUT: Duration = Duration::from_secs(8);
/// Longest accepted idempotency key.
const MAX_KEY_LEN: usize = 256;

/// Why a push was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The event log could not be written; the sender should retry.
    #[error("event log unavailable: {0}")]
    Unavailable(#[source] Arc<crate::store::StoreError>),
    /// Recording took longer than the caller can wait; a retry is de-duplicated.
    #[error("recording timed out")]
    Timeout,
    /// The server is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// The idempotency key is unusable.
    #[error("idempotency key longer than {MAX_KEY_LEN} bytes")]
    KeyTooLong,
}

struct Job {
    push: NewEvent,
    reply: oneshot::Sender<Result<RecordOutcome, IntakeError>>,
}

/// Records pushes; cheap to share.
pub struct Intake {
    jobs: mpsc::Sender<Job>,
    metrics: Arc<Metrics>,
    closed: CancellationToken,
    writers: TaskTracker,
    /// Stamps each push's receipt time.
    clock: Clock,
}

impl Intake {
    /// Starts `writers` writer tasks into the event log, handing recorded events to `outbox`.
    pub fn start(
        log: Arc<dyn EventLog>,
        outbox: Arc<Outbox>,
        metrics: Arc<Metrics>,
        writers: usize,
        clock: Clock,
    ) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let closed = CancellationToken::new();
        let tracker = TaskTracker::new();
        for _ in 0..writers.max(1) {
            tracker.spawn(write_batches(rx.clone(), log.clone(), outbox.clone(), metrics.clone(), closed.clone()));
        }
        tracker.close();
        Self { jobs, metrics, closed, writers: tracker, clock }
    }

    /// Records a push; `key` de-duplicates redeliveries (a random one is used when absent).
    pub async fn record(
        &self,
        event: PushEvent,
        key: Option<&str>,
        source: EventSource,
    ) -> Result<RecordOutcome, IntakeError> {
        self.submit(event, None, key, source).await
    }

    /// Records an image push, already mapped to its project (`event`, kind `ImagePush`); the
    /// registry's event id de-duplicates its retries.
    pub async fn record_image(
        &self,
        event: PushEvent,
        image: ImageRef,
        event_id: &str,
    ) -> Result<RecordOutcome, IntakeError> {
        self.submit(event, Some(image), Some(event_id), EventSource::Registry).await
    }

    async fn submit(
        &self,
        event: PushEvent,
        image: Option<ImageRef>,
        key: Option<&str>,
        source: EventSource,
    ) -> Result<RecordOutcome, IntakeError> {
        let started = std::time::Instant::now();
        let idempotency_key = match key {
            Some(k) if k.len() > MAX_KEY_LEN => return Err(IntakeError::KeyTooLong),
            Some(k) if !k.is_empty() => format!("{}:{k}", source.as_str()),
            _ => random_key(),
        };
        if self.closed.is_cancelled() {
            return Err(IntakeError::ShuttingDown);
        }
        let (reply, answer) = oneshot::channel();
        let push = NewEvent { event, image, idempotency_key, source, received_at: self.clock.now_ms() };
        let result = tokio::time::timeout(RECORD_TIMEOUT, async {
            self.jobs.send(Job { push, reply }).await.map_err(|_| IntakeError::ShuttingDown)?;
            answer.await.map_err(|_| IntakeError::ShuttingDown)?
        })
        .await
        .unwrap_or(Err(IntakeError::Timeout));
        self.metrics.intake_seconds.observe(started.elapsed().as_secs_f64());
        result
    }

    /// Stops taking pushes, records what is queued, and waits for the writers to finish.
    pub async fn close(&self) {
        self.closed.cancel();
        self.writers.wait().await;
    }
}

async fn write_batches(
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    log: Arc<dyn EventLog>,
    outbox: Arc<Outbox>,
    metrics: Arc<Metrics>,
    closed: CancellationToken,
) {
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let first = tokio::select! {
                biased;
                job = rx.recv() => job,
                // Closing: take what is still queued, then stop.
                _ = closed.cancelled() => rx.try_recv().ok(),
            };
            let Some(first) = first else { break };
            let mut batch = Vec::with_capacity(16);
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            batch
        };
        let (pushes, replies): (Vec<NewEvent>, Vec<_>) = batch.into_iter().map(|j| (j.push, j.reply)).unzip();
        match log.record_pushes(&pushes).await {
            Ok(outcomes) => {
                let mut recorded = Vec::with_capacity(outcomes.len());
                for (outcome, reply) in outcomes.into_iter().zip(replies) {
                    match &outcome {
                        RecordOutcome::Recorded(notice) => {
                            metrics.events_recorded.inc();
                            recorded.push(notice.clone());
                        }
                        RecordOutcome::Duplicate => {
                            metrics.events_duplicate.inc();
                        }
                    }
                    let _ = reply.send(Ok(outcome));
                }
                outbox.publish(recorded);
            }
            Err(e) => {
                tracing::error!(error = %e, pushes = pushes.len(), "cannot record pushes; senders will retry");
                let reason = Arc::new(e);
                for reply in replies {
                    let _ = reply.send(Err(IntakeError::Unavailable(reason.clone())));
                }
            }
        }
    }
}

fn random_key() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    format!("kas:{}", crate::hex::encode(&b))
}
