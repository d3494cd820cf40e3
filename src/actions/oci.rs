//! Which Flux `OCIRepository` objects an image push concerns, and the patch that asks Flux to
//! reconcile one now. Pure: the cluster's answers come in as bytes, requests go out as values.

use serde::Deserialize;

/// Flux's source API group.
pub const SOURCE_GROUP: &str = "source.toolkit.fluxcd.io";
/// Versions of OCIRepository to try, newest first (`v1` since Flux 2.6).
pub const VERSIONS: [&str; 2] = ["v1", "v1beta2"];
/// The annotation `flux reconcile source oci` sets.
pub const REQUESTED_AT: &str = "reconcile.fluxcd.io/requestedAt";

/// An OCIRepository to reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRepository {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl OciRepository {
    /// The object's API path under `version`.
    pub fn path(&self, version: &str) -> String {
        format!("/apis/{SOURCE_GROUP}/{version}/namespaces/{}/ocirepositories/{}", self.namespace, self.name)
    }
}

/// The list path across namespaces under `version`.
pub fn list_path(version: &str) -> String {
    format!("/apis/{SOURCE_GROUP}/{version}/ocirepositories")
}

/// The merge patch that requests a reconcile at `requested_at` (RFC 3339).
pub fn reconcile_patch(requested_at: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"metadata": {"annotations": {REQUESTED_AT: requested_at}}}))
        .expect("serializable")
}

/// What was pushed, as the selection needs it.
#[derive(Debug, Clone, Copy)]
pub struct Pushed<'a> {
    /// Registry host, lower-case (`registry.example.com`).
    pub host: &'a str,
    /// Repository path.
    pub repository: &'a str,
    /// Pushed tag, if any.
    pub tag: Option<&'a str>,
}

#[derive(Deserialize)]
struct List {
    #[serde(default)]
    items: Vec<Item>,
}

#[derive(Deserialize)]
struct Item {
    metadata: Metadata,
    #[serde(default)]
    spec: Spec,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
    #[serde(default)]
    namespace: String,
}

#[derive(Deserialize, Default)]
struct Spec {
    #[serde(default)]
    url: String,
    #[serde(default, rename = "ref")]
    reference: Option<Reference>,
}

#[derive(Deserialize, Default)]
struct Reference {
    #[serde(default)]
    tag: Option<String>,
    #[serde(default)]
    semver: Option<String>,
    #[serde(default)]
    digest: Option<String>,
}

/// The objects of an `OCIRepositoryList` that follow the pushed repository and whose reference
/// the push can move: a tag equal to the pushed one, a semver range (Flux picks the newest
/// match), or no reference (the `latest` tag). A digest pin never moves. The URL is compared
/// case-insensitively, without a trailing slash.
pub fn matching(list: &[u8], pushed: Pushed<'_>) -> Result<Vec<OciRepository>, serde_json::Error> {
    let list: List = serde_json::from_slice(list)?;
    let wanted = format!("oci://{}/{}", pushed.host, pushed.repository).to_ascii_lowercase();
    Ok(list
        .items
        .into_iter()
        .filter(|item| item.spec.url.trim_end_matches('/').eq_ignore_ascii_case(&wanted))
        .filter(|item| moves(item.spec.reference.as_ref(), pushed.tag))
        .filter(|item| valid_name(&item.metadata.namespace) && valid_name(&item.metadata.name))
        .map(|item| OciRepository { namespace: item.metadata.namespace, name: item.metadata.name })
        .collect())
}

fn moves(reference: Option<&Reference>, pushed: Option<&str>) -> bool {
    let Some(r) = reference else { return pushed.is_none_or(|t| t == "latest") };
    if r.digest.as_deref().is_some_and(|d| !d.is_empty()) {
        return false;
    }
    if r.semver.as_deref().is_some_and(|s| !s.is_empty()) {
        return true;
    }
    match r.tag.as_deref().filter(|t| !t.is_empty()) {
        Some(tag) => pushed == Some(tag),
        None => pushed.is_none_or(|t| t == "latest"),
    }
}

/// A Kubernetes object name or namespace (DNS subdomain characters), so it is safe in a path.
fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST: &str = r#"{"kind":"OCIRepositoryList","items":[
      {"metadata":{"name":"web","namespace":"flux-system"},"spec":{"url":"oci://Registry.Example.com/group/app/web/","ref":{"tag":"v1.4.0"}}},
      {"metadata":{"name":"web-latest","namespace":"apps"},"spec":{"url":"oci://registry.example.com/group/app/web"}},
      {"metadata":{"name":"web-semver","namespace":"apps"},"spec":{"url":"oci://registry.example.com/group/app/web","ref":{"semver":">=1.0.0"}}},
      {"metadata":{"name":"web-pinned","namespace":"apps"},"spec":{"url":"oci://registry.example.com/group/app/web","ref":{"digest":"sha256:00"}}},
      {"metadata":{"name":"web-other-tag","namespace":"apps"},"spec":{"url":"oci://registry.example.com/group/app/web","ref":{"tag":"v2"}}},
      {"metadata":{"name":"api","namespace":"apps"},"spec":{"url":"oci://registry.example.com/group/app/api","ref":{"tag":"v1.4.0"}}},
      {"metadata":{"name":"elsewhere","namespace":"apps"},"spec":{"url":"oci://ghcr.io/group/app/web","ref":{"tag":"v1.4.0"}}},
      {"metadata":{"name":"Bad/Name","namespace":"apps"},"spec":{"url":"oci://registry.example.com/group/app/web"}}
    ]}"#;

    fn names(found: Vec<OciRepository>) -> Vec<String> {
        found.into_iter().map(|r| format!("{}/{}", r.namespace, r.name)).collect()
    }

    #[test]
    fn a_tag_push_moves_its_tag_semver_ranges_but_no_pin_and_no_other_repository() {
        let pushed = Pushed { host: "registry.example.com", repository: "group/app/web", tag: Some("v1.4.0") };
        assert_eq!(names(matching(LIST.as_bytes(), pushed).unwrap()), ["flux-system/web", "apps/web-semver"]);
    }

    #[test]
    fn a_latest_push_moves_unpinned_objects() {
        let pushed = Pushed { host: "registry.example.com", repository: "group/app/web", tag: Some("latest") };
        assert_eq!(names(matching(LIST.as_bytes(), pushed).unwrap()), ["apps/web-latest", "apps/web-semver"]);
    }

    #[test]
    fn paths_and_patch() {
        let r = OciRepository { namespace: "apps".into(), name: "web".into() };
        assert_eq!(r.path("v1"), "/apis/source.toolkit.fluxcd.io/v1/namespaces/apps/ocirepositories/web");
        assert_eq!(list_path("v1beta2"), "/apis/source.toolkit.fluxcd.io/v1beta2/ocirepositories");
        let patch: serde_json::Value = serde_json::from_slice(&reconcile_patch("2026-11-28T09:30:00.123Z")).unwrap();
        assert_eq!(patch["metadata"]["annotations"][REQUESTED_AT], "2026-11-28T09:30:00.123Z");
        assert!(matching(b"not json", Pushed { host: "h", repository: "g/p", tag: None }).is_err());
    }
}
