//! GitLab webhook payloads → domain pushes. Pure: no I/O, so it can be fuzzed.
//!
//! Accepts project and group hooks (`X-Gitlab-Event: Push Hook` / `Tag Push Hook`) and system
//! hooks (`System Hook`, `event_name` push or tag_push; the project id may be only in the
//! top-level `project_id`). Other events are recognised and ignored, so GitLab never
//! auto-disables the hook.

use std::borrow::Cow;
use std::sync::Arc;

use serde::Deserialize;

use crate::domain::{EventKind, InvalidValue, ProjectPath, PushEvent, Visibility};

/// Longest ref name kept (Git itself has no hard limit; GitLab's are far shorter).
const MAX_REF_LEN: usize = 1024;
/// Longest commit id kept (SHA-256 object ids are 64 hex characters).
const MAX_SHA_LEN: usize = 64;

/// What a webhook asks of kas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hook {
    /// A push to record.
    Push(PushEvent),
    /// A kind kas does not act on, with the reason for the response body.
    Ignored(String),
}

/// Why a webhook body was refused (answered with 400).
#[derive(Debug, Clone, thiserror::Error)]
pub enum WebhookError {
    /// No `X-Gitlab-Event` header.
    #[error("missing X-Gitlab-Event header")]
    MissingEvent,
    /// The body is not the JSON GitLab sends (shared so the error stays `Clone`).
    #[error("malformed JSON: {0}")]
    Malformed(#[source] Arc<serde_json::Error>),
    /// The body is JSON but not an object.
    #[error("malformed JSON: expected a JSON object")]
    NotAnObject,
    /// A push without `project.path_with_namespace`.
    #[error("push without a project path (project.path_with_namespace)")]
    MissingProjectPath,
    /// A push without a positive project id.
    #[error("push without a project id (project.id or project_id)")]
    MissingProjectId,
    /// The project path is not one GitLab allows.
    #[error("{0}")]
    ProjectPath(#[source] InvalidValue),
    /// A field with an unusable value.
    #[error("{0}")]
    Invalid(String),
}

#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(borrow, default)]
    object_kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    event_name: Option<Cow<'a, str>>,
    #[serde(default)]
    project_id: Option<i64>,
    #[serde(borrow, default)]
    project: Option<ProjectPayload<'a>>,
    #[serde(borrow, default, rename = "ref")]
    git_ref: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    before: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    after: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ProjectPayload<'a> {
    #[serde(default)]
    id: Option<i64>,
    #[serde(borrow, default)]
    path_with_namespace: Option<Cow<'a, str>>,
    #[serde(default)]
    visibility_level: Option<i64>,
}

/// Parses a webhook given its `X-Gitlab-Event` header and body.
pub fn parse(event: Option<&str>, body: &[u8]) -> Result<Hook, WebhookError> {
    let event = event.ok_or(WebhookError::MissingEvent)?;
    let header_kind = match event {
        "Push Hook" => Some(EventKind::Push),
        "Tag Push Hook" => Some(EventKind::TagPush),
        "System Hook" => None,
        other => return Ok(Hook::Ignored(format!("{other} events are not acted on"))),
    };
    // serde would also take a struct from a JSON array; GitLab only ever sends an object.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(WebhookError::NotAnObject);
    }
    let payload: Payload<'_> = serde_json::from_slice(body).map_err(|e| WebhookError::Malformed(Arc::new(e)))?;
    // The body's own kind is the most specific: system hooks carry only `event_name`, project
    // hooks carry both it and `object_kind`.
    let body_kind = payload.object_kind.as_deref().or(payload.event_name.as_deref());
    let kind = match (body_kind, header_kind) {
        (Some("push"), _) => EventKind::Push,
        (Some("tag_push"), _) => EventKind::TagPush,
        (None, Some(kind)) => kind,
        (Some(other), _) => {
            return Ok(Hook::Ignored(format!("{event} event {other:?} is not acted on")));
        }
        (None, None) => return Ok(Hook::Ignored("system hook without event_name".into())),
    };
    let project = payload.project.as_ref();
    let path = project.and_then(|p| p.path_with_namespace.as_deref()).ok_or(WebhookError::MissingProjectPath)?;
    let project_path = ProjectPath::parse(path).map_err(WebhookError::ProjectPath)?;
    let project_id =
        project.and_then(|p| p.id).or(payload.project_id).filter(|id| *id > 0).ok_or(WebhookError::MissingProjectId)?;
    // An unknown level (a future GitLab's) leaves the registry as it is rather than guessing.
    let visibility = project.and_then(|p| p.visibility_level).and_then(|l| Visibility::from_level(l).ok());
    Ok(Hook::Push(PushEvent {
        project_id,
        project_path,
        kind,
        git_ref: bounded("ref", payload.git_ref, MAX_REF_LEN)?,
        before: bounded("before", payload.before, MAX_SHA_LEN)?,
        after: bounded("after", payload.after, MAX_SHA_LEN)?,
        visibility,
    }))
}

fn bounded(field: &str, value: Option<Cow<'_, str>>, max: usize) -> Result<Option<String>, WebhookError> {
    match value {
        Some(v) if v.len() > max => Err(WebhookError::Invalid(format!("{field} is longer than {max} bytes"))),
        Some(v) if v.is_empty() => Ok(None),
        other => Ok(other.map(Cow::into_owned)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn push(event: &str, body: &[u8]) -> PushEvent {
        match parse(Some(event), body).unwrap() {
            Hook::Push(p) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_fixture_is_a_push() {
        let p = push("Push Hook", &fixture("project-hook-push.json"));
        assert_eq!((p.project_id, p.project_path.as_str(), p.kind), (15, "mike/diaspora", EventKind::Push));
        assert_eq!(p.git_ref.as_deref(), Some("refs/heads/master"));
        assert_eq!(p.visibility, Some(Visibility::Private));
        let t = push("Tag Push Hook", &fixture("project-hook-tag-push.json"));
        assert_eq!((t.project_id, t.project_path.as_str(), t.kind), (1, "jsmith/example", EventKind::TagPush));
        assert_eq!(t.before.as_deref(), Some("0000000000000000000000000000000000000000"));
        let s = push("System Hook", &fixture("system-hook-push.json"));
        assert_eq!((s.project_id, s.project_path.as_str()), (15, "mike/diaspora"), "id from top-level project_id");
        let b = push("Push Hook", &fixture("test-button-push.json"));
        assert_eq!(b.project_path.as_str(), "gitlab/gitlab");
    }

    #[test]
    fn variants() {
        // Nested groups, branch deletion, unknown extra fields, missing optional fields.
        let body = br#"{"object_kind":"push","project":{"id":9,"path_with_namespace":"a/b/c/d","visibility_level":20,"new_field":{"x":[1]}},
            "after":"0000000000000000000000000000000000000000","checkout_sha":null,"brand_new":true}"#;
        let p = push("Push Hook", body);
        assert_eq!((p.project_id, p.project_path.as_str(), p.visibility), (9, "a/b/c/d", Some(Visibility::Public)));
        assert_eq!(p.after.as_deref(), Some("0000000000000000000000000000000000000000"));
        assert_eq!(p.git_ref, None);
        // System hook tag push.
        let t =
            push("System Hook", br#"{"event_name":"tag_push","project_id":4,"project":{"path_with_namespace":"g/p"}}"#);
        assert_eq!(t.kind, EventKind::TagPush);
        // Unknown visibility level: left unknown.
        let u = push("Push Hook", br#"{"project":{"id":1,"path_with_namespace":"g/p","visibility_level":15}}"#);
        assert_eq!(u.visibility, None);
    }

    #[test]
    fn ignored_kinds() {
        for (event, body) in [
            ("Merge Request Hook", &b"{}"[..]),
            ("Issue Hook", b"not even json"),
            ("System Hook", br#"{"event_name":"project_create","project_id":1}"#),
            ("System Hook", br#"{"event_name":"user_create"}"#),
            ("System Hook", br#"{}"#),
        ] {
            assert!(matches!(parse(Some(event), body), Ok(Hook::Ignored(_))), "{event} {body:?}");
        }
    }

    #[test]
    fn refusals() {
        assert!(matches!(parse(None, b"{}"), Err(WebhookError::MissingEvent)));
        assert!(matches!(parse(Some("Push Hook"), b"{"), Err(WebhookError::Malformed(_))));
        assert!(matches!(parse(Some("Push Hook"), b"[]"), Err(WebhookError::NotAnObject)));
        assert!(matches!(parse(Some("Push Hook"), br#"{"project_id":"15"}"#), Err(WebhookError::Malformed(_))));
        assert!(matches!(parse(Some("Push Hook"), br#"{"project":{"id":1}}"#), Err(WebhookError::MissingProjectPath)));
        assert!(matches!(
            parse(Some("Push Hook"), br#"{"project":{"path_with_namespace":"g/p"}}"#),
            Err(WebhookError::MissingProjectId)
        ));
        assert!(matches!(
            parse(Some("Push Hook"), br#"{"project_id":0,"project":{"path_with_namespace":"g/p"}}"#),
            Err(WebhookError::MissingProjectId)
        ));
        assert!(matches!(
            parse(Some("Push Hook"), br#"{"project":{"id":1,"path_with_namespace":"g/p q"}}"#),
            Err(WebhookError::ProjectPath(_))
        ));
        let long_ref = format!(r#"{{"project":{{"id":1,"path_with_namespace":"g/p"}},"ref":"{}"}}"#, "r".repeat(2000));
        assert!(matches!(parse(Some("Push Hook"), long_ref.as_bytes()), Err(WebhookError::Invalid(_))));
    }
}
