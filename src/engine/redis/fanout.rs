//! Fan-out: publish recorded events' sequence numbers, subscribe to every replica's, and catch
//! up from the event log after any gap in the subscription.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};

use super::{OP_TIMEOUT, RedisEngine};
use crate::domain::EventNotice;
use crate::engine::{Broadcast, EngineContext, EngineError};
use crate::store::{LogReplay, replay_log};

/// How often the subscription is checked with a PING.
pub(super) const SUBSCRIPTION_PING: Duration = Duration::from_secs(2);
/// Catch-up reaches this far before the moment the subscription was found lost.
const CATCH_UP_OVERLAP_MS: i64 = 30_000;
/// Events read from the log per catch-up query.
const CATCH_UP_PAGE: i64 = 5000;
/// Messages waiting on the channel are gathered into one lookup until it holds this many
/// sequence numbers (a message is never split or cut: the lookup reads in chunks).
const MAX_SEQS_PER_LOOKUP: usize = 5000;
/// A message larger than this is not one a replica published (a batch of a few thousand numbers
/// is tens of KiB); it is ignored before it is parsed.
const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// What travels on the channel: which events were recorded, nothing about them. Receivers
/// read the events from the database, so a forged message can make a replica look up numbers,
/// never deliver what the log does not hold or decide who may see it.
#[derive(Serialize, Deserialize)]
struct Envelope {
    /// Publishing replica instance (unique per process, even when two replicas share a name).
    r: String,
    /// Sequence numbers of the recorded events.
    #[serde(default)]
    s: Vec<i64>,
}

impl RedisEngine {
    /// The sequence numbers a message announces, unless this replica published it.
    pub(super) fn announced(&self, payload: &[u8], into: &mut Vec<i64>) {
        if payload.len() > MAX_MESSAGE_BYTES {
            tracing::warn!(bytes = payload.len(), "ignoring an oversized message on the events channel");
            self.metrics.engine_forgeries.inc();
            return;
        }
        let envelope: Envelope = match serde_json::from_slice(payload) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a malformed message on the events channel");
                return;
            }
        };
        if envelope.r == self.replica {
            return; // delivered locally when it was recorded
        }
        into.extend(envelope.s.into_iter().filter(|s| *s > 0));
    }

    /// Reads the announced events from the log and hands them to local delivery. A number the
    /// log does not hold is dropped here: the database, not the message, says what happened.
    /// False when the database could not be read: the caller treats that as a gap to catch up.
    pub(super) async fn deliver_announced(&self, ctx: &EngineContext, mut seqs: Vec<i64>) -> bool {
        seqs.sort_unstable();
        seqs.dedup();
        if seqs.is_empty() {
            return true;
        }
        let mut backoff = Duration::from_millis(50);
        let notices = loop {
            match ctx.log.pushes_by_seq(&seqs).await {
                Ok(n) => break n,
                // The event is in the log (it was published after its commit); a database hiccup
                // delays it, and the catch-up after any gap would find it too.
                Err(e) if backoff < Duration::from_secs(2) && !ctx.shutdown.is_cancelled() => {
                    tracing::debug!(error = %e, "cannot read announced events yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = seqs.len(), "cannot read announced events from the log; will catch up");
                    self.metrics.engine_errors.inc();
                    return false;
                }
            }
        };
        if notices.len() < seqs.len() {
            ctx.metrics.events_unknown_announced.inc_by((seqs.len() - notices.len()) as u64);
        }
        ctx.metrics.events_received_remote.inc_by(notices.len() as u64);
        ctx.local.deliver(&notices);
        true
    }

    /// Delivers what was recorded since `since` (less an overlap) from the event log; false when
    /// the log could not be read (the gap stays open).
    pub(super) async fn catch_up(&self, ctx: &EngineContext, since: i64) -> bool {
        let query = LogReplay {
            after_seq: i64::MAX,
            overlap_from: since - CATCH_UP_OVERLAP_MS,
            not_before: self.clock.now_ms() - ctx.replay_window.as_millis() as i64,
            projects: &[],
            page: CATCH_UP_PAGE,
        };
        let total = match replay_log(&*ctx.log, query, |page| ctx.local.deliver(page)).await {
            Ok(total) => total,
            Err(e) => {
                tracing::warn!(error = %e, "cannot catch up from the event log; will try again");
                return false;
            }
        };
        tracing::info!(events = total, "caught up from the event log after a gap in the Redis subscription");
        true
    }

    pub(super) async fn subscribe_loop(self: Arc<Self>, ctx: EngineContext) {
        let mut gap_since: Option<i64> = None;
        let mut backoff = Duration::from_millis(100);
        let mut warned = false;
        while !ctx.shutdown.is_cancelled() {
            let subscribed = async {
                let pubsub =
                    tokio::time::timeout(OP_TIMEOUT, self.target.pubsub()).await.map_err(|_| "timed out".to_owned())?;
                let (mut sink, stream) = pubsub.map_err(|e| e.to_string())?.split();
                tokio::time::timeout(OP_TIMEOUT, sink.subscribe(&self.keys.channel))
                    .await
                    .map_err(|_| "timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((sink, stream))
            }
            .await;
            let (mut sink, mut stream) = match subscribed {
                Ok(pair) => pair,
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "cannot subscribe to Redis; local agents keep being served, retrying");
                        warned = true;
                    }
                    self.metrics.engine_errors.inc();
                    gap_since.get_or_insert_with(|| self.clock.now_ms());
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            self.subscribed.store(true, Ordering::Release);
            backoff = Duration::from_millis(100);
            warned = false;
            tracing::info!(channel = %self.keys.channel, "subscribed to the Redis events channel");
            if let Some(since) = gap_since {
                if !self.catch_up(&ctx, since).await {
                    // Subscribed but behind: try again shortly, keeping the gap's start.
                    self.subscribed.store(false, Ordering::Release);
                    tokio::select! {
                        _ = ctx.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    continue;
                }
                gap_since = None;
            }
            let mut ping = tokio::time::interval(SUBSCRIPTION_PING);
            loop {
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    message = stream.next() => match message {
                        Some(m) => {
                            // Everything already waiting goes into one database lookup.
                            let received = self.clock.now_ms();
                            let mut seqs = Vec::new();
                            self.announced(m.get_payload_bytes(), &mut seqs);
                            let mut ended = false;
                            while seqs.len() < MAX_SEQS_PER_LOOKUP {
                                match stream.next().now_or_never() {
                                    Some(Some(m)) => self.announced(m.get_payload_bytes(), &mut seqs),
                                    Some(None) => { ended = true; break; }
                                    None => break,
                                }
                            }
                            if !self.deliver_announced(&ctx, seqs).await {
                                // Announced but unread: the catch-up from the log covers it.
                                gap_since = Some(received);
                                break;
                            }
                            if ended {
                                break;
                            }
                        }
                        None => break,
                    },
                    _ = ping.tick() => {
                        let alive = tokio::time::timeout(OP_TIMEOUT, sink.ping::<redis::Value>()).await;
                        if !matches!(alive, Ok(Ok(_))) {
                            break;
                        }
                    }
                }
            }
            self.subscribed.store(false, Ordering::Release);
            let lost_at = self.clock.now_ms();
            gap_since = Some(gap_since.map_or(lost_at, |g| g.min(lost_at)));
            self.metrics.engine_errors.inc();
            tracing::warn!("lost the Redis subscription; will catch up from the event log once it is back");
        }
    }

    pub(super) fn publishable(&self, notices: &[EventNotice]) -> Vec<u8> {
        let envelope = Envelope { r: self.replica.clone(), s: notices.iter().map(|n| n.seq).collect() };
        serde_json::to_vec(&envelope).expect("serializable")
    }
}

#[async_trait]
impl Broadcast for RedisEngine {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn start(self: Arc<Self>, ctx: EngineContext) {
        let heartbeat_ctx = EngineContext {
            local: ctx.local.clone(),
            log: ctx.log.clone(),
            metrics: ctx.metrics.clone(),
            replay_window: ctx.replay_window,
            shutdown: ctx.shutdown.clone(),
            tasks: ctx.tasks.clone(),
        };
        let tasks = ctx.tasks.clone();
        if let Some(sink) = self.direct.get().cloned() {
            tasks.spawn(self.clone().direct_loop(sink, ctx.shutdown.clone()));
        }
        tasks.spawn(self.clone().subscribe_loop(ctx));
        tasks.spawn(self.heartbeat_loop(heartbeat_ctx));
    }

    async fn broadcast(&self, notices: &[EventNotice]) -> Result<(), EngineError> {
        if notices.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH").arg(&self.keys.channel).arg(self.publishable(notices)).ignore();
        self.run::<()>(&pipe).await
    }

    async fn ping(&self) -> Result<(), EngineError> {
        let mut pipe = redis::pipe();
        pipe.cmd("PING");
        let _: (String,) = self.run(&pipe).await?;
        if !self.subscribed.load(Ordering::Acquire) {
            return Err(EngineError::Unavailable("not subscribed to the events channel".into()));
        }
        Ok(())
    }
}
