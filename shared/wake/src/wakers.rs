//! `Wakers`: the `Wakeups` port over the senders this shape has, routed by platform.

use async_trait::async_trait;
use courier_core::ids::{DeviceId, UserId};
use courier_core::ports::{Platform, PushRegistration, Wakeups, Woken};
use courier_core::{Error, Result};
use tracing::instrument;

use crate::{GatewaySender, WebPushSender};

/// Web Push when a VAPID key is configured; FCM and APNs when a push gateway is.
#[derive(Debug, Default)]
pub struct Wakers {
    web_push: Option<WebPushSender>,
    gateway: Option<GatewaySender>,
}

impl Wakers {
    pub fn new(web_push: Option<WebPushSender>, gateway: Option<GatewaySender>) -> Self {
        Self { web_push, gateway }
    }
}

#[async_trait]
impl Wakeups for Wakers {
    fn serves(&self, platform: Platform) -> bool {
        match platform {
            Platform::WebPush => self.web_push.is_some(),
            Platform::Fcm | Platform::Apns | Platform::ApnsSandbox => self.gateway.is_some(),
        }
    }

    /// Checks the registration; nothing to make for a gateway or Web Push,
    /// so it comes back as it went in (`endpoint` cleared: it is SNS's).
    async fn prepare(
        &self,
        registration: PushRegistration,
        _previous: Option<&PushRegistration>,
    ) -> Result<PushRegistration> {
        let platform = registration.platform;
        if !self.serves(platform) {
            return Err(Error::BadRequest(format!(
                "platform: {} is not enabled on this server",
                platform.name()
            )));
        }
        match platform {
            Platform::WebPush => {
                let sender = self.web_push.as_ref().ok_or_else(|| not_configured(platform))?;
                let keys = registration
                    .keys
                    .as_ref()
                    .ok_or_else(|| Error::BadRequest("subscription: keys are required".into()))?;
                sender.check(&registration.address, keys).await?;
                Ok(PushRegistration { endpoint: None, ..registration })
            }
            _ => {
                if !(1..=MAX_TOKEN).contains(&registration.address.chars().count()) {
                    return Err(Error::BadRequest("token: 1-4096 characters".into()));
                }
                Ok(PushRegistration { keys: None, endpoint: None, ..registration })
            }
        }
    }

    #[instrument(skip_all, fields(user = %user, device = %device, platform = registration.platform.name()))]
    async fn wake(&self, user: &UserId, device: &DeviceId, registration: &PushRegistration) -> Result<Woken> {
        let platform = registration.platform;
        match platform {
            Platform::WebPush => {
                let sender = self.web_push.as_ref().ok_or_else(|| not_configured(platform))?;
                let keys = registration
                    .keys
                    .as_ref()
                    .ok_or_else(|| Error::internal("a Web Push registration without keys"))?;
                sender.send(&registration.address, keys).await
            }
            _ => {
                self.gateway
                    .as_ref()
                    .ok_or_else(|| not_configured(platform))?
                    .send(platform, &registration.address)
                    .await
            }
        }
    }

    /// Nothing was made for the registration, so nothing is let go.
    async fn release(&self, _registration: &PushRegistration) -> Result<()> {
        Ok(())
    }
}

/// The protocol's bound on an FCM or APNs token.
const MAX_TOKEN: usize = 4096;

fn not_configured(platform: Platform) -> Error {
    Error::internal(format!("no sender for {} is configured", platform.name()))
}
