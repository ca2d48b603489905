//! Push notifications to devices that are not connected: registerPush,
//! unregisterPush, and the Wake job that sends content-free wake-ups.
//!
//! A command never waits on a push service: the send path only enqueues a
//! Wake job for recipients that have a registration and no connection, and
//! the job (the deliver side) sends it, collapsed per device.

use std::collections::BTreeSet;
use std::time::Duration;

use tracing::instrument;

use super::Courier;
use crate::domain::{Caller, Device, InboxKey};
use crate::error::{Error, Result};
use crate::ports::{Job, PushRegistration, WakeTarget, Woken};
use crate::protocol::{Empty, Platform, RegisterPush, UnregisterPush};

/// The longest FCM or APNs device token.
const MAX_TOKEN_CHARS: usize = 4096;

impl Courier {
    #[instrument(level = "debug", skip_all, fields(user = %caller.user, device = %caller.device))]
    pub async fn register_push(&self, caller: &Caller, cmd: RegisterPush) -> Result<Empty> {
        let platform = cmd.platform;
        let registration = match (platform, cmd.token, cmd.subscription) {
            (Platform::WebPush, None, Some(subscription)) => PushRegistration {
                platform,
                address: subscription.endpoint,
                keys: Some(subscription.keys),
                endpoint: None,
            },
            (Platform::WebPush, _, _) => {
                return Err(Error::BadRequest("webpush takes a subscription and no token".into()));
            }
            (_, Some(token), None) => {
                let n = token.chars().count();
                if n == 0 || n > MAX_TOKEN_CHARS {
                    return Err(Error::BadRequest(format!("token is 1-{MAX_TOKEN_CHARS} characters")));
                }
                PushRegistration { platform, address: token, keys: None, endpoint: None }
            }
            (_, _, _) => {
                return Err(Error::BadRequest(format!(
                    "{} takes a token and no subscription",
                    platform.name()
                )));
            }
        };
        if !self.ports.wakeups.serves(platform) {
            return Err(Error::BadRequest(format!(
                "push platform {} is turned off on this server",
                platform.name()
            )));
        }
        let previous = self.own_device(caller).await?.and_then(|d| d.push);
        let ready = self.ports.wakeups.prepare(registration, previous.as_ref()).await?;
        if !self.ports.devices.register_push(&caller.user, &caller.device, &ready).await? {
            // Removed meanwhile: what prepare made goes with it.
            self.release(&ready).await;
            return Err(Error::NotFound("this device has been removed".into()));
        }
        Ok(Empty {})
    }

    pub async fn unregister_push(&self, caller: &Caller, _cmd: UnregisterPush) -> Result<Empty> {
        if let Some(removed) = self.ports.devices.unregister_push(&caller.user, &caller.device, None).await? {
            self.release(&removed).await;
        }
        Ok(Empty {})
    }

    async fn own_device(&self, caller: &Caller) -> Result<Option<Device>> {
        let devices = self.ports.devices.devices_of(std::slice::from_ref(&caller.user), i64::MIN).await?;
        Ok(devices.into_iter().find(|d| d.id == caller.device))
    }

    /// Lets go of what a registration holds at the push service (an SNS
    /// endpoint) through the queue. Logged, not returned: the registration
    /// is gone either way, and at worst the endpoint outlives it.
    pub(super) async fn release(&self, registration: &PushRegistration) {
        if registration.endpoint.is_none() {
            return;
        }
        let job = Job::Release { registration: registration.clone() };
        if let Err(e) = self.ports.jobs.enqueue(&job, Duration::ZERO).await {
            tracing::warn!(platform = registration.platform.name(), error = %e, "enqueueing a push release failed");
        }
    }

    /// Releases the registrations of devices that are gone.
    pub(super) async fn release_devices(&self, devices: &[Device]) {
        for registration in devices.iter().filter_map(|d| d.push.as_ref()) {
            self.release(registration).await;
        }
    }

    /// Hands the devices to wake to the queue. Never fails the caller: the
    /// message is stored, and a device that is not woken finds it when it
    /// next connects.
    pub(super) async fn enqueue_wake(&self, devices: Vec<WakeTarget>) {
        if devices.is_empty() {
            return;
        }
        if let Err(e) = self.ports.jobs.enqueue(&Job::Wake { devices }, Duration::ZERO).await {
            tracing::warn!(error = %e, "enqueueing a wake-up failed");
        }
    }

    /// The Wake job: one wake-up per device, unless one is outstanding (the
    /// collapse window) or the device has connected meanwhile. A temporary
    /// failure clears that device's mark and fails the job, whose retry
    /// wakes only the devices not woken yet.
    pub(super) async fn wake(&self, devices: &[WakeTarget]) -> Result<()> {
        let mut retry = None;
        for target in devices {
            let (user, device) = (&target.user_id, &target.device_id);
            let now = self.now();
            let not_before = now - self.limits.wake_collapse_ms + 1;
            let Some(registration) = self.ports.devices.begin_wake(user, device, now, not_before).await?
            else {
                continue;
            };
            match self.ports.wakeups.wake(user, device, &registration).await {
                Ok(Woken::Sent) => {}
                Ok(Woken::Gone) => {
                    tracing::info!(%user, %device, platform = registration.platform.name(), "push registration gone");
                    if self.ports.devices.unregister_push(user, device, Some(&registration)).await?.is_some()
                    {
                        self.release(&registration).await;
                    }
                }
                Err(e) if e.is_retryable() => {
                    tracing::warn!(%user, %device, error = %e, "wake-up will be retried");
                    self.ports.devices.end_wake(user, device).await?;
                    retry.get_or_insert(e);
                }
                // Permanent for this wake-up: the mark stays, so the next
                // message after the window tries again rather than this one
                // being retried in a loop.
                Err(e) => tracing::warn!(%user, %device, error = %e, "wake-up refused"),
            }
        }
        retry.map_or(Ok(()), Err)
    }
}

/// The devices among `inboxes` that have a push registration and no connection.
pub(super) fn wake_targets(inboxes: &[InboxKey], devices: &[Device]) -> Vec<WakeTarget> {
    let wanted: BTreeSet<&InboxKey> = inboxes.iter().collect();
    devices
        .iter()
        .filter(|d| d.connection.is_none() && d.push.is_some() && wanted.contains(&d.inbox()))
        .map(|d| WakeTarget { user_id: d.user.clone(), device_id: d.id.clone() })
        .collect()
}
