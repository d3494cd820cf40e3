//! Fuzzes the webhook body parser: any bytes under any event header must give a push, an
//! ignore or a clear error, never a panic; a push always carries a valid path and id.
#![no_main]

use kas::intake::webhook::{parse, Hook};
use libfuzzer_sys::fuzz_target;

const EVENTS: [&str; 5] = ["Push Hook", "Tag Push Hook", "System Hook", "Merge Request Hook", ""];

fuzz_target!(|data: &[u8]| {
    let (selector, body) = data.split_first().map(|(s, b)| (*s, b)).unwrap_or((0, data));
    let event = EVENTS[usize::from(selector) % EVENTS.len()];
    let event = (!event.is_empty()).then_some(event);
    if let Ok(Hook::Push(push)) = parse(event, body) {
        assert!(push.project_id > 0);
        assert!(kas::domain::ProjectPath::parse(push.project_path.as_str()).is_ok());
    }
});
