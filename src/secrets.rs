//! Secrets read from files at start: the webhook secrets (each instance-wide or scoped to a
//! namespace), the admin secret for operator endpoints, and GitLab's shared JWT key. Each does
//! one job (docs/security.md).

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

/// What a webhook secret may speak for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HookScope {
    /// Any project: what a system hook's secret gets.
    Instance,
    /// Projects whose full path is this namespace or below it: what a group or project hook
    /// owner gets.
    Namespace(String),
}

impl HookScope {
    /// Whether a push for `path` may be submitted with this scope.
    pub fn allows(&self, path: &str) -> bool {
        match self {
            Self::Instance => true,
            Self::Namespace(ns) => {
                path.strip_prefix(ns.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
        }
    }
}

/// One line of the webhook secret file.
#[derive(Clone, Debug)]
pub struct WebhookSecret {
    /// The `X-Gitlab-Token` value.
    pub secret: Secret<Vec<u8>>,
    /// What it may speak for.
    pub scope: HookScope,
}

/// The secrets kas checks callers against.
#[derive(Clone, Debug)]
pub struct Secrets {
    /// Accepted `X-Gitlab-Token` values with their scopes; several during a rotation.
    pub webhook: Vec<WebhookSecret>,
    /// Bearer secret of the operator endpoints (`GET /agents`).
    pub admin: Secret<Vec<u8>>,
    /// GitLab's shared secret, decoded; `None` rejects every GitLab-facing call.
    pub gitlab_jwt_key: Option<Secret<Vec<u8>>>,
    /// What the container registry sends as `Authorization` to `POST /webhooks/registry`.
    pub registry: Secret<Vec<u8>>,
}

impl Secrets {
    /// Loads the configured files, generating the webhook and admin secrets in the data
    /// directory when no file is configured and none was generated before.
    pub fn load(config: &Config) -> Result<Self, SecretError> {
        let webhook_path = secret_file(
            config.webhook_secret_file.as_deref(),
            &config.store.data_dir,
            "webhook-secret",
            "use its content as the GitLab system hook's secret token",
        )?;
        let webhook = read_webhook_secrets(&webhook_path)?;
        let admin_path = secret_file(
            config.admin_secret_file.as_deref(),
            &config.store.data_dir,
            "admin-secret",
            "operators send it as Authorization: Bearer to GET /agents (kas agents reads it)",
        )?;
        let admin = read_admin_secret(&admin_path)?;
        if webhook.iter().any(|w| w.secret.expose() == admin.expose()) {
            return Err(SecretError::Invalid {
                path: admin_path,
                reason: "the admin secret must differ from every webhook secret".into(),
            });
        }
        let gitlab_jwt_key = config.gitlab_secret_file.as_deref().map(read_gitlab_secret).transpose()?;
        let registry_path = secret_file(
            config.registry_secret_file.as_deref(),
            &config.store.data_dir,
            "registry-secret",
            "put it in the registry's notification endpoint headers as Authorization (docs/oci.md)",
        )?;
        let registry = read_admin_secret(&registry_path)?;
        if registry.expose() == admin.expose() || webhook.iter().any(|w| w.secret.expose() == registry.expose()) {
            return Err(SecretError::Invalid {
                path: registry_path,
                reason: "the registry secret must differ from the admin and webhook secrets".into(),
            });
        }
        Ok(Self { webhook, admin, gitlab_jwt_key, registry })
    }

    /// The scope of the webhook secret `presented` equals, if any. Every secret is compared in
    /// constant time, so timing reveals neither whether nor which one matched.
    pub fn webhook_scope(&self, presented: &[u8]) -> Option<&HookScope> {
        use subtle::ConditionallySelectable;
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, s) in self.webhook.iter().enumerate() {
            let hit = s.secret.expose().as_slice().ct_eq(presented);
            index.conditional_assign(&(i as u64), hit);
            found |= hit;
        }
        bool::from(found).then(|| &self.webhook[index as usize].scope)
    }

    /// Whether `presented` is the registry's notification secret, in constant time.
    pub fn registry_matches(&self, presented: &[u8]) -> bool {
        self.registry.expose().as_slice().ct_eq(presented).into()
    }

    /// Whether `presented` is the admin secret, in constant time.
    pub fn admin_matches(&self, presented: &[u8]) -> bool {
        self.admin.expose().as_slice().ct_eq(presented).into()
    }
}

/// The configured file, or `<data dir>/<name>`, generated (0600) when missing.
fn secret_file(configured: Option<&Path>, data_dir: &Path, name: &str, hint: &str) -> Result<PathBuf, SecretError> {
    if let Some(path) = configured {
        return Ok(path.to_owned());
    }
    let path = data_dir.join(name);
    if !path.exists() {
        generate_secret(&path)?;
        tracing::info!(path = %path.display(), "generated {name}; {hint}");
    } else {
        tracing::info!(path = %path.display(), "using {name} in the data directory");
    }
    Ok(path)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SecretError + '_ {
    move |source| SecretError::Io { path: path.to_owned(), source }
}

/// Writes a new random secret to `path` (0600, in a 0700 directory created if missing); never
/// overwrites one.
fn generate_secret(path: &Path) -> Result<(), SecretError> {
    if let Some(dir) = path.parent() {
        crate::files::create_private_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut raw = [0u8; 32];
    getrandom::fill(&mut raw).map_err(|e| SecretError::Invalid { path: path.to_owned(), reason: e.to_string() })?;
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let mut file = crate::files::create_private_file(path).map_err(io_err(path))?;
    writeln!(file, "{secret}").map_err(io_err(path))
}

/// Shortest secret accepted: anything shorter can be guessed.
const MIN_SECRET_LEN: usize = 16;

/// One secret per non-empty line, `SECRET` (instance-wide) or `SECRET NAMESPACE` (projects at
/// or below the namespace); `#` starts a comment line. Never empty; no secret twice.
pub fn read_webhook_secrets(path: &Path) -> Result<Vec<WebhookSecret>, SecretError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let invalid = |line: usize, reason: String| SecretError::Invalid {
        path: path.to_owned(),
        reason: format!("line {line}: {reason}"),
    };
    let mut secrets: Vec<WebhookSecret> = Vec::new();
    for (n, line) in text.lines().enumerate().map(|(n, l)| (n + 1, l.trim())) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let secret = words.next().expect("non-empty line");
        let scope = match words.next() {
            None => HookScope::Instance,
            Some(ns) => HookScope::Namespace(parse_namespace(ns).map_err(|r| invalid(n, r))?),
        };
        if words.next().is_some() {
            return Err(invalid(n, "expected `SECRET` or `SECRET NAMESPACE`".into()));
        }
        if secret.len() < MIN_SECRET_LEN {
            return Err(invalid(n, format!("a secret needs at least {MIN_SECRET_LEN} characters")));
        }
        if secrets.iter().any(|s| s.secret.expose().as_slice() == secret.as_bytes()) {
            return Err(invalid(n, "this secret appears on an earlier line too".into()));
        }
        secrets.push(WebhookSecret { secret: Secret::new(secret.as_bytes().to_vec()), scope });
    }
    if secrets.is_empty() {
        return Err(SecretError::Invalid { path: path.to_owned(), reason: "holds no secret".into() });
    }
    Ok(secrets)
}

/// A namespace as GitLab spells group paths: segments of letters, digits, `_`, `-`, `.`.
fn parse_namespace(raw: &str) -> Result<String, String> {
    let raw = raw.trim_end_matches('/');
    let ok = !raw.is_empty()
        && raw.split('/').all(|seg| {
            !seg.is_empty() && seg.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        });
    if ok {
        Ok(raw.to_owned())
    } else {
        Err(format!("{raw:?} is not a namespace path such as my-group or my-group/sub"))
    }
}

/// A one-line secret (admin, registry): the first non-empty line.
pub fn read_admin_secret(path: &Path) -> Result<Secret<Vec<u8>>, SecretError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let secret = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or_else(|| SecretError::Invalid { path: path.to_owned(), reason: "holds no secret".into() })?;
    if secret.len() < MIN_SECRET_LEN {
        return Err(SecretError::Invalid {
            path: path.to_owned(),
            reason: format!("the admin secret needs at least {MIN_SECRET_LEN} characters"),
        });
    }
    Ok(Secret::new(secret.as_bytes().to_vec()))
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
    fn webhook_secrets_match_any_line_exactly_with_their_scope() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(
            &path,
            "# rotation\nold-secret-0123456789\n\n  new-secret-0123456789  \ngroup-secret-012345 my-group/sub\n",
        )
        .unwrap();
        let s = Secrets {
            webhook: read_webhook_secrets(&path).unwrap(),
            admin: Secret::new(b"admin-secret-0123456789".to_vec()),
            registry: Secret::new(b"registry-secret-0123456789".to_vec()),
            gitlab_jwt_key: None,
        };
        assert_eq!(s.webhook_scope(b"old-secret-0123456789"), Some(&HookScope::Instance));
        assert_eq!(s.webhook_scope(b"new-secret-0123456789"), Some(&HookScope::Instance));
        let scoped = s.webhook_scope(b"group-secret-012345").unwrap();
        assert_eq!(scoped, &HookScope::Namespace("my-group/sub".into()));
        assert!(scoped.allows("my-group/sub/app") && scoped.allows("my-group/sub"));
        assert!(!scoped.allows("my-group/subway/app") && !scoped.allows("my-group/app") && !scoped.allows("other/x"));
        assert_eq!(s.webhook_scope(b"new-secret-012345678"), None);
        assert_eq!(s.webhook_scope(b""), None);
        assert!(!s.admin_matches(b"new-secret-0123456789"));
        assert!(s.admin_matches(b"admin-secret-0123456789"));
        for bad in [
            "short",
            "same-secret-0123456789\nsame-secret-0123456789 g",
            "a-long-enough-secret g h",
            "a-long-enough-secret g//h",
        ] {
            std::fs::write(&path, bad).unwrap();
            assert!(read_webhook_secrets(&path).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn generated_secret_is_private_and_not_regenerated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/webhook-secret");
        generate_secret(&path).unwrap();
        assert!(generate_secret(&path).is_err(), "must never overwrite a secret");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
            assert_eq!(std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777, 0o700);
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
