//! Fuzzes the agent configuration file parser on both paths a file takes: the registry path
//! (`kas agent config` reads the file as UTF-8 text and validates it before storing it) and the
//! GitLab-mode path (the raw file from GitLab's REST API, taken only when it is UTF-8, parsed
//! when a configuration is sent). Invariants: no panic, and YAML aliases, nesting or size never
//! make it allocate past the fuzzer's memory limits; the same text gives the same answer every
//! time; a file over the size limit is refused; what is sent to the agent comes from a file
//! that parsed.
#![no_main]

use kas::agentcfg::{AgentConfigFile, ConfigFileError, MAX_CONFIG_BYTES, commit_id};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Both paths accept only UTF-8 (`read_to_string`, `String::from_utf8` of the API body).
    let Ok(text) = std::str::from_utf8(data) else { return };
    let parsed = AgentConfigFile::parse(text);
    match &parsed {
        Ok(_) => assert!(text.len() <= MAX_CONFIG_BYTES),
        Err(ConfigFileError::TooLarge(n)) => assert_eq!(*n, text.len()),
        Err(ConfigFileError::Invalid(message)) => assert!(!message.is_empty()),
    }
    // GitLab mode parses the stored text again on every send: it must agree with itself.
    assert_eq!(parsed, AgentConfigFile::parse(text));
    if parsed.is_ok() {
        // Registry mode: the commit id sent is a digest of the text.
        let id = commit_id(text, 1, 2, "group/agent-config", "https://gitlab.example.com");
        assert_eq!(id.len(), 40);
    }
});
