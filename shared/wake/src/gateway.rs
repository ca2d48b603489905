//! FCM and APNs wake-ups through an HTTP push gateway (the contract is in the crate's documentation).

use std::time::Duration;

use courier_core::ports::{Platform, Woken};
use courier_core::{Error, Result};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use tracing::{instrument, warn};

use crate::collapse_key;

/// How a [`GatewaySender`] reaches its gateway.
#[derive(Clone, Debug)]
pub struct GatewayOptions {
    /// Sent as `Authorization: Bearer <secret>`, for a gateway that is not
    /// only reachable by this server.
    pub bearer: Option<String>,
    /// How long one request may take before it is abandoned as a retryable failure.
    pub timeout: Duration,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self { bearer: None, timeout: Duration::from_secs(10) }
    }
}

/// Sends FCM and APNs wake-ups to a push gateway.
pub struct GatewaySender {
    url: Url,
    bearer: Option<String>,
    client: reqwest::Client,
}

// By hand: the bearer secret stays out of Debug.
impl std::fmt::Debug for GatewaySender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewaySender").field("url", &self.url.as_str()).finish_non_exhaustive()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WakeRequest<'a> {
    platform: &'a str,
    token: &'a str,
    priority: &'static str,
    collapse_key: String,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    unregistered: bool,
}

impl GatewaySender {
    pub fn new(url: &str, options: GatewayOptions) -> Result<Self> {
        let url = Url::parse(url).map_err(|e| Error::internal(format!("the push gateway URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::internal("the push gateway URL must be http or https"));
        }
        let client = reqwest::Client::builder()
            .timeout(options.timeout)
            .build()
            .map_err(|e| Error::internal(format!("building the push gateway client: {e}")))?;
        Ok(Self { url, bearer: options.bearer, client })
    }

    /// Which platforms a gateway carries.
    pub fn serves(platform: Platform) -> bool {
        matches!(platform, Platform::Fcm | Platform::Apns | Platform::ApnsSandbox)
    }

    /// Sends one wake-up for a device token.
    #[instrument(skip_all, fields(platform = platform.name()))]
    pub async fn send(&self, platform: Platform, token: &str) -> Result<Woken> {
        if !Self::serves(platform) {
            return Err(Error::internal(format!("the push gateway does not carry {}", platform.name())));
        }
        let body = WakeRequest {
            platform: platform.name(),
            token,
            priority: "high",
            collapse_key: collapse_key(token),
        };
        let body = serde_json::to_vec(&body).map_err(Error::internal)?;
        let mut request =
            self.client.post(self.url.clone()).header(CONTENT_TYPE, "application/json").body(body);
        if let Some(secret) = &self.bearer {
            request = request.header(AUTHORIZATION, format!("Bearer {secret}"));
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) if e.is_builder() => return Err(Error::internal(e.without_url())),
            Err(e) => return Err(Error::unavailable(e.without_url())),
        };
        let status = response.status();
        // A timeout while reading the answer is as retryable as one before it.
        let text = response.text().await.map_err(|e| Error::unavailable(e.without_url()))?;
        if serde_json::from_str::<Answer>(&text).is_ok_and(|a| a.unregistered) {
            return Ok(Woken::Gone);
        }
        match status {
            s if s.is_success() => Ok(Woken::Sent),
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(Woken::Gone),
            s if s == StatusCode::TOO_MANY_REQUESTS || s.is_server_error() => {
                Err(Error::unavailable(format!("the push gateway answered {status}")))
            }
            _ => {
                // Status only: a gateway's text may quote the token back.
                warn!(%status, "the push gateway refused a wake-up");
                Err(Error::internal(format!("the push gateway answered {status}")))
            }
        }
    }
}
