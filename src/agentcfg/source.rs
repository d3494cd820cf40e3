//! Where an agent's configuration file comes from: the registry (stored with `kas agent
//! config`) or GitLab (the file in the configuration project's repository).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::domain::{AgentId, AgentName, ProjectPath};
use crate::identity::AgentIdentity;
use crate::store::AgentRegistry;

/// An agent's configuration as its source has it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigSnapshot {
    /// The file's text; empty when there is none.
    pub text: String,
    /// What the source calls this version; changes whenever the text may have changed.
    pub version: String,
    /// The commit id to send, when the source has one (GitLab: the branch head); otherwise kas
    /// sends a digest of what it sends.
    pub commit_id: Option<String>,
}

/// Why a configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigSourceError {
    /// The agent (or its project) does not exist any more.
    #[error("{0}")]
    NotFound(String),
    /// The source cannot answer now.
    #[error("cannot read the agent configuration: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The file is there but cannot be used (over 128 KiB).
    #[error("{0}")]
    Invalid(String),
}

/// A source of agent configuration files.
#[async_trait]
pub trait ConfigSource: Send + Sync + 'static {
    /// The agent's configuration now.
    async fn load(&self, agent: &AgentIdentity) -> Result<ConfigSnapshot, ConfigSourceError>;
    /// The current versions of these agents' configurations (agents it cannot tell are left out).
    async fn versions(&self, agents: &[AgentIdentity]) -> Vec<(AgentId, String)>;
    /// How often watched agents are checked for changes.
    fn poll_interval(&self) -> Duration;
    /// The agents whose configuration lives in `project` (GitLab's "Connect a cluster" list).
    async fn config_files(&self, project: &ProjectPath) -> Result<Vec<AgentName>, ConfigSourceError>;
}

/// Configuration files stored in kas's database.
pub struct RegistryConfigSource {
    registry: Arc<dyn AgentRegistry>,
}

impl RegistryConfigSource {
    /// Reads from `registry`.
    pub fn new(registry: Arc<dyn AgentRegistry>) -> Self {
        Self { registry }
    }
}

#[async_trait]
impl ConfigSource for RegistryConfigSource {
    async fn load(&self, agent: &AgentIdentity) -> Result<ConfigSnapshot, ConfigSourceError> {
        match self.registry.agent_config(agent.id).await {
            Ok(Some((text, version))) => {
                Ok(ConfigSnapshot { text: text.unwrap_or_default(), version: version.to_string(), commit_id: None })
            }
            Ok(None) => Err(ConfigSourceError::NotFound("the agent no longer exists".into())),
            Err(e) => Err(ConfigSourceError::Unavailable(e.into())),
        }
    }

    async fn versions(&self, agents: &[AgentIdentity]) -> Vec<(AgentId, String)> {
        let ids: Vec<AgentId> = agents.iter().map(|a| a.id).collect();
        match self.registry.config_versions(&ids).await {
            Ok(v) => v.into_iter().map(|(id, version)| (id, version.to_string())).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot check agent configuration versions");
                Vec::new()
            }
        }
    }

    fn poll_interval(&self) -> Duration {
        // A database query for every watched agent at once: cheap enough to notice changes fast.
        Duration::from_secs(2)
    }

    async fn config_files(&self, project: &ProjectPath) -> Result<Vec<AgentName>, ConfigSourceError> {
        // The registry is managed by hand and small; GitLab asks only when its page is opened.
        let agents = self.registry.list_agents().await.map_err(|e| ConfigSourceError::Unavailable(e.into()))?;
        Ok(agents.into_iter().filter(|a| &a.config_project == project).map(|a| a.name).collect())
    }
}
