//! `kas agent`, `kas token`, `kas project`: the registry, managed directly in the database.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Subcommand;

use super::{CliError, format_time, io};
use crate::agentcfg::AgentConfigFile;
use crate::clock::now_ms;
use crate::config::StoreSettings;
use crate::domain::{AgentName, AgentToken, ProjectInfo, ProjectPath, RepositoryAccess, Visibility};
use crate::store::{self, AgentRecord, Store};

/// `kas agent …`
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Register an agent; prints its first token alone on the last line
    Create {
        /// Agent name (a DNS label, as in GitLab)
        name: String,
        /// Full path of the agent's configuration project
        #[arg(long)]
        config_project: String,
        /// The agent's configuration file (.gitlab/agents/<name>/config.yaml)
        #[arg(long)]
        config_file: Option<PathBuf>,
        /// Database location.
        #[command(flatten)]
        store: StoreSettings,
    },
    /// Store an agent's configuration file; open configuration streams get it at once
    Config {
        /// Agent name
        name: String,
        /// The configuration file (.gitlab/agents/<name>/config.yaml)
        #[arg(long, required_unless_present = "clear", conflicts_with = "clear")]
        file: Option<PathBuf>,
        /// Remove the stored configuration (the agent gets an empty one)
        #[arg(long)]
        clear: bool,
        /// Configuration project, when several agents share the name
        #[arg(long)]
        config_project: Option<String>,
        /// Database location.
        #[command(flatten)]
        store: StoreSettings,
    },
    /// List agents
    List {
        /// Database location.
        #[command(flatten)]
        store: StoreSettings,
    },
    /// Delete an agent and its tokens
    Delete {
        /// Agent name
        name: String,
        /// Configuration project, when several agents share the name
        #[arg(long)]
        config_project: Option<String>,
        /// Database location.
        #[command(flatten)]
        store: StoreSettings,
    },
}

/// `kas token …`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Add a token to an agent (at most 2 active); prints it alone on the last line
    Create {
        /// Agent name
        agent: String,
        /// Configuration project, when several agents share the name
        #[arg(long)]
        config_project: Option<String>,
        /// Database location.
        #[command(flatten)]
        store: StoreSettings,
    },
    /// List an agent's tokens
    List {
        /// Agent name
        agent: String,
        /// Configuration project, when several agents share the name
        #[arg(long)]
        config_project: Option<String>,
        /// Database location.
        #[command(flatten)]
        store: StoreSettings,
    },
    /// Revoke a token; it stops working at once
    Revoke {
        /// Token id (from `kas token list`)
        id: i64,
        /// Database location.
        #[command(flatten)]
        store: StoreSettings,
    },
}

/// `kas project …`
#[derive(Debug, Subcommand)]
pub enum ProjectCommand {
    /// Create or update a project's registry entry (what the access rule reads)
    Set {
        /// Full path (group/sub/name)
        full_path: String,
        /// GitLab project id
        #[arg(long)]
        id: i64,
        /// public, internal or private
        #[arg(long)]
        visibility: String,
        /// Who may read the repository of a public project: everyone or members
        #[arg(long, default_value = "everyone")]
        repository_access: String,
        /// Database location.
        #[command(flatten)]
        store: StoreSettings,
    },
}

/// Reads and validates a configuration file; the text is stored as written.
fn read_config_file(path: &std::path::Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::Other(format!("{}: {e}", path.display())))?;
    AgentConfigFile::parse(&text).map_err(|e| CliError::Other(format!("{}: {e}", path.display())))?;
    Ok(text)
}

async fn open(settings: StoreSettings) -> Result<Arc<dyn Store>, CliError> {
    let store = store::open(&settings.resolve()?).await?;
    store.migrate().await?;
    Ok(store)
}

/// Finds the one agent a name (and optional configuration project) designates.
async fn find_agent(store: &dyn Store, name: &str, config_project: Option<&str>) -> Result<AgentRecord, CliError> {
    let name = AgentName::parse(name)?;
    let project = config_project.map(ProjectPath::parse).transpose()?;
    let mut found: Vec<_> = store
        .agents_named(&name)
        .await?
        .into_iter()
        .filter(|a| project.as_ref().is_none_or(|p| &a.config_project == p))
        .collect();
    match found.len() {
        0 => Err(CliError::Other(format!(
            "no agent named {name}{}",
            project.map(|p| format!(" for {p}")).unwrap_or_default()
        ))),
        1 => Ok(found.remove(0)),
        n => Err(CliError::Other(format!("{n} agents are named {name}; add --config-project to choose one"))),
    }
}

/// Runs `kas agent …`.
pub async fn agent(action: AgentCommand, out: &mut impl std::io::Write) -> Result<(), CliError> {
    match action {
        AgentCommand::Create { name, config_project, config_file, store } => {
            let name = AgentName::parse(&name)?;
            let config_project = ProjectPath::parse(&config_project)?;
            let config = config_file.as_deref().map(read_config_file).transpose()?;
            let store = open(store).await?;
            let token = AgentToken::generate();
            let (agent, record) =
                store.create_agent(&name, &config_project, &token.digest(), config.as_deref(), now_ms()).await?;
            writeln!(
                out,
                "created agent {} (id {}) with configuration project {}",
                agent.name, agent.id, agent.config_project
            )
            .map_err(io)?;
            writeln!(out, "token {} follows; it is shown only this once:", record.id).map_err(io)?;
            writeln!(out, "{}", token.expose()).map_err(io)?;
            store.close().await;
        }
        AgentCommand::Config { name, file, clear, config_project, store } => {
            let config = if clear { None } else { file.as_deref().map(read_config_file).transpose()? };
            let store = open(store).await?;
            let agent = find_agent(store.as_ref(), &name, config_project.as_deref()).await?;
            let version = store.set_agent_config(agent.id, config.as_deref()).await?;
            let what = if config.is_some() { "stored" } else { "cleared" };
            writeln!(out, "configuration of agent {} {what} (version {version})", agent.name).map_err(io)?;
            store.close().await;
        }
        AgentCommand::List { store } => {
            let store = open(store).await?;
            writeln!(out, "{:<6} {:<30} {:<40} CREATED", "ID", "NAME", "CONFIGURATION PROJECT").map_err(io)?;
            for a in store.list_agents().await? {
                writeln!(out, "{:<6} {:<30} {:<40} {}", a.id, a.name, a.config_project, format_time(a.created_at))
                    .map_err(io)?;
            }
            store.close().await;
        }
        AgentCommand::Delete { name, config_project, store } => {
            let store = open(store).await?;
            let agent = find_agent(store.as_ref(), &name, config_project.as_deref()).await?;
            if !store.delete_agent(agent.id).await? {
                return Err(CliError::Other(format!("agent {name} was deleted meanwhile")));
            }
            writeln!(out, "deleted agent {} (id {}) and its tokens", agent.name, agent.id).map_err(io)?;
            store.close().await;
        }
    }
    Ok(())
}

/// Runs `kas token …`.
pub async fn token(action: TokenCommand, out: &mut impl std::io::Write) -> Result<(), CliError> {
    match action {
        TokenCommand::Create { agent, config_project, store } => {
            let store = open(store).await?;
            let agent = find_agent(store.as_ref(), &agent, config_project.as_deref()).await?;
            let token = AgentToken::generate();
            let record = store.create_token(agent.id, &token.digest(), now_ms()).await?;
            writeln!(out, "token {} for agent {} follows; it is shown only this once:", record.id, agent.name)
                .map_err(io)?;
            writeln!(out, "{}", token.expose()).map_err(io)?;
            store.close().await;
        }
        TokenCommand::List { agent, config_project, store } => {
            let store = open(store).await?;
            let agent = find_agent(store.as_ref(), &agent, config_project.as_deref()).await?;
            writeln!(out, "{:<6} {:<8} {:<21} {:<21} REVOKED", "ID", "STATUS", "CREATED", "LAST USED").map_err(io)?;
            for t in store.list_tokens(agent.id).await? {
                let status = if t.revoked_at.is_some() { "revoked" } else { "active" };
                let last = t.last_used_at.map(format_time).unwrap_or_else(|| "never".into());
                let revoked = t.revoked_at.map(format_time).unwrap_or_else(|| "-".into());
                writeln!(out, "{:<6} {:<8} {:<21} {:<21} {}", t.id, status, format_time(t.created_at), last, revoked)
                    .map_err(io)?;
            }
            store.close().await;
        }
        TokenCommand::Revoke { id, store } => {
            let store = open(store).await?;
            let now = now_ms();
            match store.revoke_token(id, now).await? {
                None => return Err(CliError::Other(format!("no token with id {id}"))),
                Some(t) if t.revoked_at == Some(now) => writeln!(out, "revoked token {id}").map_err(io)?,
                Some(t) => {
                    writeln!(out, "token {id} was already revoked at {}", format_time(t.revoked_at.unwrap_or_default()))
                        .map_err(io)?
                }
            }
            store.close().await;
        }
    }
    Ok(())
}

/// Runs `kas project …`.
pub async fn project(action: ProjectCommand, out: &mut impl std::io::Write) -> Result<(), CliError> {
    match action {
        ProjectCommand::Set { full_path, id, visibility, repository_access, store } => {
            let path = ProjectPath::parse(&full_path)?;
            if id <= 0 {
                return Err(CliError::Other(format!("invalid project id {id}: must be positive")));
            }
            let visibility: Visibility = visibility.parse()?;
            let repository_access: RepositoryAccess = repository_access.parse()?;
            let store = open(store).await?;
            let info = ProjectInfo { id, path, visibility: Some(visibility), repository_access };
            store.set_project(&info, now_ms()).await?;
            writeln!(out, "project {} (id {id}): {visibility}, repository access {repository_access}", info.path)
                .map_err(io)?;
            store.close().await;
        }
    }
    Ok(())
}
