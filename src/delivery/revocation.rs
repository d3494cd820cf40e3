//! Credentials of open streams, re-checked on a timer: a revoked token ends its streams, and a
//! token that cannot be re-checked keeps serving only within the credential grace.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::identity::{AgentDirectory, Rechecked};

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

/// Every credential held by an open stream of this replica.
pub(super) struct Credentials {
    directory: Arc<dyn AgentDirectory>,
    grace: Duration,
    next_id: AtomicU64,
    /// Watched streams: credential and the signal that ends the stream.
    watched: Mutex<HashMap<u64, (i64, Arc<EndSignal>)>>,
    /// When each held credential was last known good (authenticated or re-checked).
    verified_at: Mutex<HashMap<i64, Instant>>,
}

/// Watches one stream's credential until dropped; `revoked` fires when the credential stops
/// working or cannot be verified any more.
pub struct CredentialWatch {
    credentials: Arc<Credentials>,
    id: u64,
    /// Ends when the credential is revoked or cannot be verified any more.
    pub revoked: Arc<EndSignal>,
}

impl Drop for CredentialWatch {
    fn drop(&mut self) {
        self.credentials.watched.lock().expect("watched lock").remove(&self.id);
    }
}

impl Credentials {
    /// Nothing watched yet; `grace` is how long a credential keeps serving unverified.
    pub(super) fn new(directory: Arc<dyn AgentDirectory>, grace: Duration) -> Arc<Self> {
        Arc::new(Self {
            directory,
            grace,
            next_id: AtomicU64::new(1),
            watched: Mutex::default(),
            verified_at: Mutex::default(),
        })
    }

    /// Watches `credential`, which was just authenticated.
    pub(super) fn watch(self: &Arc<Self>, credential: i64) -> CredentialWatch {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let revoked = Arc::<EndSignal>::default();
        self.verified_at.lock().expect("verified lock").insert(credential, Instant::now());
        self.watched.lock().expect("watched lock").insert(id, (credential, revoked.clone()));
        CredentialWatch { credentials: self.clone(), id, revoked }
    }

    /// Re-checks every watched credential every `every` until `stop`.
    pub(super) async fn run(self: Arc<Self>, every: Duration, stop: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.recheck().await,
            }
        }
    }

    async fn recheck(&self) {
        let held: Vec<(i64, Arc<EndSignal>)> = self.watched.lock().expect("watched lock").values().cloned().collect();
        let mut credentials: Vec<i64> = held.iter().map(|(c, _)| *c).collect();
        credentials.sort_unstable();
        credentials.dedup();
        let answer = match self.directory.recheck(&credentials).await {
            Ok(answer) => answer,
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-check agent tokens; streams keep serving within the credential grace");
                Rechecked { valid: Vec::new(), unverified: credentials.clone() }
            }
        };
        let valid: HashSet<i64> = answer.valid.into_iter().collect();
        let unverified: HashSet<i64> = answer.unverified.into_iter().collect();
        let now = Instant::now();
        let expired: HashSet<i64> = {
            let mut verified_at = self.verified_at.lock().expect("verified lock");
            // Forget credentials nobody holds (one that was just authenticated is recent).
            verified_at.retain(|c, at| credentials.binary_search(c).is_ok() || now.duration_since(*at) < self.grace);
            for c in &valid {
                verified_at.insert(*c, now);
            }
            unverified
                .iter()
                .filter(|c| verified_at.get(c).is_none_or(|at| now.duration_since(*at) > self.grace))
                .copied()
                .collect()
        };
        for (credential, end) in held {
            if end.is_ended() {
                continue;
            }
            if expired.contains(&credential) {
                tracing::warn!(
                    credential,
                    grace = ?self.grace,
                    "agent token could not be re-checked within the credential grace; ending its stream (UNAVAILABLE)"
                );
                end.end(StreamEnd::Unverified);
            } else if !valid.contains(&credential) && !unverified.contains(&credential) {
                tracing::info!(credential, "agent token revoked; closing its stream");
                end.end(StreamEnd::Revoked);
            }
        }
    }
}
