//! The bounded queue between the watcher and GitLab: one task posts queued statuses in order,
//! skips what the status log says was posted (by any replica, before any restart), retries
//! what may pass with backoff until a deadline, and records what GitLab took. A full queue
//! refuses at once (the watcher offers the change again on its next look), so neither a slow
//! GitLab nor a burst of Flux changes ever holds up anything else.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::Clock;
use crate::domain::AgentId;
use crate::gitlab::statuses::{CommitStatus, Posted, StatusClient, StatusError};
use crate::metrics::Metrics;
use crate::store::{PostedStatus, StatusLog};

/// Statuses waiting for GitLab at once.
pub const QUEUE: usize = 1000;
/// First wait after a failure that may pass; doubled up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between two tries.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long one status is tried before it is dropped (counted; a later change posts anew).
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);

/// One status to post for `agent`'s cluster.
#[derive(Debug, Clone)]
pub struct Job {
    /// The agent whose cluster reported it.
    pub agent: AgentId,
    /// The status.
    pub status: CommitStatus,
}

/// The sending side of the queue.
#[derive(Clone)]
pub struct Poster {
    tx: mpsc::Sender<Job>,
}

impl Poster {
    /// Starts the posting task on `tasks`; it ends with `stop`.
    pub fn start(
        client: Arc<StatusClient>,
        log: Arc<dyn StatusLog>,
        metrics: Arc<Metrics>,
        clock: Clock,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Self {
        let (tx, mut rx) = mpsc::channel::<Job>(QUEUE);
        tasks.spawn(async move {
            loop {
                let job = tokio::select! {
                    _ = stop.cancelled() => return,
                    job = rx.recv() => match job { Some(j) => j, None => return },
                };
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = post_one(&client, &*log, &metrics, &clock, job) => {}
                }
            }
        });
        Self { tx }
    }

    /// Queues a status; false (counted as dropped) when the queue is full.
    pub fn offer(&self, job: Job, metrics: &Metrics) -> bool {
        match self.tx.try_send(job) {
            Ok(()) => true,
            Err(_) => {
                metrics.sync_status("dropped");
                false
            }
        }
    }
}

async fn post_one(client: &StatusClient, log: &dyn StatusLog, metrics: &Metrics, clock: &Clock, job: Job) {
    let s = &job.status;
    match log.status_posted(&s.project, &s.sha, &s.name, &s.state).await {
        Ok(true) => {
            metrics.sync_status("duplicate");
            return;
        }
        Ok(false) => {}
        // Posting twice is the lesser harm: GitLab refuses a repeated transition.
        Err(e) => tracing::warn!(error = %e, "cannot read the commit status log; posting anyway"),
    }
    let started = tokio::time::Instant::now();
    let mut backoff = FIRST_BACKOFF;
    loop {
        match client.post(s).await {
            Ok(posted) => {
                let result = match posted {
                    Posted::Created => "posted",
                    Posted::AlreadyReported => "already_reported",
                };
                metrics.sync_status(result);
                tracing::info!(agent = job.agent, project = %s.project, sha = %s.sha, name = %s.name, state = %s.state, result, "commit status");
                let record = PostedStatus {
                    project: s.project.clone(),
                    sha: s.sha.clone(),
                    name: s.name.clone(),
                    state: s.state.clone(),
                    agent: job.agent,
                    posted_at: clock.now_ms(),
                };
                match log.record_status(&record).await {
                    Ok(true) if posted == Posted::Created && s.state == "success" => {
                        observe_push_to_synced(log, metrics, clock, s).await
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot record a commit status; it may be posted again"),
                }
                return;
            }
            Err(StatusError::Refused { status, message }) => {
                metrics.sync_status("refused");
                tracing::warn!(agent = job.agent, project = %s.project, sha = %s.sha, name = %s.name, status, %message, "GitLab refused a commit status (does the token have the api scope and access to the project?)");
                return;
            }
            Err(StatusError::Retry(e)) => {
                if started.elapsed() >= GIVE_UP_AFTER {
                    metrics.sync_status("dropped");
                    tracing::warn!(project = %s.project, sha = %s.sha, name = %s.name, error = %e, "commit status dropped: GitLab did not take it in time");
                    return;
                }
                tracing::info!(project = %s.project, error = %e, wait_ms = backoff.as_millis() as u64, "commit status not posted yet; trying again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// push → synced: from the first push kas recorded of this commit to Flux's Ready for it.
async fn observe_push_to_synced(log: &dyn StatusLog, metrics: &Metrics, clock: &Clock, s: &CommitStatus) {
    match log.push_received(&s.project, &s.sha).await {
        Ok(Some(at)) => {
            let seconds = (clock.now_ms() - at).max(0) as f64 / 1000.0;
            metrics.push_to_synced_seconds.observe(seconds);
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "cannot read the push of a synced commit"),
    }
}
