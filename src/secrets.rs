//! Secrets read from files at start: the webhook secret(s) and GitLab's shared JWT key.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use subtle::ConstantTimeEq;

use crate::config::{Config, Secret};

/// The credential of an `Authorization: Bearer <credential>` value (scheme case-insensitive);
/// `None` for another scheme or an empty credential.
pub fn bearer_credential(value: &str) -> Option<&str> {
    let (scheme, credential) = value.split_once(' ')?;
    let credential = credential.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credential.is_empty()).then_some(credential)
}

/// Length GitLab's `.gitlab_kas_secret` must have once decoded.
const GITLAB_SECRET_LEN: usize = 32;

/// A secret file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file's content is unusable.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// The secrets kas checks callers against.
#[derive(Clone, Debug)]
pub struct Secrets {
    /// Accepted `X-Gitlab-Token` values; several during a rotation.
    pub webhook: Vec<Secret<Vec<u8>>>,
    /// GitLab's shared secret, decoded; `None` rejects every GitLab-facing call.
    pub gitlab_jwt_key: Option<Secret<Vec<u8>>>,
}

impl Secrets {
    /// Loads the configured files, generating the webhook secret in the data directory when
    /// no file is configured and none was generated before.
    pub fn load(config: &Config) -> Result<Self, SecretError> {
        let webhook_path = match &config.webhook_secret_file {
            Some(path) => path.clone(),
            None => {
                let path = config.store.data_dir.join("webhook-secret");
                if !path.exists() {
                    generate_webhook_secret(&path)?;
                    tracing::info!(path = %path.display(), "generated a webhook secret; use its content as the GitLab webhook's secret token");
                } else {
                    tracing::info!(path = %path.display(), "using the webhook secret in the data directory");
                }
                path
            }
        };
        let webhook = read_webhook_secrets(&webhook_path)?;
        let gitlab_jwt_key = config.gitlab_secret_file.as_deref().map(read_gitlab_secret).transpose()?;
        Ok(Self { webhook, gitlab_jwt_key })
    }

    /// Whether `presented` equals one of the webhook secrets, in constant time per secret.
    pub fn webhook_token_matches(&self, presented: &[u8]) -> bool {
        // Every secret is compared, so timing does not reveal which one matched.
        self.webhook.iter().fold(0u8, |hit, s| hit | s.expose().as_slice().ct_eq(presented).unwrap_u8()) == 1
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SecretError + '_ {
    move |source| SecretError::Io { path: path.to_owned(), source }
}

fn generate_webhook_secret(path: &Path) -> Result<(), SecretError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| SecretError::Invalid { path: path.to_owned(), reason: e.to_string() })?;
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path).map_err(io_err(path))?;
    writeln!(file, "{secret}").map_err(io_err(path))
}

/// One secret per non-empty line; surrounding whitespace is not part of a secret. Never empty.
pub fn read_webhook_secrets(path: &Path) -> Result<Vec<Secret<Vec<u8>>>, SecretError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let secrets: Vec<_> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(|l| Secret::new(l.as_bytes().to_vec())).collect();
    if secrets.is_empty() {
        return Err(SecretError::Invalid { path: path.to_owned(), reason: "holds no secret".into() });
    }
    Ok(secrets)
}

/// GitLab's `.gitlab_kas_secret`: base64 of exactly 32 bytes.
pub fn read_gitlab_secret(path: &Path) -> Result<Secret<Vec<u8>>, SecretError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| SecretError::Invalid { path: path.to_owned(), reason: format!("not base64: {e}") })?;
    if decoded.len() != GITLAB_SECRET_LEN {
        return Err(SecretError::Invalid {
            path: path.to_owned(),
            reason: format!(
                "decodes to {} bytes; GitLab's shared secret is exactly {GITLAB_SECRET_LEN}",
                decoded.len()
            ),
        });
    }
    Ok(Secret::new(decoded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_secrets_match_any_line_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, "old-secret\n\n  new-secret  \n").unwrap();
        let s = Secrets { webhook: read_webhook_secrets(&path).unwrap(), gitlab_jwt_key: None };
        assert!(s.webhook_token_matches(b"old-secret"));
        assert!(s.webhook_token_matches(b"new-secret"));
        assert!(!s.webhook_token_matches(b"new-secre"));
        assert!(!s.webhook_token_matches(b""));
    }

    #[test]
    fn generated_secret_is_private_and_not_regenerated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/webhook-secret");
        generate_webhook_secret(&path).unwrap();
        assert!(generate_webhook_secret(&path).is_err(), "must never overwrite a secret");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(read_webhook_secrets(&path).unwrap().len(), 1);
    }

    #[test]
    fn gitlab_secret_must_be_32_bytes_of_base64() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g");
        std::fs::write(&path, base64::engine::general_purpose::STANDARD.encode([7u8; 32])).unwrap();
        assert_eq!(read_gitlab_secret(&path).unwrap().expose().len(), 32);
        std::fs::write(&path, base64::engine::general_purpose::STANDARD.encode([7u8; 31])).unwrap();
        assert!(read_gitlab_secret(&path).unwrap_err().to_string().contains("exactly 32"));
        std::fs::write(&path, "not base64!").unwrap();
        assert!(read_gitlab_secret(&path).is_err());
    }
}
