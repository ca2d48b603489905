//! The domain services: one method per command, over the ports, shared by every shape.

mod account;
mod attachments;
mod chats;
mod devices;
mod keys;
mod messages;
mod receipts;
mod wake;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub use keys::devices_digest;

use crate::domain::{Caller, Device, InboxKey, Limits, Millis};
use crate::error::{Error, Result};
use crate::ids::{ChatId, ConnectionId, IdGen, UserId};
use crate::ports::{
    AttachmentStore, Blobs, ChatStore, Clock, DedupeKey, DeviceStore, Jobs, KeyStore, MessageRetention,
    MessageStore, Posted, Push, Quota, QuotaStore, ReceiptStore, Wakeups,
};

/// The ports a `Courier` runs on, chosen once at start-up.
#[derive(Clone)]
pub struct Ports {
    pub chats: Arc<dyn ChatStore>,
    pub devices: Arc<dyn DeviceStore>,
    pub messages: Arc<dyn MessageStore>,
    /// The clean-up's: deployed, only its function wires it.
    pub retention: Arc<dyn MessageRetention>,
    pub attachments: Arc<dyn AttachmentStore>,
    pub quotas: Arc<dyn QuotaStore>,
    pub keys: Arc<dyn KeyStore>,
    pub receipts: Arc<dyn ReceiptStore>,
    pub wakeups: Arc<dyn Wakeups>,
    pub blobs: Arc<dyn Blobs>,
    pub push: Arc<dyn Push>,
    pub jobs: Arc<dyn Jobs>,
    pub clock: Arc<dyn Clock>,
}

/// The service context: every command is a method on it.
pub struct Courier {
    ports: Ports,
    ids: IdGen,
    limits: Limits,
    /// When each (device, chat) last had a typing frame pushed: typing is
    /// throttled in memory, never stored.
    typing: Mutex<HashMap<(InboxKey, ChatId), Millis>>,
}

impl Courier {
    pub fn new(ports: Ports, limits: Limits) -> Self {
        Self { ports, ids: IdGen::new(), limits, typing: Mutex::default() }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn ports(&self) -> &Ports {
        &self.ports
    }

    fn now(&self) -> Millis {
        self.ports.clock.now()
    }

    /// Devices unseen since this instant count as gone.
    fn expired_before(&self, now: Millis) -> Millis {
        now - self.limits.device_expiry_ms
    }

    async fn live_devices(&self, users: &[UserId], now: Millis) -> Result<Vec<Device>> {
        self.ports.devices.devices_of(users, self.expired_before(now)).await
    }

    /// Pushes one frame to each connection, in parallel; a connection found
    /// gone is unbound from its device so later sends skip it, and returned.
    async fn push_all(
        &self,
        connections: impl IntoIterator<Item = &ConnectionId>,
        frame: &str,
    ) -> Result<Vec<ConnectionId>> {
        let posts = connections.into_iter().map(|c| async move { (c, self.ports.push.post(c, frame).await) });
        let mut first_error = None;
        let mut gone = Vec::new();
        for (connection, outcome) in futures_util::future::join_all(posts).await {
            match outcome {
                Ok(Posted::Sent) => {}
                Ok(Posted::Gone) => {
                    tracing::debug!(%connection, "push found the connection gone");
                    self.ports.devices.disconnect(connection, self.now()).await?;
                    gone.push(connection.clone());
                }
                Err(e) => {
                    tracing::warn!(%connection, error = %e, "push failed");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(gone), Err)
    }

    /// Counts `amount` against one of the caller's daily quotas, or refuses
    /// with LIMIT_EXCEEDED naming the quota when the day's is used up.
    async fn charge(&self, user: &UserId, quota: Quota, amount: u64) -> Result<()> {
        let limit = match quota {
            Quota::PendingBytes => self.limits.max_pending_bytes_per_day,
            Quota::AttachmentBytes => self.limits.max_attachment_bytes_per_day,
        };
        let day = self.now().div_euclid(crate::domain::DAY_MS);
        if amount <= limit && self.ports.quotas.charge(user, quota, day, amount, limit).await? {
            return Ok(());
        }
        Err(crate::Error::LimitExceeded(match quota {
            Quota::PendingBytes => {
                format!(
                    "quota reached: at most {limit} bytes a day of messages to users who have never connected"
                )
            }
            Quota::AttachmentBytes => format!("quota reached: at most {limit} bytes of attachments a day"),
        }))
    }

    /// The `limit` of a paged command (sync, listChats), checked.
    fn page_limit(&self, asked: Option<u32>) -> Result<usize> {
        match asked {
            None => Ok(self.limits.default_page_limit as usize),
            Some(0) => Err(crate::Error::BadRequest("limit must be at least 1".into())),
            Some(n) if n > self.limits.max_page_limit => {
                Err(crate::Error::LimitExceeded(format!("limit is at most {}", self.limits.max_page_limit)))
            }
            Some(n) => Ok(n as usize),
        }
    }

    /// The idempotency key of a send, from its optional clientMessageId.
    fn dedupe_key(&self, caller: &Caller, client_message_id: Option<String>) -> Result<Option<DedupeKey>> {
        match client_message_id {
            Some(id) if id.is_empty() => Err(Error::BadRequest("clientMessageId must not be empty".into())),
            Some(id) if id.chars().count() > 64 => {
                Err(Error::LimitExceeded("clientMessageId is at most 64 characters".into()))
            }
            Some(id) => Ok(Some(DedupeKey {
                user: caller.user.clone(),
                device: caller.device.clone(),
                client_message_id: id,
            })),
            None => Ok(None),
        }
    }

    /// The periodic clean-up: expired devices (with their keys) and inbox
    /// rows, old message rows.
    pub async fn cleanup(&self) -> Result<(u64, u64)> {
        let now = self.now();
        let expired = self.ports.devices.expire_devices(self.expired_before(now)).await?;
        let users: std::collections::BTreeSet<UserId> = expired.iter().map(|d| d.user.clone()).collect();
        for device in &expired {
            self.ports.keys.remove_keys(&device.user, &device.id).await?;
        }
        self.release_devices(&expired).await;
        for user in users {
            self.announce_devices(&user, None).await;
        }
        let rows = self.ports.retention.expire_messages(now, self.limits.retention_ms).await?;
        let devices = expired.len() as u64;
        tracing::info!(devices, rows, "cleanup");
        Ok((devices, rows))
    }
}
