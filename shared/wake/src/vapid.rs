//! The server's VAPID key (RFC 8292): the P-256 key pair that signs every Web Push request.
//!
//! Browsers subscribe with the public half as `applicationServerKey`, and
//! push services then accept only requests signed by the private half, so
//! the key must outlive restarts: courier-local keeps it in a file,
//! deployed stacks read it from SSM as the base64url private key.

use std::io::Write;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use courier_core::{Error, Result};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use serde::Serialize;

use crate::check::decode_base64url;

/// A VAPID key pair and the contact (`sub`) that goes with it.
pub struct VapidKey {
    signing: SigningKey,
    public: String,
    subject: String,
}

// By hand: the derived one would print the private key.
impl std::fmt::Debug for VapidKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VapidKey").field("public", &self.public).field("subject", &self.subject).finish()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    aud: &'a str,
    exp: u64,
    sub: &'a str,
}

impl VapidKey {
    /// A new random key. `subject` is the contact push services may use
    /// about abuse: a `mailto:` address or an `https:` URL.
    pub fn generate(subject: &str) -> Result<Self> {
        // A random 32-byte string is a valid scalar unless it is zero or past
        // the group order, a chance of about 2^-32 that a retry covers.
        loop {
            let bytes: [u8; 32] = rand::random();
            if let Ok(secret) = p256::SecretKey::from_bytes(&bytes.into()) {
                return Self::new(secret, subject);
            }
        }
    }

    /// The key whose private half is `private` (32 bytes of base64url, as
    /// `to_base64url` gives it and as the usual VAPID tools print it).
    pub fn from_base64url(private: &str, subject: &str) -> Result<Self> {
        let bytes = decode_base64url(private.trim())
            .filter(|b| b.len() == 32)
            .ok_or_else(|| Error::internal("the VAPID private key is not 32 bytes of base64url"))?;
        let secret = p256::SecretKey::from_slice(&bytes)
            .map_err(|_| Error::internal("the VAPID private key is not a P-256 private key"))?;
        Self::new(secret, subject)
    }

    fn new(secret: p256::SecretKey, subject: &str) -> Result<Self> {
        check_subject(subject)?;
        let public = URL_SAFE_NO_PAD.encode(secret.public_key().to_encoded_point(false).as_bytes());
        Ok(Self { signing: SigningKey::from(secret), public, subject: subject.to_owned() })
    }

    /// Reads the key from a file holding its base64url private key.
    pub fn load(path: &Path, subject: &str) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::internal(format!("reading the VAPID key {}: {e}", path.display())))?;
        Self::from_base64url(&text, subject)
    }

    /// Writes the private key to a new file that only its owner can read.
    /// An existing file is an error: it may hold the key browsers subscribed with.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let written = options.open(path).and_then(|mut file| {
            file.write_all(format!("{}\n", self.to_base64url()).as_bytes())?;
            file.sync_all()
        });
        written.map_err(|e| Error::internal(format!("writing the VAPID key {}: {e}", path.display())))
    }

    /// The key in `path`, or a new one saved there if there is no such file
    /// (courier-local's first start).
    pub fn load_or_generate(path: &Path, subject: &str) -> Result<Self> {
        if path.exists() {
            return Self::load(path, subject);
        }
        let key = Self::generate(subject)?;
        match key.save(path) {
            Ok(()) => Ok(key),
            // Another process made it first: use theirs, or subscriptions made
            // with it would be refused.
            Err(_) if path.exists() => Self::load(path, subject),
            Err(e) => Err(e),
        }
    }

    /// The private key, base64url: what the key file and SSM hold.
    pub fn to_base64url(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.signing.to_bytes())
    }

    /// The public key, base64url of the uncompressed point: the
    /// `applicationServerKey` browsers subscribe with.
    pub fn public_key(&self) -> &str {
        &self.public
    }

    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The `Authorization` header value for a request to `audience` (the
    /// endpoint's origin): `vapid t=JWT, k=PUBLIC KEY`, the JWT expiring at
    /// `expires_at` (seconds since the epoch).
    pub fn authorization(&self, audience: &str, expires_at: u64) -> Result<String> {
        // By hand rather than with jsonwebtoken: its `encode` picks the
        // signer at run time, so it links every algorithm it has (RSA,
        // Ed25519, P-384...) into each push function's bootstrap.
        let claims = Claims { aud: audience, exp: expires_at, sub: &self.subject };
        let claims = serde_json::to_vec(&claims)
            .map_err(|e| Error::internal(format!("encoding the VAPID claims: {e}")))?;
        let mut token = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature: Signature = self.signing.sign(token.as_bytes());
        // JWS ES256 (RFC 7518 §3.4) wants r || s, 64 bytes, not DER.
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
        Ok(format!("vapid t={token}, k={}", self.public))
    }
}

/// RFC 8292 §2.1: the contact is a `mailto:` or an `https:` URI.
fn check_subject(subject: &str) -> Result<()> {
    let ok = match subject.strip_prefix("mailto:") {
        Some(address) => address.contains('@'),
        None => reqwest::Url::parse(subject).is_ok_and(|u| u.scheme() == "https" && u.host().is_some()),
    };
    if ok {
        Ok(())
    } else {
        Err(Error::internal("the VAPID subject must be a mailto: address or an https: URL"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBJECT: &str = "mailto:ops@example.com";

    #[test]
    fn a_key_survives_base64url_and_a_file() {
        let key = VapidKey::generate(SUBJECT).unwrap();
        let again = VapidKey::from_base64url(&key.to_base64url(), SUBJECT).unwrap();
        assert_eq!(again.public_key(), key.public_key());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vapid.key");
        key.save(&path).unwrap();
        assert!(key.save(&path).is_err(), "an existing key file is never overwritten");
        assert_eq!(VapidKey::load(&path, SUBJECT).unwrap().public_key(), key.public_key());
        assert_eq!(VapidKey::load_or_generate(&path, SUBJECT).unwrap().public_key(), key.public_key());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }

        let fresh = dir.path().join("new.key");
        let made = VapidKey::load_or_generate(&fresh, SUBJECT).unwrap();
        assert_eq!(VapidKey::load(&fresh, SUBJECT).unwrap().public_key(), made.public_key());
    }

    #[test]
    fn the_public_key_is_an_uncompressed_point() {
        let key = VapidKey::generate(SUBJECT).unwrap();
        let bytes = decode_base64url(key.public_key()).unwrap();
        assert_eq!(bytes.len(), 65);
        assert_eq!(bytes[0], 4);
        assert!(!format!("{key:?}").contains(&key.to_base64url()), "Debug never shows the private key");
    }

    #[test]
    fn a_known_private_key_gives_its_known_public_key() {
        // web-push-native's documented example pair.
        let key = VapidKey::from_base64url("RS0WdYWWo1HajXg3NZR1olzCf31i-ZBGDkFyCs7j1jw", SUBJECT).unwrap();
        let public = decode_base64url(key.public_key()).unwrap();
        let expected = p256::SecretKey::from_slice(
            &decode_base64url("RS0WdYWWo1HajXg3NZR1olzCf31i-ZBGDkFyCs7j1jw").unwrap(),
        )
        .unwrap()
        .public_key();
        assert_eq!(p256::PublicKey::from_sec1_bytes(&public).unwrap(), expected);
    }

    #[test]
    fn bad_keys_and_subjects_are_refused() {
        assert!(VapidKey::from_base64url("not base64!", SUBJECT).is_err());
        assert!(VapidKey::from_base64url(&URL_SAFE_NO_PAD.encode([0u8; 31]), SUBJECT).is_err());
        // Zero is no private key.
        assert!(VapidKey::from_base64url(&URL_SAFE_NO_PAD.encode([0u8; 32]), SUBJECT).is_err());
        for subject in ["", "ops@example.com", "mailto:", "http://example.com", "https://"] {
            assert!(VapidKey::generate(subject).is_err(), "{subject:?}");
        }
        assert!(VapidKey::generate("https://example.com/contact").is_ok());
    }

    #[test]
    fn the_authorization_is_an_es256_jwt_with_the_claims_asked_for() {
        let key = VapidKey::generate(SUBJECT).unwrap();
        let header = key.authorization("https://push.example", 2_000_000_000).unwrap();
        let (token, public) = header.strip_prefix("vapid t=").unwrap().split_once(", k=").unwrap();
        assert_eq!(public, key.public_key());

        let decoding = jsonwebtoken::DecodingKey::from_ec_components(
            &URL_SAFE_NO_PAD.encode(&decode_base64url(public).unwrap()[1..33]),
            &URL_SAFE_NO_PAD.encode(&decode_base64url(public).unwrap()[33..]),
        )
        .unwrap();
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.set_audience(&["https://push.example"]);
        let claims = jsonwebtoken::decode::<serde_json::Value>(token, &decoding, &validation).unwrap().claims;
        assert_eq!(claims["sub"], SUBJECT);
        assert_eq!(claims["exp"], 2_000_000_000u64);
    }
}
