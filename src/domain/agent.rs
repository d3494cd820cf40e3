//! Agents and their tokens.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use super::InvalidValue;

/// The registry's numeric id of an agent.
pub type AgentId = i64;

/// Token prefix GitLab uses for agent tokens.
pub const TOKEN_PREFIX: &str = "glagent-";
/// Random characters after the prefix.
const TOKEN_RANDOM_LEN: usize = 50;
/// URL-safe alphabet; 64 symbols so that a random byte maps onto it without bias.
const TOKEN_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// An agent name: a DNS label of at most 63 characters, as GitLab requires.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AgentName(String);

impl AgentName {
    /// Validates GitLab's rule `[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63 characters.
    pub fn parse(raw: &str) -> Result<Self, InvalidValue> {
        let err = |reason: &str| InvalidValue::new("agent name", format!("{raw:?} {reason}"));
        if raw.is_empty() || raw.len() > 63 {
            return Err(err("must be 1 to 63 characters long"));
        }
        if !raw.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return Err(err("may contain only lower-case letters, digits and '-'"));
        }
        if raw.starts_with('-') || raw.ends_with('-') {
            return Err(err("must start and end with a letter or digit"));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AgentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

impl FromStr for AgentName {
    type Err = InvalidValue;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A plain agent token. It exists only while it is being handed out or checked; its
/// `Debug` output never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct AgentToken(String);

impl AgentToken {
    /// Makes a new random token: `glagent-` and 50 URL-safe characters from the OS RNG.
    pub fn generate() -> Self {
        let mut random = [0u8; TOKEN_RANDOM_LEN];
        getrandom::fill(&mut random).expect("the operating system's random source failed");
        let mut token = String::with_capacity(TOKEN_PREFIX.len() + TOKEN_RANDOM_LEN);
        token.push_str(TOKEN_PREFIX);
        token.extend(random.iter().map(|b| TOKEN_ALPHABET[usize::from(b % 64)] as char));
        Self(token)
    }

    /// Wraps a token presented by a client. Any non-empty string is accepted here: a token
    /// minted by GitLab may not follow our format, and an unknown token fails the lookup anyway.
    pub fn from_presented(raw: &str) -> Option<Self> {
        let raw = raw.trim();
        (!raw.is_empty() && raw.len() <= 1024).then(|| Self(raw.to_owned()))
    }

    /// The secret, for handing to the operator once.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The SHA-256 digest the registry stores instead of the token.
    pub fn digest(&self) -> TokenDigest {
        TokenDigest(crate::hex::encode(&Sha256::digest(self.0.as_bytes())))
    }
}

impl fmt::Debug for AgentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentToken(***)")
    }
}

/// Hex SHA-256 of a token: what the registry stores and looks tokens up by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenDigest(String);

impl TokenDigest {
    /// The lower-case hex text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_gitlab_rule() {
        for ok in ["a", "my-agent", "agent1", &"a".repeat(63)] {
            AgentName::parse(ok).unwrap();
        }
        for bad in ["", "-a", "a-", "Agent", "a_b", "a.b", &"a".repeat(64)] {
            assert!(AgentName::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn generated_tokens_have_gitlab_shape_and_differ() {
        let a = AgentToken::generate();
        let b = AgentToken::generate();
        assert_ne!(a, b);
        let random = a.expose().strip_prefix(TOKEN_PREFIX).unwrap();
        assert_eq!(random.len(), TOKEN_RANDOM_LEN);
        assert!(random.bytes().all(|c| TOKEN_ALPHABET.contains(&c)));
    }

    #[test]
    fn digest_is_sha256_hex_and_debug_hides_secret() {
        let t = AgentToken::from_presented("abc").unwrap();
        assert_eq!(t.digest().as_str(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
        assert!(!format!("{t:?}").contains("abc"));
        assert!(AgentToken::from_presented("  ").is_none());
    }
}
