//! What Flux says about a cluster's Kustomizations, as GitLab commit statuses need it: the list
//! answers parsed, each Kustomization mapped to (project, commit, state) through its source.
//! Pure: the cluster's answers come in as bytes, statuses go out as values.

use std::collections::HashMap;

use serde::Deserialize;

/// Kustomizations across namespaces.
pub const KUSTOMIZATIONS: &str = "/apis/kustomize.toolkit.fluxcd.io/v1/kustomizations";
/// GitRepositories across namespaces.
pub const GIT_REPOSITORIES: &str = "/apis/source.toolkit.fluxcd.io/v1/gitrepositories";
/// OCIRepositories across namespaces, newest API version first (`v1` since Flux 2.6).
pub const OCI_REPOSITORIES: [&str; 2] =
    ["/apis/source.toolkit.fluxcd.io/v1/ocirepositories", "/apis/source.toolkit.fluxcd.io/v1beta2/ocirepositories"];
/// GitLab's limit on a commit status description.
pub const MAX_DESCRIPTION: usize = 255;
/// The annotation `flux push artifact --source` sets.
const OCI_SOURCE: &str = "org.opencontainers.image.source";
/// The annotation `flux push artifact --revision` sets.
const OCI_REVISION: &str = "org.opencontainers.image.revision";

/// A commit status state, as GitLab names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncState {
    /// Flux is applying the revision.
    Running,
    /// Ready=True: applied.
    Success,
    /// Ready=False or Stalled.
    Failed,
}

impl SyncState {
    /// GitLab's name of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Success => "success",
            Self::Failed => "failed",
        }
    }

    /// The stored name back.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "running" => Some(Self::Running),
            "success" => Some(Self::Success),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

#[derive(Debug, Deserialize)]
struct List<T> {
    #[serde(default = "Vec::new")]
    items: Vec<T>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Metadata {
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SourceRef {
    #[serde(default)]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KustomizationSpec {
    #[serde(default)]
    source_ref: SourceRef,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Condition {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    message: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KustomizationStatus {
    #[serde(default)]
    conditions: Vec<Condition>,
    #[serde(default)]
    last_applied_revision: Option<String>,
    #[serde(default)]
    last_attempted_revision: Option<String>,
}

/// A Flux Kustomization, as much of it as statuses need.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Kustomization {
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: KustomizationSpec,
    #[serde(default)]
    status: KustomizationStatus,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct GitSpec {
    #[serde(default)]
    url: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct Artifact {
    #[serde(default)]
    revision: Option<String>,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct SourceStatus {
    #[serde(default)]
    artifact: Option<Artifact>,
}

/// A Flux GitRepository or OCIRepository.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Source {
    #[serde(default)]
    metadata: Metadata,
    #[serde(default)]
    spec: GitSpec,
    #[serde(default)]
    status: SourceStatus,
}

/// Parses a `KustomizationList`.
pub fn kustomizations(body: &[u8]) -> Result<Vec<Kustomization>, serde_json::Error> {
    Ok(serde_json::from_slice::<List<Kustomization>>(body)?.items)
}

/// Parses a `GitRepositoryList` or `OCIRepositoryList`.
pub fn sources(body: &[u8]) -> Result<Vec<Source>, serde_json::Error> {
    Ok(serde_json::from_slice::<List<Source>>(body)?.items)
}

/// The sources of one cluster, by (namespace, name).
#[derive(Debug, Default)]
pub struct Sources {
    git: HashMap<(String, String), Source>,
    oci: HashMap<(String, String), Source>,
}

impl Sources {
    /// Indexes the listed GitRepositories and OCIRepositories.
    pub fn new(git: Vec<Source>, oci: Vec<Source>) -> Self {
        let by_name = |list: Vec<Source>| {
            list.into_iter().map(|s| ((s.metadata.namespace.clone(), s.metadata.name.clone()), s)).collect()
        };
        Self { git: by_name(git), oci: by_name(oci) }
    }
}

/// One Kustomization's state for one commit of one project: what becomes a commit status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    /// Namespace of the Kustomization.
    pub namespace: String,
    /// Name of the Kustomization.
    pub name: String,
    /// The revision Flux names (`main@sha1:…`, or `v1@sha256:…` for OCI).
    pub revision: String,
    /// The state.
    pub state: SyncState,
    /// The Ready (or Stalled) condition's message.
    pub message: String,
    /// Where it maps to: (project path, commit sha, ref), or why it does not.
    pub target: Result<Target, Unmapped>,
}

/// The project and commit a Kustomization's revision belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Full project path on the GitLab host.
    pub project: String,
    /// 40 hex digits, lower case.
    pub sha: String,
    /// Branch or tag, when the revision names one.
    pub git_ref: Option<String>,
}

/// Why a Kustomization maps to no GitLab commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmapped {
    /// Its source is not listed (or is a kind kas does not follow, e.g. Bucket).
    NoSource,
    /// The source's URL is not on the GitLab host.
    OtherHost,
    /// The revision names no Git commit (an OCI artifact without `--source`/`--revision`).
    NoCommit,
}

impl Unmapped {
    /// Short name for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoSource => "no_source",
            Self::OtherHost => "other_host",
            Self::NoCommit => "no_commit",
        }
    }
}

impl Kustomization {
    /// Namespace and name.
    pub fn key(&self) -> (String, String) {
        (self.metadata.namespace.clone(), self.metadata.name.clone())
    }

    fn condition(&self, kind: &str) -> Option<&Condition> {
        self.status.conditions.iter().find(|c| c.kind == kind)
    }

    /// The state Flux reports; `None` before Flux has said anything.
    pub fn state(&self) -> Option<(SyncState, String)> {
        let ready = self.condition("Ready");
        if let Some(stalled) = self.condition("Stalled").filter(|c| c.status == "True") {
            return Some((SyncState::Failed, stalled.message.clone()));
        }
        match ready {
            Some(c) if c.status == "True" => Some((SyncState::Success, c.message.clone())),
            Some(c) if c.status == "False" && !self.reconciling() => Some((SyncState::Failed, c.message.clone())),
            Some(c) => Some((SyncState::Running, c.message.clone())),
            None if self.reconciling() => Some((SyncState::Running, String::new())),
            None => None,
        }
    }

    fn reconciling(&self) -> bool {
        self.condition("Reconciling").is_some_and(|c| c.status == "True")
    }
}

/// Maps a Kustomization to what GitLab should hear, `None` while Flux has no state or no
/// revision for it. `gitlab_host` is the host (lower case, with a port if not the default) of
/// GitLab's external URL: sources elsewhere are not GitLab's.
pub fn observe(k: &Kustomization, sources: &Sources, gitlab_host: &str) -> Option<Observed> {
    let (state, message) = k.state()?;
    let source_ns = k.spec.source_ref.namespace.clone().unwrap_or_else(|| k.metadata.namespace.clone());
    let source_key = (source_ns, k.spec.source_ref.name.clone());
    let (git, oci) = match k.spec.source_ref.kind.as_str() {
        "GitRepository" => (sources.git.get(&source_key), None),
        "OCIRepository" => (None, sources.oci.get(&source_key)),
        _ => (None, None),
    };
    let artifact_revision = git.or(oci).and_then(|s| s.status.artifact.as_ref()).and_then(|a| a.revision.clone());
    // Success is about what was applied; a running or failing attempt is about what Flux is
    // trying, which for a fresh commit is the source's newest artifact.
    let revision = match state {
        SyncState::Success => k.status.last_applied_revision.clone(),
        SyncState::Failed => k.status.last_attempted_revision.clone().or(k.status.last_applied_revision.clone()),
        SyncState::Running => artifact_revision.clone().or(k.status.last_attempted_revision.clone()),
    }?;
    // Flux re-applies what it applied every interval (Ready=Unknown meanwhile): that is no news
    // for GitLab, and a `running` after `success` would read as a new deployment.
    if state == SyncState::Running && k.status.last_applied_revision.as_deref() == Some(revision.as_str()) {
        return None;
    }
    let target = match (git, oci) {
        (Some(git), _) => match project_of_url(&git.spec.url, gitlab_host) {
            None => Err(Unmapped::OtherHost),
            Some(project) => match git_commit(&revision) {
                Some((git_ref, sha)) => Ok(Target { project, sha, git_ref }),
                None => Err(Unmapped::NoCommit),
            },
        },
        (None, Some(oci)) => oci_target(oci, &revision, gitlab_host),
        (None, None) => Err(Unmapped::NoSource),
    };
    Some(Observed {
        namespace: k.metadata.namespace.clone(),
        name: k.metadata.name.clone(),
        revision,
        state,
        message,
        target,
    })
}

/// The commit an OCI artifact was pushed from, when its annotations say, and only for the
/// artifact the Kustomization's revision names (another artifact's annotations would name
/// another commit).
fn oci_target(oci: &Source, revision: &str, gitlab_host: &str) -> Result<Target, Unmapped> {
    let artifact = oci.status.artifact.as_ref().ok_or(Unmapped::NoCommit)?;
    if artifact.revision.as_deref().is_some_and(|r| r != revision) {
        return Err(Unmapped::NoCommit);
    }
    let source = artifact.metadata.get(OCI_SOURCE).ok_or(Unmapped::NoCommit)?;
    let commit = artifact.metadata.get(OCI_REVISION).ok_or(Unmapped::NoCommit)?;
    let project = project_of_url(source, gitlab_host).ok_or(Unmapped::OtherHost)?;
    let (git_ref, sha) = git_commit(commit).ok_or(Unmapped::NoCommit)?;
    Ok(Target { project, sha, git_ref })
}

/// `<ref>@sha1:<sha>` (Flux v1), `<ref>/<sha>` (older Flux) or a bare sha → (ref, sha).
pub fn git_commit(revision: &str) -> Option<(Option<String>, String)> {
    let (git_ref, sha) = match revision.rsplit_once("@sha1:") {
        Some((r, s)) => (Some(r), s),
        None => match revision.rsplit_once('/') {
            Some((r, s)) => (Some(r), s),
            None => (None, revision.strip_prefix("sha1:").unwrap_or(revision)),
        },
    };
    if sha.len() != 40 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let git_ref = git_ref
        .filter(|r| !r.is_empty())
        .map(|r| r.strip_prefix("refs/heads/").or_else(|| r.strip_prefix("refs/tags/")).unwrap_or(r).to_owned());
    Some((git_ref, sha.to_ascii_lowercase()))
}

/// The project path of a Git URL on `gitlab_host`: `https://host/group/project(.git)`,
/// `ssh://git@host(:port)/group/project(.git)` or `git@host:group/project(.git)`. `None` for
/// any other host.
pub fn project_of_url(url: &str, gitlab_host: &str) -> Option<String> {
    let url = url.trim();
    let (host, path) = if let Some((scheme, rest)) = url.split_once("://") {
        if !matches!(scheme.to_ascii_lowercase().as_str(), "https" | "http" | "ssh") {
            return None;
        }
        let (authority, path) = rest.split_once('/')?;
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        // ssh URLs name the SSH port, which is not the web host's.
        let host = if scheme.eq_ignore_ascii_case("ssh") { host.split(':').next()? } else { host };
        (host.to_owned(), path)
    } else {
        // scp-like: git@host:group/project.git
        let (user_host, path) = url.split_once(':')?;
        let host = user_host.rsplit_once('@').map_or(user_host, |(_, h)| h);
        (host.to_owned(), path)
    };
    let wanted = gitlab_host.to_ascii_lowercase();
    let host = host.to_ascii_lowercase();
    // The external URL may carry a port the ssh form cannot: compare the host names then.
    let same = host == wanted || wanted.split(':').next() == Some(host.as_str()) && !host.contains(':');
    if !same {
        return None;
    }
    let path = path.split(['?', '#']).next()?.trim_matches('/');
    let path = path.strip_suffix(".git").unwrap_or(path);
    crate::domain::ProjectPath::parse(path).ok().map(|p| p.as_str().to_owned())
}

/// The host (and port, when not the scheme's default) of a URL, lower case.
pub fn url_host(url: &str) -> Option<String> {
    let parsed = reqwest::Url::parse(url).ok()?;
    let host = parsed.host_str()?.to_ascii_lowercase();
    Some(match parsed.port() {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

/// `flux/<agent>/<namespace>/<kustomization>`: one status per cluster and Kustomization, so
/// clusters never overwrite each other's.
pub fn status_name(agent: &str, namespace: &str, name: &str) -> String {
    format!("flux/{agent}/{namespace}/{name}")
}

/// `message` cut to GitLab's limit, on a character boundary.
pub fn description(message: &str) -> String {
    let message = message.trim();
    if message.len() <= MAX_DESCRIPTION {
        return message.to_owned();
    }
    let mut end = MAX_DESCRIPTION - 3;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &message[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "gitlab.example.com";
    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    fn cluster() -> (Vec<Kustomization>, Sources) {
        let ks = kustomizations(&fixture("flux-kustomizations.json")).unwrap();
        let git = sources(&fixture("flux-gitrepositories.json")).unwrap();
        let oci = sources(&fixture("flux-ocirepositories.json")).unwrap();
        (ks, Sources::new(git, oci))
    }

    fn observed(name: &str) -> Option<Observed> {
        let (ks, sources) = cluster();
        let k = ks.iter().find(|k| k.metadata.name == name).unwrap();
        observe(k, &sources, HOST)
    }

    #[test]
    fn git_urls_map_to_projects_on_the_gitlab_host_only() {
        for url in [
            "https://gitlab.example.com/group/app",
            "https://gitlab.example.com/group/app.git",
            "https://GitLab.example.com/group/app.git/",
            "ssh://git@gitlab.example.com/group/app.git",
            "ssh://git@gitlab.example.com:2222/group/app.git",
            "git@gitlab.example.com:group/app.git",
        ] {
            assert_eq!(project_of_url(url, HOST).as_deref(), Some("group/app"), "{url}");
        }
        assert_eq!(project_of_url("https://gitlab.example.com/a/b/c.git", HOST).as_deref(), Some("a/b/c"));
        for url in [
            "https://github.com/group/app",
            "https://gitlab.example.com.evil.io/group/app",
            "https://evil.io/gitlab.example.com/group/app",
            "file:///gitlab.example.com/group/app",
            "https://gitlab.example.com/",
            "https://gitlab.example.com/../x",
        ] {
            assert_eq!(project_of_url(url, HOST), None, "{url}");
        }
        assert_eq!(
            project_of_url("https://gitlab.example.com:8443/g/p", "gitlab.example.com:8443").as_deref(),
            Some("g/p")
        );
        assert_eq!(
            project_of_url("ssh://git@gitlab.example.com/g/p", "gitlab.example.com:8443").as_deref(),
            Some("g/p")
        );
        assert_eq!(project_of_url("https://gitlab.example.com:9999/g/p", "gitlab.example.com:8443"), None);
        assert_eq!(url_host("https://GitLab.example.com/").as_deref(), Some("gitlab.example.com"));
        assert_eq!(url_host("http://127.0.0.1:8080/x").as_deref(), Some("127.0.0.1:8080"));
    }

    #[test]
    fn revisions_name_commits() {
        assert_eq!(git_commit(&format!("main@sha1:{SHA}")), Some((Some("main".into()), SHA.into())));
        assert_eq!(git_commit(&format!("refs/heads/dev@sha1:{SHA}")), Some((Some("dev".into()), SHA.into())));
        assert_eq!(git_commit(&format!("main/{}", SHA.to_uppercase())), Some((Some("main".into()), SHA.into())));
        assert_eq!(git_commit(&format!("sha1:{SHA}")), Some((None, SHA.into())));
        assert_eq!(git_commit("v1.0.0@sha256:abcd"), None);
        assert_eq!(git_commit("main@sha1:0123"), None);
    }

    #[test]
    fn states_follow_the_conditions() {
        let o = observed("apps").unwrap();
        assert_eq!((o.state, o.revision.as_str()), (SyncState::Success, format!("main@sha1:{SHA}").as_str()));
        assert_eq!(o.target, Ok(Target { project: "group/app".into(), sha: SHA.into(), git_ref: Some("main".into()) }));
        assert!(o.message.starts_with("Applied revision"));

        // Reconciling a new commit: the source's newest artifact is what is being applied.
        let o = observed("infra").unwrap();
        assert_eq!(o.state, SyncState::Running);
        assert_eq!(o.target.unwrap().sha, "1111111111111111111111111111111111111111");

        let o = observed("broken").unwrap();
        assert_eq!(o.state, SyncState::Failed);
        assert_eq!(o.target.unwrap().sha, "2222222222222222222222222222222222222222");
        assert!(o.message.contains("kustomize build failed"));
        assert_eq!(observed("stalled").unwrap().state, SyncState::Failed);
        assert_eq!(observed("fresh"), None, "no conditions yet");
        // The periodic re-apply of what is applied is not reported.
        let (mut ks, sources) = cluster();
        let infra = ks.iter_mut().find(|k| k.metadata.name == "infra").unwrap();
        infra.status.last_applied_revision = Some("main@sha1:1111111111111111111111111111111111111111".into());
        assert_eq!(observe(infra, &sources, HOST), None);
    }

    #[test]
    fn sources_elsewhere_or_without_commits_are_unmapped() {
        assert_eq!(observed("mirror").unwrap().target, Err(Unmapped::OtherHost));
        assert_eq!(observed("orphan").unwrap().target, Err(Unmapped::NoSource));
        let o = observed("oci-app").unwrap();
        assert_eq!(o.target, Ok(Target { project: "group/app".into(), sha: SHA.into(), git_ref: Some("main".into()) }));
        assert_eq!(observed("oci-bare").unwrap().target, Err(Unmapped::NoCommit));
        // The Kustomization applied another artifact than the source now holds.
        assert_eq!(observed("oci-stale").unwrap().target, Err(Unmapped::NoCommit));
    }

    #[test]
    fn names_and_descriptions() {
        assert_eq!(status_name("prod", "flux-system", "apps"), "flux/prod/flux-system/apps");
        assert_eq!(description("  short  "), "short");
        let long = "é".repeat(200);
        let cut = description(&long);
        assert!(cut.len() <= MAX_DESCRIPTION && cut.ends_with("..."), "{}", cut.len());
        assert!(kustomizations(b"{\"items\": [{}]}").is_ok());
        assert!(kustomizations(b"[").is_err());
    }
}
