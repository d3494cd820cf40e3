//! A push to the container registry, reduced to what kas acts on: which repository, which tag
//! or digest, and which project the repository belongs to.

use super::InvalidValue;
use super::project::ProjectPath;

/// Longest registry event id kept (distribution sends UUIDs).
pub const MAX_EVENT_ID_LEN: usize = 255;
/// Longest tag the registry allows.
pub const MAX_TAG_LEN: usize = 128;
/// Longest manifest digest kept (`sha512:` and 128 hex characters is 135).
pub const MAX_DIGEST_LEN: usize = 160;

/// A manifest pushed to the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePush {
    /// The registry's event id: the de-duplication key (the registry retries until it gets 2xx).
    pub event_id: String,
    /// The repository (`group/project` or `group/project/image`); a project path's syntax.
    pub repository: ProjectPath,
    /// The tag, when a tagged manifest was pushed.
    pub tag: Option<String>,
    /// The manifest digest (`sha256:…`).
    pub digest: Option<String>,
    /// The registry host the client pushed to (`registry.example.com`), when the event says.
    pub host: Option<String>,
}

impl ImagePush {
    /// The project paths the repository could belong to, longest first: GitLab maps a
    /// repository to the longest project full path that is a prefix of it, and a project path
    /// has at least two segments.
    pub fn project_candidates(&self) -> Vec<ProjectPath> {
        let path = self.repository.as_str();
        let mut candidates = vec![self.repository.clone()];
        let mut end = path.len();
        while let Some(slash) = path[..end].rfind('/') {
            end = slash;
            match ProjectPath::parse(&path[..end]) {
                Ok(p) => candidates.push(p),
                Err(_) => break,
            }
        }
        candidates
    }
}

/// Checks a tag against the registry's grammar (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`).
pub fn validate_tag(tag: &str) -> Result<(), InvalidValue> {
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG_LEN
        && tag.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok { Ok(()) } else { Err(InvalidValue::new("tag", format!("{tag:?} is not a registry tag"))) }
}

/// Checks a digest's form (`algorithm:hex`).
pub fn validate_digest(digest: &str) -> Result<(), InvalidValue> {
    let ok = digest.len() <= MAX_DIGEST_LEN
        && digest.split_once(':').is_some_and(|(algorithm, hex)| {
            !algorithm.is_empty()
                && algorithm
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'.' | b'_' | b'-'))
                && hex.len() >= 32
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
        });
    if ok { Ok(()) } else { Err(InvalidValue::new("digest", format!("{digest:?} is not a manifest digest"))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(repository: &str) -> ImagePush {
        ImagePush {
            event_id: "e".into(),
            repository: ProjectPath::parse(repository).unwrap(),
            tag: None,
            digest: None,
            host: None,
        }
    }

    #[test]
    fn candidates_run_from_the_whole_repository_down_to_namespace_and_project() {
        let c: Vec<String> = push("group/sub/app/image").project_candidates().iter().map(|p| p.to_string()).collect();
        assert_eq!(c, ["group/sub/app/image", "group/sub/app", "group/sub"]);
        let c: Vec<String> = push("group/app").project_candidates().iter().map(|p| p.to_string()).collect();
        assert_eq!(c, ["group/app"]);
    }

    #[test]
    fn tags_and_digests() {
        for good in ["latest", "v1.2.3", "_x", "a-b_c.d"] {
            assert!(validate_tag(good).is_ok(), "{good}");
        }
        for bad in ["", ".x", "-x", "a/b", "a b", &"x".repeat(129)] {
            assert!(validate_tag(bad).is_err(), "{bad}");
        }
        assert!(validate_digest(&format!("sha256:{}", "ab".repeat(32))).is_ok());
        for bad in ["sha256", "sha256:xyz", ":abcd", &format!("SHA:{}", "a".repeat(64))] {
            assert!(validate_digest(bad).is_err(), "{bad}");
        }
    }
}
