//! Fuzzes the check of the JWT GitLab sends on the GitLab-facing listener, two ways:
//! - the input is the `authorization` metadata value, through the Bearer parsing and the
//!   signature and claims checks, as `grpc::authorize_gitlab` runs them;
//! - the input is `<header JSON> NUL <claims JSON>`, signed here with the shared secret, so the
//!   fuzzer reaches the claims checks behind the signature.
//!
//! Invariants: no panic; an accepted token is bound to the key (another key refuses it), names
//! `gitlab-kas` as its audience, has not expired and is not used before `nbf`.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use kas::gitlab::jwt::{GitLabJwt, KAS_AUDIENCE};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::Value;

const SECRET: [u8; 32] = [7; 32];
/// The leeway kas allows on `exp` and `nbf`, plus time for this input to run.
const LEEWAY_SECS: f64 = 10.0 + 60.0;

/// The claims checked, read as kas reads them: other claims are skipped unparsed (they may hold
/// numbers out of range or invalid UTF-8 in a token GitLab signed), a repeated one is refused.
#[derive(Deserialize)]
struct Checked {
    aud: Value,
    exp: Value,
    #[serde(default)]
    nbf: Value,
}

/// What must hold for a token kas accepted.
fn check_accepted(token: &str) {
    assert!(GitLabJwt::new(&[8; 32]).verify_from_gitlab(token).is_err(), "a token verified under two keys");
    let claims = token.split('.').nth(1).expect("an accepted token has a payload");
    let claims = URL_SAFE_NO_PAD.decode(claims).expect("base64url payload");
    let claims: Checked = serde_json::from_slice(&claims).expect("the claims kas reads parse");
    let audience_ok = match &claims.aud {
        Value::String(a) => a == KAS_AUDIENCE,
        Value::Array(list) => list.iter().any(|a| a == KAS_AUDIENCE),
        _ => false,
    };
    assert!(audience_ok, "accepted audience {:?}", claims.aud);
    let now = jsonwebtoken::get_current_timestamp() as f64;
    let exp = claims.exp.as_f64().expect("accepted without a numeric exp");
    assert!(exp + LEEWAY_SECS >= now, "accepted an expired token (exp {exp})");
    if !claims.nbf.is_null() {
        let nbf = claims.nbf.as_f64().expect("accepted a non-numeric nbf");
        assert!(nbf <= now + LEEWAY_SECS, "accepted a token before its nbf ({nbf})");
    }
}

fuzz_target!(|data: &[u8]| {
    let jwt = GitLabJwt::new(&SECRET);
    // As metadata: visible ASCII only, then `Bearer <token>`.
    if let Ok(value) = http::HeaderValue::from_bytes(data)
        && let Ok(value) = value.to_str()
        && let Some(token) = kas::secrets::bearer_credential(value)
        && jwt.verify_from_gitlab(token).is_ok()
    {
        check_accepted(token);
    }
    // Signed with the right key: only the header and claims checks stand in the way.
    if let Some(split) = data.iter().position(|b| *b == 0) {
        let (header, claims) = (&data[..split], &data[split + 1..]);
        let algorithm = match serde_json::from_slice::<Value>(header).ok().as_ref().and_then(|h| h["alg"].as_str()) {
            Some("HS384") => Algorithm::HS384,
            Some("HS512") => Algorithm::HS512,
            _ => Algorithm::HS256,
        };
        let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
        let signature = jsonwebtoken::crypto::sign(message.as_bytes(), &EncodingKey::from_secret(&SECRET), algorithm)
            .expect("HMAC signing cannot fail");
        let token = format!("{message}.{signature}");
        if jwt.verify_from_gitlab(&token).is_ok() {
            check_accepted(&token);
        }
    }
});
