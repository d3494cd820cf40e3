//! The JWTs GitLab and kas exchange, signed with GitLab's 32-byte shared secret.
//!
//! GitLab → kas (the GitLab-facing listener): HS256 (HS384/HS512 accepted), `aud` `gitlab-kas`,
//! `exp` required, `nbf` checked when present, any issuer (GitLab sets its host name).
//! kas → GitLab (the internal API): HS256, `iss` `gitlab-kas`, `aud` `gitlab`, 30 s lifetime.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Audience GitLab puts in tokens for kas.
pub const KAS_AUDIENCE: &str = "gitlab-kas";
/// Audience kas puts in tokens for GitLab.
pub const GITLAB_AUDIENCE: &str = "gitlab";
/// Issuer kas puts in tokens for GitLab.
pub const KAS_ISSUER: &str = "gitlab-kas";
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
const LEEWAY_SECS: u64 = 10;
/// Lifetime of the tokens kas signs, as upstream.
const KAS_TOKEN_LIFETIME_SECS: u64 = 30;

/// Why a token was refused. The message is safe to return: it never includes the token.
#[derive(Debug, thiserror::Error)]
#[error("invalid JWT: {0}")]
pub struct JwtError(#[source] jsonwebtoken::errors::Error);

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    aud: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// Verifies and signs tokens with the shared secret.
#[derive(Clone)]
pub struct GitLabJwt {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

impl GitLabJwt {
    /// Uses the decoded shared secret.
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
        validation.set_audience(&[KAS_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECS;
        Self { decoding: DecodingKey::from_secret(secret), encoding: EncodingKey::from_secret(secret), validation }
    }

    /// Checks a token GitLab sent to kas.
    pub fn verify_from_gitlab(&self, token: &str) -> Result<(), JwtError> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map(|_| ()).map_err(JwtError)
    }

    /// Signs a token as GitLab Rails does for kas (used by `kas push` and tests).
    pub fn sign_as_gitlab(&self, issuer: &str) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            iss: Some(issuer.into()),
            aud: KAS_AUDIENCE.into(),
            exp: now + 60,
            nbf: Some(now - 5),
            iat: Some(now),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }

    /// Signs a token for GitLab's internal API.
    pub fn sign_for_gitlab(&self) -> String {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            iss: Some(KAS_ISSUER.into()),
            aud: GITLAB_AUDIENCE.into(),
            exp: now + KAS_TOKEN_LIFETIME_SECS,
            nbf: Some(now - 5),
            iat: Some(now),
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 signing cannot fail")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(secret: &[u8], alg: Algorithm, aud: &str, exp_offset: i64, nbf_offset: Option<i64>) -> String {
        let now = jsonwebtoken::get_current_timestamp() as i64;
        let claims = Claims {
            iss: Some("gitlab.example.com".into()),
            aud: aud.into(),
            exp: (now + exp_offset) as u64,
            nbf: nbf_offset.map(|o| (now + o) as u64),
            iat: Some(now as u64),
        };
        jsonwebtoken::encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn accepts_what_gitlab_sends() {
        let jwt = GitLabJwt::new(&[1; 32]);
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            jwt.verify_from_gitlab(&token(&[1; 32], alg, KAS_AUDIENCE, 60, Some(-5))).unwrap();
        }
        jwt.verify_from_gitlab(&jwt.sign_as_gitlab("gitlab.example.com")).unwrap();
    }

    #[test]
    fn refuses_bad_tokens() {
        let jwt = GitLabJwt::new(&[1; 32]);
        for (what, t) in [
            ("expired", token(&[1; 32], Algorithm::HS256, KAS_AUDIENCE, -60, None)),
            ("wrong audience", token(&[1; 32], Algorithm::HS256, "gitlab", 60, None)),
            ("wrong key", token(&[2; 32], Algorithm::HS256, KAS_AUDIENCE, 60, None)),
            ("not yet valid", token(&[1; 32], Algorithm::HS256, KAS_AUDIENCE, 600, Some(300))),
            ("garbage", "a.b.c".into()),
            ("kas's own token for GitLab", jwt.sign_for_gitlab()),
        ] {
            assert!(jwt.verify_from_gitlab(&t).is_err(), "{what} accepted");
        }
    }
}
