//! GitLab as the source of truth for agents and access.
//!
//! - Identity: a presented token is checked with GitLab's `agent_info`. Good answers are cached
//!   for the cache TTL on this replica; refusals (401/403/404) for a minute on every replica
//!   (through the engine), so a flood of bad tokens does not become a flood of GitLab calls.
//!   The refusal cache is bounded (`MAX_REFUSALS`, oldest first out). A token this replica does
//!   not know is looked up in the client's `Lane::Unknown` (a small share of GitLab, limited per
//!   peer address, failing at once when used up), so strangers never delay known agents.
//! - "Connected": GitLab shows an agent as connected while its token was used within 8 minutes.
//!   The credential re-check of open streams refreshes each token's `agent_info` once its cached
//!   answer is older than the TTL (5 minutes by default), and no more often; a token GitLab now
//!   refuses closes its streams.
//! - Access: the agent's own configuration project is always allowed; anything else is GitLab's
//!   `verify_project_access`, cached per (agent, project) for the TTL and asked again at once when a
//!   push shows the project's visibility changed. When GitLab cannot answer, nothing is sent and
//!   the notification waits and is retried: fail closed, never dropped.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::client::{GitLabClient, GitLabError, Lane};
use crate::config::Secret;
use crate::domain::{AgentId, AgentToken};
use crate::engine::RefusalCache;
use crate::identity::{AgentDirectory, AgentIdentity, IdentityError, Rechecked};

/// How long a refusal is remembered, as upstream.
const REFUSAL_TTL: Duration = Duration::from_secs(60);
/// Refusals remembered at once on this replica. Lookups of unknown tokens are rate-limited, so
/// a minute of them stays far below this; the cap holds whatever the limits are.
const MAX_REFUSALS: usize = 10_000;

/// Recently refused tokens (by digest), bounded in size and age. Every entry lives the same
/// TTL, so insertion order is expiry order: the oldest go first, whether expired or evicted.
struct Refusals {
    by_key: HashMap<String, (Instant, RefusalKind)>,
    order: VecDeque<(Instant, String)>,
    cap: usize,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Refusals {
    fn new(cap: usize, gauge: prometheus_client::metrics::gauge::Gauge) -> Self {
        Self { by_key: HashMap::new(), order: VecDeque::new(), cap, gauge }
    }

    fn get(&self, key: &str) -> Option<RefusalKind> {
        self.by_key.get(key).filter(|(at, _)| at.elapsed() < REFUSAL_TTL).map(|(_, kind)| *kind)
    }

    fn insert(&mut self, key: String, kind: RefusalKind) {
        let now = Instant::now();
        self.by_key.insert(key.clone(), (now, kind));
        self.order.push_back((now, key));
        while let Some((at, _)) = self.order.front() {
            if at.elapsed() < REFUSAL_TTL && self.by_key.len() <= self.cap {
                break;
            }
            let (at, key) = self.order.pop_front().expect("front exists");
            // A key refused again since has a newer entry further back: keep it.
            if self.by_key.get(&key).is_some_and(|(t, _)| *t == at) {
                self.by_key.remove(&key);
            }
        }
        self.gauge.set(self.by_key.len() as i64);
    }
}

struct Known {
    token: Secret<String>,
    identity: AgentIdentity,
    checked: Instant,
}

struct Access {
    allowed: bool,
    world_readable: bool,
    checked: Instant,
}

/// Agents, tokens and access from GitLab.
pub struct GitLabDirectory {
    client: Arc<GitLabClient>,
    refusals: Arc<dyn RefusalCache>,
    ttl: Duration,
    known: Mutex<HashMap<i64, Known>>,
    refused: Mutex<Refusals>,
    access: Mutex<HashMap<(AgentId, String), Access>>,
    access_swept_at: Mutex<usize>,
    /// One lookup per token at a time (by digest): agentk opens several calls at once with a new
    /// token, and they wait for the first one's answer instead of each asking GitLab. Entries live
    /// only while a lookup is in flight.
    lookups: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

#[derive(Clone, Copy)]
enum RefusalKind {
    Unauthenticated,
    PermissionDenied,
    NotFound,
}

impl RefusalKind {
    fn error(self) -> IdentityError {
        match self {
            Self::Unauthenticated => IdentityError::Unauthenticated,
            Self::PermissionDenied => IdentityError::PermissionDenied("GitLab refused the agent token".into()),
            Self::NotFound => IdentityError::NotFound("GitLab does not know this agent".into()),
        }
    }
}

/// The refusal-cache key (the token's SHA-256 in hex, as the registry stores digests) and a
/// numeric credential id derived from it.
fn token_key(token: &AgentToken) -> (String, i64) {
    let digest = token.digest();
    let credential = i64::from_str_radix(&digest.as_str()[..15], 16).expect("hex digest");
    (digest.as_str().to_owned(), credential)
}

impl GitLabDirectory {
    /// A directory asking `client`, caching good answers for `ttl`.
    pub fn new(client: Arc<GitLabClient>, refusals: Arc<dyn RefusalCache>, ttl: Duration) -> Self {
        let gauge = client.metrics().gitlab_cache("refusals");
        Self {
            client,
            refusals,
            ttl,
            known: Mutex::default(),
            refused: Mutex::new(Refusals::new(MAX_REFUSALS, gauge)),
            access: Mutex::default(),
            access_swept_at: Mutex::new(0),
            lookups: Mutex::default(),
        }
    }

    /// The token a credential stands for, while a stream holds it.
    fn token_of(&self, credential: i64) -> Option<Secret<String>> {
        self.known.lock().expect("known lock").get(&credential).map(|k| k.token.clone())
    }

    async fn refuse(&self, key: &str, kind: RefusalKind) -> IdentityError {
        self.refused.lock().expect("refused lock").insert(key.to_owned(), kind);
        if matches!(kind, RefusalKind::Unauthenticated) {
            self.refusals.remember_refusal(key, REFUSAL_TTL).await;
        }
        kind.error()
    }

    async fn ask(&self, token: &str, key: &str, credential: i64, lane: Lane) -> Result<AgentIdentity, IdentityError> {
        match self.client.agent_info(token, lane).await {
            Ok(info) => {
                let identity = AgentIdentity {
                    id: info.agent_id,
                    name: info.agent_name,
                    config_project: info.project_path,
                    config_project_id: Some(info.project_id),
                    default_branch: info.default_branch,
                    credential,
                };
                let known =
                    Known { token: Secret::new(token.to_owned()), identity: identity.clone(), checked: Instant::now() };
                self.known.lock().expect("known lock").insert(credential, known);
                Ok(identity)
            }
            // Upstream's mapping: 401 unauthenticated, 403 denied, 404 not found, else retry later.
            Err(GitLabError::Status(401)) => Err(self.refuse(key, RefusalKind::Unauthenticated).await),
            Err(GitLabError::Status(403)) => Err(self.refuse(key, RefusalKind::PermissionDenied).await),
            Err(GitLabError::Status(404)) => Err(self.refuse(key, RefusalKind::NotFound).await),
            Err(e) => Err(IdentityError::Unavailable(e.into())),
        }
    }
}

/// A place in the line of lookups of one token; leaving it (also when the call is cancelled)
/// removes the line once nobody else is in it.
struct LookupTurn<'a> {
    lookups: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    key: String,
    gate: Arc<tokio::sync::Mutex<()>>,
    held: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl<'a> LookupTurn<'a> {
    fn enter(lookups: &'a Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>, key: &str) -> Self {
        let gate = lookups.lock().expect("lookups lock").entry(key.to_owned()).or_default().clone();
        Self { lookups, key: key.to_owned(), gate, held: None }
    }

    async fn wait(&mut self) {
        self.held = Some(self.gate.clone().lock_owned().await);
    }
}

impl Drop for LookupTurn<'_> {
    fn drop(&mut self) {
        self.held = None;
        let mut lookups = self.lookups.lock().expect("lookups lock");
        // Only the map's reference and this one left: nobody else is in line.
        if Arc::strong_count(&self.gate) == 2 {
            lookups.remove(&self.key);
        }
    }
}

/// What the caches say about a presented token.
enum Cached {
    /// Refused recently, or vouched for within the TTL.
    Answer(Result<AgentIdentity, IdentityError>),
    /// GitLab must be asked, in this lane.
    Ask(Lane),
}

impl GitLabDirectory {
    fn cached(&self, token: &AgentToken, key: &str, credential: i64, peer: Option<IpAddr>) -> Cached {
        if let Some(kind) = self.refused.lock().expect("refused lock").get(key) {
            return Cached::Answer(Err(kind.error()));
        }
        match self.known.lock().expect("known lock").get(&credential) {
            Some(k) if k.token.expose() == token.expose() => {
                if k.checked.elapsed() < self.ttl {
                    Cached::Answer(Ok(k.identity.clone()))
                } else {
                    // GitLab vouched for it before: a known agent's, even if the answer is stale.
                    Cached::Ask(Lane::Known)
                }
            }
            _ => Cached::Ask(Lane::Unknown(peer)),
        }
    }
}

#[async_trait]
impl AgentDirectory for GitLabDirectory {
    async fn authenticate(&self, token: &AgentToken, peer: Option<IpAddr>) -> Result<AgentIdentity, IdentityError> {
        let (key, credential) = token_key(token);
        let lane = match self.cached(token, &key, credential, peer) {
            Cached::Answer(answer) => return answer,
            Cached::Ask(lane) => lane,
        };
        if self.refusals.was_refused(&key).await {
            self.refused.lock().expect("refused lock").insert(key, RefusalKind::Unauthenticated);
            return Err(IdentityError::Unauthenticated);
        }
        let mut turn = LookupTurn::enter(&self.lookups, &key);
        turn.wait().await;
        // A lookup of the same token that held the turn before may have answered meanwhile.
        match self.cached(token, &key, credential, peer) {
            Cached::Answer(answer) => answer,
            Cached::Ask(_) => self.ask(token.expose(), &key, credential, lane).await,
        }
    }

    async fn recheck(&self, credentials: &[i64]) -> Result<Rechecked, IdentityError> {
        let held: std::collections::HashSet<i64> = credentials.iter().copied().collect();
        // Forget tokens no stream holds any more.
        self.known.lock().expect("known lock").retain(|c, k| held.contains(c) || k.checked.elapsed() < self.ttl);
        let due: Vec<(i64, Secret<String>)> = {
            let known = self.known.lock().expect("known lock");
            credentials
                .iter()
                .filter_map(|c| known.get(c).filter(|k| k.checked.elapsed() >= self.ttl).map(|k| (*c, k.token.clone())))
                .collect()
        };
        let mut revoked = Vec::new();
        let mut unverified = Vec::new();
        for (credential, token) in due {
            let Some(presented) = AgentToken::from_presented(token.expose()) else { continue };
            let (key, _) = token_key(&presented);
            match self.ask(token.expose(), &key, credential, Lane::Known).await {
                Ok(_) => {}
                Err(IdentityError::Unavailable(e)) => {
                    // GitLab cannot say: the stream stays within the credential grace; the next
                    // re-check asks again.
                    tracing::warn!(error = %e, "cannot refresh an agent token with GitLab");
                    unverified.push(credential);
                }
                Err(_) => {
                    self.known.lock().expect("known lock").remove(&credential);
                    revoked.push(credential);
                }
            }
        }
        let known = self.known.lock().expect("known lock");
        let valid = credentials
            .iter()
            .copied()
            .filter(|c| known.contains_key(c) && !revoked.contains(c) && !unverified.contains(c))
            .collect();
        Ok(Rechecked { valid, unverified })
    }

    fn could_notify(&self, _: &AgentIdentity, _: &str, _: bool) -> bool {
        // GitLab decides, before the send.
        true
    }

    async fn may_notify(
        &self,
        agent: &AgentIdentity,
        project: &str,
        world_readable: bool,
    ) -> Result<bool, IdentityError> {
        if agent.config_project == project {
            return Ok(true);
        }
        let key = (agent.id, project.to_owned());
        if let Some(a) = self.access.lock().expect("access lock").get(&key)
            && a.checked.elapsed() < self.ttl
            && a.world_readable == world_readable
        {
            return Ok(a.allowed);
        }
        let token = self
            .token_of(agent.credential)
            .ok_or_else(|| IdentityError::Unavailable("the agent's token is no longer known".into()))?;
        let allowed = self
            .client
            .verify_project_access(token.expose(), project)
            .await
            .map_err(|e| IdentityError::Unavailable(e.into()))?;
        let mut access = self.access.lock().expect("access lock");
        // Expired answers are swept when the table has doubled since the last sweep, so a
        // public push to many agents does not sweep it once per agent.
        let mut swept = self.access_swept_at.lock().expect("sweep lock");
        if access.len() >= *swept * 2 + 1024 {
            access.retain(|_, a| a.checked.elapsed() < self.ttl);
            *swept = access.len();
        }
        access.insert(key, Access { allowed, world_readable, checked: Instant::now() });
        Ok(allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_bounded_oldest_first() {
        let gauge = prometheus_client::metrics::gauge::Gauge::default();
        let mut r = Refusals::new(3, gauge.clone());
        for key in ["a", "b", "c", "d"] {
            r.insert(key.into(), RefusalKind::Unauthenticated);
        }
        assert_eq!((r.by_key.len(), gauge.get()), (3, 3));
        assert!(r.get("a").is_none(), "the oldest left first");
        assert!(r.get("d").is_some());
        // Refused again: its newer entry outlives the older one's eviction.
        r.insert("b".into(), RefusalKind::NotFound);
        r.insert("e".into(), RefusalKind::Unauthenticated);
        assert!(matches!(r.get("b"), Some(RefusalKind::NotFound)));
        assert!(r.get("c").is_none());
        assert_eq!(r.by_key.len(), 3);
        assert!(r.order.len() <= 4, "the order queue stays bounded too: {}", r.order.len());
    }

    #[tokio::test]
    async fn the_lookup_line_is_removed_by_whoever_leaves_last() {
        let lookups = Mutex::default();
        let mut first = LookupTurn::enter(&lookups, "k");
        first.wait().await;
        {
            // Cancelled while waiting behind the first.
            let mut second = LookupTurn::enter(&lookups, "k");
            assert!(tokio::time::timeout(Duration::from_millis(20), second.wait()).await.is_err());
        }
        let mut third = LookupTurn::enter(&lookups, "k");
        drop(first);
        third.wait().await;
        assert_eq!(lookups.lock().unwrap().len(), 1);
        drop(third);
        assert!(lookups.lock().unwrap().is_empty());
    }
}
