//! One open ReconcileProjects stream, seen from delivery: the next project to send, or why the
//! stream ends. Transport-neutral; `grpc/flux.rs` turns it into the wire stream.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::hub::{Hub, StreamShared};
use crate::clock::now_ms;

/// First wait before asking the directory again about a project it could not answer for; it
/// doubles with every failure in a row, up to `ACCESS_RETRY_MAX`.
const ACCESS_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between access checks of one project.
const ACCESS_RETRY_MAX: Duration = Duration::from_secs(60);

/// Why a stream ends with an error (a clean end is `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The agent's credential stopped working while the stream was open.
    Revoked,
    /// The credential could not be re-checked for longer than the credential grace: the agent
    /// reconnects and is judged on fresh facts.
    Unverified,
}

/// Ends a stream from outside (the credential re-check), saying why; the first reason wins.
#[derive(Debug, Default)]
pub struct EndSignal {
    token: CancellationToken,
    reason: std::sync::OnceLock<StreamEnd>,
}

impl EndSignal {
    /// Ends the stream for `why`, unless it was ended already.
    pub fn end(&self, why: StreamEnd) {
        let _ = self.reason.set(why);
        self.token.cancel();
    }

    /// Whether it was ended.
    pub fn is_ended(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when the stream is ended, with the reason.
    pub async fn ended(&self) -> StreamEnd {
        self.token.cancelled().await;
        self.reason.get().copied().unwrap_or(StreamEnd::Revoked)
    }
}

/// An open stream's delivery side. Dropping it unregisters the stream and saves its position.
pub struct ReconcileStream {
    hub: Arc<Hub>,
    shared: Arc<StreamShared>,
    closing: CancellationToken,
    done: bool,
}

impl ReconcileStream {
    pub(super) fn new(hub: Arc<Hub>, shared: Arc<StreamShared>, closing: CancellationToken) -> Self {
        Self { hub, shared, closing, done: false }
    }

    /// The agent this stream serves.
    pub fn agent(&self) -> &crate::identity::AgentIdentity {
        &self.shared.agent
    }

    /// Waits for the next project to send. `None` ends the stream cleanly (shutdown or the
    /// connection's maximum age); `Some(Err)` ends it with an error.
    pub async fn next(&mut self) -> Option<Result<Arc<str>, StreamEnd>> {
        if self.done {
            return None;
        }
        loop {
            if self.shared.revoked.is_ended() {
                self.done = true;
                return Some(Err(self.shared.revoked.ended().await));
            }
            let (popped, next_retry) = {
                let mut pending = self.shared.pending.lock().expect("pending lock");
                let next_retry = pending.release_due(tokio::time::Instant::now());
                (pending.take(), next_retry)
            };
            if let Some((path, entry)) = popped {
                // The access rule, applied before every send.
                match self.hub.directory.may_notify(&self.shared.agent, &path, entry.world_readable).await {
                    Ok(allowed) => {
                        self.shared.pending.lock().expect("pending lock").settled(&path);
                        if !allowed {
                            continue;
                        }
                        let metrics = &self.hub.metrics;
                        metrics.notifications_sent.inc();
                        let waited_ms = (now_ms() - entry.received_at).max(0);
                        metrics.intake_to_send_seconds.observe(waited_ms as f64 / 1000.0);
                        return Some(Ok(path));
                    }
                    Err(e) => {
                        // Fail closed, and retry this project later rather than drop it; the
                        // others go on meanwhile, and the deferred entry holds the delivery
                        // position back so nothing is skipped.
                        let mut pending = self.shared.pending.lock().expect("pending lock");
                        let failures = pending.failures(&path);
                        let wait = ACCESS_RETRY.saturating_mul(1 << failures.min(6)).min(ACCESS_RETRY_MAX);
                        pending.defer(path.clone(), entry, tokio::time::Instant::now() + wait);
                        drop(pending);
                        self.hub.metrics.access_check_failures.inc();
                        tracing::warn!(error = %e, agent = self.shared.agent.id, project = %path, retry_in = ?wait, "cannot check access; will retry");
                        continue;
                    }
                }
            }
            let retry = async {
                match next_retry {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = self.shared.revoked.ended() => continue,
                _ = self.closing.cancelled() => {
                    self.done = true;
                    return None;
                }
                _ = self.shared.wake.notified() => {}
                _ = retry => {}
            }
        }
    }
}

impl Drop for ReconcileStream {
    fn drop(&mut self) {
        self.hub.close(&self.shared);
    }
}
