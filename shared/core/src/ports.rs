//! The ports: small traits through which the services reach storage, pushes, queues and blobs.
//!
//! Each trait matches one capability (and so one IAM grant when deployed).
//! Adapters are named `<Tech><Port>`: `SqliteStore` implements the table
//! ports locally, the DynamoDB adapters implement them deployed.

mod unwired;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::domain::{Chat, Device, InboxKey, Millis};
use crate::error::Result;
use crate::ids::{AttachmentId, ChatId, ConnectionId, DeviceId, MessageId, UserId};

pub use unwired::Unwired;

#[async_trait]
pub trait ChatStore: Send + Sync {
    async fn create_chat(&self, chat: &Chat) -> Result<()>;
    async fn chat(&self, id: &ChatId) -> Result<Option<Chat>>;
    /// Writes `chat` if the stored version is still `expected_version`;
    /// `false` means somebody else changed it first.
    async fn update_chat(&self, chat: &Chat, expected_version: u64) -> Result<bool>;
    /// The user's chats in chatId order, after `after` (exclusive), at most `limit`.
    async fn chats_of(&self, user: &UserId, after: Option<&ChatId>, limit: usize) -> Result<Vec<Chat>>;
}

/// What `DeviceStore::connect` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Connected {
    /// The device is registered and now bound to the new connection.
    /// `replaced` is its previous live connection, to be closed.
    Ok { new_device: bool, first_device: bool, replaced: Option<ConnectionId> },
    /// The user already has `max_devices` other devices.
    DeviceLimit,
}

#[async_trait]
pub trait DeviceStore: Send + Sync {
    /// Registers the device if new (refusing a device past `max_devices`
    /// live ones, where devices unseen since `expired_before` do not count)
    /// and binds it to `connection`. Clears the device's wake mark: a
    /// wake-up is answered once the device connects. A device registered
    /// anew (new, or back after it expired) has no push registration.
    async fn connect(
        &self,
        user: &UserId,
        device: &DeviceId,
        connection: &ConnectionId,
        now: Millis,
        max_devices: usize,
        expired_before: Millis,
    ) -> Result<Connected>;
    /// Unbinds `connection`, if it is still its device's connection.
    async fn disconnect(&self, connection: &ConnectionId, now: Millis) -> Result<()>;
    /// The devices of these users not unseen since `expired_before`.
    async fn devices_of(&self, users: &[UserId], expired_before: Millis) -> Result<Vec<Device>>;
    /// Deletes the device and its inbox. Returns it if it existed.
    async fn remove_device(&self, user: &UserId, device: &DeviceId) -> Result<Option<Device>>;
    /// Deletes devices unseen since `before`, with their inboxes. Returns them.
    async fn expire_devices(&self, before: Millis) -> Result<Vec<Device>>;
    /// Stores the device's push registration, replacing any (the wake mark
    /// goes with the old one). `false` when the device does not exist.
    async fn register_push(
        &self,
        user: &UserId,
        device: &DeviceId,
        registration: &PushRegistration,
    ) -> Result<bool>;
    /// Removes the device's registration if it is `expected` (whatever it is
    /// when `None`) and returns what was removed.
    async fn unregister_push(
        &self,
        user: &UserId,
        device: &DeviceId,
        expected: Option<&PushRegistration>,
    ) -> Result<Option<PushRegistration>>;
    /// Begins a wake-up, atomically: when the device has a registration, no
    /// live connection, and no wake-up begun at or after `not_before` (the
    /// collapse window; `connect` clears the mark), sets the mark to `now`
    /// and returns the registration; `None` otherwise.
    async fn begin_wake(
        &self,
        user: &UserId,
        device: &DeviceId,
        now: Millis,
        not_before: Millis,
    ) -> Result<Option<PushRegistration>>;
    /// Clears the wake mark, so the wake-up can be tried again.
    async fn end_wake(&self, user: &UserId, device: &DeviceId) -> Result<()>;
}

/// A message as stored until its fan-out is done. `json` is the wire form
/// (the `Message` object), kept as bytes so pushes and syncs copy it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    pub chat: ChatId,
    pub id: MessageId,
    pub timestamp: Millis,
    pub json: String,
    pub recipients: Vec<InboxKey>,
    /// Once set, `message` returns no body: the inboxes hold it.
    pub fanned_out: bool,
}

/// The idempotency key of a send: one device, one client-chosen id, one chat.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DedupeKey {
    pub user: UserId,
    pub device: DeviceId,
    pub client_message_id: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Store {
    Stored,
    /// A message with the same dedupe key exists; nothing was written.
    Duplicate(StoredMessage),
}

#[async_trait]
pub trait MessageStore: Send + Sync {
    /// Durably stores the message for every recipient inbox, or finds
    /// the earlier message with the same dedupe key. After `Ok(Stored)`, the
    /// message reaches every recipient even if the process dies.
    /// A message stored `fanned_out` is stored done: its row keeps no body
    /// and no recipients, and no feed ever finishes it.
    async fn store(
        &self,
        message: &StoredMessage,
        dedupe: Option<&DedupeKey>,
        expires_at: Millis,
    ) -> Result<Store>;
    async fn message(&self, chat: &ChatId, id: &MessageId) -> Result<Option<StoredMessage>>;
    /// Marks the fan-out done and drops the body from the message row. The
    /// mark may become visible shortly after this returns, and a crash may
    /// lose it: it only spares the feed the work of finishing the fan-out.
    async fn mark_fanned_out(&self, chat: &ChatId, id: &MessageId) -> Result<()>;
    /// Messages stored before `before` whose fan-out was never marked done.
    async fn unfinished(&self, before: Millis, limit: usize) -> Result<Vec<(ChatId, MessageId)>>;
    /// Of `keys`, the inboxes that still hold `id` (not acked, not expired).
    async fn holders(&self, id: &MessageId, keys: &[InboxKey], now: Millis) -> Result<Vec<InboxKey>>;
    /// The next page of an inbox after `after` (exclusive), oldest first,
    /// skipping expired rows. Each item is (messageId, wire JSON).
    async fn inbox_page(
        &self,
        inbox: &InboxKey,
        after: Option<&MessageId>,
        limit: usize,
        now: Millis,
    ) -> Result<Vec<(MessageId, String)>>;
    /// Stores one inbox row per item under one message id (a `sendToDevices`
    /// batch; each item is the row's wire JSON), or finds the earlier batch
    /// with the same dedupe key and returns its id. Dedupe keys of device
    /// messages are a namespace of their own, apart from any chat's.
    async fn store_device_messages(
        &self,
        id: &MessageId,
        items: &[(InboxKey, String)],
        dedupe: Option<&DedupeKey>,
        expires_at: Millis,
    ) -> Result<Option<MessageId>>;
    /// Deletes these ids from one inbox; returns those it held, each with its
    /// chat (none for a device message), so the caller can move receipt markers.
    async fn ack(&self, inbox: &InboxKey, ids: &[MessageId]) -> Result<Vec<(MessageId, Option<ChatId>)>>;
    /// Deletes a user's pending inbox (rows kept for a user with no device yet).
    async fn drop_pending(&self, user: &UserId) -> Result<()>;
    /// Moves a user's pending rows into the inbox of their first device.
    async fn claim_pending(&self, user: &UserId, device: &DeviceId) -> Result<u64>;
}

/// What the scheduled clean-up removes from the message store. Apart from
/// `MessageStore` because a trait object links every method of its adapter:
/// deployed, only the clean-up function links these scans.
#[async_trait]
pub trait MessageRetention: Send + Sync {
    /// Deletes inbox rows and message rows past retention, and whatever
    /// text of a message every device acked the store still keeps. Returns
    /// how many rows.
    async fn expire_messages(&self, now: Millis, retention: Millis) -> Result<u64>;
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub id: AttachmentId,
    pub uploader: UserId,
    pub content_type: String,
    pub size: u64,
    /// Lower-case hex.
    pub sha256: String,
    pub created_at: Millis,
}

#[async_trait]
pub trait AttachmentStore: Send + Sync {
    async fn put_attachment(&self, attachment: &Attachment) -> Result<()>;
    async fn attachment(&self, id: &AttachmentId) -> Result<Option<Attachment>>;
    /// Records that a message in `chat` carried these attachments.
    async fn link(&self, ids: &[AttachmentId], chat: &ChatId) -> Result<()>;
    /// The chats in which a message carried the attachment.
    async fn chats_of_attachment(&self, id: &AttachmentId) -> Result<Vec<ChatId>>;
    /// Deletes every attachment the user uploaded (deleteAccount) and returns them,
    /// so their blobs can go too. Found by an index on the uploader, never a scan.
    async fn remove_attachments_of(&self, uploader: &UserId) -> Result<Vec<Attachment>>;
}

/// A key and its signature, as the client encoded them (the server checks sizes only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SignedKey {
    pub key_id: String,
    pub public_key: String,
    pub signature: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OneTimeKey {
    pub key_id: String,
    pub public_key: String,
}

/// What one `uploadKeys` asks to store; the service has checked sizes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyUpload {
    pub identity_key: Option<String>,
    pub signed_pre_key: Option<SignedKey>,
    pub one_time_pre_keys: Vec<OneTimeKey>,
    pub fallback_key: Option<SignedKey>,
}

/// The published keys of a ready device (one with an identity key and a signed prekey).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceKeys {
    pub user: UserId,
    pub device: DeviceId,
    pub identity_key: String,
    pub signed_pre_key: SignedKey,
    pub fallback_key: Option<SignedKey>,
}

/// What `KeyStore::upload` did. Anything but `Stored` stored nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uploaded {
    /// `one_time_keys` is the device's count now; `became_ready` is true
    /// when this upload made the device ready.
    Stored { one_time_keys: u64, became_ready: bool },
    /// The device has no keys yet and the upload lacks the identity key or the signed prekey.
    NotReady,
    /// The device's identity key is another one.
    IdentityMismatch,
    /// The new one-time prekeys would take the count past the limit.
    TooManyOneTimeKeys,
}

/// One counter of a claim request: `amount` more claims under `scope` (a
/// target device's inbox key, or `*` for all targets), at most `limit` an hour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimCount {
    pub scope: String,
    pub amount: u64,
    pub limit: u64,
}

/// The key directory: per device an identity key, a signed prekey, a
/// fallback key and a bounded set of one-time prekeys, each of which is
/// handed out at most once, whatever the concurrency.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Stores an upload as one atomic change (see [`Uploaded`]). One-time
    /// prekeys whose keyId is already stored are ignored and do not count.
    async fn upload_keys(
        &self,
        user: &UserId,
        device: &DeviceId,
        upload: &KeyUpload,
        max_one_time_keys: usize,
    ) -> Result<Uploaded>;
    /// The ready devices of these users (device liveness is the caller's business).
    async fn device_keys(&self, users: &[UserId]) -> Result<Vec<DeviceKeys>>;
    /// How many one-time prekeys the device has stored.
    async fn one_time_key_count(&self, user: &UserId, device: &DeviceId) -> Result<u64>;
    /// Removes one one-time prekey of the device and returns it, with how
    /// many are left; `None` when none is left. Two claims never get the same key.
    async fn claim_one_time_key(&self, user: &UserId, device: &DeviceId)
    -> Result<(Option<OneTimeKey>, u64)>;
    /// Counts one claim request by `claimer` in the hour `hour` (hours since
    /// the epoch) on several counters at once, all or nothing: if any would
    /// pass its limit, nothing changes and the answer is `false`. Old hours'
    /// counters expire by themselves.
    async fn count_claims(&self, claimer: &InboxKey, hour: i64, counts: &[ClaimCount]) -> Result<bool>;
    /// Deletes every key of the device.
    async fn remove_keys(&self, user: &UserId, device: &DeviceId) -> Result<()>;
}

/// One participant's receipt markers in one chat: messageIds that only move forward.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Markers {
    pub delivered: Option<MessageId>,
    pub read: Option<MessageId>,
    /// Read by `markRead {private: true}` too; only the user's own devices see it.
    pub private_read: Option<MessageId>,
}

/// Receipt markers per (chat, participant).
#[async_trait]
pub trait ReceiptStore: Send + Sync {
    /// Moves each marker given in `to` forward to it (a marker already at or
    /// past it stays), atomically against racing moves. Returns the markers
    /// as they now stand if any moved, `None` if none did.
    async fn advance(&self, chat: &ChatId, user: &UserId, to: &Markers) -> Result<Option<Markers>>;
    /// Every marker set in the chat; may include former participants (the
    /// caller filters by the chat's members).
    async fn receipts(&self, chat: &ChatId) -> Result<Vec<(UserId, Markers)>>;
    /// Forgets the user's markers in the chat (they left it).
    async fn remove_receipts(&self, chat: &ChatId, user: &UserId) -> Result<()>;
}

/// The push service a device is woken through (`registerPush`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Platform {
    #[serde(rename = "fcm")]
    Fcm,
    #[serde(rename = "apns")]
    Apns,
    #[serde(rename = "apns-sandbox")]
    ApnsSandbox,
    #[serde(rename = "webpush")]
    WebPush,
}

impl Platform {
    pub fn name(self) -> &'static str {
        match self {
            Platform::Fcm => "fcm",
            Platform::Apns => "apns",
            Platform::ApnsSandbox => "apns-sandbox",
            Platform::WebPush => "webpush",
        }
    }
}

/// A Web Push subscription's keys (RFC 8291), base64url as the browser gives them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebPushKeys {
    /// An uncompressed P-256 public key, 65 bytes.
    pub p256dh: String,
    /// The authentication secret, 16 bytes.
    pub auth: String,
}

/// One device's push registration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushRegistration {
    pub platform: Platform,
    /// The FCM or APNs device token, or the Web Push endpoint URL.
    pub address: String,
    /// Web Push only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys: Option<WebPushKeys>,
    /// Deployed FCM/APNs: the SNS platform endpoint made for `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// What a push service said to a wake-up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Woken {
    /// Accepted for delivery.
    Sent,
    /// The registration is gone (FCM UNREGISTERED, APNs 410, Web Push 404
    /// or 410, a disabled SNS endpoint): forget it.
    Gone,
}

/// Sends content-free, high-priority wake-ups to devices that are not
/// connected. A temporary failure is an `Err` that `is_retryable`.
#[async_trait]
pub trait Wakeups: Send + Sync {
    /// Whether this shape can wake devices of `platform` (deployed: its SNS
    /// platform application is configured; local: a push gateway is set).
    fn serves(&self, platform: Platform) -> bool;
    /// Checks a new registration (`BadRequest` saying what is wrong: a
    /// plain-http or private endpoint, keys of the wrong size) and readies it:
    /// deployed FCM/APNs get an SNS platform endpoint, made only when the
    /// token differs from `previous`'s (whose endpoint is then released).
    async fn prepare(
        &self,
        registration: PushRegistration,
        previous: Option<&PushRegistration>,
    ) -> Result<PushRegistration>;
    async fn wake(&self, user: &UserId, device: &DeviceId, registration: &PushRegistration) -> Result<Woken>;
    /// Lets go of what `prepare` made (an SNS endpoint); nothing for Web Push.
    async fn release(&self, registration: &PushRegistration) -> Result<()>;
}

/// A daily quota on what one user can make the server store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quota {
    /// Message bytes stored for users who have never connected, counted once
    /// per such recipient: nothing else bounds what a sender makes the server
    /// keep for made-up users.
    PendingBytes,
    /// Bytes of attachments declared by createAttachment.
    AttachmentBytes,
}

impl Quota {
    pub fn name(self) -> &'static str {
        match self {
            Quota::PendingBytes => "pendingBytes",
            Quota::AttachmentBytes => "attachmentBytes",
        }
    }
}

/// Usage counters behind the quotas, one per user and quota, for the current day.
#[async_trait]
pub trait QuotaStore: Send + Sync {
    /// Adds `amount` to the user's use of `quota` on `day` (days since the
    /// epoch, UTC; a new day starts from zero) unless that would pass `limit`:
    /// then nothing changes and the answer is `false`.
    async fn charge(&self, user: &UserId, quota: Quota, day: i64, amount: u64, limit: u64) -> Result<bool>;
}

/// A presigned request: where to send it and which headers must go with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presigned {
    pub url: String,
    pub headers: BTreeMap<String, String>,
    pub expires_at: Millis,
}

#[async_trait]
pub trait Blobs: Send + Sync {
    async fn presign_upload(&self, attachment: &Attachment, expires_at: Millis) -> Result<Presigned>;
    async fn presign_download(&self, attachment: &Attachment, expires_at: Millis) -> Result<Presigned>;
    /// Whether the upload completed (with the declared size and hash).
    async fn uploaded(&self, attachment: &Attachment) -> Result<bool>;
    /// Deletes the stored bytes, if any.
    async fn delete(&self, attachment: &Attachment) -> Result<()>;
}

#[derive(Debug, PartialEq, Eq)]
pub enum Posted {
    Sent,
    /// The connection is gone (API Gateway's 410).
    Gone,
}

/// Pushes frames to live connections: PostToConnection, or the local gateway.
#[async_trait]
pub trait Push: Send + Sync {
    async fn post(&self, connection: &ConnectionId, frame: &str) -> Result<Posted>;
    /// Closes a connection (DeleteConnection). Closing a gone one is no error.
    async fn close(&self, connection: &ConnectionId) -> Result<()>;
}

/// Work the send path hands to a queue, to run at least once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "job", rename_all = "camelCase")]
pub enum Job {
    /// Push a stored message (its wire JSON, carried along because the
    /// message row drops its body once fan-out is handed off) to these connections.
    #[serde(rename_all = "camelCase")]
    Deliver { message_id: MessageId, message: String, targets: Vec<PushTarget> },
    /// Wake these devices, which have something to sync and no connection.
    #[serde(rename_all = "camelCase")]
    Wake { devices: Vec<WakeTarget> },
    /// Finish a fan-out if the send path did not mark it done.
    #[serde(rename_all = "camelCase")]
    FinishFanout { chat_id: ChatId, message_id: MessageId },
    /// Let go of what a dropped push registration holds at the push
    /// service (its SNS endpoint): queued, so a failure is retried and the
    /// command that dropped it needs no push client.
    #[serde(rename_all = "camelCase")]
    Release { registration: PushRegistration },
}

impl Job {
    /// Wake-ups and releases talk to push services, whose failures and
    /// slowness must not hold up deliveries: deployed, they have a queue
    /// (and a function) of their own.
    pub fn is_push_service(&self) -> bool {
        matches!(self, Job::Wake { .. } | Job::Release { .. })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PushTarget {
    pub user_id: UserId,
    pub device_id: DeviceId,
    pub connection_id: ConnectionId,
}

/// A device to wake.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WakeTarget {
    pub user_id: UserId,
    pub device_id: DeviceId,
}

#[async_trait]
pub trait Jobs: Send + Sync {
    async fn enqueue(&self, job: &Job, delay: Duration) -> Result<()>;
}

pub trait Clock: Send + Sync {
    fn now(&self) -> Millis;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as Millis)
            .unwrap_or(0)
    }
}
