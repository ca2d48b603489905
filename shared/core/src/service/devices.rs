//! Devices and connections: $connect, $disconnect and removeDevice.

use tracing::instrument;

use super::Courier;
use crate::domain::Caller;
use crate::error::{Error, Result};
use crate::ids::{ConnectionId, DeviceId, UserId};
use crate::ports::Connected;

impl Courier {
    /// Registers the device and binds the new connection to it. A user's
    /// first device inherits what was sent to them while they had none; an
    /// older connection of the same device is closed.
    #[instrument(level = "debug", skip_all, fields(user = %user, device = %device, connection = %connection))]
    pub async fn connect(&self, user: &UserId, device: &DeviceId, connection: &ConnectionId) -> Result<()> {
        let now = self.now();
        let outcome = self
            .ports
            .devices
            .connect(user, device, connection, now, self.limits.max_devices, self.expired_before(now))
            .await?;
        match outcome {
            Connected::DeviceLimit => Err(Error::LimitExceeded(format!(
                "a user has at most {} devices; remove one with removeDevice",
                self.limits.max_devices
            ))),
            Connected::Ok { new_device, first_device, replaced } => {
                if new_device {
                    // A device id seen again after it expired is a new install:
                    // the old identity key must not bind it.
                    self.ports.keys.remove_keys(user, device).await?;
                }
                if first_device {
                    let claimed = self.ports.messages.claim_pending(user, device).await?;
                    tracing::debug!(claimed, "first device claimed pending messages");
                }
                if let Some(old) = replaced
                    && let Err(e) = self.ports.push.close(&old).await
                {
                    tracing::warn!(error = %e, "closing the replaced connection failed");
                }
                Ok(())
            }
        }
    }

    pub async fn disconnect(&self, connection: &ConnectionId) -> Result<()> {
        self.ports.devices.disconnect(connection, self.now()).await
    }

    /// Removes one of the caller's devices with its inbox and closes its
    /// connection. When that is the very connection asking, the answer must
    /// go out first: its closing is returned for the handler to do last.
    #[instrument(level = "debug", skip_all, fields(user = %caller.user, device = %device))]
    pub async fn remove_device(&self, caller: &Caller, device: &DeviceId) -> Result<Option<ConnectionId>> {
        let removed = self.ports.devices.remove_device(&caller.user, device).await?;
        let removed = removed.ok_or_else(|| Error::NotFound("you have no such device".into()))?;
        let was_ready = self
            .ports
            .keys
            .device_keys(std::slice::from_ref(&caller.user))
            .await?
            .iter()
            .any(|k| &k.device == device);
        self.ports.keys.remove_keys(&caller.user, device).await?;
        self.release_devices(std::slice::from_ref(&removed)).await;
        if was_ready {
            self.announce_devices(&caller.user, None).await;
        }
        match removed.connection {
            Some(connection) if connection == caller.connection => Ok(Some(connection)),
            Some(connection) => {
                self.ports.push.close(&connection).await?;
                Ok(None)
            }
            None => Ok(None),
        }
    }
}
