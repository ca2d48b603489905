//! `ReceiptStore` on SQLite: one row of markers per (chat, participant).

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::SqliteStore;
use super::rows::id;
use courier_core::error::Result;
use courier_core::ids::{ChatId, MessageId, UserId};
use courier_core::ports::{Markers, ReceiptStore};

#[async_trait]
impl ReceiptStore for SqliteStore {
    async fn advance(&self, chat: &ChatId, user: &UserId, to: &Markers) -> Result<Option<Markers>> {
        let (chat, user, to) = (chat.to_string(), user.to_string(), to.clone());
        // Read and write in the one writer: a racing advance runs wholly
        // before or after, so the markers end at the furthest either asked for.
        self.write(move |c| {
            let stored = c
                .prepare_cached(
                    "SELECT delivered, read, private_read FROM receipts WHERE chat_id = ?1 AND user_id = ?2",
                )?
                .query_row([&chat, &user], |r| {
                    let marker = |i| -> rusqlite::Result<Option<MessageId>> {
                        r.get::<_, Option<String>>(i)?.map(id).transpose()
                    };
                    Ok(Markers { delivered: marker(0)?, read: marker(1)?, private_read: marker(2)? })
                })
                .optional()?
                .unwrap_or_default();
            let now = Markers {
                delivered: further(&stored.delivered, &to.delivered),
                read: further(&stored.read, &to.read),
                private_read: further(&stored.private_read, &to.private_read),
            };
            if now == stored {
                return Ok(None);
            }
            c.prepare_cached(
                "INSERT INTO receipts (chat_id, user_id, delivered, read, private_read) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (chat_id, user_id) DO UPDATE SET
                     delivered = excluded.delivered, read = excluded.read, private_read = excluded.private_read",
            )?
            .execute(params![
                chat,
                user,
                now.delivered.as_ref().map(MessageId::as_str),
                now.read.as_ref().map(MessageId::as_str),
                now.private_read.as_ref().map(MessageId::as_str),
            ])?;
            Ok(Some(now))
        })
        .await
    }

    async fn receipts(&self, chat: &ChatId) -> Result<Vec<(UserId, Markers)>> {
        let chat = chat.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT user_id, delivered, read, private_read FROM receipts WHERE chat_id = ?1 ORDER BY user_id",
            )?;
            let rows = stmt.query_map([&chat], |r| {
                let marker = |i| -> rusqlite::Result<Option<MessageId>> {
                    r.get::<_, Option<String>>(i)?.map(id).transpose()
                };
                Ok((
                    id(r.get(0)?)?,
                    Markers { delivered: marker(1)?, read: marker(2)?, private_read: marker(3)? },
                ))
            })?;
            rows.collect()
        })
        .await
    }

    async fn remove_receipts(&self, chat: &ChatId, user: &UserId) -> Result<()> {
        let (chat, user) = (chat.to_string(), user.to_string());
        self.write(move |c| {
            c.prepare_cached("DELETE FROM receipts WHERE chat_id = ?1 AND user_id = ?2")?
                .execute([&chat, &user])
                .map(drop)
        })
        .await
    }
}

/// The further of a stored marker and a move: messageIds are ULIDs, so they order by time.
fn further(stored: &Option<MessageId>, to: &Option<MessageId>) -> Option<MessageId> {
    stored.clone().max(to.clone())
}
