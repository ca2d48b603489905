//! Wake-ups for devices that are not connected: the `Wakeups` port's direct adapters.
//!
//! A wake-up carries no content: it tells an app that it has something to
//! `sync`, and nothing about what (no text, sender, chat or name leaves
//! through a push service). It is sent at high priority and collapsed per
//! device, so a device that stays away for a day finds one wake-up, not a
//! hundred.
//!
//! # Crate map
//!
//! - [`vapid`]: [`VapidKey`], the server's P-256 key that signs Web Push
//!   requests (RFC 8292), made, loaded and saved as base64url.
//! - [`webpush`]: [`WebPushSender`], which encrypts the wake-up for the
//!   subscription (RFC 8291, `aes128gcm`) and POSTs it to its endpoint.
//! - [`gateway`]: [`GatewaySender`], which hands FCM and APNs wake-ups to an
//!   HTTP push gateway (the contract is below).
//! - [`wakers`]: [`Wakers`], the `Wakeups` implementation that routes each
//!   registration to the sender of its platform.
//! - [`check`]: the checks `registerPush` makes on a Web Push subscription
//!   ([`check_subscription`], [`check_public_host`]).
//!
//! # The push gateway contract
//!
//! Deployed, FCM and APNs wake-ups go through Amazon SNS. Locally (and for
//! an app team that runs its own push sender) they go to an HTTP push
//! gateway, whose URL is configuration. This is what such a gateway
//! implements:
//!
//! - **Request**: `POST` to the configured URL, `Content-Type:
//!   application/json`, and `Authorization: Bearer <secret>` when a secret is
//!   configured. The body is
//!
//!   ```json
//!   {"platform":"fcm","token":"...","priority":"high","collapseKey":"..."}
//!   ```
//!
//!   `platform` is `fcm`, `apns` or `apns-sandbox` (APNs' development
//!   environment); `token` is the device token the app registered;
//!   `priority` is always `high` (FCM `android.priority: high`, APNs
//!   `apns-priority: 10`); `collapseKey` is 32 characters of base64url,
//!   stable per registration (FCM `collapse_key`, APNs `apns-collapse-id`).
//!   The gateway adds no text: the app, woken, calls `sync`.
//! - **Answer**: any 2xx when the platform accepted the push. 404 or 410
//!   when the platform says the token is no longer valid (FCM
//!   `UNREGISTERED`, APNs 410 `Unregistered` or 400 `BadDeviceToken`); a
//!   gateway that cannot choose its status may instead answer a JSON body
//!   `{"unregistered": true}` with any status. Courier then forgets the
//!   registration. 429 or 5xx when the failure is temporary: Courier retries
//!   with backoff. Any other 4xx is taken as a permanent error for this
//!   wake-up (logged, not retried).
//! - **Time**: answer within the configured timeout (10 s by default);
//!   a request that takes longer is abandoned and retried.

pub mod check;
pub mod gateway;
pub mod vapid;
pub mod wakers;
pub mod webpush;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

pub use check::{check_public_endpoint, check_public_host, check_subscription, is_public};
pub use gateway::{GatewayOptions, GatewaySender};
pub use vapid::VapidKey;
pub use wakers::Wakers;
pub use webpush::{WebPushOptions, WebPushSender};

/// The collapse key (Web Push `Topic`, FCM `collapse_key`, APNs
/// `apns-collapse-id`) for a registration's address: 32 base64url
/// characters, the most RFC 8030 §5.4 allows.
///
/// A hash of the address (the endpoint or token) rather than of the user and
/// device: topics only collapse within one registration, so it collapses
/// just as well, and it tells the push service nothing it does not already
/// hold, where a hash of a user id (often an email address) could be
/// reversed by trying guesses.
pub fn collapse_key(address: &str) -> String {
    let digest = Sha256::new().chain_update(b"courier wake-up\n").chain_update(address.as_bytes()).finalize();
    URL_SAFE_NO_PAD.encode(&digest[..24])
}

/// Whether `error` or anything in its chain of sources is an `E`.
fn caused_by<E: std::error::Error + 'static>(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if e.is::<E>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// At most `max` characters of a push service's answer, for a log line.
fn excerpt(body: &str, max: usize) -> &str {
    match body.char_indices().nth(max) {
        Some((end, _)) => &body[..end],
        None => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collapse_keys_are_32_base64url_characters_and_stable_per_address() {
        let a = collapse_key("https://push.example/abc");
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(a, collapse_key("https://push.example/abc"));
        assert_ne!(a, collapse_key("https://push.example/abd"));
    }

    #[test]
    fn excerpts_cut_on_characters() {
        assert_eq!(excerpt("héllo", 2), "hé");
        assert_eq!(excerpt("hi", 10), "hi");
    }
}
