//! One open ReconcileProjects stream, seen from delivery: the next project to send, or why the
//! stream ends. Transport-neutral; `grpc/flux.rs` turns it into the wire stream.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::index::StreamShared;
use super::limits::Slot;
use super::revocation::{CredentialWatch, StreamEnd};
use crate::clock::Clock;
use crate::identity::AgentDirectory;
use crate::metrics::Metrics;

/// First wait before asking the directory again about a project it could not answer for; it
/// doubles with every failure in a row, up to `ACCESS_RETRY_MAX`.
const ACCESS_RETRY: Duration = Duration::from_secs(1);
/// Longest wait between access checks of one project.
const ACCESS_RETRY_MAX: Duration = Duration::from_secs(60);

/// What a stream does when it is dropped: unregister and hand over its final position.
pub(super) type OnClose = Box<dyn FnOnce(&Arc<StreamShared>) + Send + Sync>;

/// An open stream's delivery side. Dropping it unregisters the stream and saves its position.
pub struct ReconcileStream {
    shared: Arc<StreamShared>,
    directory: Arc<dyn AgentDirectory>,
    metrics: Arc<Metrics>,
    clock: Clock,
    closing: CancellationToken,
    done: bool,
    /// Unregisters the stream and saves its position; run once, on drop.
    on_close: Option<OnClose>,
    /// Held for the stream's lifetime: its place under the per-agent limit and its credential's
    /// re-check (dropped after `on_close` ran).
    _slot: Slot,
    _credential: CredentialWatch,
}

/// What a stream needs besides its own state.
pub(super) struct StreamParts {
    pub directory: Arc<dyn AgentDirectory>,
    pub metrics: Arc<Metrics>,
    pub clock: Clock,
    pub slot: Slot,
    pub credential: CredentialWatch,
    pub on_close: OnClose,
}

impl ReconcileStream {
    pub(super) fn new(shared: Arc<StreamShared>, parts: StreamParts, closing: CancellationToken) -> Self {
        Self {
            shared,
            directory: parts.directory,
            metrics: parts.metrics,
            clock: parts.clock,
            closing,
            done: false,
            on_close: Some(parts.on_close),
            _slot: parts.slot,
            _credential: parts.credential,
        }
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
                match self.directory.may_notify(&self.shared.agent, &path, entry.world_readable).await {
                    Ok(allowed) => {
                        self.shared.pending.lock().expect("pending lock").settled(&path);
                        if !allowed {
                            continue;
                        }
                        let metrics = &self.metrics;
                        metrics.notifications_sent.inc();
                        let waited_ms = (self.clock.now_ms() - entry.received_at).max(0);
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
                        self.metrics.access_check_failures.inc();
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
        if let Some(close) = self.on_close.take() {
            close(&self.shared);
        }
    }
}
