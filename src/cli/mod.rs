//! The `kas` command line: `serve` runs the server; the other commands manage the registry
//! directly in the database or act as GitLab's and an agent's clients.

mod agents;
pub mod client;
mod cluster;
mod health;
mod push;
mod registry;
mod watch;

use std::fmt;

use clap::{Parser, Subcommand};

use crate::config::{ConfigError, Settings, StoreSettings};
use crate::domain::InvalidValue;
use crate::store::StoreError;

pub use registry::{AgentCommand, ProjectCommand, TokenCommand};

/// kas: GitLab agent server for push notifications to Kubernetes agents.
#[derive(Debug, Parser)]
#[command(name = "kas", version, about, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (migrates the database first)
    Serve(Box<Settings>),
    /// Apply database migrations and exit
    Migrate(StoreSettings),
    /// Manage agents
    Agent {
        /// Action.
        #[command(subcommand)]
        action: AgentCommand,
    },
    /// Manage agent tokens
    Token {
        /// Action.
        #[command(subcommand)]
        action: TokenCommand,
    },
    /// Manage the project registry
    Project {
        /// Action.
        #[command(subcommand)]
        action: ProjectCommand,
    },
    /// Call GitPushEvent as GitLab Rails does (test the GitLab-facing listener by hand)
    Push(push::PushArgs),
    /// Open ReconcileProjects as an agent does; print one JSON line per notification
    Watch(watch::WatchArgs),
    /// List the agents connected to any replica (from a server's GET /agents)
    Agents(agents::AgentsArgs),
    /// Check that a server is alive (GET /healthz): exit 0 if it is, 1 if not
    Health(health::HealthArgs),
    /// Read an agent's Kubernetes API through its tunnel (agents with kas.cluster_read: true)
    Cluster {
        /// Action.
        #[command(subcommand)]
        action: cluster::ClusterCommand,
    },
}

/// Why a command failed; printed as one line.
#[derive(Debug)]
pub enum CliError {
    /// A configuration value is unusable.
    Config(ConfigError),
    /// An argument is invalid.
    Invalid(InvalidValue),
    /// Storage refused or failed.
    Store(StoreError),
    /// Anything else, already in words.
    Other(String),
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config(e) => write!(f, "{e}"),
            Self::Invalid(e) => write!(f, "{e}"),
            Self::Store(e) => write!(f, "{e}"),
            Self::Other(e) => f.write_str(e),
        }
    }
}

impl From<ConfigError> for CliError {
    fn from(e: ConfigError) -> Self {
        Self::Config(e)
    }
}
impl From<InvalidValue> for CliError {
    fn from(e: InvalidValue) -> Self {
        Self::Invalid(e)
    }
}
impl From<StoreError> for CliError {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

/// Runs every command except `serve`, writing results to `out`.
pub async fn run(command: Command, out: &mut impl std::io::Write) -> Result<(), CliError> {
    match command {
        Command::Serve(_) => Err(CliError::Other("serve is run by main".into())),
        Command::Migrate(settings) => {
            let store = crate::store::open(&settings.resolve()?).await?;
            store.migrate().await?;
            writeln!(out, "database is up to date").map_err(io)?;
            store.close().await;
            Ok(())
        }
        Command::Agent { action } => registry::agent(action, out).await,
        Command::Token { action } => registry::token(action, out).await,
        Command::Project { action } => registry::project(action, out).await,
        Command::Push(args) => push::run(args, out).await,
        Command::Watch(args) => watch::run(args, out).await,
        Command::Agents(args) => agents::run(args, out).await,
        Command::Health(args) => health::run(args, out).await,
        Command::Cluster { action } => cluster::run(action, out).await,
    }
}

pub(crate) fn io(e: std::io::Error) -> CliError {
    CliError::Other(format!("cannot write output: {e}"))
}

/// An RFC 3339 UTC time, to the second.
pub fn format_time(ms: i64) -> String {
    let mut text = crate::clock::rfc3339_ms(ms);
    text.truncate(19);
    text.push('Z');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(1_795_000_000_123), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
