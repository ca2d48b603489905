//! Token verification for $connect: the JWT rules of the protocol, and dev tokens.

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
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier").field("algorithms", &self.validation.algorithms).finish()
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
        Ok(Self { key, validation })
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
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(|e| {
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
