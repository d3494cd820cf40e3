//! Container registry notifications → image pushes. Pure: no I/O, so it can be fuzzed.
//!
//! The registry (distribution, which GitLab's container registry is) POSTs an envelope
//! `{"events": [...]}` to each notification endpoint, retrying until it gets 2xx. Manifest
//! pushes (a tag, or a manifest digest) are what kas acts on; pulls, mounts, deletes and blob
//! uploads are acknowledged and ignored, so the registry never backs off on kas.

use std::borrow::Cow;

use serde::Deserialize;

use crate::domain::image::{MAX_EVENT_ID_LEN, validate_digest, validate_tag};
use crate::domain::{ImagePush, ProjectPath};

/// Most events one envelope may carry (distribution sends one per request by default).
pub const MAX_EVENTS: usize = 1000;
/// Longest registry host kept.
const MAX_HOST_LEN: usize = 255;

/// What one event of an envelope asks of kas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryEvent {
    /// A manifest push to record.
    Push(ImagePush),
    /// An event kas does not act on, with the reason.
    Ignored(String),
}

/// Why an envelope was refused (answered with 400; nothing of it is recorded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The body is not the JSON the registry sends.
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// More events than one envelope may carry.
    #[error("more than {MAX_EVENTS} events in one envelope")]
    TooManyEvents,
    /// An event with an unusable value.
    #[error("event {index}: {reason}")]
    Invalid {
        /// Position in the envelope.
        index: usize,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow)]
    events: Vec<Event<'a>>,
}

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    action: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    target: Option<Target<'a>>,
    #[serde(borrow, default)]
    request: Option<Request<'a>>,
}

#[derive(Deserialize)]
struct Target<'a> {
    #[serde(borrow, default, rename = "mediaType")]
    media_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    digest: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    repository: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    url: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    tag: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow, default)]
    host: Option<Cow<'a, str>>,
}

/// Parses a notification envelope: one outcome per event, in order, or an error for the whole
/// envelope (the registry then retries it, and a broken one is never half recorded).
pub fn parse(body: &[u8]) -> Result<Vec<RegistryEvent>, RegistryError> {
    let envelope: Envelope = serde_json::from_slice(body).map_err(|e| RegistryError::Malformed(e.to_string()))?;
    if envelope.events.len() > MAX_EVENTS {
        return Err(RegistryError::TooManyEvents);
    }
    envelope
        .events
        .into_iter()
        .enumerate()
        .map(|(index, event)| event_of(event).map_err(|reason| RegistryError::Invalid { index, reason }))
        .collect()
}

fn event_of(event: Event<'_>) -> Result<RegistryEvent, String> {
    let action = event.action.as_deref().unwrap_or("");
    if action != "push" {
        let shown = if action.is_empty() { "an event without action" } else { "an event" };
        return Ok(RegistryEvent::Ignored(format!("{shown} {:?} is not a push", truncate(action))));
    }
    let Some(target) = event.target else {
        return Err("a push without a target".into());
    };
    let tag = target.tag.as_deref().filter(|t| !t.is_empty());
    if tag.is_none() && !is_manifest(&target) {
        return Ok(RegistryEvent::Ignored("a blob push (no tag, not a manifest)".into()));
    }
    let id = event.id.as_deref().unwrap_or("");
    if id.is_empty() || id.len() > MAX_EVENT_ID_LEN || id.chars().any(char::is_control) {
        return Err(format!("id must be 1 to {MAX_EVENT_ID_LEN} printable characters"));
    }
    let repository = target.repository.as_deref().ok_or("a push without target.repository")?;
    let repository = ProjectPath::parse(repository).map_err(|e| format!("target.repository: {}", e.reason))?;
    if let Some(tag) = tag {
        validate_tag(tag).map_err(|e| format!("target.tag: {}", e.reason))?;
    }
    let digest = target.digest.as_deref().filter(|d| !d.is_empty());
    if let Some(digest) = digest {
        validate_digest(digest).map_err(|e| format!("target.digest: {}", e.reason))?;
    }
    let host =
        event.request.and_then(|r| r.host).map(|h| h.trim().to_ascii_lowercase()).filter(|h| {
            !h.is_empty() && h.len() <= MAX_HOST_LEN && h.bytes().all(|b| b.is_ascii_graphic() && b != b'/')
        });
    Ok(RegistryEvent::Push(ImagePush {
        event_id: id.to_owned(),
        repository,
        tag: tag.map(str::to_owned),
        digest: digest.map(str::to_owned),
        host,
    }))
}

/// Whether the pushed object is a manifest (or an index of manifests) rather than a blob.
fn is_manifest(target: &Target<'_>) -> bool {
    let media = target.media_type.as_deref().unwrap_or("");
    media.contains("manifest")
        || media.ends_with("image.index.v1+json")
        || target.url.as_deref().is_some_and(|u| u.contains("/manifests/"))
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(32) {
        Some((at, _)) => &s[..at],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    #[test]
    fn a_tagged_manifest_push_of_a_nested_image() {
        let events = parse(&fixture("registry-push-v1.json")).unwrap();
        let [RegistryEvent::Push(push)] = events.as_slice() else { panic!("{events:?}") };
        assert_eq!(push.repository.as_str(), "group/app/web");
        assert_eq!(push.tag.as_deref(), Some("v1.4.0"));
        assert_eq!(push.host.as_deref(), Some("registry.example.com"));
        assert!(push.digest.as_deref().unwrap().starts_with("sha256:"));
        assert_eq!(push.event_id, "8cf1ad9c-9b47-4a3e-9d6a-1b3bce7f6e11");
    }

    #[test]
    fn an_envelope_mixing_blob_pull_and_manifest_events() {
        let events = parse(&fixture("registry-mixed-v2.json")).unwrap();
        assert!(matches!(&events[0], RegistryEvent::Ignored(r) if r.contains("blob")), "{events:?}");
        assert!(matches!(&events[1], RegistryEvent::Push(p) if p.tag.is_none() && p.digest.is_some()), "{events:?}");
        assert!(matches!(&events[2], RegistryEvent::Ignored(r) if r.contains("pull")), "{events:?}");
        assert!(matches!(&events[3], RegistryEvent::Ignored(r) if r.contains("delete")), "{events:?}");
    }

    #[test]
    fn broken_envelopes_are_refused_whole() {
        assert!(matches!(parse(b"{"), Err(RegistryError::Malformed(_))));
        assert!(matches!(parse(b"{}"), Err(RegistryError::Malformed(_))));
        let no_id = br#"{"events":[{"action":"push","target":{"repository":"g/p","tag":"x"}}]}"#;
        assert!(matches!(parse(no_id), Err(RegistryError::Invalid { index: 0, .. })));
        let bad_repo = br#"{"events":[{"id":"1","action":"push","target":{"repository":"p","tag":"x"}}]}"#;
        assert!(matches!(parse(bad_repo), Err(RegistryError::Invalid { .. })));
        let bad_tag = br#"{"events":[{"id":"1","action":"push","target":{"repository":"g/p","tag":"-x"}}]}"#;
        assert!(matches!(parse(bad_tag), Err(RegistryError::Invalid { .. })));
        let many = format!(r#"{{"events":[{}]}}"#, vec![r#"{"action":"pull"}"#; MAX_EVENTS + 1].join(","));
        assert_eq!(parse(many.as_bytes()), Err(RegistryError::TooManyEvents));
    }
}
