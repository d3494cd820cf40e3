//! Direct messages between replicas: a signed, dated envelope on the recipient's own channel.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::fanout::SUBSCRIPTION_PING;
use super::{OP_TIMEOUT, RedisEngine, sign, verify};
use crate::engine::{DirectMessages, EngineError, MAX_DIRECT_MESSAGE};

/// A message from one replica to another: signed, so whoever can publish to Redis cannot make a
/// replica act (a relayed call reaches a cluster), and dated, so an old one cannot be replayed
/// after a minute.
#[derive(Serialize, Deserialize)]
struct DirectEnvelope {
    /// Recipient instance.
    t: String,
    /// Unix milliseconds when sent.
    a: i64,
    /// The body.
    b: String,
    /// HMAC of the above.
    m: String,
}

/// How old a direct message may be when it arrives.
const DIRECT_MAX_AGE_MS: i64 = 60_000;

#[async_trait]
impl DirectMessages for RedisEngine {
    async fn send_direct(&self, to: &str, body: String) -> Result<(), EngineError> {
        let at = self.clock.now_ms();
        let m = sign(self.key.expose(), &["direct", to, &at.to_string(), &body]);
        let envelope = DirectEnvelope { t: to.to_owned(), a: at, b: body, m };
        let payload = serde_json::to_vec(&envelope).expect("serializable");
        if payload.len() > MAX_DIRECT_MESSAGE {
            return Err(EngineError::Unavailable(format!("direct message of {} bytes is too large", payload.len())));
        }
        let mut pipe = redis::pipe();
        pipe.cmd("PUBLISH").arg(self.keys.direct(to)).arg(payload);
        let (receivers,): (i64,) = self.run(&pipe).await?;
        if receivers == 0 {
            return Err(EngineError::Unavailable(format!("replica {to} is not listening")));
        }
        Ok(())
    }

    fn on_direct(&self, sink: tokio::sync::mpsc::Sender<String>) {
        let _ = self.direct.set(sink);
    }
}

impl RedisEngine {
    /// The body of a direct message addressed to this replica, if kas signed it within the last
    /// minute.
    fn direct_body(&self, payload: &[u8]) -> Option<String> {
        if payload.len() > MAX_DIRECT_MESSAGE {
            self.metrics.engine_forgeries.inc();
            return None;
        }
        let e: DirectEnvelope = serde_json::from_slice(payload).ok()?;
        let fresh = (self.clock.now_ms() - e.a).abs() <= DIRECT_MAX_AGE_MS;
        let genuine = verify(self.key.expose(), &["direct", &e.t, &e.a.to_string(), &e.b], &e.m);
        if !genuine || e.t != self.replica {
            tracing::warn!("ignoring a direct message in Redis that kas did not sign for this replica");
            self.metrics.engine_forgeries.inc();
            return None;
        }
        if !fresh {
            tracing::warn!(age_ms = self.clock.now_ms() - e.a, "ignoring a stale direct message");
            return None;
        }
        Some(e.b)
    }

    /// Receives this replica's direct messages until shutdown, resubscribing after any loss
    /// (what is published meanwhile is lost: senders wait with a deadline and fail).
    pub(super) async fn direct_loop(
        self: Arc<Self>,
        sink: tokio::sync::mpsc::Sender<String>,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let channel = self.keys.direct(&self.replica);
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let subscribed = async {
                let pubsub =
                    tokio::time::timeout(OP_TIMEOUT, self.target.pubsub()).await.map_err(|_| "timed out".to_owned())?;
                let (mut sink, stream) = pubsub.map_err(|e| e.to_string())?.split();
                tokio::time::timeout(OP_TIMEOUT, sink.subscribe(&channel))
                    .await
                    .map_err(|_| "timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((sink, stream))
            }
            .await;
            let (mut ping_sink, mut stream) = match subscribed {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot subscribe to the direct channel; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let mut ping = tokio::time::interval(SUBSCRIPTION_PING);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    message = stream.next() => match message {
                        Some(m) => {
                            if let Some(body) = self.direct_body(m.get_payload_bytes())
                                && sink.try_send(body).is_err()
                            {
                                tracing::warn!("direct message dropped: the queue is full");
                            }
                        }
                        None => break,
                    },
                    _ = ping.tick() => {
                        let alive = tokio::time::timeout(OP_TIMEOUT, ping_sink.ping::<redis::Value>()).await;
                        if !matches!(alive, Ok(Ok(_))) {
                            break;
                        }
                    }
                }
            }
        }
    }
}
