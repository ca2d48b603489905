//! `MessageStore` on SQLite: each message appended to the log once, each inbox derived from it (see `inboxes.rs`).

use std::sync::Mutex;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, params};

use super::SqliteStore;
use super::inboxes::{Held, Inboxes, Seq, dedupe_hash, save_cursor};
use super::rows::{dedupe_text, from_json, id, json, message_from_row};
use courier_core::domain::{InboxKey, Millis};
use courier_core::error::Result;
use courier_core::ids::{ChatId, DeviceId, MessageId, UserId};
use courier_core::ports::{DedupeKey, MessageRetention, MessageStore, Store, StoredMessage};

/// Log rows one expiry write deletes at most.
const EXPIRE_SLICE: usize = 5_000;

/// A message row as the feed reads it: once fanned out, without its body.
const MESSAGE_ROW: &str =
    "SELECT chat_id, message_id, timestamp, CASE fanned_out WHEN 0 THEN body END AS body,
     COALESCE(recipients, '[]') AS recipients, fanned_out FROM log";

pub(super) fn lock(inboxes: &Mutex<Inboxes>) -> std::sync::MutexGuard<'_, Inboxes> {
    inboxes.lock().unwrap_or_else(|e| e.into_inner())
}

/// Appends one row to the log; the index learns of it once the insert succeeded.
#[allow(clippy::too_many_arguments)]
fn append(
    c: &Connection,
    inboxes: &Mutex<Inboxes>,
    message: &MessageId,
    chat: Option<&str>,
    timestamp: Millis,
    body: &str,
    recipients: &[String],
    fanned_out: bool,
    dedupe: Option<&str>,
    expires_at: Millis,
) -> rusqlite::Result<()> {
    let seq = lock(inboxes).next_seq();
    c.prepare_cached(
        "INSERT INTO log (seq, message_id, chat_id, timestamp, body, recipients, fanned_out, dedupe, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        seq,
        message.as_str(),
        chat,
        timestamp,
        body,
        json(&recipients),
        fanned_out,
        dedupe,
        expires_at
    ])?;
    let hash = chat.zip(dedupe).map(|(chat, key)| dedupe_hash(chat, key));
    lock(inboxes).append(seq, message, recipients, expires_at, hash, body);
    Ok(())
}

/// A held row's body: from memory if kept there, else from the log.
fn body_of(c: &Connection, held: &Held) -> rusqlite::Result<Option<String>> {
    if let Some(body) = &held.body {
        return Ok(Some(body.to_string()));
    }
    let body = c.prepare_cached("SELECT body FROM log WHERE seq = ?1")?.query_row([held.seq], |r| r.get(0));
    Ok(body.optional()?.flatten())
}

/// Rewrites the recipients of row `seq`: `from` becomes `to`, or goes.
fn rename_recipient(c: &Connection, seq: Seq, from: &str, to: Option<&str>) -> rusqlite::Result<()> {
    let listed: Option<Option<String>> = c
        .prepare_cached("SELECT recipients FROM log WHERE seq = ?1")?
        .query_row([seq], |r| r.get(0))
        .optional()?;
    let Some(Some(listed)) = listed else { return Ok(()) };
    let mut keys: Vec<String> = from_json(&listed)?;
    let before = keys.len();
    keys.retain(|k| k != from);
    if keys.len() == before {
        return Ok(());
    }
    if let Some(to) = to.filter(|to| !keys.iter().any(|k| k == to)) {
        keys.push(to.to_owned());
    }
    c.prepare_cached("UPDATE log SET recipients = ?2 WHERE seq = ?1")?.execute(params![seq, json(&keys)])?;
    Ok(())
}

/// Empties an inbox for good (its device is gone, or its user): every row
/// that names it, held or acked, stops naming it, and its cursor goes.
pub(super) fn drop_inbox(c: &Connection, inboxes: &Mutex<Inboxes>, key: &str) -> rusqlite::Result<()> {
    let (held, position) = lock(inboxes).holdings(key);
    let mut rows: Vec<Seq> = held.iter().map(|(_, h)| h.seq).collect();
    if let Some(position) = position {
        // Rows it acked name it until every other inbox has acked them too.
        rows.extend(lock(inboxes).live_through(position));
        c.prepare_cached("DELETE FROM cursors WHERE inbox = ?1")?.execute([key])?;
    }
    rows.sort_unstable();
    rows.dedup();
    for seq in rows {
        rename_recipient(c, seq, key, None)?;
    }
    lock(inboxes).apply_drop(key);
    Ok(())
}

impl SqliteStore {
    /// Drops the bodies of rows every inbox has acked, in the next commit:
    /// the ack that freed them does not wait for it. A row that keeps a
    /// dedupe key stays, without body or recipients, until it expires.
    fn compact(&self) {
        let inboxes = self.inner.inboxes.clone();
        let queued = self.write_detached("compaction", move |c| {
            let done = lock(&inboxes).take_done();
            let mut delete = c.prepare_cached("DELETE FROM log WHERE seq = ?1 AND dedupe IS NULL")?;
            let mut empty =
                c.prepare_cached("UPDATE log SET body = NULL, recipients = NULL WHERE seq = ?1")?;
            for seq in done {
                if delete.execute([seq])? == 0 {
                    empty.execute([seq])?;
                }
            }
            Ok(())
        });
        if let Err(e) = queued {
            tracing::debug!(error = %e, "compaction not queued");
        }
    }

    /// Compacts if writes left rows that no inbox holds. At most one such
    /// write waits in the queue at a time: it takes every row done by the
    /// time it runs.
    pub(super) fn compact_if_done(&self) {
        if lock(&self.inner.inboxes).compaction_wanted() {
            self.compact();
        }
    }
}

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
        let inboxes = self.inner.inboxes.clone();
        self.write(move |c| {
            let chat = message.chat.as_str();
            if let Some(key) = &dedupe {
                let seq = lock(&inboxes).first_with(chat, key);
                if let Some(seq) = seq {
                    let first = c
                        .prepare_cached(&format!(
                            "{MESSAGE_ROW} WHERE seq = ?1 AND chat_id = ?2 AND dedupe = ?3"
                        ))?
                        .query_row(params![seq, chat, key], message_from_row)
                        .optional()?;
                    if let Some(first) = first {
                        return Ok(Store::Duplicate(first));
                    }
                }
            }
            let mut recipients: Vec<String> = message.recipients.iter().map(InboxKey::key).collect();
            recipients.sort_unstable();
            recipients.dedup();
            append(
                c,
                &inboxes,
                &message.id,
                Some(chat),
                message.timestamp,
                &message.json,
                &recipients,
                message.fanned_out,
                dedupe.as_deref(),
                expires_at,
            )?;
            Ok(Store::Stored)
        })
        .await
    }

    async fn message(&self, chat: &ChatId, message_id: &MessageId) -> Result<Option<StoredMessage>> {
        let (chat, message_id) = (chat.to_string(), message_id.to_string());
        self.read(move |c| {
            c.prepare_cached(&format!("{MESSAGE_ROW} WHERE message_id = ?2 AND chat_id = ?1"))?
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
            c.prepare_cached("UPDATE log SET fanned_out = 1 WHERE message_id = ?2 AND chat_id = ?1")?
                .execute([&chat, &message_id])
                .map(drop)
        })
    }

    async fn unfinished(&self, before: Millis, limit: usize) -> Result<Vec<(ChatId, MessageId)>> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT chat_id, message_id FROM log WHERE fanned_out = 0 AND timestamp < ?1 ORDER BY timestamp LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![before, limit as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.map(|row| row.and_then(|(chat, msg)| Ok((id(chat)?, id(msg)?)))).collect()
        })
        .await
    }

    async fn holders(&self, message_id: &MessageId, keys: &[InboxKey], now: Millis) -> Result<Vec<InboxKey>> {
        let inboxes = lock(&self.inner.inboxes);
        Ok(keys.iter().filter(|key| inboxes.holds(&key.key(), message_id, now)).cloned().collect())
    }

    async fn inbox_page(
        &self,
        inbox: &InboxKey,
        after: Option<&MessageId>,
        limit: usize,
        now: Millis,
    ) -> Result<Vec<(MessageId, String)>> {
        let listed = lock(&self.inner.inboxes).page(&inbox.key(), after, limit, now);
        if listed.iter().all(|(_, held)| held.body.is_some()) {
            return Ok(listed
                .into_iter()
                .map(|(m, held)| (m, held.body.unwrap_or_default().to_string()))
                .collect());
        }
        self.read(move |c| {
            let mut page = Vec::with_capacity(listed.len());
            for (message, held) in listed {
                // None: acked (or expired) and gone since the index was read.
                if let Some(body) = body_of(c, &held)? {
                    page.push((message, body));
                }
            }
            Ok(page)
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
        let (message_id, dedupe) = (message_id.clone(), dedupe.map(dedupe_text));
        let items: Vec<(String, String)> =
            items.iter().map(|(key, json)| (key.key(), json.clone())).collect();
        let (inboxes, now) = (self.inner.inboxes.clone(), self.now());
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
                .execute(params![key, message_id.as_str(), expires_at])?;
            }
            // Each device's body differs: a row each, all appended.
            let mut seen = std::collections::HashSet::new();
            for (key, json) in items.iter().filter(|(key, _)| seen.insert(key.clone())) {
                let to = std::slice::from_ref(key);
                append(c, &inboxes, &message_id, None, now, json, to, true, None, expires_at)?;
            }
            Ok(None)
        })
        .await
    }

    async fn ack(&self, inbox: &InboxKey, ids: &[MessageId]) -> Result<Vec<(MessageId, Option<ChatId>)>> {
        let (key, ids, inboxes) = (inbox.key(), ids.to_vec(), self.inner.inboxes.clone());
        self.write(move |c| {
            let Some(plan) = lock(&inboxes).plan_ack(&key, &ids) else { return Ok(Vec::new()) };
            let mut acked = Vec::with_capacity(plan.rows.len());
            for (message, held) in &plan.rows {
                if let Some(body) = body_of(c, held)? {
                    acked.push((message.clone(), courier_core::protocol::chat_of(&body)));
                }
            }
            save_cursor(c, &key, &plan.cursor)?;
            lock(&inboxes).apply_ack(&key, plan);
            Ok(acked)
        })
        .await
    }

    async fn drop_pending(&self, user: &UserId) -> Result<()> {
        let (pending, inboxes) = (InboxKey::Pending(user.clone()).key(), self.inner.inboxes.clone());
        self.write(move |c| drop_inbox(c, &inboxes, &pending)).await
    }

    async fn claim_pending(&self, user: &UserId, device: &DeviceId) -> Result<u64> {
        let pending = InboxKey::Pending(user.clone()).key();
        let target = InboxKey::Device(user.clone(), device.clone()).key();
        let inboxes = self.inner.inboxes.clone();
        self.write(move |c| {
            let (moves, cursor) = lock(&inboxes).plan_claim(&pending, &target);
            for (_, held, moved) in &moves {
                rename_recipient(c, held.seq, &pending, moved.then_some(target.as_str()))?;
            }
            if let Some(cursor) = &cursor {
                save_cursor(c, &target, cursor)?;
            }
            lock(&inboxes).apply_claim(&pending, &target, &moves, cursor);
            Ok(moves.iter().filter(|(_, _, moved)| *moved).count() as u64)
        })
        .await
    }
}

#[async_trait]
impl MessageRetention for SqliteStore {
    async fn expire_messages(&self, now: Millis, _retention: Millis) -> Result<u64> {
        // In slices, each its own write: the writes of senders and ackers
        // queued meanwhile commit between them instead of after all of it.
        let mut total = 0;
        loop {
            let inboxes = self.inner.inboxes.clone();
            let (rows, more) = self
                .write(move |c| {
                    let gone: Vec<(Seq, String, Option<String>, Option<String>, Option<String>)> = c
                        .prepare_cached(
                            "DELETE FROM log WHERE seq IN (SELECT seq FROM log WHERE expires_at <= ?1 LIMIT ?2)
                             RETURNING seq, message_id, chat_id, recipients, dedupe",
                        )?
                        .query_map(params![now, EXPIRE_SLICE as i64], |r| {
                            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                        })?
                        .collect::<rusqlite::Result<_>>()?;
                    let mut forgotten = Vec::with_capacity(gone.len());
                    for (seq, message, chat, recipients, key) in &gone {
                        let recipients: Vec<String> =
                            recipients.as_deref().map(from_json).transpose()?.unwrap_or_default();
                        let hash = chat.as_deref().zip(key.as_deref()).map(|(chat, key)| dedupe_hash(chat, key));
                        forgotten.push((*seq, id::<MessageId>(message.clone())?, recipients, hash));
                    }
                    let mut index = lock(&inboxes);
                    for (seq, message, recipients, hash) in &forgotten {
                        index.forget(*seq, message, recipients, *hash);
                    }
                    Ok((gone.len() as u64, gone.len() == EXPIRE_SLICE))
                })
                .await?;
            total += rows;
            if !more {
                break;
            }
        }
        let dedupe = self
            .write(move |c| c.execute("DELETE FROM device_message_dedupe WHERE expires_at <= ?1", [now]))
            .await?;
        Ok(total + dedupe as u64)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::sqlite::Durability;
    use courier_core::ports::SystemClock;

    fn message(n: u32, to: &[&str]) -> StoredMessage {
        let id = format!("01JDX00000000000000000M{n:03}");
        StoredMessage {
            chat: ChatId::try_from("01JDX0000000000000000000C1".to_owned()).unwrap(),
            id: MessageId::try_from(id.clone()).unwrap(),
            timestamp: n as Millis,
            json: format!(r#"{{"messageId":"{id}","message":"text {n}"}}"#),
            recipients: to.iter().map(|k| InboxKey::parse(k).unwrap()).collect(),
            fanned_out: true,
        }
    }

    async fn page(store: &SqliteStore, inbox: &str) -> Vec<String> {
        let page = store.inbox_page(&InboxKey::parse(inbox).unwrap(), None, 10, 0).await.unwrap();
        page.into_iter().map(|(id, _)| id.to_string()).collect()
    }

    #[tokio::test]
    async fn what_each_inbox_holds_survives_a_reopen_and_acked_text_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.db");
        let sent: Vec<StoredMessage> = (1..=3).map(|n| message(n, &["bob#p", "eve#p"])).collect();
        {
            let store = SqliteStore::open(&path, Durability::Process, Arc::new(SystemClock)).unwrap();
            for m in &sent {
                assert_eq!(store.store(m, None, i64::MAX).await.unwrap(), Store::Stored);
            }
            // Out of order: m2 stays held below bob's position.
            let bob = InboxKey::parse("bob#p").unwrap();
            let acked = store.ack(&bob, &[sent[0].id.clone(), sent[2].id.clone()]).await.unwrap();
            assert_eq!(acked.len(), 2);
            // Eve's device goes, with what she held.
            let inboxes = store.inner.inboxes.clone();
            store.write(move |c| drop_inbox(c, &inboxes, "eve#p")).await.unwrap();
            store.flush().await.unwrap();
            store.close();
        }
        let store = SqliteStore::open(&path, Durability::Process, Arc::new(SystemClock)).unwrap();
        assert_eq!(page(&store, "bob#p").await, vec![sent[1].id.to_string()], "bob still holds m2 alone");
        assert!(page(&store, "eve#p").await.is_empty(), "eve's inbox is gone for good");
        let texts: Vec<String> = store
            .read(|c| {
                c.prepare("SELECT body FROM log WHERE body IS NOT NULL")?
                    .query_map([], |r| r.get(0))?
                    .collect()
            })
            .await
            .unwrap();
        assert_eq!(texts, vec![sent[1].json.clone()], "only the text some inbox holds is kept");
        let named: i64 = store
            .read(|c| {
                c.query_row(
                    "SELECT (SELECT count(*) FROM log WHERE recipients LIKE '%eve#p%')
                          + (SELECT count(*) FROM cursors WHERE inbox = 'eve#p')",
                    [],
                    |r| r.get(0),
                )
            })
            .await
            .unwrap();
        assert_eq!(named, 0, "no row names eve's inbox");
        // A new device under the same id starts empty, and gets what comes next.
        let m4 = message(4, &["bob#p", "eve#p"]);
        store.store(&m4, None, i64::MAX).await.unwrap();
        assert_eq!(page(&store, "eve#p").await, vec![m4.id.to_string()]);
        store.close();
    }
}
