//! Agent configuration: the YAML GitLab keeps at `.gitlab/agents/<name>/config.yaml`, parsed
//! strictly, and the watch that re-sends it to open configuration streams when it changes.
//!
//! `flux` and `observability` are what kas sends to the agent; `gitops`, `ci_access`,
//! `user_access`, `container_scanning` and `remote_development` are accepted and stored but not
//! sent (kas serves only the Flux path). Any other key is refused, naming it.

pub mod source;
pub mod watch;

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// Largest configuration file accepted, as GitLab.
pub const MAX_CONFIG_BYTES: usize = 128 * 1024;

/// Why a configuration file was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigFileError {
    /// Over `MAX_CONFIG_BYTES`.
    #[error("configuration is {0} bytes; at most {MAX_CONFIG_BYTES} are allowed")]
    TooLarge(usize),
    /// Not the YAML GitLab accepts; the message names the key or line.
    #[error("invalid agent configuration: {0}")]
    Invalid(String),
}

/// Log levels agentk understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// `info` (the default).
    Info,
    /// `debug`.
    Debug,
    /// `warn`.
    Warn,
    /// `error`.
    Error,
}

/// `observability.logging`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logging {
    /// `level`.
    pub level: Option<LogLevel>,
    /// `grpc_level`.
    pub grpc_level: Option<LogLevel>,
}

/// `observability`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Observability {
    /// `logging`.
    pub logging: Option<Logging>,
}

/// `flux`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flux {
    /// Where agentk POSTs to Flux's Receiver on every notification.
    pub webhook_receiver_url: Option<String>,
}

/// A parsed configuration file.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfigFile {
    /// Sent to the agent.
    pub flux: Option<Flux>,
    /// Sent to the agent.
    pub observability: Option<Observability>,
    /// Stored, not sent.
    pub gitops: Option<serde_yaml_ng::Value>,
    /// Stored, not sent.
    pub ci_access: Option<serde_yaml_ng::Value>,
    /// Stored, not sent.
    pub user_access: Option<serde_yaml_ng::Value>,
    /// Stored, not sent.
    pub container_scanning: Option<serde_yaml_ng::Value>,
    /// Stored, not sent.
    pub remote_development: Option<serde_yaml_ng::Value>,
}

impl AgentConfigFile {
    /// Parses and validates a configuration file's text. An empty file is an empty configuration.
    pub fn parse(text: &str) -> Result<Self, ConfigFileError> {
        if text.len() > MAX_CONFIG_BYTES {
            return Err(ConfigFileError::TooLarge(text.len()));
        }
        if text.trim().is_empty() {
            return Ok(Self::default());
        }
        let parsed: Option<Self> =
            serde_yaml_ng::from_str(text).map_err(|e| ConfigFileError::Invalid(e.to_string()))?;
        let parsed = parsed.unwrap_or_default();
        if let Some(url) = parsed.flux.as_ref().and_then(|f| f.webhook_receiver_url.as_deref()) {
            let ok = (url.starts_with("http://") || url.starts_with("https://")) && url.parse::<http::Uri>().is_ok();
            if !ok {
                return Err(ConfigFileError::Invalid(format!(
                    "flux.webhook_receiver_url {url:?} is not an http(s) URL"
                )));
            }
        }
        Ok(parsed)
    }
}

/// The version of a stored configuration as agents see it (`commit_id`): a digest of what is
/// sent, so every replica computes the same one and any change to what is sent changes it.
pub fn commit_id(text: &str, agent_id: i64, project_id: i64, project_path: &str, gitlab_external_url: &str) -> String {
    let mut h = Sha256::new();
    for part in [text, &agent_id.to_string(), &project_id.to_string(), project_path, gitlab_external_url] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    h.finalize()[..20].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_gitlab_sections() {
        let cfg = AgentConfigFile::parse(
            "flux:\n  webhook_receiver_url: http://receiver.flux-system.svc\nobservability:\n  logging:\n    level: debug\n    grpc_level: warn\n\
             ci_access:\n  projects:\n    - id: g/p\nuser_access:\n  access_as:\n    agent: {}\ngitops: {}\ncontainer_scanning: {}\nremote_development:\n  enabled: true\n",
        )
        .unwrap();
        assert_eq!(cfg.flux.unwrap().webhook_receiver_url.as_deref(), Some("http://receiver.flux-system.svc"));
        let logging = cfg.observability.unwrap().logging.unwrap();
        assert_eq!((logging.level, logging.grpc_level), (Some(LogLevel::Debug), Some(LogLevel::Warn)));
        assert!(cfg.ci_access.is_some());
        assert_eq!(AgentConfigFile::parse("").unwrap(), AgentConfigFile::default());
        assert_eq!(AgentConfigFile::parse("# only a comment\n").unwrap(), AgentConfigFile::default());
    }

    #[test]
    fn refuses_unknown_keys_naming_them() {
        for (text, key) in [
            ("fluxx: {}\n", "fluxx"),
            ("flux:\n  webhook_reciever_url: http://x\n", "webhook_reciever_url"),
            ("observability:\n  logging:\n    levle: info\n", "levle"),
        ] {
            let err = AgentConfigFile::parse(text).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        assert!(AgentConfigFile::parse("observability:\n  logging:\n    level: loud\n").is_err());
        assert!(AgentConfigFile::parse("- a list\n").is_err());
        assert!(AgentConfigFile::parse("flux:\n  webhook_receiver_url: ftp://x\n").is_err());
        let big = format!("# {}\n", "x".repeat(MAX_CONFIG_BYTES));
        assert_eq!(AgentConfigFile::parse(&big).unwrap_err(), ConfigFileError::TooLarge(big.len()));
    }

    #[test]
    fn commit_id_changes_with_what_is_sent() {
        let base = commit_id("flux: {}", 1, 2, "g/p", "https://gitlab");
        assert_eq!(base.len(), 40);
        assert_eq!(base, commit_id("flux: {}", 1, 2, "g/p", "https://gitlab"));
        for other in [
            commit_id("flux: {} ", 1, 2, "g/p", "https://gitlab"),
            commit_id("flux: {}", 9, 2, "g/p", "https://gitlab"),
            commit_id("flux: {}", 1, 2, "g/q", "https://gitlab"),
            commit_id("flux: {}", 1, 2, "g/p", ""),
        ] {
            assert_ne!(base, other);
        }
    }
}
