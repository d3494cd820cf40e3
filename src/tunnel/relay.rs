//! Calls relayed between replicas: a replica without a tunnel of the agent sends the call, as a
//! signed direct message through the engine, to one that holds a tunnel; that replica makes it
//! through its own tunnel and sends back the answer, its body read whole (bounded by the
//! response limit). Both ways have deadlines; an answer that does not come in time is a timeout.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{KubeRequest, KubeResponse, Purpose, ResponseBody, TunnelConfig, TunnelError};
use crate::domain::AgentId;
use crate::engine::Engine;

/// Call ids remembered, so a replayed call is not made twice.
const REMEMBERED: usize = 10_000;
/// Calls this replica waits on at once.
const MAX_PENDING: usize = 1024;
/// Time the answer takes to travel back, beyond the call's own limits.
const TRANSIT: Duration = Duration::from_secs(3);

/// What travels between replicas.
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Envelope {
    Call { id: String, from: String, agent: AgentId, purpose: Purpose, request: KubeRequest, wait_ms: u64 },
    Answer { id: String, result: Result<Answered, TunnelError> },
}

/// A relayed answer, its body complete.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Answered {
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    #[serde(with = "super::base64_bytes")]
    pub body: Vec<u8>,
}

/// A call another replica relayed here.
pub(super) struct Incoming {
    pub id: String,
    pub from: String,
    pub agent: AgentId,
    pub purpose: Purpose,
    pub request: KubeRequest,
    pub wait_ms: u64,
}

/// Calls in flight from this replica, and ids of calls made here for others.
#[derive(Default)]
pub(super) struct Relay {
    pending: Mutex<HashMap<String, oneshot::Sender<Result<Answered, TunnelError>>>>,
    seen: Mutex<(HashSet<String>, VecDeque<String>)>,
}

/// Removes a pending call however the wait ends.
struct PendingGuard<'a> {
    relay: &'a Relay,
    id: String,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.relay.pending.lock().expect("pending lock").remove(&self.id);
    }
}

impl Relay {
    /// Sends the call to `to` and waits for its answer: at most `wait` for a tunnel there, plus
    /// the call timeout, plus transit.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn call(
        &self,
        engine: &dyn Engine,
        me: &str,
        to: &str,
        agent: AgentId,
        purpose: Purpose,
        request: KubeRequest,
        wait: Duration,
        config: &TunnelConfig,
    ) -> Result<KubeResponse, TunnelError> {
        let mut raw = [0u8; 16];
        getrandom::fill(&mut raw).expect("system randomness");
        let id = crate::hex::encode(&raw);
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.pending.lock().expect("pending lock");
            if pending.len() >= MAX_PENDING {
                return Err(TunnelError::Unavailable("too many relayed calls in flight".into()));
            }
            pending.insert(id.clone(), tx);
        }
        let _guard = PendingGuard { relay: self, id: id.clone() };
        let wait_ms = wait.as_millis() as u64;
        let call = Envelope::Call { id, from: me.to_owned(), agent, purpose, request, wait_ms };
        let body = serde_json::to_string(&call).expect("serializable");
        engine
            .send_direct(to, body)
            .await
            .map_err(|e| TunnelError::Unavailable(format!("cannot relay the call to replica {to}: {e}")))?;
        let limit = wait + config.call_timeout + TRANSIT;
        let answered = match tokio::time::timeout(limit, rx).await {
            Ok(Ok(result)) => result?,
            Ok(Err(_)) => return Err(TunnelError::Unavailable("relay dropped".into())),
            Err(_) => return Err(TunnelError::Timeout(format!("waiting for replica {to}'s answer"))),
        };
        if answered.body.len() > config.max_response_body {
            return Err(TunnelError::ResponseTooLarge(config.max_response_body));
        }
        Ok(KubeResponse {
            status: answered.status,
            reason: answered.reason,
            headers: answered.headers,
            body: ResponseBody::full(answered.body),
        })
    }

    /// Reads a direct message: an answer is handed to its waiting call here; a call to make is
    /// returned (once per id).
    pub(super) fn receive(&self, body: &str) -> Option<Incoming> {
        match serde_json::from_str::<Envelope>(body) {
            Ok(Envelope::Answer { id, result }) => {
                if let Some(tx) = self.pending.lock().expect("pending lock").remove(&id) {
                    let _ = tx.send(result);
                }
                None
            }
            Ok(Envelope::Call { id, from, agent, purpose, request, wait_ms }) => {
                let mut seen = self.seen.lock().expect("seen lock");
                if !seen.0.insert(id.clone()) {
                    tracing::warn!(agent, "ignoring a relayed call seen before");
                    return None;
                }
                seen.1.push_back(id.clone());
                if seen.1.len() > REMEMBERED
                    && let Some(old) = seen.1.pop_front()
                {
                    seen.0.remove(&old);
                }
                Some(Incoming { id, from, agent, purpose, request, wait_ms })
            }
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a malformed direct message");
                None
            }
        }
    }

    /// Sends the answer of a relayed call back to the replica that asked.
    pub(super) async fn answer(
        &self,
        engine: &dyn Engine,
        to: &str,
        id: String,
        result: Result<Answered, TunnelError>,
    ) {
        let body = serde_json::to_string(&Envelope::Answer { id, result }).expect("serializable");
        if let Err(e) = engine.send_direct(to, body).await {
            tracing::warn!(error = %e, replica = to, "cannot send a relayed call's answer back");
        }
    }
}
