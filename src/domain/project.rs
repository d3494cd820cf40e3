//! Projects as GitLab names them, and what decides who may hear about them.

use std::fmt;
use std::str::FromStr;

use super::InvalidValue;

/// Longest full path accepted; GitLab allows 255 characters per segment and about 20 levels.
const MAX_PATH_LEN: usize = 4096;

/// A project's full path (`group/sub/name`), as GitLab's `path_with_namespace`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjectPath(String);

impl ProjectPath {
    /// Validates a full path: at least a namespace and a name, GitLab's segment characters.
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let err = |reason: String| InvalidValue::new("project path", reason);
        if raw.is_empty() {
            return Err(err("must not be empty".into()));
        }
        if raw.len() > MAX_PATH_LEN {
            return Err(err(format!("longer than {MAX_PATH_LEN} bytes")));
        }
        let mut segments = 0;
        for segment in raw.split('/') {
            segments += 1;
            if segment.is_empty() {
                return Err(err(format!("{raw:?} has an empty segment")));
            }
            if let Some(c) = segment.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
                return Err(err(format!(
                    "{raw:?} contains {c:?}; only letters, digits, '_', '-', '.' and '/' are allowed"
                )));
            }
            if segment.starts_with(['-', '.']) || segment.ends_with('.') {
                return Err(err(format!("segment {segment:?} must not start with '-' or '.', or end with '.'")));
            }
        }
        if segments < 2 {
            return Err(err(format!("{raw:?} is not a full path: expected namespace/project")));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The path as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ProjectPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl FromStr for ProjectPath {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// GitLab's project visibility level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Visibility {
    /// Level 0.
    Private,
    /// Level 10: any signed-in user.
    Internal,
    /// Level 20: anyone.
    Public,
}

impl Visibility {
    /// Maps GitLab's `visibility_level` number.
    pub fn from_level(level: i64) -> Result<Self, InvalidValue> {
        match level {
            0 => Ok(Self::Private),
            10 => Ok(Self::Internal),
            20 => Ok(Self::Public),
            other => Err(InvalidValue::new("visibility_level", format!("{other} is not one of 0, 10, 20"))),
        }
    }

    /// GitLab's number for this level.
    pub fn level(self) -> i64 {
        match self {
            Self::Private => 0,
            Self::Internal => 10,
            Self::Public => 20,
        }
    }

    /// The more restrictive of two levels (private < internal < public).
    pub fn most_restrictive(self, other: Self) -> Self {
        if other.level() < self.level() { other } else { self }
    }

    /// The lower-case name used in the CLI and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Private => "private",
            Self::Internal => "internal",
            Self::Public => "public",
        }
    }
}

impl FromStr for Visibility {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "private" => Ok(Self::Private),
            "internal" => Ok(Self::Internal),
            "public" => Ok(Self::Public),
            other => Err(InvalidValue::new("visibility", format!("{other:?} is not one of public, internal, private"))),
        }
    }
}

impl fmt::Display for Visibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Who may read a project's repository (GitLab's "Repository" feature visibility).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RepositoryAccess {
    /// "Everyone with access": for a public project, anyone.
    #[default]
    Everyone,
    /// "Only project members".
    Members,
}

impl RepositoryAccess {
    /// The lower-case name used in the CLI and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Everyone => "everyone",
            Self::Members => "members",
        }
    }
}

impl FromStr for RepositoryAccess {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "everyone" => Ok(Self::Everyone),
            "members" => Ok(Self::Members),
            other => Err(InvalidValue::new("repository access", format!("{other:?} is not one of everyone, members"))),
        }
    }
}

impl fmt::Display for RepositoryAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// What the registry knows about a project; `visibility` is `None` until GitLab or an
/// operator has told us, and an unknown visibility is treated as private.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectInfo {
    /// GitLab's numeric project id.
    pub id: i64,
    /// Current full path.
    pub path: ProjectPath,
    /// Visibility level, when known.
    pub visibility: Option<Visibility>,
    /// Repository feature access.
    pub repository_access: RepositoryAccess,
}

/// What one batch of pushes says about one project, merged: the newest path, and the most
/// restrictive visibility any of them carried (none when none carried it).
///
/// Two doors report the same push: a webhook (with visibility) and GitLab's `GitPushEvent`
/// (without). When they land in one batch, the one without visibility must not erase what the
/// other said, and of two contradicting payloads the one that opens less wins, so a race can
/// only ever close a project, never open it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectUpdate {
    /// GitLab's project id.
    pub id: i64,
    /// The path of the newest push.
    pub path: ProjectPath,
    /// The most restrictive visibility carried, if any push carried one.
    pub visibility: Option<Visibility>,
    /// Receipt time of the newest push (Unix milliseconds).
    pub seen_at: i64,
}

impl ProjectUpdate {
    /// Starts from one push.
    pub fn new(id: i64, path: ProjectPath, visibility: Option<Visibility>, seen_at: i64) -> Self {
        Self { id, path, visibility, seen_at }
    }

    /// Folds in another push for the same project; a later one (or an equally timed one seen
    /// after) provides the path.
    pub fn merge(&mut self, path: &ProjectPath, visibility: Option<Visibility>, seen_at: i64) {
        if seen_at >= self.seen_at {
            self.path = path.clone();
            self.seen_at = seen_at;
        }
        self.visibility = match (self.visibility, visibility) {
            (Some(a), Some(b)) => Some(a.most_restrictive(b)),
            (a, b) => a.or(b),
        };
    }
}

/// The registry's visibility after an update that was merged from pushes: a push without
/// visibility never changes it, except that knowledge about another path does not carry over to
/// a new one (a renamed or re-used project id starts unknown, i.e. private); newer news replaces
/// older; older news that arrives late can only make a project more private.
pub fn merged_visibility(
    stored: Option<(&ProjectPath, Option<Visibility>, i64)>,
    update: &ProjectUpdate,
) -> Option<Visibility> {
    let Some((stored_path, stored_visibility, stored_at)) = stored else {
        return update.visibility;
    };
    match update.visibility {
        None if stored_path != &update.path && update.seen_at >= stored_at => None,
        None => stored_visibility,
        Some(v) if update.seen_at >= stored_at => Some(v),
        Some(v) => Some(stored_visibility.unwrap_or(Visibility::Private).most_restrictive(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_nested_group_paths() {
        for ok in ["a/b", "group/sub.group/my-project_1", "A/B/C/D/E", "x/y.z"] {
            assert_eq!(ProjectPath::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_malformed_paths() {
        for bad in ["", "single", "/a/b", "a/b/", "a//b", "a/b c", "a/-b", "a/.b", "a/b.", "a/b?x", "a/ü"] {
            assert!(ProjectPath::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(ProjectPath::parse(&format!("a/{}", "x".repeat(MAX_PATH_LEN))).is_err());
    }

    #[test]
    fn visibility_levels_round_trip() {
        for v in [Visibility::Private, Visibility::Internal, Visibility::Public] {
            assert_eq!(Visibility::from_level(v.level()).unwrap(), v);
            assert_eq!(v.as_str().parse::<Visibility>().unwrap(), v);
        }
        assert!(Visibility::from_level(5).is_err());
        assert!("secret".parse::<Visibility>().is_err());
        assert!("nobody".parse::<RepositoryAccess>().is_err());
    }

    mod merging {
        use proptest::prelude::*;

        use super::super::*;

        fn visibility() -> impl Strategy<Value = Option<Visibility>> {
            prop_oneof![
                Just(None),
                Just(Some(Visibility::Private)),
                Just(Some(Visibility::Internal)),
                Just(Some(Visibility::Public))
            ]
        }

        fn rank(v: Option<Visibility>) -> i64 {
            v.map_or(-1, Visibility::level)
        }

        /// One batch's pushes for a project: (path a or b, visibility, receipt time).
        fn batch() -> impl Strategy<Value = Vec<(bool, Option<Visibility>, i64)>> {
            prop::collection::vec((any::<bool>(), visibility(), 0i64..20), 1..8)
        }

        fn merge(pushes: &[(bool, Option<Visibility>, i64)]) -> ProjectUpdate {
            let path = |b: bool| ProjectPath::parse(if b { "g/b" } else { "g/a" }).unwrap();
            let (first, rest) = pushes.split_first().unwrap();
            let mut u = ProjectUpdate::new(1, path(first.0), first.1, first.2);
            for (b, v, at) in rest {
                u.merge(&path(*b), *v, *at);
            }
            u
        }

        proptest! {
            /// In a batch the most restrictive visibility carried wins, whatever the order, and
            /// pushes without visibility change nothing; the newest push gives the path.
            #[test]
            fn the_most_restrictive_wins_in_a_batch(pushes in batch()) {
                let u = merge(&pushes);
                let carried: Vec<Visibility> = pushes.iter().filter_map(|p| p.1).collect();
                let want = carried.iter().copied().min_by_key(|v| v.level());
                prop_assert_eq!(u.visibility, want);
                let mut reversed = pushes.clone();
                reversed.reverse();
                prop_assert_eq!(merge(&reversed).visibility, want, "order-independent");
                let newest = pushes.iter().map(|p| p.2).max().unwrap();
                prop_assert_eq!(u.seen_at, newest);
                let name = |b: bool| if b { "g/b" } else { "g/a" };
                let newest_path = pushes.iter().any(|p| p.2 == newest && name(p.0) == u.path.as_str());
                prop_assert!(newest_path, "the path comes from a newest push");
            }

            /// Against what the registry holds: an update without visibility never opens a
            /// project; news never makes a project more open than it says; late (older) news only
            /// ever closes.
            #[test]
            fn merging_into_the_registry_never_opens_beyond_the_news(
                stored in visibility(), stored_b in any::<bool>(), stored_at in 0i64..20, pushes in batch(),
            ) {
                let u = merge(&pushes);
                let stored_path = ProjectPath::parse(if stored_b { "g/b" } else { "g/a" }).unwrap();
                let got = merged_visibility(Some((&stored_path, stored, stored_at)), &u);
                match u.visibility {
                    None => prop_assert!(rank(got) <= rank(stored), "{got:?} opens {stored:?}"),
                    Some(v) if u.seen_at >= stored_at => prop_assert_eq!(got, Some(v)),
                    Some(v) => prop_assert!(rank(got) <= rank(Some(v)).min(rank(stored).max(0))),
                }
                if u.visibility.is_none() && u.path == stored_path {
                    prop_assert_eq!(got, stored, "a push without visibility changed it");
                }
                prop_assert_eq!(merged_visibility(None, &u), u.visibility);
            }
        }
    }
}
