//! Web Push: a content-free wake-up, encrypted for the subscription (RFC 8291) and signed with VAPID (RFC 8292).

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use courier_core::ports::{WebPushKeys, Woken};
use courier_core::{Error, Result};
use reqwest::header::{AUTHORIZATION, CONTENT_ENCODING, CONTENT_TYPE};
use reqwest::{StatusCode, Url};
use tracing::{instrument, warn};

use crate::check::{check_public_endpoint, check_subscription, decode_keys, host_ip, is_public};
use crate::{VapidKey, caused_by, collapse_key, excerpt};

/// What the service worker receives: that there is something to sync, and nothing else.
pub const WAKE_PAYLOAD: &[u8] = br#"{"type":"wake"}"#;

/// How long a VAPID token is valid. RFC 8292 allows at most 24 hours; half
/// of that leaves room for a push service whose clock runs ahead.
const VAPID_VALIDITY: Duration = Duration::from_secs(12 * 60 * 60);

/// How a [`WebPushSender`] behaves.
#[derive(Clone, Debug)]
pub struct WebPushOptions {
    /// How long the push service keeps a wake-up for a device that is
    /// offline (the `TTL` header).
    pub ttl: Duration,
    /// How long one request may take, connecting included, before it is
    /// abandoned as a retryable failure.
    pub timeout: Duration,
    /// Only https endpoints on public addresses (deployed). Off in
    /// courier-local, whose tests subscribe with `http://127.0.0.1` endpoints.
    pub public_hosts_only: bool,
}

impl Default for WebPushOptions {
    fn default() -> Self {
        Self {
            // Four weeks: the most FCM accepts, and within the 30 days a
            // device's inbox keeps its messages, so a wake-up delivered late
            // still finds something to sync. Collapsing keeps it to one.
            ttl: Duration::from_secs(28 * 24 * 60 * 60),
            timeout: Duration::from_secs(10),
            public_hosts_only: true,
        }
    }
}

/// Sends wake-ups to Web Push subscriptions.
#[derive(Debug)]
pub struct WebPushSender {
    key: VapidKey,
    client: reqwest::Client,
    options: WebPushOptions,
}

/// An endpoint's host that is not public, when only public ones may be reached.
#[derive(Debug, thiserror::Error)]
#[error("the push endpoint's host is not a public address")]
struct NotPublic;

/// A resolver that gives an endpoint's addresses only if they are all
/// public: checked at registration is not enough, since a name may resolve
/// elsewhere by the time a wake-up is sent.
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addresses: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addresses.is_empty() {
                return Err(
                    std::io::Error::new(std::io::ErrorKind::NotFound, "the host has no address").into()
                );
            }
            if !addresses.iter().all(|a| is_public(a.ip())) {
                return Err(NotPublic.into());
            }
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

impl WebPushSender {
    pub fn new(key: VapidKey, options: WebPushOptions) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .timeout(options.timeout)
            // A push service answers; it does not redirect. Following one
            // would let an endpoint lead the server anywhere.
            .redirect(reqwest::redirect::Policy::none())
            // A proxy would resolve names itself, past the public-address check.
            .no_proxy();
        if options.public_hosts_only {
            builder = builder.dns_resolver(PublicOnly);
        }
        let client =
            builder.build().map_err(|e| Error::internal(format!("building the Web Push client: {e}")))?;
        Ok(Self { key, client, options })
    }

    pub fn vapid_key(&self) -> &VapidKey {
        &self.key
    }

    /// Checks a subscription for `registerPush`, by this sender's rules: an
    /// https endpoint on a public host when `public_hosts_only`, else https
    /// or `http://127.0.0.1`; keys that RFC 8291 can encrypt to. A
    /// `BadRequest` says what is wrong.
    pub async fn check(&self, endpoint: &str, keys: &WebPushKeys) -> Result<()> {
        let public_only = self.options.public_hosts_only;
        check_subscription(endpoint, &keys.p256dh, &keys.auth, !public_only).map_err(bad_request)?;
        if public_only {
            check_public_endpoint(endpoint).await.map_err(bad_request)?;
        }
        Ok(())
    }

    /// Sends one wake-up to a subscription. `Woken::Gone` when the push
    /// service says the subscription has expired or been removed (404, 410);
    /// a retryable error for 429, 5xx, timeouts and failed connections; any
    /// other answer is a non-retryable error.
    #[instrument(skip_all, fields(host))]
    pub async fn send(&self, endpoint: &str, keys: &WebPushKeys) -> Result<Woken> {
        let url = self.endpoint(endpoint)?;
        tracing::Span::current().record("host", url.host_str().unwrap_or_default());
        let (public, auth) = decode_keys(&keys.p256dh, &keys.auth)
            .map_err(|e| Error::internal(format!("stored Web Push keys: {e}")))?;
        let body = web_push_native::encrypt(WAKE_PAYLOAD.to_vec(), &public, &auth.into())
            .map_err(|e| Error::internal(format!("encrypting the wake-up: {e}")))?;
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        // RFC 8292 §2: `aud` is the endpoint's origin, its port included when
        // it is not the scheme's default.
        let authorization =
            self.key.authorization(&url.origin().ascii_serialization(), (now + VAPID_VALIDITY).as_secs())?;

        let sent = self
            .client
            .post(url)
            .header("TTL", self.options.ttl.as_secs())
            .header("Urgency", "high")
            .header("Topic", collapse_key(endpoint))
            .header(CONTENT_ENCODING, "aes128gcm")
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(AUTHORIZATION, authorization)
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            // The endpoint is a bearer capability: it stays out of errors and logs.
            Err(e) if caused_by::<NotPublic>(&e) => return Err(Error::internal(NotPublic)),
            Err(e) if e.is_builder() => return Err(Error::internal(e.without_url())),
            Err(e) => return Err(Error::unavailable(e.without_url())),
        };
        let status = response.status();
        match status {
            StatusCode::OK | StatusCode::CREATED | StatusCode::ACCEPTED => Ok(Woken::Sent),
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(Woken::Gone),
            s if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
                Err(Error::unavailable(format!("the Web Push service answered {status}")))
            }
            _ => {
                // Most often a VAPID key that is not the one the browser
                // subscribed with (401, 403), or a refused header (400): the
                // service's text says which, and carries no secret.
                let text = response.text().await.unwrap_or_default();
                warn!(%status, answer = excerpt(&text, 200), "the Web Push service refused a wake-up");
                Err(Error::internal(format!("the Web Push service answered {status}")))
            }
        }
    }

    /// The stored endpoint as a URL this sender may reach.
    fn endpoint(&self, endpoint: &str) -> Result<Url> {
        let url =
            Url::parse(endpoint).map_err(|_| Error::internal("a stored Web Push endpoint is not a URL"))?;
        let allowed = match url.scheme() {
            _ if url.host_str().is_none() => false,
            "http" => !self.options.public_hosts_only,
            // A name is checked when it is resolved (`PublicOnly`).
            "https" if self.options.public_hosts_only => host_ip(&url).is_none_or(is_public),
            "https" => true,
            _ => false,
        };
        if allowed { Ok(url) } else { Err(Error::internal(NotPublic)) }
    }
}

fn bad_request(message: &str) -> Error {
    Error::BadRequest(message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sender(public_hosts_only: bool) -> WebPushSender {
        let key = VapidKey::generate("mailto:ops@example.com").unwrap();
        WebPushSender::new(key, WebPushOptions { public_hosts_only, ..WebPushOptions::default() }).unwrap()
    }

    #[test]
    fn deployed_senders_reach_only_https_endpoints_on_public_hosts() {
        let deployed = sender(true);
        assert!(deployed.endpoint("https://fcm.googleapis.com/fcm/send/x").is_ok());
        assert!(deployed.endpoint("https://8.8.8.8/x").is_ok());
        for refused in [
            "http://127.0.0.1:9/x",
            "https://127.0.0.1/x",
            "https://[::1]/x",
            "https://10.0.0.1/x",
            "http://push.example/x",
        ] {
            assert!(deployed.endpoint(refused).is_err(), "{refused}");
        }
        let local = sender(false);
        assert!(local.endpoint("http://127.0.0.1:9/x").is_ok());
        assert!(local.endpoint("ftp://127.0.0.1/x").is_err());
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_a_private_address_is_not_reached_nor_retried() {
        // `localhost` resolves to loopback without DNS.
        let keys = crate::check::test_keys();
        let e = sender(true).send("https://localhost:9/x", &keys).await.unwrap_err();
        assert!(!e.is_retryable(), "{e}");
        assert!(e.to_string().contains("not a public address"), "{e}");
        assert!(!e.to_string().contains("localhost:9"), "the endpoint stays out of errors: {e}");
    }
}
