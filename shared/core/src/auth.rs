//! Token verification for $connect: the JWT rules of the protocol, and dev tokens.

use std::collections::HashMap;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::UserId;

/// The local server's secret when `COURIER_JWT_SECRET` is not set.
pub const DEV_SECRET: &str = "courier-dev-secret";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    /// Defaulted so that a missing `sub` is reported as such, not as a malformed token.
    #[serde(default)]
    sub: String,
    exp: u64,
}

/// Checks tokens: signature, algorithm, expiry, `sub`, and `iss`/`aud` when configured.
#[derive(Clone)]
pub struct Verifier {
    keys: Keys,
    validation: Validation,
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
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        Ok(Self { keys: Keys::Secret(key), validation })
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
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 0;
        Ok(Self { keys: Keys::Set(keys), validation })
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
                K::InvalidSignature => "bad token signature",
                K::InvalidAlgorithm | K::InvalidAlgorithmName => "token algorithm not accepted",
                K::MissingRequiredClaim(_) => "token lacks a required claim",
                K::InvalidIssuer => "token issuer not accepted",
                K::InvalidAudience => "token audience not accepted",
                _ => "malformed token",
            };
            Error::Unauthorized(why.into())
        })?;
        UserId::try_from(data.claims.sub)
            .map_err(|_| Error::Unauthorized("token sub is not a valid userId".into()))
    }
}

/// Mints an HS256 token for `user`, valid for `ttl_secs`: for development and tests.
pub fn mint(secret: &[u8], user: &str, ttl_secs: i64) -> String {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let claims = Claims { sub: user.to_owned(), exp: (now + ttl_secs).max(0) as u64 };
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
            &Claims { sub: "alice".into(), exp: 9_999_999_999 },
            &EncodingKey::from_secret(SECRET).unwrap(),
        )
        .unwrap();
        assert_eq!(refusal(&hs512), "token algorithm not accepted");
        assert_eq!(refusal("not-a-jwt"), "malformed token");
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
        let good = serde_json::json!({"sub": "carol", "exp": 9_999_999_999u64, "iss": "https://idp", "aud": "courier"});
        assert_eq!(verifier.verify(&es256(Some("k1"), &good)).unwrap().as_str(), "carol");

        let refuse = |token: &str| match verifier.verify(token) {
            Err(Error::Unauthorized(why)) => why,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(refuse(&es256(Some("k9"), &good)), "token key not accepted");
        assert_eq!(refuse(&es256(None, &good)), "token names no key");
        let other_iss = serde_json::json!({"sub": "carol", "exp": 9_999_999_999u64, "iss": "https://evil", "aud": "courier"});
        assert_eq!(refuse(&es256(Some("k1"), &other_iss)), "token issuer not accepted");
        let no_aud = serde_json::json!({"sub": "carol", "exp": 9_999_999_999u64, "iss": "https://idp"});
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
