//! Talking with GitLab: the JWTs both sides sign with the shared secret (`jwt`), and GitLab as
//! the source of truth: agents, tokens, access and configuration straight from GitLab (chosen
//! with `KAS_GITLAB_URL`), instead of kas's own registry.

pub mod client;
pub mod config_source;
pub mod directory;
pub mod jwt;
pub mod statuses;

pub use client::GitLabClient;
pub use config_source::GitLabConfigSource;
pub use directory::GitLabDirectory;
