//! One struct per item shape, attribute names as in `schema.rs`, and their serde_dynamo conversions.

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::Item;
use courier_core::domain::{Chat, Device, InboxKey, Member, Millis};
use courier_core::error::{Error, Result};
use courier_core::ids::{AttachmentId, ChatId, ConnectionId, DeviceId, MessageId, UserId};
use courier_core::ports::{Attachment, Markers, PushRegistration, SignedKey, StoredMessage};

pub(super) fn to_item<T: Serialize>(row: &T) -> Result<Item> {
    serde_dynamo::to_item(row).map_err(Error::internal)
}

pub(super) fn from_item<T: DeserializeOwned>(item: Item) -> Result<T> {
    serde_dynamo::from_item(item).map_err(Error::internal)
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ChatRow {
    chat_id: ChatId,
    name: String,
    members: Vec<MemberRow>,
    admins: Vec<UserId>,
    created_at: Millis,
    version: u64,
    /// Absent from rows written before encrypted chats existed: those are plain.
    #[serde(default)]
    encrypted: bool,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MemberRow {
    user: UserId,
    joined_at: Millis,
}

impl From<&Chat> for ChatRow {
    fn from(c: &Chat) -> Self {
        Self {
            chat_id: c.id.clone(),
            name: c.name.clone(),
            members: c
                .members
                .iter()
                .map(|m| MemberRow { user: m.user.clone(), joined_at: m.joined_at })
                .collect(),
            admins: c.admins.clone(),
            created_at: c.created_at,
            version: c.version,
            encrypted: c.encrypted,
        }
    }
}

impl From<ChatRow> for Chat {
    fn from(r: ChatRow) -> Self {
        Self {
            id: r.chat_id,
            name: r.name,
            members: r.members.into_iter().map(|m| Member { user: m.user, joined_at: m.joined_at }).collect(),
            admins: r.admins,
            created_at: r.created_at,
            version: r.version,
            encrypted: r.encrypted,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ParticipantRow {
    pub(super) chat_id: ChatId,
    pub(super) user_id: UserId,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DeviceRow {
    pub(super) user_id: UserId,
    pub(super) device_id: DeviceId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) connection_id: Option<ConnectionId>,
    pub(super) last_seen: Millis,
    pub(super) expires_at: i64,
    /// The push registration (`registerPush`), a map: it lives and dies with the row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) push: Option<PushRegistration>,
    /// The wake mark: when the outstanding wake-up began (see `begin_wake`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) woken_at: Option<Millis>,
}

impl From<DeviceRow> for Device {
    fn from(r: DeviceRow) -> Self {
        Self {
            user: r.user_id,
            id: r.device_id,
            connection: r.connection_id,
            last_seen: r.last_seen,
            push: r.push,
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ConnectionRow {
    pub(super) connection_id: ConnectionId,
    pub(super) user_id: UserId,
    pub(super) device_id: DeviceId,
    pub(super) connected_at: Millis,
    pub(super) expires_at: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct MessageRow {
    pub(super) chat_id: ChatId,
    pub(super) message_id: MessageId,
    pub(super) timestamp: Millis,
    /// The wire JSON; removed once the fan-out is done (the inbox rows hold it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) body: Option<String>,
    /// Inbox keys; removed with the body.
    #[serde(default)]
    pub(super) recipients: Vec<String>,
    pub(super) fanned_out: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) dedupe: Option<String>,
    /// A group message stored once (see `shared`): its text and recipients
    /// for the devices, kept past the fan-out mark, which removes only the
    /// top-level `body` and `recipients`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) shared: Option<SharedPart>,
    pub(super) expires_at: i64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct SharedPart {
    pub(super) body: String,
    pub(super) recipients: Vec<String>,
}

impl From<MessageRow> for StoredMessage {
    fn from(r: MessageRow) -> Self {
        let (body, recipients) = match r.shared {
            Some(shared) => (Some(shared.body), shared.recipients),
            None => (r.body, r.recipients),
        };
        Self {
            chat: r.chat_id,
            id: r.message_id,
            timestamp: r.timestamp,
            json: body.unwrap_or_default(),
            recipients: recipients.iter().filter_map(|k| InboxKey::parse(k)).collect(),
            fanned_out: r.fanned_out,
        }
    }
}

/// Where one device stands in one chat's group messages: written and read
/// by hand in `shared`, not through serde (see `shared::position`).
#[derive(Clone, Debug)]
pub(super) struct PositionRow {
    /// `positions#user#device`
    pub(super) inbox: String,
    /// The chat id, under the Inbox table's sort key.
    pub(super) message_id: ChatId,
    /// The device holds none of the chat's messages up to here but `held`.
    pub(super) after: String,
    /// Where `after` started (made, or reset): a message at or before it
    /// that lists the device was never counted in, and goes in `held`.
    pub(super) since: String,
    /// Sorted.
    pub(super) held: Vec<String>,
    /// Acked after `after`; sorted.
    pub(super) acked: Vec<String>,
    /// Bumped by every ack: the condition of the next.
    pub(super) version: u64,
    pub(super) expires_at: i64,
}

/// Claims a dedupe key within a chat and names the message that claimed it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DedupeRow {
    pub(super) chat_id: ChatId,
    /// `dedupe#user#device#clientMessageId`: no message id starts so (ULIDs are alphanumeric).
    pub(super) message_id: String,
    pub(super) first_message_id: MessageId,
    pub(super) expires_at: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct InboxRow {
    pub(super) inbox: String,
    pub(super) message_id: MessageId,
    pub(super) body: String,
    pub(super) expires_at: i64,
}

/// Claims a sendToDevices dedupe key, and holds the batch until its inbox
/// rows are written (as a message row holds its body until fan-out), so a
/// retry after a crash in between can write them. A client frame is at most
/// 32 KiB, so a batch fits an item with room to spare.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DeviceDedupeRow {
    /// `dedupe#user#device`: no inbox key has two `#`.
    pub(super) inbox: String,
    /// The clientMessageId.
    pub(super) message_id: String,
    pub(super) first_message_id: MessageId,
    /// The batch, until its inbox rows are written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) pending: Option<Vec<DeviceItem>>,
    pub(super) expires_at: i64,
}

#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct DeviceItem {
    pub(super) inbox: String,
    pub(super) body: String,
}

/// A ready device's published keys and how many one-time prekeys it holds.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct BundleRow {
    pub(super) user_id: UserId,
    /// `bundle#deviceId`
    pub(super) entry: String,
    pub(super) device_id: DeviceId,
    pub(super) identity_key: String,
    pub(super) signed_pre_key: SignedKey,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) fallback_key: Option<SignedKey>,
    /// Kept by the writes that add and claim one-time prekeys (see `keys`).
    pub(super) one_time_keys: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct OneTimeKeyRow {
    pub(super) user_id: UserId,
    /// `otk#deviceId#keyId`
    pub(super) entry: String,
    pub(super) key_id: String,
    pub(super) public_key: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct ReceiptRow {
    pub(super) user_id: UserId,
    #[serde(default)]
    pub(super) delivered: Option<MessageId>,
    #[serde(default)]
    pub(super) read: Option<MessageId>,
    #[serde(default)]
    pub(super) private_read: Option<MessageId>,
}

impl From<ReceiptRow> for Markers {
    fn from(r: ReceiptRow) -> Self {
        Self { delivered: r.delivered, read: r.read, private_read: r.private_read }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct AttachmentRow {
    attachment_id: AttachmentId,
    uploader: UserId,
    content_type: String,
    size: u64,
    sha256: String,
    created_at: Millis,
    // `chats`, a string set, is written only by `link` (`ADD`) and read only
    // by `chats_of_attachment`, so a put never carries it.
}

impl From<&Attachment> for AttachmentRow {
    fn from(a: &Attachment) -> Self {
        Self {
            attachment_id: a.id.clone(),
            uploader: a.uploader.clone(),
            content_type: a.content_type.clone(),
            size: a.size,
            sha256: a.sha256.clone(),
            created_at: a.created_at,
        }
    }
}

impl From<AttachmentRow> for Attachment {
    fn from(r: AttachmentRow) -> Self {
        Self {
            id: r.attachment_id,
            uploader: r.uploader,
            content_type: r.content_type,
            size: r.size,
            sha256: r.sha256,
            created_at: r.created_at,
        }
    }
}
