//! Token verification for $connect: the JWT rules of the protocol, and dev tokens.

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::UserId;

/// The local server's secret when `COURIER_JWT_SECRET` is not set.
pub const DEV_SECRET: &str = "courier-dev-secret";

/// The longest a token may be valid for, unless configured otherwise. A
/// leaked token opens connections until it expires, so issuers must not mint
/// ones that never do; a day is the longest Cognito issues ID and access
/// tokens for, and what `courier-local token` mints by default.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// Defaulted so that a missing `sub` is reported as such, not as a malformed token.
    #[serde(default)]
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iat: Option<u64>,
}

/// Checks tokens: signature, algorithm, `exp`, `nbf`, lifetime, `sub`, and
/// `iss`/`aud` when configured.
#[derive(Clone)]
pub struct Verifier {
    keys: Keys,
    validation: Validation,
    /// The longest `exp - iat` (or, without `iat`, `exp - now`) accepted, in seconds.
    max_lifetime: u64,
}

#[derive(Clone)]
enum Keys {
    /// One HS256 secret.
    Secret(DecodingKey),
    /// Public keys by `kid`, each with the one algorithm it may sign with.
    Set(HashMap<String, (DecodingKey, Algorithm)>),
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = match &self.keys {
            Keys::Secret(_) => 1,
            Keys::Set(keys) => keys.len(),
        };
        f.debug_struct("Verifier").field("keys", &keys).finish()
    }
}

impl Verifier {
    /// HS256 with a shared secret.
    pub fn hs256(secret: &[u8]) -> Result<Self> {
        if secret.is_empty() {
            return Err(Error::BadRequest("the JWT secret is empty".into()));
        }
        let key = DecodingKey::from_secret(secret).map_err(Error::internal)?;
        Ok(Self::new(Keys::Secret(key), Algorithm::HS256))
    }

    /// RS256 and ES256 (P-256) public keys from a JWKS document, such as a
    /// Cognito user pool's `/.well-known/jwks.json`. A token must name one of
    /// them in its `kid` and be signed with that key's algorithm.
    pub fn from_jwks(jwks: &str) -> Result<Self> {
        let set: JwkSet =
            serde_json::from_str(jwks).map_err(|e| Error::internal(format!("bad JWKS: {e}")))?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let algorithm = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Algorithm::RS256,
                AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => Algorithm::ES256,
                _ => continue,
            };
            let (Some(kid), Ok(key)) = (jwk.common.key_id.clone(), DecodingKey::from_jwk(jwk)) else {
                continue;
            };
            keys.insert(kid, (key, algorithm));
        }
        if keys.is_empty() {
            return Err(Error::internal("the JWKS holds no RS256 or P-256 key with a kid"));
        }
        Ok(Self::new(Keys::Set(keys), Algorithm::RS256))
    }

    fn new(keys: Keys, algorithm: Algorithm) -> Self {
        let mut validation = Validation::new(algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // No leeway, for `nbf` as for `exp`: issuers and Courier keep time by NTP.
        validation.leeway = 0;
        validation.validate_nbf = true;
        Self { keys, validation, max_lifetime: MAX_LIFETIME.as_secs() }
    }

    /// Accepts tokens valid for at most `lifetime` (default [`MAX_LIFETIME`]).
    pub fn with_max_lifetime(mut self, lifetime: Duration) -> Self {
        self.max_lifetime = lifetime.as_secs();
        self
    }

    pub fn with_issuer(mut self, iss: &str) -> Self {
        self.validation.set_issuer(&[iss]);
        self.validation.required_spec_claims.insert("iss".into());
        self
    }

    pub fn with_audience(mut self, aud: &str) -> Self {
        self.validation.set_audience(&[aud]);
        self.validation.required_spec_claims.insert("aud".into());
        self
    }

    /// The user a token speaks for, or `Unauthorized` saying why not.
    pub fn verify(&self, token: &str) -> Result<UserId> {
        let refused = |why: &str| Error::Unauthorized(why.into());
        let (key, validation) = match &self.keys {
            Keys::Secret(key) => (key, std::borrow::Cow::Borrowed(&self.validation)),
            Keys::Set(keys) => {
                let header = jsonwebtoken::decode_header(token).map_err(|_| refused("malformed token"))?;
                let kid = header.kid.ok_or_else(|| refused("token names no key"))?;
                let (key, algorithm) = keys.get(&kid).ok_or_else(|| refused("token key not accepted"))?;
                let mut validation = self.validation.clone();
                validation.algorithms = vec![*algorithm];
                (key, std::borrow::Cow::Owned(validation))
            }
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            let why = match e.kind() {
                K::ExpiredSignature => "token expired",
                K::ImmatureSignature => "token not yet valid",
                K::InvalidSignature => "bad token signature",
                K::InvalidAlgorithm | K::InvalidAlgorithmName => "token algorithm not accepted",
                K::MissingRequiredClaim(_) => "token lacks a required claim",
                K::InvalidIssuer => "token issuer not accepted",
                K::InvalidAudience => "token audience not accepted",
                _ => "malformed token",
            };
            Error::Unauthorized(why.into())
        })?;
        let Claims { sub, exp, iat } = data.claims;
        // From `iat`, or from now if that is earlier: an `iat` set in the
        // future must not stretch how long the token is accepted.
        let now = jsonwebtoken::get_current_timestamp();
        let from = iat.map_or(now, |iat| iat.min(now));
        if exp.saturating_sub(from) > self.max_lifetime {
            return Err(refused("token lifetime too long"));
        }
        UserId::try_from(sub).map_err(|_| Error::Unauthorized("token sub is not a valid userId".into()))
    }
}

/// Mints an HS256 token for `user`, issued now and valid for `ttl_secs`: for
/// development and tests.
pub fn mint(secret: &[u8], user: &str, ttl_secs: i64) -> String {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let claims = Claims { sub: user.to_owned(), exp: (now + ttl_secs).max(0) as u64, iat: Some(now as u64) };
    let key = EncodingKey::from_secret(secret).expect("an HS256 key takes any bytes");
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).expect("HS256 signing cannot fail")
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

    use super::*;

    const SECRET: &[u8] = b"s3cret";

    fn refusal(token: &str) -> String {
        match Verifier::hs256(SECRET).unwrap().verify(token) {
            Err(Error::Unauthorized(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_fresh_token_names_its_user() {
        let user = Verifier::hs256(SECRET).unwrap().verify(&mint(SECRET, "alice", 60)).unwrap();
        assert_eq!(user.as_str(), "alice");
    }

    #[test]
    fn expired_forged_and_unsigned_tokens_are_refused() {
        assert_eq!(refusal(&mint(SECRET, "alice", -10)), "token expired");
        assert_eq!(refusal(&mint(b"other", "alice", 60)), "bad token signature");
        let claims = B64.encode(br#"{"sub":"alice","exp":9999999999}"#);
        let none = format!("{}.{claims}.", B64.encode(br#"{"alg":"none","typ":"JWT"}"#));
        assert!(Verifier::hs256(SECRET).unwrap().verify(&none).is_err());
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &serde_json::json!({"sub": "alice", "exp": now() + 60}),
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();
        assert_eq!(refusal(&hs512), "token algorithm not accepted");
        assert_eq!(refusal("not-a-jwt"), "malformed token");
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn hs256(claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap()
    }

    fn accepted(token: &str) -> bool {
        Verifier::hs256(SECRET).unwrap().verify(token).is_ok()
    }

    #[test]
    fn a_token_is_refused_before_its_nbf_and_accepted_from_it() {
        let at = |nbf: u64| hs256(&serde_json::json!({"sub": "alice", "exp": now() + 600, "nbf": nbf}));
        assert_eq!(refusal(&at(now() + 60)), "token not yet valid");
        assert_eq!(refusal(&at(now() + 2)), "token not yet valid", "no leeway, as for exp");
        assert!(accepted(&at(now())), "valid from nbf itself");
        assert!(accepted(&at(now() - 60)));
    }

    #[test]
    fn a_token_valid_for_longer_than_a_day_is_refused() {
        let day = MAX_LIFETIME.as_secs();
        let issued = now() - 10;
        let lasting =
            |secs: u64| hs256(&serde_json::json!({"sub": "alice", "iat": issued, "exp": issued + secs}));
        assert!(accepted(&lasting(day)), "exactly the maximum is accepted");
        assert_eq!(refusal(&lasting(day + 1)), "token lifetime too long");
        // Counted from iat, not from now: a week-long token is refused on its last day too.
        let old = now() - 6 * day;
        let week = hs256(&serde_json::json!({"sub": "alice", "iat": old, "exp": old + 7 * day}));
        assert_eq!(refusal(&week), "token lifetime too long");

        // Without iat, from now.
        let until = |exp: u64| hs256(&serde_json::json!({"sub": "alice", "exp": exp}));
        assert!(accepted(&until(now() + day)), "exactly the maximum is accepted");
        assert_eq!(refusal(&until(now() + day + 60)), "token lifetime too long");
        // An iat in the future stretches nothing.
        let ahead = hs256(&serde_json::json!({"sub": "alice", "iat": now() + day, "exp": now() + 2 * day}));
        assert_eq!(refusal(&ahead), "token lifetime too long");
    }

    #[test]
    fn the_maximum_lifetime_is_configurable_and_fits_minted_dev_tokens() {
        // `courier-local token` mints for a day by default.
        assert!(accepted(&mint(SECRET, "alice", MAX_LIFETIME.as_secs() as i64)));
        let hour = Verifier::hs256(SECRET).unwrap().with_max_lifetime(Duration::from_secs(3600));
        assert!(hour.verify(&mint(SECRET, "alice", 3600)).is_ok());
        assert!(matches!(
            hour.verify(&mint(SECRET, "alice", 3601)),
            Err(Error::Unauthorized(why)) if why == "token lifetime too long"
        ));
    }

    /// A P-256 key made for these tests, and its public half as a JWK.
    const EC_PRIVATE_DER: &str = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgGVf5Gk3Tw/2yarzovWytGcJgt5iAgKI4KskIeR38FVWhRANCAAQV2mLmDiJZuehnsr3qm1OBoFI66YXWkX4CXcNLEN1xp5l1X9TdzY0lI6J2i2tTVA9CG7dAt/2naPSZwP2h3HXV";
    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","use":"sig",
        "x":"Fdpi5g4iWbnoZ7K96ptTgaBSOumF1pF-Al3DSxDdcac","y":"mXVf1N3NjSUjonaLa1NUD0Ibt0C3_ado9JnA_aHcddU"}]}"#;

    fn es256(kid: Option<&str>, claims: &serde_json::Value) -> String {
        let der = base64::engine::general_purpose::STANDARD.decode(EC_PRIVATE_DER).unwrap();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&der)).unwrap()
    }

    #[test]
    fn jwks_keys_verify_es256_tokens_by_kid_with_issuer_and_audience() {
        let verifier = Verifier::from_jwks(JWKS).unwrap().with_issuer("https://idp").with_audience("courier");
        let exp = now() + 3600;
        let good = serde_json::json!({"sub": "carol", "exp": exp, "iss": "https://idp", "aud": "courier"});
        assert_eq!(verifier.verify(&es256(Some("k1"), &good)).unwrap().as_str(), "carol");

        let refuse = |token: &str| match verifier.verify(token) {
            Err(Error::Unauthorized(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(refuse(&es256(Some("k9"), &good)), "token key not accepted");
        assert_eq!(refuse(&es256(None, &good)), "token names no key");
        let other_iss =
            serde_json::json!({"sub": "carol", "exp": exp, "iss": "https://evil", "aud": "courier"});
        assert_eq!(refuse(&es256(Some("k1"), &other_iss)), "token issuer not accepted");
        let no_aud = serde_json::json!({"sub": "carol", "exp": exp, "iss": "https://idp"});
        assert_eq!(refuse(&es256(Some("k1"), &no_aud)), "token lacks a required claim");
        // An HS256 token claiming the same kid is not accepted in place of the key's own algorithm.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let forged = jsonwebtoken::encode(&header, &good, &EncodingKey::from_secret(b"x").unwrap()).unwrap();
        assert_eq!(refuse(&forged), "token algorithm not accepted");
    }

    #[test]
    fn a_jwks_without_usable_keys_is_a_configuration_error() {
        assert!(Verifier::from_jwks(r#"{"keys":[]}"#).is_err());
        assert!(Verifier::from_jwks("not json").is_err());
    }

    #[test]
    fn a_token_without_sub_or_with_a_bad_sub_is_refused() {
        #[derive(Serialize)]
        struct NoSub {
            exp: u64,
        }
        let t = jsonwebtoken::encode(
            &Header::default(),
            &NoSub { exp: 9_999_999_999 },
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();
        assert_eq!(refusal(&t), "token lacks a required claim");
        assert_eq!(refusal(&mint(SECRET, "bad user", 60)), "token sub is not a valid userId");
    }
}
