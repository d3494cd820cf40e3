//! The access rule: which agents may hear about which project. This is a security boundary.
//!
//! An agent may be told about a project only if it is the agent's configuration project, or
//! the project is public and its repository is readable by everyone. Anything unknown is
//! treated as private.

use super::project::{ProjectInfo, RepositoryAccess, Visibility};

/// Whether an agent whose configuration project has the full path `config_project` may be
/// notified about a push to the project with full path `project`. `world_readable` is what
/// [`is_world_readable`] said about the pushed project. Paths match exactly.
pub fn may_notify(config_project: &str, project: &str, world_readable: bool) -> bool {
    config_project == project || world_readable
}

/// Whether the registry entry makes the project at `path` readable by everyone: the entry must
/// describe this very path (a stale entry for a renamed project must not open a path it no
/// longer owns), be public, and have repository access for everyone.
pub fn is_world_readable(path: &str, info: Option<&ProjectInfo>) -> bool {
    info.is_some_and(|i| {
        i.path.as_str() == path
            && i.visibility == Some(Visibility::Public)
            && i.repository_access == RepositoryAccess::Everyone
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ProjectPath;

    fn info(p: &str, v: Option<Visibility>, a: RepositoryAccess) -> ProjectInfo {
        ProjectInfo { id: 1, path: ProjectPath::parse(p).unwrap(), visibility: v, repository_access: a }
    }

    /// Every combination of (own project?, visibility, repository access, registry entry for
    /// the right path?) against the rule written out longhand.
    #[test]
    fn exhaustive() {
        let own = "team/agent-config";
        let other = "team/app";
        let visibilities = [None, Some(Visibility::Private), Some(Visibility::Internal), Some(Visibility::Public)];
        let accesses = [RepositoryAccess::Everyone, RepositoryAccess::Members];
        let mut allowed = 0;
        for is_own in [true, false] {
            let pushed = if is_own { own } else { other };
            for v in visibilities {
                for a in accesses {
                    for entry in ["none", "same-path", "stale-path"] {
                        let registry = match entry {
                            "none" => None,
                            "same-path" => Some(info(pushed, v, a)),
                            _ => Some(info("team/renamed-away", v, a)),
                        };
                        let got = may_notify(own, pushed, is_world_readable(pushed, registry.as_ref()));
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
        for v in [Visibility::Private, Visibility::Internal] {
            let readable = is_world_readable("g/p", Some(&info("g/p", Some(v), RepositoryAccess::Everyone)));
            assert!(!readable);
            assert!(may_notify("g/p", "g/p", readable));
            assert!(!may_notify("g/other-config", "g/p", readable));
        }
    }

    #[test]
    fn matching_is_exact_not_prefix_or_case_insensitive() {
        assert!(!may_notify("g/p", "g/p2", false));
        assert!(!may_notify("g/p", "G/P", false));
        assert!(!may_notify("g/p", "g/p/sub", false));
        assert!(!may_notify("g/p", "g/p ", false));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::domain::ProjectPath;

    /// Paths from a few segments, so equal, prefix and case-variant paths come up often.
    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["g", "G", "p", "p2", "sub"]), 2..4).prop_map(|s| s.join("/"))
    }

    fn visibility() -> impl Strategy<Value = Option<Visibility>> {
        prop::sample::select(vec![
            None,
            Some(Visibility::Private),
            Some(Visibility::Internal),
            Some(Visibility::Public),
        ])
    }

    fn access() -> impl Strategy<Value = RepositoryAccess> {
        prop::sample::select(vec![RepositoryAccess::Everyone, RepositoryAccess::Members])
    }

    fn entry() -> impl Strategy<Value = Option<ProjectInfo>> {
        prop::option::of((path(), visibility(), access()).prop_map(|(p, visibility, repository_access)| ProjectInfo {
            id: 1,
            path: ProjectPath::parse(&p).unwrap(),
            visibility,
            repository_access,
        }))
    }

    /// The rule as the design states it, written as a table rather than as the code is.
    fn model(config_project: &str, pushed: &str, entry: Option<&ProjectInfo>) -> bool {
        let own = config_project.as_bytes() == pushed.as_bytes();
        let open_to_all = match entry {
            Some(e) if e.path.as_str().as_bytes() == pushed.as_bytes() => match (e.visibility, e.repository_access) {
                (Some(Visibility::Public), RepositoryAccess::Everyone) => true,
                (Some(Visibility::Public), RepositoryAccess::Members) => false,
                (Some(Visibility::Internal), _) => false,
                (Some(Visibility::Private), _) => false,
                (None, _) => false,
            },
            // No entry, or one left from before a rename: unknown is private.
            _ => false,
        };
        own || open_to_all
    }

    /// The same project made no more visible: less visibility, members-only, no entry.
    fn narrowed(e: &ProjectInfo, how: u8) -> Option<ProjectInfo> {
        let mut n = e.clone();
        match how % 4 {
            0 => n.visibility = Some(Visibility::Internal),
            1 => n.visibility = None,
            2 => n.repository_access = RepositoryAccess::Members,
            _ => return None,
        }
        Some(n)
    }

    proptest! {
        #[test]
        fn the_rule_matches_the_model(config in path(), pushed in path(), entry in entry()) {
            let got = may_notify(&config, &pushed, is_world_readable(&pushed, entry.as_ref()));
            prop_assert_eq!(got, model(&config, &pushed, entry.as_ref()));
        }

        #[test]
        fn an_entry_for_the_pushed_path_decides_alone(config in path(), pushed in path(), v in visibility(), a in access()) {
            let entry = ProjectInfo { id: 1, path: ProjectPath::parse(&pushed).unwrap(), visibility: v, repository_access: a };
            let got = may_notify(&config, &pushed, is_world_readable(&pushed, Some(&entry)));
            prop_assert_eq!(got, model(&config, &pushed, Some(&entry)));
        }

        #[test]
        fn narrowing_a_project_never_widens_who_hears(config in path(), pushed in path(), entry in entry(), how in any::<u8>()) {
            let Some(entry) = entry else { return Ok(()) };
            let narrower = narrowed(&entry, how);
            let before = may_notify(&config, &pushed, is_world_readable(&pushed, Some(&entry)));
            let after = may_notify(&config, &pushed, is_world_readable(&pushed, narrower.as_ref()));
            prop_assert!(!after || before, "narrowing {:?} to {:?} opened {}", entry, narrower, pushed);
        }
    }
}
