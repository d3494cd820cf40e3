//! The access rule: which agents may hear about which project. This is a security boundary.
//!
//! An agent may be told about a project only if it is the agent's configuration project, or
//! the project is public and its repository is readable by everyone. Anything unknown is
//! treated as private.

use super::project::{ProjectInfo, ProjectPath, RepositoryAccess, Visibility};

/// Whether an agent whose configuration project is `config_project` may be notified about a
/// push to `project`. `project_info` is what the registry knows about the pushed project;
/// `None` (never seen) is treated as private.
pub fn may_notify(
    config_project: &ProjectPath,
    project: &ProjectPath,
    project_info: Option<&ProjectInfo>,
) -> bool {
    if config_project == project {
        return true;
    }
    match project_info {
        // The registry entry must describe this very path: a stale entry for a renamed
        // project must not open a path it no longer owns.
        Some(info) if &info.path == project => {
            is_world_readable(info.visibility, info.repository_access)
        }
        _ => false,
    }
}

/// Whether a project with this visibility and repository access is readable by anyone.
pub fn is_world_readable(visibility: Option<Visibility>, access: RepositoryAccess) -> bool {
    visibility == Some(Visibility::Public) && access == RepositoryAccess::Everyone
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(s: &str) -> ProjectPath {
        ProjectPath::parse(s).unwrap()
    }

    fn info(p: &str, v: Option<Visibility>, a: RepositoryAccess) -> ProjectInfo {
        ProjectInfo {
            id: 1,
            path: path(p),
            visibility: v,
            repository_access: a,
        }
    }

    /// Every combination of (own project?, visibility, repository access, registry entry for
    /// the right path?) against the rule written out longhand.
    #[test]
    fn exhaustive() {
        let own = path("team/agent-config");
        let other = path("team/app");
        let visibilities = [
            None,
            Some(Visibility::Private),
            Some(Visibility::Internal),
            Some(Visibility::Public),
        ];
        let accesses = [RepositoryAccess::Everyone, RepositoryAccess::Members];
        let mut allowed = 0;
        for is_own in [true, false] {
            let pushed = if is_own { &own } else { &other };
            for v in visibilities {
                for a in accesses {
                    for entry in ["none", "same-path", "stale-path"] {
                        let registry = match entry {
                            "none" => None,
                            "same-path" => Some(info(pushed.as_str(), v, a)),
                            _ => Some(info("team/renamed-away", v, a)),
                        };
                        let got = may_notify(&own, pushed, registry.as_ref());
                        let want = is_own
                            || (entry == "same-path"
                                && v == Some(Visibility::Public)
                                && a == RepositoryAccess::Everyone);
                        assert_eq!(got, want, "own={is_own} v={v:?} a={a:?} entry={entry}");
                        allowed += usize::from(got);
                    }
                }
            }
        }
        // 24 own-project cases plus the single public+everyone case with a matching entry.
        assert_eq!(allowed, 25);
    }

    #[test]
    fn private_and_internal_reach_only_their_own_agent() {
        let own = path("g/p");
        for v in [Visibility::Private, Visibility::Internal] {
            let i = info("g/p", Some(v), RepositoryAccess::Everyone);
            assert!(may_notify(&own, &own, Some(&i)));
            assert!(!may_notify(&path("g/other-config"), &own, Some(&i)));
        }
    }

    #[test]
    fn matching_is_exact_not_prefix_or_case_insensitive() {
        let own = path("g/p");
        assert!(!may_notify(&own, &path("g/p2"), None));
        assert!(!may_notify(&own, &path("G/P"), None));
        assert!(!may_notify(&own, &path("g/p/sub"), None));
    }
}
