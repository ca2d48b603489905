//! `MessageStore` on SQLite: messages with their fan-out mark, and every device's inbox.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::SqliteStore;
use super::rows::{dedupe_text, id, json, message_from_row};
use courier_core::domain::{InboxKey, Millis};
use courier_core::error::Result;
use courier_core::ids::{ChatId, DeviceId, MessageId, UserId};
use courier_core::ports::{DedupeKey, MessageStore, Store, StoredMessage};

#[async_trait]
impl MessageStore for SqliteStore {
    async fn store(
        &self,
        message: &StoredMessage,
        dedupe: Option<&DedupeKey>,
        expires_at: Millis,
    ) -> Result<Store> {
        let message = message.clone();
        let dedupe = dedupe.map(dedupe_text);
        self.write(move |c| {
            if let Some(key) = &dedupe {
                let first = c
                    .prepare_cached("SELECT chat_id, message_id, timestamp, body, recipients, fanned_out FROM messages WHERE chat_id = ?1 AND dedupe = ?2")?
                    .query_row([message.chat.as_str(), key], message_from_row)
                    .optional()?;
                if let Some(first) = first {
                    return Ok(Store::Duplicate(first));
                }
            }
            let recipients: Vec<String> = message.recipients.iter().map(InboxKey::key).collect();
            // Stored done, the row is what the mark leaves of it.
            let (body, listed) = match message.fanned_out {
                true => (None, json(&Vec::<String>::new())),
                false => (Some(message.json.as_str()), json(&recipients)),
            };
            c.prepare_cached(
                "INSERT INTO messages (chat_id, message_id, timestamp, body, recipients, fanned_out, dedupe, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                message.chat.as_str(),
                message.id.as_str(),
                message.timestamp,
                body,
                listed,
                message.fanned_out,
                dedupe,
                expires_at
            ])?;
            let mut put = c.prepare_cached(
                "INSERT OR IGNORE INTO inbox (inbox, message_id, body, expires_at) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for key in &recipients {
                put.execute(params![key, message.id.as_str(), message.json, expires_at])?;
            }
            Ok(Store::Stored)
        })
        .await
    }

    async fn message(&self, chat: &ChatId, message_id: &MessageId) -> Result<Option<StoredMessage>> {
        let (chat, message_id) = (chat.to_string(), message_id.to_string());
        self.read(move |c| {
            c.prepare_cached("SELECT chat_id, message_id, timestamp, body, recipients, fanned_out FROM messages WHERE message_id = ?2 AND chat_id = ?1")?
                .query_row([&chat, &message_id], message_from_row)
                .optional()
        })
        .await
    }

    async fn mark_fanned_out(&self, chat: &ChatId, message_id: &MessageId) -> Result<()> {
        // Not waited for: a mark lost to a crash only means the feed finishes
        // the fan-out again, pushing to the inboxes that still hold it.
        let (chat, message_id) = (chat.to_string(), message_id.to_string());
        self.write_detached("fan-out mark", move |c| {
            c.prepare_cached(
                "UPDATE messages SET fanned_out = 1, body = NULL, recipients = '[]' WHERE message_id = ?2 AND chat_id = ?1",
            )?
            .execute([&chat, &message_id])
            .map(drop)
        })
    }

    async fn unfinished(&self, before: Millis, limit: usize) -> Result<Vec<(ChatId, MessageId)>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT chat_id, message_id FROM messages WHERE fanned_out = 0 AND timestamp < ?1 ORDER BY timestamp LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![before, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.map(|row| row.and_then(|(chat, msg)| Ok((id(chat)?, id(msg)?)))).collect()
        })
        .await
    }

    async fn holders(&self, message_id: &MessageId, keys: &[InboxKey], now: Millis) -> Result<Vec<InboxKey>> {
        let (message_id, keys) = (message_id.to_string(), keys.to_vec());
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT 1 FROM inbox WHERE inbox = ?1 AND message_id = ?2 AND expires_at > ?3",
            )?;
            let mut held = Vec::new();
            for key in keys {
                if stmt.exists(params![key.key(), message_id, now])? {
                    held.push(key);
                }
            }
            Ok(held)
        })
        .await
    }

    async fn inbox_page(
        &self,
        inbox: &InboxKey,
        after: Option<&MessageId>,
        limit: usize,
        now: Millis,
    ) -> Result<Vec<(MessageId, String)>> {
        let (inbox, after) = (inbox.key(), after.map(|a| a.to_string()).unwrap_or_default());
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT message_id, body FROM inbox WHERE inbox = ?1 AND message_id > ?2 AND expires_at > ?3
                 ORDER BY message_id LIMIT ?4",
            )?;
            let rows =
                stmt.query_map(params![inbox, after, now, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.map(|row| row.and_then(|(msg, body): (String, String)| Ok((id(msg)?, body)))).collect()
        })
        .await
    }

    async fn store_device_messages(
        &self,
        message_id: &MessageId,
        items: &[(InboxKey, String)],
        dedupe: Option<&DedupeKey>,
        expires_at: Millis,
    ) -> Result<Option<MessageId>> {
        let (message_id, dedupe) = (message_id.to_string(), dedupe.map(dedupe_text));
        let items: Vec<(String, String)> =
            items.iter().map(|(key, json)| (key.key(), json.clone())).collect();
        self.write(move |c| {
            if let Some(key) = &dedupe {
                let first: Option<String> = c
                    .prepare_cached("SELECT message_id FROM device_message_dedupe WHERE dedupe = ?1")?
                    .query_row([key], |r| r.get(0))
                    .optional()?;
                if let Some(first) = first {
                    return Ok(Some(id(first)?));
                }
                c.prepare_cached(
                    "INSERT INTO device_message_dedupe (dedupe, message_id, expires_at) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![key, message_id, expires_at])?;
            }
            let mut put = c.prepare_cached(
                "INSERT OR IGNORE INTO inbox (inbox, message_id, body, expires_at) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for (key, json) in &items {
                put.execute(params![key, message_id, json, expires_at])?;
            }
            Ok(None)
        })
        .await
    }

    async fn ack(&self, inbox: &InboxKey, ids: &[MessageId]) -> Result<Vec<(MessageId, String)>> {
        let (inbox, ids) = (inbox.key(), ids.to_vec());
        self.write(move |c| {
            let mut delete =
                c.prepare_cached("DELETE FROM inbox WHERE inbox = ?1 AND message_id = ?2 RETURNING body")?;
            let mut acked = Vec::new();
            for message_id in ids {
                let body: Option<String> =
                    delete.query_row([&inbox, message_id.as_str()], |r| r.get(0)).optional()?;
                if let Some(body) = body {
                    acked.push((message_id, body));
                }
            }
            Ok(acked)
        })
        .await
    }

    async fn drop_pending(&self, user: &UserId) -> Result<()> {
        let pending = InboxKey::Pending(user.clone()).key();
        self.write(move |c| c.execute("DELETE FROM inbox WHERE inbox = ?1", [&pending]).map(drop)).await
    }

    async fn claim_pending(&self, user: &UserId, device: &DeviceId) -> Result<u64> {
        let pending = InboxKey::Pending(user.clone()).key();
        let target = InboxKey::Device(user.clone(), device.clone()).key();
        self.write(move |c| {
            let moved =
                c.execute("UPDATE OR IGNORE inbox SET inbox = ?2 WHERE inbox = ?1", [&pending, &target])?;
            c.execute("DELETE FROM inbox WHERE inbox = ?1", [&pending])?;
            Ok(moved as u64)
        })
        .await
    }

    async fn expire_messages(&self, now: Millis, _retention: Millis) -> Result<u64> {
        self.write(move |c| {
            let inbox = c.execute("DELETE FROM inbox WHERE expires_at <= ?1", [now])?;
            let messages = c.execute("DELETE FROM messages WHERE expires_at <= ?1", [now])?;
            let dedupe = c.execute("DELETE FROM device_message_dedupe WHERE expires_at <= ?1", [now])?;
            Ok((inbox + messages + dedupe) as u64)
        })
        .await
    }
}
