//! `MessageStore`: message and dedupe rows in Messages, one row per recipient device in Inbox.

use std::collections::HashSet;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue};
use serde::Deserialize;
use tracing::instrument;

use super::batch::{delete_request, put_request};
use super::rows::{
    DedupeRow, DeviceDedupeRow, DeviceItem, InboxRow, MessageRow, SharedPart, from_item, to_item,
};
use super::shared::is_shared;
use super::{DynamoTables, Item, condition_failed, in_parallel, key, n, now_secs, s, ttl_secs, unique};
use crate::{SdkFailure, sdk_error};
use courier_core::domain::{InboxKey, Millis};
use courier_core::error::{Error, Result};
use courier_core::ids::{ChatId, DeviceId, MessageId, UserId};
use courier_core::ports::{DedupeKey, MessageRetention, MessageStore, Store, StoredMessage};
use courier_core::protocol::chat_of;

/// Dedupe rows share the Messages partition of their chat under this sort-key prefix.
const DEDUPE_PREFIX: &str = "dedupe#";

fn dedupe_text(key: &DedupeKey) -> String {
    format!("{DEDUPE_PREFIX}{}#{}#{}", key.user, key.device, key.client_message_id)
}

/// The Inbox partition of one device's sendToDevices dedupe rows. No inbox
/// key (`user#device`, `user#*`) has two `#`, so none is ever this; and the
/// Inbox table, unlike Messages, is not streamed to the fan-out.
fn device_dedupe_partition(key: &DedupeKey) -> String {
    format!("{DEDUPE_PREFIX}{}#{}", key.user, key.device)
}

/// The time part of a ULID (its first 10 Crockford base-32 digits), or
/// `None` for an id that is no ULID.
pub(super) fn ulid_millis(id: &str) -> Option<Millis> {
    const DIGITS: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    if id.len() != 26 {
        return None;
    }
    id.bytes().take(10).try_fold(0i64, |ms, c| {
        let digit = DIGITS.iter().position(|&d| d == c.to_ascii_uppercase())?;
        Some(ms << 5 | digit as i64)
    })
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
        let keys = || message.recipients.iter().map(InboxKey::key).collect();
        let shared = is_shared(&message.recipients);
        let row = MessageRow {
            chat_id: message.chat.clone(),
            message_id: message.id.clone(),
            timestamp: message.timestamp,
            // Stored done, the row is what the mark leaves of it.
            body: (!message.fanned_out && !shared).then(|| message.json.clone()),
            recipients: match message.fanned_out || shared {
                true => Vec::new(),
                false => keys(),
            },
            fanned_out: message.fanned_out,
            dedupe: dedupe.clone(),
            shared: shared.then(|| SharedPart { body: message.json.clone(), recipients: keys() }),
            expires_at: expires,
        };
        // The message row, then its claim: two conditional puts, half the
        // units of one transaction of both. Whichever of two racing sends
        // claims first is the message; the other deletes its row. A send
        // that dies between the two leaves a row no inbox holds, which the
        // stream's safety net finds unmarked, pushes to no one and marks.
        let put = self
            .client
            .put_item()
            .table_name(table)
            .set_item(Some(to_item(&row)?))
            .condition_expression("attribute_not_exists(messageId)")
            .send()
            .await;
        match put {
            Ok(_) => {}
            // The SDK retried a put whose first attempt landed: the row is
            // ours, and the claim and the inbox rows below are still due.
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
        if let Some(dedupe) = &dedupe
            && let Some(first) = self.claim(message, dedupe, expires).await?
        {
            // Lost to an earlier send with the same key: this row was never
            // answered, nor will it be. If the delete fails, the safety net
            // marks it, and TTL takes it.
            self.forget(&message.chat, &message.id).await;
            return self.duplicate(&message.chat, dedupe, first).await;
        }
        self.put_copies(message, expires).await?;
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

    /// A group message stored once is held by the devices whose position
    /// in its chat holds it, and the users with no device yet whose inbox row does.
    async fn holders(&self, id: &MessageId, keys: &[InboxKey], now: Millis) -> Result<Vec<InboxKey>> {
        if let Some(chat) = self.shared_chat(id, now).await? {
            let (devices, pending): (Vec<InboxKey>, Vec<InboxKey>) =
                keys.iter().cloned().partition(|k| matches!(k, InboxKey::Device(..)));
            let mut holding = self.shared_holders(&chat, id, &devices).await?;
            holding.extend(self.inbox_holders(id, &pending, now).await?);
            return Ok(keys.iter().filter(|k| holding.contains(k)).cloned().collect());
        }
        self.inbox_holders(id, keys, now).await
    }

    /// The next page of the inbox rows, merged with the group messages of
    /// each chat the device has a position in, by messageId.
    async fn inbox_page(
        &self,
        inbox: &InboxKey,
        after: Option<&MessageId>,
        limit: usize,
        now: Millis,
    ) -> Result<Vec<(MessageId, String)>> {
        let positions = self.positions(inbox).await?;
        let mut page = self.inbox_rows(inbox, after, limit, now).await?;
        let groups = positions.values().map(|p| self.shared_page(inbox, p, after, limit, now));
        page.extend(in_parallel(groups.collect()).await?.into_iter().flatten());
        if !positions.is_empty() {
            page.sort_by(|a, b| a.0.cmp(&b.0));
            page.dedup_by(|a, b| a.0 == b.0);
            page.truncate(limit);
        }
        Ok(page)
    }

    /// Without a dedupe key, the inbox rows alone. With one, a conditional
    /// put claims the key in the device-message dedupe partition of the
    /// sender (apart from any chat's) and holds the batch; the inbox rows
    /// follow, and last the claim drops the batch. A retry that finds the
    /// claim still holding it writes the rows again (idempotent puts), so
    /// its SUCCESS is as true as the first.
    #[instrument(level = "debug", skip_all, fields(message = %id, items = items.len()))]
    async fn store_device_messages(
        &self,
        id: &MessageId,
        items: &[(InboxKey, String)],
        dedupe: Option<&DedupeKey>,
        expires_at: Millis,
    ) -> Result<Option<MessageId>> {
        let expires = ttl_secs(expires_at);
        let items: Vec<DeviceItem> =
            items.iter().map(|(inbox, body)| DeviceItem { inbox: inbox.key(), body: body.clone() }).collect();
        let Some(dedupe) = dedupe else {
            self.put_device_items(id, &items, expires).await?;
            return Ok(None);
        };
        let claim = DeviceDedupeRow {
            inbox: device_dedupe_partition(dedupe),
            message_id: dedupe.client_message_id.clone(),
            first_message_id: id.clone(),
            pending: Some(items.clone()),
            expires_at: expires,
        };
        let mut put = self
            .client
            .put_item()
            .table_name(&self.names.inbox_table)
            .set_item(Some(to_item(&claim)?))
            .condition_expression("attribute_not_exists(messageId)");
        // A claim past its expiry that TTL has not removed yet is free to
        // take; the new id's own time stands in for "now".
        if let Some(now) = ulid_millis(id.as_str()) {
            put = put
                .condition_expression("attribute_not_exists(messageId) OR expiresAt <= :now")
                .expression_attribute_values(":now", n(now_secs(now)));
        }
        match put.send().await {
            Ok(_) => {}
            Err(e) if condition_failed(&e) => {
                let first = self.device_duplicate(&claim.inbox, &claim.message_id).await?;
                // Our own id: the SDK retried a put whose first attempt
                // landed, and the batch is stored now like any other.
                return Ok(Some(first).filter(|first| first != id));
            }
            Err(e) => return Err(sdk_error(e)),
        }
        self.put_device_items(id, &items, expires).await?;
        self.release_device_batch(&claim.inbox, &claim.message_id).await?;
        Ok(None)
    }

    /// A device with positions (a member of a group chat) looks its ids up
    /// first: each group message moves its chat's position once. The other
    /// ids are inbox rows, one DeleteItem each, in parallel, each returning
    /// the row it deleted, so the answer needs no read: a delete costs the
    /// same write unit whether the row was there or not, and reading first
    /// cost a read unit per id on top (BatchWriteItem returns nothing).
    async fn ack(&self, inbox: &InboxKey, ids: &[MessageId]) -> Result<Vec<(MessageId, Option<ChatId>)>> {
        let positions = self.positions(inbox).await?;
        let ids = unique(ids);
        let shared = self.ack_shared(inbox, &ids, false, &positions).await?;
        let mut acked = shared.acked;
        let rest: Vec<MessageId> = shared.unknown.iter().chain(&shared.untaken).cloned().collect();
        let rows = self.ack_inbox_rows(inbox, &rest).await?;
        // An id found nowhere: a pointer written a moment ago may not show
        // in an eventually consistent read yet.
        let unseen: Vec<MessageId> =
            shared.unknown.into_iter().filter(|id| !rows.iter().any(|(r, _)| r == id)).collect();
        acked.extend(rows);
        acked.extend(self.ack_shared(inbox, &unseen, true, &positions).await?.acked);
        Ok(acked)
    }

    async fn drop_pending(&self, user: &UserId) -> Result<()> {
        self.delete_inbox(&InboxKey::Pending(user.clone()).key()).await
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
}

#[async_trait]
impl MessageRetention for DynamoTables {
    /// Deployed, TTL does this within days and this job is a backstop; it is
    /// a Scan of two tables, so it runs on a schedule, never on a request.
    /// It also drops the text of group messages every device acked (see `shared`).
    #[instrument(level = "debug", skip_all)]
    async fn expire_messages(&self, now: Millis, _retention: Millis) -> Result<u64> {
        let inbox = self.delete_expired(&self.names.inbox_table, "inbox", "messageId", now).await?;
        let messages = self.delete_expired(&self.names.messages_table, "chatId", "messageId", now).await?;
        let texts = self.drop_finished_shared(now).await?;
        Ok(inbox + messages + texts)
    }
}

impl DynamoTables {
    async fn ack_inbox_rows(
        &self,
        inbox: &InboxKey,
        ids: &[MessageId],
    ) -> Result<Vec<(MessageId, Option<ChatId>)>> {
        let inbox = inbox.key();
        let deletes = ids.iter().map(|id| {
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
                match out.attributes.filter(|a| !a.is_empty()) {
                    Some(old) => {
                        from_item::<InboxRow>(old).map(|row| Some((row.message_id, chat_of(&row.body))))
                    }
                    None => Ok(None),
                }
            }
        });
        Ok(in_parallel(deletes.collect()).await?.into_iter().flatten().collect())
    }

    async fn inbox_holders(&self, id: &MessageId, keys: &[InboxKey], now: Millis) -> Result<Vec<InboxKey>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
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

    async fn inbox_rows(
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

    /// Every row of one inbox partition, oldest first, expired or not.
    pub(super) async fn inbox_partition(&self, inbox: &str, projection: Option<&str>) -> Result<Vec<Item>> {
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

    /// Deletes a device's inbox: its rows, and what its positions in group
    /// chats hold (see `shared::reset_positions`).
    pub(super) async fn delete_device_inbox(&self, user: &UserId, device: &DeviceId) -> Result<()> {
        let inbox = InboxKey::Device(user.clone(), device.clone()).key();
        self.delete_inbox(&inbox).await?;
        self.reset_positions(&inbox).await
    }

    /// Deletes a whole inbox partition.
    async fn delete_inbox(&self, inbox: &str) -> Result<()> {
        let keys = self.inbox_partition(inbox, Some("inbox, messageId")).await?;
        let deletes = keys.into_iter().map(delete_request).collect::<Result<Vec<_>>>()?;
        self.write_batches(&self.names.inbox_table, deletes).await
    }

    /// What a send with this dedupe key stored first. A first attempt that
    /// died between its message row and its inbox rows left the message
    /// unfanned; its inbox rows are put (again, idempotently) so the retry's
    /// success is true.
    /// Claims `dedupe` for `message`; answers the claim that stands in its
    /// way, or `None` when the claim is this message's (new, or an SDK retry
    /// of a claim that landed). A claim past its expiry that TTL has not
    /// removed yet is free to take; the message's own time stands in for now.
    async fn claim(&self, message: &StoredMessage, dedupe: &str, expires: i64) -> Result<Option<DedupeRow>> {
        let claim = DedupeRow {
            chat_id: message.chat.clone(),
            message_id: dedupe.to_owned(),
            first_message_id: message.id.clone(),
            expires_at: expires,
        };
        let put = self
            .client
            .put_item()
            .table_name(&self.names.messages_table)
            .set_item(Some(to_item(&claim)?))
            .condition_expression("attribute_not_exists(messageId) OR expiresAt <= :now")
            .expression_attribute_values(":now", n(now_secs(message.timestamp)))
            .send()
            .await;
        match put {
            Ok(_) => Ok(None),
            Err(e) if condition_failed(&e) => {
                let at = key([("chatId", message.chat.as_str()), ("messageId", dedupe)]);
                let row: DedupeRow = self.standing_claim(&self.names.messages_table, at).await?;
                Ok((row.first_message_id != message.id).then_some(row))
            }
            Err(e) => Err(sdk_error(e)),
        }
    }

    /// The dedupe claim a conditional put just ran into, read back
    /// consistently; one gone meanwhile (expired) is worth a retry.
    async fn standing_claim<T: serde::de::DeserializeOwned>(&self, table: &str, at: Item) -> Result<T> {
        let out = self
            .client
            .get_item()
            .table_name(table)
            .set_key(Some(at))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_error)?;
        let Some(item) = out.item else {
            return Err(Error::unavailable("the dedupe row vanished; retry"));
        };
        from_item(item)
    }

    /// Deletes a message row nobody was told of. Logged, not returned.
    async fn forget(&self, chat: &ChatId, id: &MessageId) {
        let deleted = self
            .client
            .delete_item()
            .table_name(&self.names.messages_table)
            .set_key(Some(key([("chatId", chat.as_str()), ("messageId", id.as_str())])))
            .send()
            .await;
        if let Err(e) = deleted {
            tracing::warn!(%chat, message = %id, error = %SdkFailure(e), "deleting a deduped message row failed");
        }
    }

    /// The earlier send that holds the claim, with its inbox rows put again
    /// unless its fan-out is done: the send that claimed it may have died
    /// before writing them.
    async fn duplicate(&self, chat: &ChatId, dedupe: &str, claim: DedupeRow) -> Result<Store> {
        let Some(first) = self.message(chat, &claim.first_message_id).await? else {
            // Claims are made after their message row: its sender is still
            // writing, or it is expired.
            return Err(Error::unavailable(format!(
                "the message behind {dedupe} is not readable yet; retry"
            )));
        };
        if !first.fanned_out {
            self.put_copies(&first, claim.expires_at).await?;
        }
        Ok(Store::Duplicate(first))
    }

    async fn put_device_items(&self, id: &MessageId, items: &[DeviceItem], expires_at: i64) -> Result<()> {
        let mut seen = HashSet::new();
        let puts = items
            .iter()
            .filter(|item| seen.insert(item.inbox.as_str()))
            .map(|item| {
                let row = InboxRow {
                    inbox: item.inbox.clone(),
                    message_id: id.clone(),
                    body: item.body.clone(),
                    expires_at,
                };
                put_request(to_item(&row)?)
            })
            .collect::<Result<Vec<_>>>()?;
        self.write_batches(&self.names.inbox_table, puts).await
    }

    /// What a sendToDevices with this dedupe key stored first; its inbox
    /// rows are written (again) if the claim still holds the batch.
    async fn device_duplicate(&self, partition: &str, client_message_id: &str) -> Result<MessageId> {
        let at = key([("inbox", partition), ("messageId", client_message_id)]);
        let claim: DeviceDedupeRow = self.standing_claim(&self.names.inbox_table, at).await?;
        if let Some(items) = &claim.pending {
            self.put_device_items(&claim.first_message_id, items, claim.expires_at).await?;
            self.release_device_batch(partition, client_message_id).await?;
        }
        Ok(claim.first_message_id)
    }

    /// Drops the batch from its claim once the inbox rows hold it: after
    /// that, no copy of a body outlives its acks but in the inbox rows.
    async fn release_device_batch(&self, partition: &str, client_message_id: &str) -> Result<()> {
        let released = self
            .client
            .update_item()
            .table_name(&self.names.inbox_table)
            .set_key(Some(key([("inbox", partition), ("messageId", client_message_id)])))
            .update_expression("REMOVE pending")
            // Never create a stub for a claim that is gone.
            .condition_expression("attribute_exists(messageId)")
            .send()
            .await;
        match released {
            Err(e) if condition_failed(&e) => Ok(()),
            other => other.map(drop).map_err(sdk_error),
        }
    }

    /// What makes a stored message reach its recipients: a group message's
    /// pointer and positions (and inbox rows for users with no device yet),
    /// or an inbox row per recipient.
    async fn put_copies(&self, message: &StoredMessage, expires_at: i64) -> Result<()> {
        if !is_shared(&message.recipients) {
            return self.put_inbox_rows(&message.id, &message.json, &message.recipients, expires_at).await;
        }
        self.share(message, expires_at).await?;
        let pending: Vec<InboxKey> =
            message.recipients.iter().filter(|k| matches!(k, InboxKey::Pending(_))).cloned().collect();
        self.put_inbox_rows(&message.id, &message.json, &pending, expires_at).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ulids_time_is_read_back() {
        let ids = courier_core::ids::IdGen::new();
        for ms in [0, 1, 1_800_000_000_123, (1 << 48) - 1] {
            assert_eq!(ulid_millis(ids.message(ms).as_str()), Some(ms));
        }
        assert_eq!(ulid_millis("01arz3ndektsv4rrffq69g5fav"), ulid_millis("01ARZ3NDEKTSV4RRFFQ69G5FAV"));
        assert_eq!(ulid_millis("not-a-ulid"), None);
        assert_eq!(ulid_millis("0123IL6789ABCDEFGHJKMNPQRS"), None, "I and L are no digits");
    }
}
