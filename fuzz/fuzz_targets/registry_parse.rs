//! Fuzzes the container registry notification parser: any bytes must give events or a clear
//! error, never a panic; a push always carries a valid repository path, a bounded printable id,
//! a tag and digest of the registry's grammar and a lower-case host without '/'.
#![no_main]

use kas::domain::image::{MAX_EVENT_ID_LEN, validate_digest, validate_tag};
use kas::intake::registry::{MAX_EVENTS, RegistryEvent, parse};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(events) = parse(data) else { return };
    assert!(events.len() <= MAX_EVENTS);
    for event in events {
        let RegistryEvent::Push(push) = event else { continue };
        assert!(kas::domain::ProjectPath::parse(push.repository.as_str()).is_ok());
        assert!(!push.event_id.is_empty() && push.event_id.len() <= MAX_EVENT_ID_LEN);
        assert!(!push.event_id.chars().any(char::is_control));
        assert!(push.tag.as_deref().is_none_or(|t| validate_tag(t).is_ok()));
        assert!(push.digest.as_deref().is_none_or(|d| validate_digest(d).is_ok()));
        assert!(push.host.as_deref().is_none_or(|h| !h.contains('/') && h == h.to_ascii_lowercase()));
        assert!(!push.project_candidates().is_empty());
    }
});
