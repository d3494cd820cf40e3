//! GitLab as the source of truth for agents and access.
//!
//! - Identity: a presented token is checked with GitLab's `agent_info`. Good answers are cached
//!   for the cache TTL on this replica; refusals (401/403/404) for a minute on every replica
//!   (through the engine), so a flood of bad tokens does not become a flood of GitLab calls.
//! - "Connected": GitLab shows an agent as connected while its token was used within 8 minutes.
//!   The credential re-check of open streams refreshes each token's `agent_info` once its cached
//!   answer is older than the TTL (5 minutes by default), and no more often; a token GitLab now
//!   refuses closes its streams.
//! - Access: the agent's own configuration project is always allowed; anything else is GitLab's
//!   `verify_project_access`, cached per (agent, project) for the TTL and asked again at once when a
//!   push shows the project's visibility changed. When GitLab cannot answer, nothing is sent and
//!   the notification waits and is retried: fail closed, never dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::client::{GitLabClient, GitLabError};
use crate::config::Secret;
use crate::domain::{AgentId, AgentToken};
use crate::engine::Engine;
use crate::identity::{AgentDirectory, AgentIdentity, IdentityError, Rechecked};

/// How long a refusal is remembered, as upstream.
const REFUSAL_TTL: Duration = Duration::from_secs(60);

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
    engine: Arc<dyn Engine>,
    ttl: Duration,
    known: Mutex<HashMap<i64, Known>>,
    refused: Mutex<HashMap<String, (Instant, RefusalKind)>>,
    access: Mutex<HashMap<(AgentId, String), Access>>,
    access_swept_at: Mutex<usize>,
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
    pub fn new(client: Arc<GitLabClient>, engine: Arc<dyn Engine>, ttl: Duration) -> Self {
        Self {
            client,
            engine,
            ttl,
            known: Mutex::default(),
            refused: Mutex::default(),
            access: Mutex::default(),
            access_swept_at: Mutex::new(0),
        }
    }

    /// The token a credential stands for, while a stream holds it.
    fn token_of(&self, credential: i64) -> Option<Secret<String>> {
        self.known.lock().expect("known lock").get(&credential).map(|k| k.token.clone())
    }

    async fn refuse(&self, key: &str, kind: RefusalKind) -> IdentityError {
        self.refused.lock().expect("refused lock").insert(key.to_owned(), (Instant::now(), kind));
        if matches!(kind, RefusalKind::Unauthenticated) {
            self.engine.remember_refusal(key, REFUSAL_TTL).await;
        }
        kind.error()
    }

    async fn ask(&self, token: &str, key: &str, credential: i64) -> Result<AgentIdentity, IdentityError> {
        match self.client.agent_info(token).await {
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
            Err(e) => Err(IdentityError::Unavailable(e.to_string())),
        }
    }
}

#[async_trait]
impl AgentDirectory for GitLabDirectory {
    async fn authenticate(&self, token: &AgentToken) -> Result<AgentIdentity, IdentityError> {
        let (key, credential) = token_key(token);
        if let Some((at, kind)) = self.refused.lock().expect("refused lock").get(&key).copied()
            && at.elapsed() < REFUSAL_TTL
        {
            return Err(kind.error());
        }
        if let Some(k) = self.known.lock().expect("known lock").get(&credential)
            && k.checked.elapsed() < self.ttl
            && k.token.expose() == token.expose()
        {
            return Ok(k.identity.clone());
        }
        if self.engine.was_refused(&key).await {
            self.refused.lock().expect("refused lock").insert(key, (Instant::now(), RefusalKind::Unauthenticated));
            return Err(IdentityError::Unauthenticated);
        }
        self.ask(token.expose(), &key, credential).await
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
            match self.ask(token.expose(), &key, credential).await {
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
            .map_err(|e| IdentityError::Unavailable(e.to_string()))?;
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
