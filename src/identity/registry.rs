//! The local registry (agents and token digests in the database) as the directory.

use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;

use super::{AgentDirectory, AgentIdentity, IdentityError, Rechecked};
use crate::clock::now_ms;
use crate::domain::{AgentToken, access};
use crate::store::Credentials;

/// Agents and tokens from kas's own database; the access rule from `domain::access`.
pub struct RegistryDirectory {
    credentials: Arc<dyn Credentials>,
}

impl RegistryDirectory {
    /// Checks tokens against `credentials`.
    pub fn new(credentials: Arc<dyn Credentials>) -> Self {
        Self { credentials }
    }
}

#[async_trait]
impl AgentDirectory for RegistryDirectory {
    async fn authenticate(&self, token: &AgentToken, _: Option<IpAddr>) -> Result<AgentIdentity, IdentityError> {
        // Looked up by digest: comparing digests reveals nothing useful about the token.
        let found = self
            .credentials
            .authenticate(&token.digest(), now_ms())
            .await
            .map_err(|e| IdentityError::Unavailable(e.into()))?
            .ok_or(IdentityError::Unauthenticated)?;
        Ok(AgentIdentity {
            id: found.agent.id,
            name: found.agent.name.to_string(),
            config_project: found.agent.config_project.to_string(),
            config_project_id: found.agent.config_project_id,
            default_branch: None,
            credential: found.token_id,
        })
    }

    async fn recheck(&self, credentials: &[i64]) -> Result<Rechecked, IdentityError> {
        let valid =
            self.credentials.active_tokens(credentials).await.map_err(|e| IdentityError::Unavailable(e.into()))?;
        Ok(Rechecked { valid, unverified: Vec::new() })
    }

    fn could_notify(&self, agent: &AgentIdentity, project: &str, world_readable: bool) -> bool {
        access::may_notify(&agent.config_project, project, world_readable)
    }

    async fn may_notify(
        &self,
        agent: &AgentIdentity,
        project: &str,
        world_readable: bool,
    ) -> Result<bool, IdentityError> {
        Ok(access::may_notify(&agent.config_project, project, world_readable))
    }
}
