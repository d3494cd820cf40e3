//! GitLab's commit statuses (`POST /api/v4/projects/:id/statuses/:sha`), posted with an API
//! token (scope `api`) that stays in kas: clusters never hold it. Every call has a deadline,
//! reads a bounded answer, never follows a redirect and never logs the token or a URL's
//! `user:password`. Retrying is the caller's (`actions::sync::poster`): this client says whether
//! a failure may pass.

use std::sync::Arc;

use serde::Serialize;

use crate::config::Secret;
use crate::gitlab::client::{GitLabError, api_base, http_client, read_at_most, redact_url};
use crate::metrics::Metrics;

/// Largest answer read (a status is about 1 KiB of JSON).
const MAX_ANSWER: usize = 64 * 1024;

/// One commit status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CommitStatus {
    /// Full project path (URL-encoded into the path as GitLab's `:id`).
    #[serde(skip)]
    pub project: String,
    /// Commit sha.
    #[serde(skip)]
    pub sha: String,
    /// `pending`, `running`, `success`, `failed` or `canceled`.
    pub state: String,
    /// `flux/<agent>/<namespace>/<kustomization>`.
    pub name: String,
    /// At most 255 characters.
    pub description: String,
    /// Branch or tag, when known.
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
}

/// What became of a status GitLab took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    /// GitLab created it.
    Created,
    /// GitLab has this or a later state already (400 "Cannot transition status"): another
    /// replica or an earlier run posted it.
    AlreadyReported,
}

/// Why a status was not posted.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// It may pass (GitLab down, slow, 5xx, 429): try again later.
    #[error("{0}")]
    Retry(GitLabError),
    /// GitLab refused it for good (401/403: the token; 404: no such project or commit).
    #[error("GitLab refused the status: {status}: {message}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// GitLab's message, cut short.
        message: String,
    },
}

/// Where statuses go and the file of the token that posts them: the status settings, else GitLab
/// mode's URL and API token; `None` when either is missing (sync status is off).
pub fn credentials(config: &crate::config::Config) -> Option<(&str, &std::path::Path)> {
    let url = config.gitlab_status_url.as_deref().or(config.gitlab_url.as_deref())?;
    let token = config.gitlab_status_token_file.as_deref().or(config.gitlab_api_token_file.as_deref())?;
    Some((url, token))
}

/// A client of one GitLab's commit statuses.
pub struct StatusClient {
    http: reqwest::Client,
    base: reqwest::Url,
    token: Secret<String>,
    metrics: Arc<Metrics>,
}

impl StatusClient {
    /// A client for GitLab at `base` with `token`, trusting `extra_roots` besides the public roots.
    pub fn new(
        base: &str,
        token: Secret<String>,
        extra_roots: Vec<reqwest::Certificate>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let http = http_client(extra_roots)?;
        let base = api_base(base)?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(format!("{}: not an http(s) URL", redact_url(base.as_str())));
        }
        Ok(Self { http, base, token, metrics })
    }

    /// GitLab's URL as kas calls it (never with a user or password): for logs.
    pub fn base_url(&self) -> &str {
        self.base.as_str().trim_end_matches('/')
    }

    /// Posts one status.
    pub async fn post(&self, status: &CommitStatus) -> Result<Posted, StatusError> {
        let mut url = self.base.clone();
        // One segment each: the project path's slashes are encoded (`group%2Fapp`).
        url.path_segments_mut().expect("http(s) base").pop_if_empty().extend([
            "api",
            "v4",
            "projects",
            &status.project,
            "statuses",
            &status.sha,
        ]);
        let request = self.http.post(url).header("PRIVATE-TOKEN", sensitive(self.token.expose())).json(status);
        let result = async {
            let response = request.send().await.map_err(|e| GitLabError::Unavailable(e.without_url().to_string()))?;
            let code = response.status().as_u16();
            let body = read_at_most(response, MAX_ANSWER).await?;
            Ok::<_, GitLabError>((code, body))
        }
        .await;
        let outcome = match &result {
            Ok((code, body)) => classify(*code, body),
            Err(e) => Err(StatusError::Retry(e.clone())),
        };
        let label = match &outcome {
            Ok(_) => "ok",
            Err(StatusError::Refused { .. }) => "refused",
            Err(StatusError::Retry(GitLabError::TooLarge(_))) => "too_large",
            Err(StatusError::Retry(_)) => "error",
        };
        self.metrics.gitlab_call("commit_status", label);
        outcome
    }
}

/// GitLab's answer as an outcome.
fn classify(code: u16, body: &[u8]) -> Result<Posted, StatusError> {
    let message = || {
        let text = String::from_utf8_lossy(body);
        let text: String = text.chars().take(200).collect();
        text
    };
    match code {
        200..=299 => Ok(Posted::Created),
        // GitLab's state machine refuses to move a status back (running after success) or to
        // the state it has: that state, or a later one, was reported already.
        400 if message().to_ascii_lowercase().contains("cannot transition") => Ok(Posted::AlreadyReported),
        408 | 429 | 500..=599 => Err(StatusError::Retry(GitLabError::Status(code))),
        status => Err(StatusError::Refused { status, message: message() }),
    }
}

/// A header value that HTTP tooling must not log.
fn sensitive(value: &str) -> reqwest::header::HeaderValue {
    let mut v =
        reqwest::header::HeaderValue::from_str(value).unwrap_or_else(|_| reqwest::header::HeaderValue::from_static(""));
    v.set_sensitive(true);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_classified() {
        assert!(matches!(classify(201, b"{}"), Ok(Posted::Created)));
        let refused = br#"{"message":"Cannot transition status via :run from :success (Reason(s): Status cannot transition via \"run\")"}"#;
        assert!(matches!(classify(400, refused), Ok(Posted::AlreadyReported)));
        assert!(matches!(
            classify(400, b"{\"message\":\"state is invalid\"}"),
            Err(StatusError::Refused { status: 400, .. })
        ));
        assert!(matches!(classify(403, b""), Err(StatusError::Refused { status: 403, .. })));
        assert!(matches!(classify(404, b""), Err(StatusError::Refused { status: 404, .. })));
        assert!(matches!(classify(500, b""), Err(StatusError::Retry(GitLabError::Status(500)))));
        assert!(matches!(classify(429, b""), Err(StatusError::Retry(_))));
    }

    #[test]
    fn credentials_come_from_the_status_settings_else_gitlab_mode() {
        let dir = tempfile::tempdir().unwrap();
        let resolve = |tweak: &dyn Fn(&mut crate::config::Settings)| {
            let mut s =
                crate::config::Settings { data_dir: Some(dir.path().display().to_string()), ..Default::default() };
            tweak(&mut s);
            s.resolve().unwrap()
        };
        let path = std::path::Path::new;
        assert_eq!(credentials(&resolve(&|_| {})), None);
        let local = resolve(&|s| s.gitlab_status_url = Some("https://gitlab.example.com".into()));
        assert_eq!(credentials(&local), None, "a URL without a token");
        let local = resolve(&|s| {
            s.gitlab_status_url = Some("https://gitlab.example.com/".into());
            s.gitlab_status_token_file = Some("/t".into());
        });
        assert_eq!(credentials(&local), Some(("https://gitlab.example.com", path("/t"))));
        let gitlab_mode = |s: &mut crate::config::Settings| {
            s.gitlab_url = Some("http://gitlab.internal".into());
            s.gitlab_api_token_file = Some("/api".into());
        };
        assert_eq!(credentials(&resolve(&gitlab_mode)), Some(("http://gitlab.internal", path("/api"))));
        let both = resolve(&|s| {
            gitlab_mode(s);
            s.gitlab_status_token_file = Some("/status".into());
        });
        assert_eq!(credentials(&both), Some(("http://gitlab.internal", path("/status"))));
    }

    #[test]
    fn the_body_is_what_gitlab_reads() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let status = CommitStatus {
            project: "group/app".into(),
            sha: "ab".into(),
            state: "success".into(),
            name: "flux/prod/flux-system/apps".into(),
            description: "Applied".into(),
            git_ref: None,
        };
        let body = serde_json::to_value(&status).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"state": "success", "name": "flux/prod/flux-system/apps", "description": "Applied"})
        );
        assert!(
            StatusClient::new("ftp://x", Secret::new(String::new()), Vec::new(), Arc::new(Metrics::new())).is_err()
        );
        let client = StatusClient::new(
            "https://u:p@gitlab.example.com/",
            Secret::new("t".into()),
            Vec::new(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        assert_eq!(client.base_url(), "https://gitlab.example.com");
    }
}
