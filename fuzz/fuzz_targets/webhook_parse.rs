//! Fuzzes the webhook body parser: any bytes under any event header must give a push, an
//! ignore or a clear error, never a panic; a push always carries a positive id, a valid,
//! non-empty ASCII path and bounded ref and commit ids.
#![no_main]

use kas::intake::webhook::{Hook, parse};
use libfuzzer_sys::fuzz_target;

const EVENTS: [&str; 5] = ["Push Hook", "Tag Push Hook", "System Hook", "Merge Request Hook", ""];

fuzz_target!(|data: &[u8]| {
    let (selector, body) = data.split_first().map(|(s, b)| (*s, b)).unwrap_or((0, data));
    let event = EVENTS[usize::from(selector) % EVENTS.len()];
    let event = (!event.is_empty()).then_some(event);
    if let Ok(Hook::Push(push)) = parse(event, body) {
        assert!(push.project_id > 0);
        let path = push.project_path.as_str();
        assert!(!path.is_empty() && path.is_ascii(), "{path:?}");
        assert!(kas::domain::ProjectPath::parse(path).is_ok());
        assert!(push.git_ref.as_ref().is_none_or(|r| r.len() <= 1024));
        assert!(push.before.as_ref().is_none_or(|s| s.len() <= 64));
        assert!(push.after.as_ref().is_none_or(|s| s.len() <= 64));
    }
});
