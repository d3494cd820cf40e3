//! Fuzzes the Flux list parsers and the mapping to commit statuses (a cluster's answers are
//! outside bytes): any bytes give lists or a clear error, never a panic; whatever maps to a
//! commit names a valid project path on the GitLab host and a 40-hex lower-case sha, and every
//! description fits GitLab's limit.
#![no_main]

use kas::actions::sync::flux::{MAX_DESCRIPTION, Sources, description, kustomizations, observe, sources};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The same bytes serve as all three lists, so one input reaches the mapping.
    let Ok(ks) = kustomizations(data) else { return };
    let git = sources(data).unwrap_or_default();
    let oci = sources(data).unwrap_or_default();
    let sources = Sources::new(git, oci);
    for k in &ks {
        let Some(o) = observe(k, &sources, "gitlab.example.com") else { continue };
        assert!(description(&o.message).len() <= MAX_DESCRIPTION);
        if let Ok(t) = o.target {
            assert!(kas::domain::ProjectPath::parse(&t.project).is_ok());
            assert!(t.sha.len() == 40 && t.sha.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        }
    }
});
