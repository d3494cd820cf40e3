//! Agent configuration: the YAML GitLab keeps at `.gitlab/agents/<name>/config.yaml`, parsed
//! strictly, and the watch that re-sends it to open configuration streams when it changes.
//!
//! `flux` and `observability` are what kas sends to the agent; `gitops`, `ci_access`,
//! `user_access`, `container_scanning` and `remote_development` are accepted and stored but not
//! sent (kas serves only the Flux path). `kas` is kas's own section (what kas may do in the
//! agent's cluster through its tunnel, all off by default): read by kas, never sent. Any other
//! key is refused, naming it.

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

/// `kas.oci`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OciSection {
    /// Reconcile OCIRepository objects on registry pushes.
    #[serde(default)]
    pub enabled: bool,
}

/// `kas.sync_status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncStatusSection {
    /// Report Flux results to GitLab as commit statuses.
    #[serde(default)]
    pub enabled: bool,
    /// Projects statuses may go to; empty means the configuration project only.
    #[serde(default)]
    pub projects: Vec<String>,
}

/// `kas`: what kas may do in the agent's cluster through its tunnel. Read by kas, never sent to
/// agentk; everything is off unless the file turns it on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KasSection {
    /// Operators may run `kas cluster get AGENT PATH` (read-only).
    #[serde(default)]
    pub cluster_read: bool,
    /// `oci`.
    #[serde(default)]
    pub oci: OciSection,
    /// `sync_status`.
    #[serde(default)]
    pub sync_status: SyncStatusSection,
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
    /// Read by kas, never sent.
    pub kas: Option<KasSection>,
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
        if let Some(url) = parsed.flux.as_ref().and_then(|f| f.webhook_receiver_url.as_deref())
            && !is_receiver_url(url)
        {
            return Err(ConfigFileError::Invalid(format!(
                "flux.webhook_receiver_url {url:?} is neither an http(s) URL nor a service proxy path \
                 (/api/v1/namespaces/<namespace>/services/<[scheme:]name[:port]>/proxy)"
            )));
        }
        if let Some(kas) = &parsed.kas {
            for p in &kas.sync_status.projects {
                crate::domain::ProjectPath::parse(p).map_err(|e| {
                    ConfigFileError::Invalid(format!("kas.sync_status.projects: {p:?} is not a project path: {e}"))
                })?;
            }
        }
        Ok(parsed)
    }

    /// kas's own section, or the default (everything off).
    pub fn kas_section(&self) -> KasSection {
        self.kas.clone().unwrap_or_default()
    }
}

/// Where GitLab keeps an agent's configuration file in its configuration project.
pub fn file_path(agent_name: &str) -> String {
    format!(".gitlab/agents/{agent_name}/config.yaml")
}

/// Whether agentk takes `url` as its Flux Receiver address: an absolute http(s) URL it POSTs to
/// itself, or the path of a Service through the Kubernetes API server's service proxy,
/// `/api/v1/namespaces/<namespace>/services/<[scheme:]name[:port]>/proxy[/…]`, which it calls
/// with its own cluster credentials. Either is sent to the agent unchanged.
pub fn is_receiver_url(url: &str) -> bool {
    if url.parse::<http::Uri>().is_err() {
        return false;
    }
    if let Some(rest) = url.strip_prefix("http://").or_else(|| url.strip_prefix("https://")) {
        return !rest.is_empty() && !rest.starts_with('/');
    }
    let Some(rest) = url.strip_prefix("/api/v1/namespaces/") else { return false };
    let mut parts = rest.splitn(4, '/');
    let (Some(namespace), Some("services"), Some(service), Some(tail)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let proxy = tail == "proxy" || tail.starts_with("proxy/");
    proxy && !url.contains(['?', '#']) && dns_label(namespace) && service_ref(service)
}

/// `[scheme:]name[:port]` as the Kubernetes API server splits it.
fn service_ref(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    let (scheme, name, port) = match parts[..] {
        [name] => ("", name, ""),
        [name, port] => ("", name, port),
        [scheme, name, port] => (scheme, name, port),
        _ => return false,
    };
    let port_ok = port.is_empty()
        || port.parse::<u16>().is_ok_and(|p| p > 0)
        || (port.len() <= 15 && dns_label(port) && port.bytes().any(|b| b.is_ascii_lowercase()));
    matches!(scheme, "" | "http" | "https") && dns_label(name) && port_ok
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The version of a stored configuration as agents see it (`commit_id`): a digest of what is
/// sent, so every replica computes the same one and any change to what is sent changes it.
pub fn commit_id(text: &str, agent_id: i64, project_id: i64, project_path: &str, gitlab_external_url: &str) -> String {
    let mut h = Sha256::new();
    for part in [text, &agent_id.to_string(), &project_id.to_string(), project_path, gitlab_external_url] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    crate::hex::encode(&h.finalize()[..20])
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
    fn kas_section_is_off_by_default_and_strict() {
        assert_eq!(AgentConfigFile::parse("flux: {}\n").unwrap().kas_section(), KasSection::default());
        let off = AgentConfigFile::parse("kas: {}\n").unwrap().kas_section();
        assert!(!off.cluster_read && !off.oci.enabled && !off.sync_status.enabled);
        let on = AgentConfigFile::parse(
            "kas:\n  cluster_read: true\n  oci:\n    enabled: true\n  sync_status:\n    enabled: true\n    projects: [group/app]\n",
        )
        .unwrap()
        .kas_section();
        assert!(on.cluster_read && on.oci.enabled && on.sync_status.enabled);
        assert_eq!(on.sync_status.projects, ["group/app"]);
        for (text, named) in [
            ("kas:\n  cluster_reed: true\n", "cluster_reed"),
            ("kas:\n  oci:\n    enable: true\n", "enable"),
            ("kas:\n  sync_status:\n    projects: [\"not a path\"]\n", "not a path"),
        ] {
            let err = AgentConfigFile::parse(text).unwrap_err().to_string();
            assert!(err.contains(named), "{err}");
        }
        assert!(AgentConfigFile::parse("kas:\n  cluster_read: yes please\n").is_err());
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
        assert!(AgentConfigFile::parse("flux:\n  webhook_receiver_url: /etc/passwd\n").is_err());
        let big = format!("# {}\n", "x".repeat(MAX_CONFIG_BYTES));
        assert_eq!(AgentConfigFile::parse(&big).unwrap_err(), ConfigFileError::TooLarge(big.len()));
    }

    #[test]
    fn receiver_urls_agentk_accepts() {
        for ok in [
            "http://webhook-receiver.flux-system.svc.cluster.local",
            "https://receiver.example.com:8443/base",
            "/api/v1/namespaces/flux-system/services/http:webhook-receiver:80/proxy",
            "/api/v1/namespaces/flux-system/services/webhook-receiver/proxy",
            "/api/v1/namespaces/flux-system/services/webhook-receiver:http/proxy",
            "/api/v1/namespaces/flux-system/services/https:webhook-receiver:/proxy/",
            "/api/v1/namespaces/flux-system/services/webhook-receiver:9292/proxy/prefix",
        ] {
            assert!(is_receiver_url(ok), "{ok}");
            let text = format!("flux:\n  webhook_receiver_url: {ok}\n");
            let file = AgentConfigFile::parse(&text).unwrap();
            assert_eq!(file.flux.unwrap().webhook_receiver_url.as_deref(), Some(ok), "kept unchanged");
        }
        for bad in [
            "",
            "http://",
            "http:///path",
            "ftp://receiver",
            "webhook-receiver.flux-system",
            "/api/v1/namespaces/flux-system/services/http:webhook-receiver:80",
            "/api/v1/namespaces/flux-system/services/http:webhook-receiver:80/proxyx",
            "/api/v1/namespaces/Flux/services/webhook-receiver/proxy",
            "/api/v1/namespaces/flux-system/services/ftp:webhook-receiver:80/proxy",
            "/api/v1/namespaces/flux-system/services/a:b:c:d/proxy",
            "/api/v1/namespaces/flux-system/services/webhook-receiver:0/proxy",
            "/api/v1/namespaces/flux-system/services/:80/proxy",
            "/api/v1/namespaces/flux-system/pods/webhook-receiver/proxy",
            "/api/v1/namespaces/flux-system/services/webhook-receiver/proxy?x=1",
        ] {
            assert!(!is_receiver_url(bad), "{bad}");
        }
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
