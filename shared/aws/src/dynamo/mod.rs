//! `DynamoTables`: every table port on DynamoDB, with the keys and indexes of [`super::schema`].

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, DeleteRequest, KeysAndAttributes, Put, PutRequest, ReturnValue, TransactWriteItem,
    Update, WriteRequest,
};
use futures_util::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tracing::instrument;

use super::sdk_error;
use courier_core::domain::{Chat, DAY_MS, Device, InboxKey, Member, Millis};
use courier_core::error::{Error, Result};
use courier_core::ids::{AttachmentId, ChatId, ConnectionId, DeviceId, MessageId, UserId};
use courier_core::ports::{
    Attachment, AttachmentStore, ChatStore, Connected, DedupeKey, DeviceStore, MessageStore, Store,
    StoredMessage,
};

type Item = HashMap<String, AttributeValue>;

/// BatchWriteItem takes at most 25 requests, BatchGetItem at most 100 keys.
const WRITE_BATCH: usize = 25;
const GET_BATCH: usize = 100;
/// Calls one batch gets before what DynamoDB left unprocessed becomes an
/// `Unavailable` error; with the backoff below that is about 3 s at worst.
const BATCH_ATTEMPTS: u32 = 8;
const BACKOFF_BASE_MS: u64 = 25;
const BACKOFF_CAP_MS: u64 = 1_000;
/// Most calls one operation keeps in flight: a fan-out to 100 people's 300
/// devices is 12 batch writes, all at once; a clean-up page waits its turn.
const PARALLEL_CALLS: usize = 16;

/// A device row lives this long past its last sighting (the default device
/// expiry; reads decide liveness from `lastSeen`, the TTL only cleans up).
const DEVICE_TTL_MS: Millis = 30 * DAY_MS;
/// API Gateway closes a connection after 2 h; the row outlives it a little.
const CONNECTION_TTL_MS: Millis = (2 * 60 + 10) * 60 * 1000;
/// Dedupe rows share the Messages partition of their chat under this sort-key prefix.
const DEDUPE_PREFIX: &str = "dedupe#";
/// Lost races (a concurrent connect of the same device) are retried this often.
const CONNECT_ATTEMPTS: usize = 8;
/// Slots to free before claiming one, and the cap.
struct Slots {
    max: usize,
    stale: Vec<String>,
}

/// The `deviceId` of each user's slots row: the set of their registered
/// devices, which caps them atomically. `#` is not allowed in a deviceId.
const SLOTS: &str = "#slots";

/// Every table port on DynamoDB. Cheap to clone.
///
/// No transaction spans the tables (one would cost double and cap a fan-out
/// at 100 rows), so each operation orders its writes so that a crash between
/// two of them leaves something a retry or a later read repairs, never a
/// lost message. TTL deletes "within a few days", so every read that is
/// given a time filters rows past `expiresAt` itself.
#[derive(Clone)]
pub struct DynamoTables {
    pub(crate) client: aws_sdk_dynamodb::Client,
    pub(crate) names: super::Names,
}

impl DynamoTables {
    pub fn new(client: aws_sdk_dynamodb::Client, names: super::Names) -> Self {
        Self { client, names }
    }
}

// ---- rows: one struct per item shape, attribute names as in schema.rs ----

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ChatRow {
    chat_id: ChatId,
    name: String,
    members: Vec<MemberRow>,
    admins: Vec<UserId>,
    created_at: Millis,
    version: u64,
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
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ParticipantRow {
    chat_id: ChatId,
    user_id: UserId,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DeviceRow {
    user_id: UserId,
    device_id: DeviceId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    connection_id: Option<ConnectionId>,
    last_seen: Millis,
    expires_at: i64,
}

impl From<DeviceRow> for Device {
    fn from(r: DeviceRow) -> Self {
        Self { user: r.user_id, id: r.device_id, connection: r.connection_id, last_seen: r.last_seen }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConnectionRow {
    connection_id: ConnectionId,
    user_id: UserId,
    device_id: DeviceId,
    connected_at: Millis,
    expires_at: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MessageRow {
    chat_id: ChatId,
    message_id: MessageId,
    timestamp: Millis,
    /// The wire JSON; removed once the fan-out is done (the inbox rows hold it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    body: Option<String>,
    /// Inbox keys; removed with the body.
    #[serde(default)]
    recipients: Vec<String>,
    fanned_out: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dedupe: Option<String>,
    expires_at: i64,
}

impl From<MessageRow> for StoredMessage {
    fn from(r: MessageRow) -> Self {
        Self {
            chat: r.chat_id,
            id: r.message_id,
            timestamp: r.timestamp,
            json: r.body.unwrap_or_default(),
            recipients: r.recipients.iter().filter_map(|k| InboxKey::parse(k)).collect(),
            fanned_out: r.fanned_out,
        }
    }
}

/// Claims a dedupe key within a chat and names the message that claimed it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DedupeRow {
    chat_id: ChatId,
    /// `dedupe#user#device#clientMessageId`: no message id starts so (ULIDs are alphanumeric).
    message_id: String,
    first_message_id: MessageId,
    expires_at: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InboxRow {
    inbox: String,
    message_id: MessageId,
    body: String,
    expires_at: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AttachmentRow {
    attachment_id: AttachmentId,
    uploader: UserId,
    content_type: String,
    size: u64,
    sha256: String,
    created_at: Millis,
    // `chats`, a string set, is written only by `link` (`ADD`) and read only
    // by `chats_of_attachment`, so a put never carries it.
}

// ---- small helpers ----

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: i64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn key<const N: usize>(parts: [(&str, &str); N]) -> Item {
    parts.into_iter().map(|(name, value)| (name.to_owned(), s(value))).collect()
}

fn to_item<T: Serialize>(row: &T) -> Result<Item> {
    serde_dynamo::to_item(row).map_err(Error::internal)
}

fn from_item<T: DeserializeOwned>(item: Item) -> Result<T> {
    serde_dynamo::from_item(item).map_err(Error::internal)
}

/// DynamoDB's TTL counts epoch seconds. Rounding up means a row never
/// expires before the time it was given.
fn ttl_secs(ms: Millis) -> i64 {
    (ms + 999).div_euclid(1000)
}

/// A row is live while `expiresAt > now_secs(now)`, and expired from then on.
fn now_secs(ms: Millis) -> i64 {
    ms.div_euclid(1000)
}

fn put_request(item: Item) -> Result<WriteRequest> {
    let put = PutRequest::builder().set_item(Some(item)).build().map_err(Error::internal)?;
    Ok(WriteRequest::builder().put_request(put).build())
}

fn delete_request(key: Item) -> Result<WriteRequest> {
    let delete = DeleteRequest::builder().set_key(Some(key)).build().map_err(Error::internal)?;
    Ok(WriteRequest::builder().delete_request(delete).build())
}

/// Whether a call failed only because its condition did not hold.
fn condition_failed<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> bool {
    e.as_service_error().and_then(|s| s.code()) == Some("ConditionalCheckFailedException")
}

/// The wait before retrying what a batch call left unprocessed: exponential,
/// capped, with full jitter so parallel callers do not retry in step.
fn backoff(attempt: u32) -> Duration {
    use rand::Rng;
    let cap = BACKOFF_BASE_MS.saturating_mul(1 << attempt.min(16)).min(BACKOFF_CAP_MS);
    Duration::from_millis(rand::rng().random_range(0..=cap))
}

fn dedupe_text(key: &DedupeKey) -> String {
    format!("{DEDUPE_PREFIX}{}#{}#{}", key.user, key.device, key.client_message_id)
}

/// Keeps the first of each repeated value, in order: a batch call refuses
/// two requests for one key.
fn unique<T: Clone + Eq + std::hash::Hash>(values: &[T]) -> Vec<T> {
    let mut seen = HashSet::new();
    values.iter().filter(|v| seen.insert(*v)).cloned().collect()
}

/// Runs calls [`PARALLEL_CALLS`] at a time, answers in order; the first error wins.
/// (A `Vec`, not an iterator: a lazy `map` closure held across the await
/// defeats the `Send` proof that `async_trait` needs.)
async fn in_parallel<T, F>(calls: Vec<F>) -> Result<Vec<T>>
where
    F: Future<Output = Result<T>>,
{
    futures_util::stream::iter(calls).buffered(PARALLEL_CALLS).try_collect().await
}

impl DynamoTables {
    /// Writes any number of puts and deletes to one table: 25 a call, the
    /// calls in parallel, what DynamoDB leaves unprocessed retried with backoff.
    /// Every caller's writes are idempotent, so a retried call is harmless.
    async fn write_batches(&self, table: &str, requests: Vec<WriteRequest>) -> Result<()> {
        let calls = requests.chunks(WRITE_BATCH).map(|chunk| self.write_batch(table, chunk.to_vec()));
        in_parallel(calls.collect()).await.map(drop)
    }

    async fn write_batch(&self, table: &str, mut pending: Vec<WriteRequest>) -> Result<()> {
        for attempt in 0..BATCH_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            let out = self
                .client
                .batch_write_item()
                .request_items(table, pending)
                .send()
                .await
                .map_err(sdk_error)?;
            pending = out.unprocessed_items.and_then(|mut left| left.remove(table)).unwrap_or_default();
            if pending.is_empty() {
                return Ok(());
            }
        }
        tracing::warn!(table, left = pending.len(), "batch writes left unprocessed");
        Err(Error::unavailable(format!("{} batch writes left unprocessed", pending.len())))
    }

    /// Reads any number of keys from one table (strongly consistent): 100 a
    /// call, the calls in parallel, unprocessed keys retried with backoff.
    /// Missing keys are simply absent from the answer, which has no order.
    async fn get_batches(&self, table: &str, keys: Vec<Item>, projection: Option<&str>) -> Result<Vec<Item>> {
        let calls = keys.chunks(GET_BATCH).map(|chunk| {
            let request = KeysAndAttributes::builder()
                .set_keys(Some(chunk.to_vec()))
                .consistent_read(true)
                .set_projection_expression(projection.map(str::to_owned))
                .build()
                .map_err(Error::internal);
            async move { self.get_batch(table, request?).await }
        });
        Ok(in_parallel(calls.collect()).await?.into_iter().flatten().collect())
    }

    async fn get_batch(&self, table: &str, request: KeysAndAttributes) -> Result<Vec<Item>> {
        let mut found = Vec::new();
        let mut pending = Some(request);
        for attempt in 0..BATCH_ATTEMPTS {
            let Some(request) = pending.take() else { break };
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt)).await;
            }
            let out =
                self.client.batch_get_item().request_items(table, request).send().await.map_err(sdk_error)?;
            found.extend(out.responses.and_then(|mut r| r.remove(table)).unwrap_or_default());
            pending =
                out.unprocessed_keys.and_then(|mut left| left.remove(table)).filter(|k| !k.keys.is_empty());
        }
        match pending {
            None => Ok(found),
            Some(left) => {
                tracing::warn!(table, left = left.keys.len(), "batch reads left unprocessed");
                Err(Error::unavailable(format!("{} batch reads left unprocessed", left.keys.len())))
            }
        }
    }

    /// Every row of one inbox partition, oldest first, expired or not.
    async fn inbox_partition(&self, inbox: &str, projection: Option<&str>) -> Result<Vec<Item>> {
        self.client
            .query()
            .table_name(&self.names.inbox_table)
            .consistent_read(true)
            .key_condition_expression("inbox = :k")
            .expression_attribute_values(":k", s(inbox))
            .set_projection_expression(projection.map(str::to_owned))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(sdk_error)
    }

    /// Deletes a whole inbox partition.
    async fn delete_inbox(&self, inbox: &str) -> Result<()> {
        let keys = self.inbox_partition(inbox, Some("inbox, messageId")).await?;
        let deletes = keys.into_iter().map(delete_request).collect::<Result<Vec<_>>>()?;
        self.write_batches(&self.names.inbox_table, deletes).await
    }

    /// Deletes what belongs to a device whose row is already gone: its inbox and its connection row.
    async fn delete_device_data(
        &self,
        user: &UserId,
        device: &DeviceId,
        connection: Option<&ConnectionId>,
    ) -> Result<()> {
        if let Some(c) = connection {
            self.delete_connection(c).await?;
        }
        self.delete_inbox(&InboxKey::Device(user.clone(), device.clone()).key()).await
    }

    async fn delete_connection(&self, connection: &ConnectionId) -> Result<()> {
        self.client
            .delete_item()
            .table_name(&self.names.connections_table)
            .set_key(Some(key([("connectionId", connection.as_str())])))
            .send()
            .await
            .map_err(sdk_error)?;
        Ok(())
    }

    async fn device_row(&self, user: &UserId, device: &DeviceId) -> Result<Option<DeviceRow>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.names.devices_table)
            .set_key(Some(key([("userId", user.as_str()), ("deviceId", device.as_str())])))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        out.item.map(from_item).transpose()
    }

    /// The live devices of one user (consistent, so a device just registered counts).
    async fn user_devices(&self, user: &UserId, expired_before: Millis) -> Result<Vec<Device>> {
        let items: Vec<Item> = self
            .client
            .query()
            .table_name(&self.names.devices_table)
            .consistent_read(true)
            .key_condition_expression("userId = :u")
            .filter_expression("lastSeen >= :cutoff")
            .expression_attribute_values(":u", s(user.as_str()))
            .expression_attribute_values(":cutoff", n(expired_before))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(sdk_error)?;
        items.into_iter().map(|i| from_item::<DeviceRow>(i).map(Device::from)).collect()
    }

    /// Registers a new device within the user's device limit. The device row
    /// and its entry in the user's slots row are written in one transaction
    /// whose condition caps the slots, so connects racing from several
    /// devices cannot overshoot the limit (a count read first could). Returns
    /// `Some(false)` at the limit and `None` when the same device raced us.
    async fn claim_slot(&self, row: &DeviceRow, slots: Slots) -> Result<Option<bool>> {
        let table = &self.names.devices_table;
        let slots_key = key([("userId", row.user_id.as_str()), ("deviceId", SLOTS)]);
        if !slots.stale.is_empty() {
            self.client
                .update_item()
                .table_name(table)
                .set_key(Some(slots_key.clone()))
                .update_expression("DELETE devices :stale")
                .expression_attribute_values(":stale", AttributeValue::Ss(slots.stale))
                .send()
                .await
                .map_err(sdk_error)?;
        }
        let claim = Update::builder()
            .table_name(table)
            .set_key(Some(slots_key))
            .update_expression("ADD devices :d")
            .condition_expression("attribute_not_exists(devices) OR size(devices) < :max")
            .expression_attribute_values(":d", AttributeValue::Ss(vec![row.device_id.to_string()]))
            .expression_attribute_values(":max", n(slots.max as i64))
            .build()
            .map_err(Error::internal)?;
        let put = Put::builder()
            .table_name(table)
            .set_item(Some(to_item(row)?))
            .condition_expression("attribute_not_exists(deviceId)")
            .build()
            .map_err(Error::internal)?;
        let written = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().update(claim).build())
            .transact_items(TransactWriteItem::builder().put(put).build())
            .send()
            .await;
        let Err(e) = written else { return Ok(Some(true)) };
        let reasons: Vec<&str> = match e.as_service_error() {
            Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
                c.cancellation_reasons().iter().map(|r| r.code().unwrap_or_default()).collect()
            }
            _ => Vec::new(),
        };
        match reasons.as_slice() {
            ["ConditionalCheckFailed", _] => Ok(Some(false)),
            [_, "ConditionalCheckFailed"] => Ok(None),
            r if r.contains(&"TransactionConflict") => Ok(None),
            _ => Err(sdk_error(e)),
        }
    }

    /// The user's live devices and the slots held by devices no longer live.
    /// The slots row is read before the device rows, so a claim committing
    /// in between is never taken for stale.
    async fn slots(&self, user: &UserId, max: usize, expired_before: Millis) -> Result<(Vec<Device>, Slots)> {
        let held = self
            .client
            .get_item()
            .table_name(&self.names.devices_table)
            .set_key(Some(key([("userId", user.as_str()), ("deviceId", SLOTS)])))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?
            .item
            .and_then(|mut item| item.remove("devices"))
            .and_then(|set| set.as_ss().ok().cloned())
            .unwrap_or_default();
        let live = self.user_devices(user, expired_before).await?;
        let ids: HashSet<&str> = live.iter().map(|d| d.id.as_str()).collect();
        let stale = held.into_iter().filter(|d| !ids.contains(d.as_str())).collect();
        Ok((live, Slots { max, stale }))
    }

    /// One try of `connect`; `None` means a concurrent change won a race and the caller should look again.
    async fn try_connect(
        &self,
        user: &UserId,
        device: &DeviceId,
        connection: &ConnectionId,
        now: Millis,
        max_devices: usize,
        expired_before: Millis,
    ) -> Result<Option<Connected>> {
        let devices = &self.names.devices_table;
        let device_key = key([("userId", user.as_str()), ("deviceId", device.as_str())]);
        let mut existing = self.device_row(user, device).await?;
        let mut inbox_cleared = false;
        // A device unseen for too long has expired: it comes back as a new one, inbox and all gone.
        if let Some(stale) = existing.take_if(|d| d.last_seen < expired_before) {
            let deleted = self
                .client
                .delete_item()
                .table_name(devices)
                .set_key(Some(device_key.clone()))
                .condition_expression("lastSeen < :cutoff")
                .expression_attribute_values(":cutoff", n(expired_before))
                .send()
                .await;
            match deleted {
                Ok(_) => {
                    self.delete_device_data(user, device, stale.connection_id.as_ref()).await?;
                    inbox_cleared = true;
                }
                Err(e) if condition_failed(&e) => return Ok(None),
                Err(e) => return Err(sdk_error(e)),
            }
        }

        let (first_device, slots) = match existing {
            Some(_) => (false, None),
            None => {
                let (live, slots) = self.slots(user, max_devices, expired_before).await?;
                let live = live.len();
                if live >= max_devices {
                    return Ok(Some(Connected::DeviceLimit));
                }
                // The TTL may have taken the row of an expired device before
                // the clean-up job saw it; its inbox must not outlive it.
                if !inbox_cleared {
                    self.delete_inbox(&InboxKey::Device(user.clone(), device.clone()).key()).await?;
                }
                (live == 0, Some(slots))
            }
        };

        // The connection row goes first: a $disconnect (or a 410 on push) can
        // then always find the device it must unbind.
        let row = ConnectionRow {
            connection_id: connection.clone(),
            user_id: user.clone(),
            device_id: device.clone(),
            connected_at: now,
            expires_at: ttl_secs(now + CONNECTION_TTL_MS),
        };
        self.client
            .put_item()
            .table_name(&self.names.connections_table)
            .set_item(Some(to_item(&row)?))
            .send()
            .await
            .map_err(sdk_error)?;

        let expires = ttl_secs(now + DEVICE_TTL_MS);
        if let Some(slots) = slots {
            let row = DeviceRow {
                user_id: user.clone(),
                device_id: device.clone(),
                connection_id: Some(connection.clone()),
                last_seen: now,
                expires_at: expires,
            };
            return Ok(match self.claim_slot(&row, slots).await? {
                Some(true) => Some(Connected::Ok { new_device: true, first_device, replaced: None }),
                Some(false) => Some(Connected::DeviceLimit),
                None => None,
            });
        }

        // The old connection comes from the update itself, not the earlier
        // read, so two racing connects each learn what they replaced.
        let updated = self
            .client
            .update_item()
            .table_name(devices)
            .set_key(Some(device_key))
            .update_expression("SET connectionId = :c, lastSeen = :now, expiresAt = :exp")
            .condition_expression("attribute_exists(deviceId)")
            .expression_attribute_values(":c", s(connection.as_str()))
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":exp", n(expires))
            .return_values(ReturnValue::UpdatedOld)
            .send()
            .await;
        let old = match updated {
            Ok(out) => out.attributes.unwrap_or_default(),
            Err(e) if condition_failed(&e) => return Ok(None),
            Err(e) => return Err(sdk_error(e)),
        };
        let replaced = match old.get("connectionId") {
            Some(AttributeValue::S(old)) if old != connection.as_str() => {
                Some(ConnectionId::try_from(old.as_str()).map_err(Error::internal)?)
            }
            _ => None,
        };
        if let Some(old) = &replaced {
            self.delete_connection(old).await?;
        }
        Ok(Some(Connected::Ok { new_device: false, first_device: false, replaced }))
    }

    /// What a send with this dedupe key stored first. A first attempt that
    /// died between its message row and its inbox rows left the message
    /// unfanned; its inbox rows are put (again, idempotently) so the retry's
    /// success is true.
    async fn duplicate(&self, chat: &ChatId, dedupe: &str) -> Result<Store> {
        let out = self
            .client
            .get_item()
            .table_name(&self.names.messages_table)
            .set_key(Some(key([("chatId", chat.as_str()), ("messageId", dedupe)])))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        let Some(item) = out.item else {
            return Err(Error::unavailable("the dedupe row vanished; retry"));
        };
        let row: DedupeRow = from_item(item)?;
        let Some(first) = self.message(chat, &row.first_message_id).await? else {
            return Err(Error::unavailable("the deduped message is gone; retry"));
        };
        if !first.fanned_out {
            self.put_inbox_rows(&first.id, &first.json, &first.recipients, row.expires_at).await?;
        }
        Ok(Store::Duplicate(first))
    }

    async fn put_inbox_rows(
        &self,
        id: &MessageId,
        json: &str,
        recipients: &[InboxKey],
        expires_at: i64,
    ) -> Result<()> {
        let puts = unique(recipients)
            .iter()
            .map(|k| {
                let row =
                    InboxRow { inbox: k.key(), message_id: id.clone(), body: json.to_owned(), expires_at };
                put_request(to_item(&row)?)
            })
            .collect::<Result<Vec<_>>>()?;
        self.write_batches(&self.names.inbox_table, puts).await
    }

    /// Deletes the rows of one table whose `expiresAt` has passed, page by
    /// page as the scan goes. Returns how many.
    async fn delete_expired(&self, table: &str, hash: &str, range: &str, now: Millis) -> Result<u64> {
        let mut pages = self
            .client
            .scan()
            .table_name(table)
            .filter_expression("expiresAt <= :now")
            .projection_expression("#h, #r")
            .expression_attribute_names("#h", hash)
            .expression_attribute_names("#r", range)
            .expression_attribute_values(":now", n(now_secs(now)))
            .into_paginator()
            .send();
        let mut deleted = 0;
        while let Some(page) = pages.try_next().await.map_err(sdk_error)? {
            let keys = page.items.unwrap_or_default();
            deleted += keys.len() as u64;
            let deletes = keys.into_iter().map(delete_request).collect::<Result<Vec<_>>>()?;
            self.write_batches(table, deletes).await?;
        }
        Ok(deleted)
    }
}

#[async_trait]
impl ChatStore for DynamoTables {
    async fn create_chat(&self, chat: &Chat) -> Result<()> {
        let put = self
            .client
            .put_item()
            .table_name(&self.names.chats_table)
            .set_item(Some(to_item(&ChatRow::from(chat))?))
            .condition_expression("attribute_not_exists(chatId)")
            .send()
            .await;
        match put {
            Ok(_) => {}
            Err(e) if condition_failed(&e) => {
                return Err(Error::internal(format!("chat {} exists", chat.id)));
            }
            Err(e) => return Err(sdk_error(e)),
        }
        let rows = unique(&chat.participants())
            .into_iter()
            .map(|user| put_request(to_item(&ParticipantRow { chat_id: chat.id.clone(), user_id: user })?))
            .collect::<Result<Vec<_>>>()?;
        self.write_batches(&self.names.participants_table, rows).await
    }

    async fn chat(&self, id: &ChatId) -> Result<Option<Chat>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.names.chats_table)
            .set_key(Some(key([("chatId", id.as_str())])))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        out.item.map(|i| from_item::<ChatRow>(i).map(Chat::from)).transpose()
    }

    async fn update_chat(&self, chat: &Chat, expected_version: u64) -> Result<bool> {
        let put = self
            .client
            .put_item()
            .table_name(&self.names.chats_table)
            .set_item(Some(to_item(&ChatRow::from(chat))?))
            .condition_expression("version = :expected")
            .expression_attribute_values(":expected", AttributeValue::N(expected_version.to_string()))
            .return_values(ReturnValue::AllOld)
            .send()
            .await;
        let old: Chat = match put {
            Ok(out) => from_item::<ChatRow>(out.attributes.unwrap_or_default())?.into(),
            Err(e) if condition_failed(&e) => return Ok(false),
            Err(e) => return Err(sdk_error(e)),
        };
        // Should this fail, a leftover row only costs a read: chats_of checks membership.
        let participant =
            |user: &UserId| to_item(&ParticipantRow { chat_id: chat.id.clone(), user_id: user.clone() });
        let mut writes = Vec::new();
        for user in unique(&chat.participants()).iter().filter(|u| !old.is_member(u)) {
            writes.push(put_request(participant(user)?)?);
        }
        for user in unique(&old.participants()).iter().filter(|u| !chat.is_member(u)) {
            writes.push(delete_request(participant(user)?)?);
        }
        self.write_batches(&self.names.participants_table, writes).await?;
        Ok(true)
    }

    async fn chats_of(&self, user: &UserId) -> Result<Vec<Chat>> {
        // A global index reads eventually consistent: a chat just joined may
        // show a moment late; one just left is filtered out below.
        let keys: Vec<Item> = self
            .client
            .query()
            .table_name(&self.names.participants_table)
            .index_name("byUser")
            .key_condition_expression("userId = :u")
            .expression_attribute_values(":u", s(user.as_str()))
            .into_paginator()
            .items()
            .send()
            .try_collect()
            .await
            .map_err(sdk_error)?;
        let chat_keys = keys
            .into_iter()
            .filter_map(|mut k| k.remove("chatId"))
            .map(|id| HashMap::from([("chatId".to_owned(), id)]))
            .collect();
        let items = self.get_batches(&self.names.chats_table, chat_keys, None).await?;
        let mut chats = items
            .into_iter()
            .map(|i| from_item::<ChatRow>(i).map(Chat::from))
            .filter(|c| c.as_ref().map_or(true, |c| c.is_member(user)))
            .collect::<Result<Vec<_>>>()?;
        chats.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(chats)
    }
}

#[async_trait]
impl DeviceStore for DynamoTables {
    #[instrument(level = "debug", skip_all, fields(user = %user, device = %device))]
    async fn connect(
        &self,
        user: &UserId,
        device: &DeviceId,
        connection: &ConnectionId,
        now: Millis,
        max_devices: usize,
        expired_before: Millis,
    ) -> Result<Connected> {
        for _ in 0..CONNECT_ATTEMPTS {
            if let Some(outcome) =
                self.try_connect(user, device, connection, now, max_devices, expired_before).await?
            {
                return Ok(outcome);
            }
            tracing::debug!("connect lost a race; looking again");
        }
        Err(Error::unavailable("connect kept losing races"))
    }

    async fn disconnect(&self, connection: &ConnectionId, now: Millis) -> Result<()> {
        let connections = &self.names.connections_table;
        let out = self
            .client
            .get_item()
            .table_name(connections)
            .set_key(Some(key([("connectionId", connection.as_str())])))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        // Not filtered on expiresAt: a row past it names a connection that is
        // surely closed, and unbinding its device is exactly what is due.
        let Some(item) = out.item else { return Ok(()) };
        let row: ConnectionRow = from_item(item)?;
        // The row stays for TTL to delete, which is free: a closed connection's
        // id never comes back, and should a late $disconnect or 410 name it
        // again, the condition below makes that a no-op, as for any old row.
        let unbound = self
            .client
            .update_item()
            .table_name(&self.names.devices_table)
            .set_key(Some(key([("userId", row.user_id.as_str()), ("deviceId", row.device_id.as_str())])))
            .update_expression("REMOVE connectionId SET lastSeen = :now, expiresAt = :exp")
            .condition_expression("connectionId = :c")
            .expression_attribute_values(":c", s(connection.as_str()))
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":exp", n(ttl_secs(now + DEVICE_TTL_MS)))
            .send()
            .await;
        match unbound {
            // A newer connection owns the device (or it was removed): nothing to unbind.
            Err(e) if condition_failed(&e) => Ok(()),
            other => other.map(drop).map_err(sdk_error),
        }
    }

    async fn devices_of(&self, users: &[UserId], expired_before: Millis) -> Result<Vec<Device>> {
        let calls = users.iter().map(|u| self.user_devices(u, expired_before));
        let per_user = in_parallel(calls.collect()).await?;
        Ok(per_user.into_iter().flatten().collect())
    }

    async fn remove_device(&self, user: &UserId, device: &DeviceId) -> Result<Option<Device>> {
        let out = self
            .client
            .delete_item()
            .table_name(&self.names.devices_table)
            .set_key(Some(key([("userId", user.as_str()), ("deviceId", device.as_str())])))
            .return_values(ReturnValue::AllOld)
            .send()
            .await
            .map_err(sdk_error)?;
        let Some(old) = out.attributes.filter(|a| !a.is_empty()) else { return Ok(None) };
        let removed: Device = from_item::<DeviceRow>(old)?.into();
        self.delete_device_data(user, device, removed.connection.as_ref()).await?;
        Ok(Some(removed))
    }

    #[instrument(level = "debug", skip_all)]
    async fn expire_devices(&self, before: Millis) -> Result<u64> {
        let stale = "lastSeen < :before AND attribute_not_exists(connectionId)";
        let mut pages = self
            .client
            .scan()
            .table_name(&self.names.devices_table)
            .filter_expression(stale)
            .expression_attribute_values(":before", n(before))
            .into_paginator()
            .send();
        let mut expired = 0;
        while let Some(page) = pages.try_next().await.map_err(sdk_error)? {
            let rows = page.items.unwrap_or_default().into_iter().map(from_item::<DeviceRow>);
            let deletions = rows.map(|row| async move {
                let row = row?;
                // Conditional, so a device that reconnected since the scan stays.
                let deleted = self
                    .client
                    .delete_item()
                    .table_name(&self.names.devices_table)
                    .set_key(Some(key([
                        ("userId", row.user_id.as_str()),
                        ("deviceId", row.device_id.as_str()),
                    ])))
                    .condition_expression(stale)
                    .expression_attribute_values(":before", n(before))
                    .send()
                    .await;
                match deleted {
                    Ok(_) => {}
                    Err(e) if condition_failed(&e) => return Ok(0),
                    Err(e) => return Err(sdk_error(e)),
                }
                self.delete_device_data(&row.user_id, &row.device_id, None).await?;
                Ok::<u64, Error>(1)
            });
            expired += in_parallel(deletions.collect()).await?.into_iter().sum::<u64>();
        }
        Ok(expired)
    }
}

#[async_trait]
impl MessageStore for DynamoTables {
    #[instrument(level = "debug", skip_all, fields(chat = %message.chat, message = %message.id, recipients = message.recipients.len()))]
    async fn store(
        &self,
        message: &StoredMessage,
        dedupe: Option<&DedupeKey>,
        expires_at: Millis,
    ) -> Result<Store> {
        let table = &self.names.messages_table;
        let expires = ttl_secs(expires_at);
        let dedupe = dedupe.map(dedupe_text);
        let row = MessageRow {
            chat_id: message.chat.clone(),
            message_id: message.id.clone(),
            timestamp: message.timestamp,
            body: Some(message.json.clone()),
            recipients: message.recipients.iter().map(InboxKey::key).collect(),
            fanned_out: false,
            dedupe: dedupe.clone(),
            expires_at: expires,
        };
        let item = to_item(&row)?;
        match &dedupe {
            Some(dedupe) => {
                let claim = DedupeRow {
                    chat_id: message.chat.clone(),
                    message_id: dedupe.clone(),
                    first_message_id: message.id.clone(),
                    expires_at: expires,
                };
                let put_message = Put::builder()
                    .table_name(table)
                    .set_item(Some(item))
                    .condition_expression("attribute_not_exists(messageId)")
                    .build()
                    .map_err(Error::internal)?;
                // A claim past its expiry that TTL has not removed yet is free
                // to take. The message's own time stands in for "now".
                let put_claim = Put::builder()
                    .table_name(table)
                    .set_item(Some(to_item(&claim)?))
                    .condition_expression("attribute_not_exists(messageId) OR expiresAt <= :now")
                    .expression_attribute_values(":now", n(now_secs(message.timestamp)))
                    .build()
                    .map_err(Error::internal)?;
                // The SDK sets a ClientRequestToken, so its own retries of
                // this call cannot trip over their first attempt.
                let written = self
                    .client
                    .transact_write_items()
                    .transact_items(TransactWriteItem::builder().put(put_message).build())
                    .transact_items(TransactWriteItem::builder().put(put_claim).build())
                    .send()
                    .await;
                if let Err(e) = written {
                    let reasons = match e.as_service_error() {
                        Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
                            c.cancellation_reasons().iter().map(|r| r.code().unwrap_or_default()).collect()
                        }
                        _ => Vec::new(),
                    };
                    return match reasons.as_slice() {
                        [_, "ConditionalCheckFailed"] => self.duplicate(&message.chat, dedupe).await,
                        // A concurrent send with the same key (its retry finds
                        // the winner), or throttling: worth another try.
                        r if r.iter().any(|c| {
                            matches!(
                                *c,
                                "TransactionConflict" | "ThrottlingError" | "ProvisionedThroughputExceeded"
                            )
                        }) =>
                        {
                            Err(Error::unavailable(format!("send transaction cancelled: {r:?}")))
                        }
                        _ => Err(sdk_error(e)),
                    };
                }
            }
            None => {
                let put = self
                    .client
                    .put_item()
                    .table_name(table)
                    .set_item(Some(item))
                    .condition_expression("attribute_not_exists(messageId)")
                    .send()
                    .await;
                match put {
                    Ok(_) => {}
                    // The SDK retried a put whose first attempt landed: the
                    // row is ours, and the inbox rows below are still due.
                    Err(e) if condition_failed(&e) => {
                        let ours = self.message(&message.chat, &message.id).await?.is_some_and(|m| {
                            m.timestamp == message.timestamp && (m.fanned_out || m.json == message.json)
                        });
                        if !ours {
                            return Err(Error::internal(format!("message id {} is taken", message.id)));
                        }
                    }
                    Err(e) => return Err(sdk_error(e)),
                }
            }
        }
        self.put_inbox_rows(&message.id, &message.json, &message.recipients, expires).await?;
        Ok(Store::Stored)
    }

    /// Not filtered on `expiresAt`: the port passes no time. A message past
    /// it is harmless to the callers (its inbox rows are filtered) and the
    /// clean-up job deletes it.
    async fn message(&self, chat: &ChatId, id: &MessageId) -> Result<Option<StoredMessage>> {
        // The Messages stream carries dedupe rows too; they are no message.
        if id.as_str().starts_with(DEDUPE_PREFIX) {
            return Ok(None);
        }
        let out = self
            .client
            .get_item()
            .table_name(&self.names.messages_table)
            .set_key(Some(key([("chatId", chat.as_str()), ("messageId", id.as_str())])))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        out.item.map(|i| from_item::<MessageRow>(i).map(StoredMessage::from)).transpose()
    }

    async fn mark_fanned_out(&self, chat: &ChatId, id: &MessageId) -> Result<()> {
        let marked = self
            .client
            .update_item()
            .table_name(&self.names.messages_table)
            .set_key(Some(key([("chatId", chat.as_str()), ("messageId", id.as_str())])))
            .update_expression("SET fannedOut = :t REMOVE body, recipients")
            // Never create a stub for a message that is gone.
            .condition_expression("attribute_exists(messageId)")
            .expression_attribute_values(":t", AttributeValue::Bool(true))
            .send()
            .await;
        match marked {
            Err(e) if condition_failed(&e) => Ok(()),
            other => other.map(drop).map_err(sdk_error),
        }
    }

    /// For recovery only (the local feed's kind of sweep, or an operator's):
    /// a Scan reads the whole table. Deployed, the stream finds these.
    /// Returns the first `limit` found, oldest first among them.
    async fn unfinished(&self, before: Millis, limit: usize) -> Result<Vec<(ChatId, MessageId)>> {
        let mut items = self
            .client
            .scan()
            .table_name(&self.names.messages_table)
            .filter_expression("fannedOut = :f AND #ts < :before AND NOT begins_with(messageId, :dedupe)")
            .projection_expression("chatId, messageId, #ts")
            .expression_attribute_names("#ts", "timestamp")
            .expression_attribute_values(":f", AttributeValue::Bool(false))
            .expression_attribute_values(":before", n(before))
            .expression_attribute_values(":dedupe", s(DEDUPE_PREFIX))
            .into_paginator()
            .items()
            .send();
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Found {
            chat_id: ChatId,
            message_id: MessageId,
            timestamp: Millis,
        }
        let mut found = Vec::new();
        while found.len() < limit
            && let Some(item) = items.try_next().await.map_err(sdk_error)?
        {
            found.push(from_item::<Found>(item)?);
        }
        found.sort_by_key(|f| f.timestamp);
        Ok(found.into_iter().map(|f| (f.chat_id, f.message_id)).collect())
    }

    async fn holders(&self, id: &MessageId, keys: &[InboxKey], now: Millis) -> Result<Vec<InboxKey>> {
        let lookups =
            unique(keys).iter().map(|k| key([("inbox", &k.key()), ("messageId", id.as_str())])).collect();
        let found = self.get_batches(&self.names.inbox_table, lookups, Some("inbox, expiresAt")).await?;
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Held {
            inbox: String,
            expires_at: i64,
        }
        let mut live = HashSet::new();
        for item in found {
            let held: Held = from_item(item)?;
            if held.expires_at > now_secs(now) {
                live.insert(held.inbox);
            }
        }
        Ok(keys.iter().filter(|k| live.contains(&k.key())).cloned().collect())
    }

    async fn inbox_page(
        &self,
        inbox: &InboxKey,
        after: Option<&MessageId>,
        limit: usize,
        now: Millis,
    ) -> Result<Vec<(MessageId, String)>> {
        let mut page = Vec::new();
        let mut start = None;
        // Limit caps the rows read, before the expiry filter drops any, so
        // one call may come back short with more behind it: read on.
        while page.len() < limit {
            let mut query = self
                .client
                .query()
                .table_name(&self.names.inbox_table)
                .consistent_read(true)
                .key_condition_expression("inbox = :k")
                .filter_expression("expiresAt > :now")
                .expression_attribute_values(":k", s(inbox.key()))
                .expression_attribute_values(":now", n(now_secs(now)))
                .limit((limit - page.len()).min(i32::MAX as usize) as i32)
                .set_exclusive_start_key(start.take());
            if let Some(after) = after {
                query = query
                    .key_condition_expression("inbox = :k AND messageId > :after")
                    .expression_attribute_values(":after", s(after.as_str()));
            }
            let out = query.send().await.map_err(sdk_error)?;
            for item in out.items.unwrap_or_default() {
                let row: InboxRow = from_item(item)?;
                page.push((row.message_id, row.body));
            }
            start = out.last_evaluated_key;
            if start.is_none() {
                break;
            }
        }
        page.truncate(limit);
        Ok(page)
    }

    /// One DeleteItem per id, in parallel, each returning the row it
    /// deleted, so the count needs no read: a delete costs the same write
    /// unit whether the row was there or not, and reading first cost a read
    /// unit per id on top (BatchWriteItem returns nothing to count by).
    async fn ack(&self, inbox: &InboxKey, ids: &[MessageId]) -> Result<u64> {
        let inbox = inbox.key();
        let deletes = unique(ids).into_iter().map(|id| {
            let inbox = &inbox;
            async move {
                let out = self
                    .client
                    .delete_item()
                    .table_name(&self.names.inbox_table)
                    .set_key(Some(key([("inbox", inbox), ("messageId", id.as_str())])))
                    .return_values(ReturnValue::AllOld)
                    .send()
                    .await
                    .map_err(sdk_error)?;
                Ok(out.attributes.is_some_and(|a| !a.is_empty()) as u64)
            }
        });
        Ok(in_parallel(deletes.collect()).await?.into_iter().sum())
    }

    async fn claim_pending(&self, user: &UserId, device: &DeviceId) -> Result<u64> {
        let pending = InboxKey::Pending(user.clone()).key();
        let target = InboxKey::Device(user.clone(), device.clone()).key();
        let rows = self.inbox_partition(&pending, None).await?.into_iter().map(from_item::<InboxRow>);
        let rows = rows.collect::<Result<Vec<_>>>()?;
        let claimed = rows.len() as u64;
        let mut puts = Vec::with_capacity(rows.len());
        let mut deletes = Vec::with_capacity(rows.len());
        for row in rows {
            deletes.push(delete_request(key([("inbox", &pending), ("messageId", row.message_id.as_str())]))?);
            puts.push(put_request(to_item(&InboxRow { inbox: target.clone(), ..row })?)?);
        }
        // Copies first, then the originals: a crash in between leaves a
        // second claim to copy again (harmless), never a lost message.
        self.write_batches(&self.names.inbox_table, puts).await?;
        self.write_batches(&self.names.inbox_table, deletes).await?;
        Ok(claimed)
    }

    /// Deployed, TTL does this within days and this job is a backstop; it is
    /// a Scan of two tables, so it runs on a schedule, never on a request.
    #[instrument(level = "debug", skip_all)]
    async fn expire_messages(&self, now: Millis, _retention: Millis) -> Result<u64> {
        let inbox = self.delete_expired(&self.names.inbox_table, "inbox", "messageId", now).await?;
        let messages = self.delete_expired(&self.names.messages_table, "chatId", "messageId", now).await?;
        Ok(inbox + messages)
    }
}

/// Attachment rows get no `expiresAt`, although the table has TTL on: one
/// may be sent in a message any time after its upload, and must outlive
/// that message's inbox rows; the port passes no time to filter reads by.
#[async_trait]
impl AttachmentStore for DynamoTables {
    async fn put_attachment(&self, a: &Attachment) -> Result<()> {
        let row = AttachmentRow {
            attachment_id: a.id.clone(),
            uploader: a.uploader.clone(),
            content_type: a.content_type.clone(),
            size: a.size,
            sha256: a.sha256.clone(),
            created_at: a.created_at,
        };
        let put = self
            .client
            .put_item()
            .table_name(&self.names.attachments_table)
            .set_item(Some(to_item(&row)?))
            .condition_expression("attribute_not_exists(attachmentId)")
            .send()
            .await;
        match put {
            Ok(_) => Ok(()),
            Err(e) if condition_failed(&e) => Err(Error::internal(format!("attachment {} exists", a.id))),
            Err(e) => Err(sdk_error(e)),
        }
    }

    async fn attachment(&self, id: &AttachmentId) -> Result<Option<Attachment>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.names.attachments_table)
            .set_key(Some(key([("attachmentId", id.as_str())])))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        let Some(item) = out.item else { return Ok(None) };
        let row: AttachmentRow = from_item(item)?;
        Ok(Some(Attachment {
            id: row.attachment_id,
            uploader: row.uploader,
            content_type: row.content_type,
            size: row.size,
            sha256: row.sha256,
            created_at: row.created_at,
        }))
    }

    async fn link(&self, ids: &[AttachmentId], chat: &ChatId) -> Result<()> {
        let links = unique(ids).into_iter().map(|id| async move {
            let linked = self
                .client
                .update_item()
                .table_name(&self.names.attachments_table)
                .set_key(Some(key([("attachmentId", id.as_str())])))
                .update_expression("ADD chats :chat")
                // ADD would otherwise create a stub row for an unknown id.
                .condition_expression("attribute_exists(attachmentId)")
                .expression_attribute_values(":chat", AttributeValue::Ss(vec![chat.to_string()]))
                .send()
                .await;
            match linked {
                Err(e) if condition_failed(&e) => Ok(()),
                other => other.map(drop).map_err(sdk_error),
            }
        });
        in_parallel(links.collect()).await.map(drop)
    }

    async fn chats_of_attachment(&self, id: &AttachmentId) -> Result<Vec<ChatId>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.names.attachments_table)
            .set_key(Some(key([("attachmentId", id.as_str())])))
            .projection_expression("chats")
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        let mut chats: Vec<ChatId> = match out.item.as_ref().and_then(|i| i.get("chats")) {
            Some(AttributeValue::Ss(chats)) => {
                chats.iter().filter_map(|c| ChatId::try_from(c.as_str()).ok()).collect()
            }
            _ => Vec::new(),
        };
        chats.sort();
        Ok(chats)
    }
}
