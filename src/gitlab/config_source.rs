//! Agent configuration from GitLab: `.gitlab/agents/<name>/config.yaml` on the configuration
//! project's default branch, read through the REST API with `KAS_GITLAB_API_TOKEN_FILE`. The
//! version (and the commit id sent to the agent) is the branch head. A missing file is an empty
//! configuration; without an API token every agent gets an empty configuration.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::client::{GitLabClient, GitLabError};
use crate::agentcfg::source::{ConfigSnapshot, ConfigSource, ConfigSourceError};
use crate::domain::{AgentId, AgentName, ProjectPath};
use crate::identity::AgentIdentity;

/// How often watched agents' branch heads are checked (besides every push to their project).
const POLL: Duration = Duration::from_secs(180);

/// Configuration files from GitLab repositories.
pub struct GitLabConfigSource {
    client: Arc<GitLabClient>,
}

impl GitLabConfigSource {
    /// Reads through `client`.
    pub fn new(client: Arc<GitLabClient>) -> Self {
        Self { client }
    }

    async fn head(&self, agent: &AgentIdentity) -> Result<Option<String>, ConfigSourceError> {
        let project = agent
            .config_project_id
            .ok_or_else(|| ConfigSourceError::NotFound("configuration project unknown".into()))?;
        let branch = agent.default_branch.as_deref().unwrap_or("main");
        self.client.branch_head(project, branch).await.map_err(unavailable)
    }
}

fn unavailable(e: GitLabError) -> ConfigSourceError {
    ConfigSourceError::Unavailable(e.into())
}

#[async_trait]
impl ConfigSource for GitLabConfigSource {
    async fn load(&self, agent: &AgentIdentity) -> Result<ConfigSnapshot, ConfigSourceError> {
        if !self.client.can_read_files() {
            return Ok(ConfigSnapshot { text: String::new(), version: "no-api-token".into(), commit_id: None });
        }
        let Some(head) = self.head(agent).await? else {
            return Ok(ConfigSnapshot { text: String::new(), version: "no-branch".into(), commit_id: None });
        };
        let project = agent.config_project_id.expect("checked by head()");
        let path = crate::agentcfg::file_path(&agent.name);
        let text = match self.client.file(project, &path, &head).await {
            Ok(text) => text.unwrap_or_default(),
            Err(GitLabError::TooLarge(limit)) => {
                return Err(ConfigSourceError::Invalid(format!("{path} is larger than {limit} bytes")));
            }
            Err(e) => return Err(unavailable(e)),
        };
        Ok(ConfigSnapshot { text, version: head.clone(), commit_id: Some(head) })
    }

    async fn versions(&self, agents: &[AgentIdentity]) -> Vec<(AgentId, String)> {
        if !self.client.can_read_files() {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(agents.len());
        for agent in agents {
            match self.head(agent).await {
                Ok(head) => out.push((agent.id, head.unwrap_or_else(|| "no-branch".into()))),
                Err(e) => tracing::debug!(error = %e, agent = agent.id, "cannot check the configuration branch"),
            }
        }
        out
    }

    fn poll_interval(&self) -> Duration {
        POLL
    }

    async fn config_files(&self, project: &ProjectPath) -> Result<Vec<AgentName>, ConfigSourceError> {
        if !self.client.can_read_files() {
            // As for the files themselves: without an API token there is nothing to list.
            return Ok(Vec::new());
        }
        let names = self.client.agent_config_files(project.as_str()).await.map_err(unavailable)?;
        // A directory that is not a valid agent name cannot hold an agent's configuration.
        Ok(names.iter().filter_map(|n| AgentName::parse(n).ok()).collect())
    }
}
