//! `ChatStore` on SQLite: a chat's JSON body and version, and a participants index for `chats_of`.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::SqliteStore;
use super::rows::{ChatRow, chat_body, chat_from_row, from_json};
use courier_core::domain::Chat;
use courier_core::error::Result;
use courier_core::ids::{ChatId, UserId};
use courier_core::ports::ChatStore;

#[async_trait]
impl ChatStore for SqliteStore {
    async fn create_chat(&self, chat: &Chat) -> Result<()> {
        let (key, chat) = (chat.id.clone(), chat.clone());
        let created = self
            .write(move |c| {
                c.execute(
                    "INSERT INTO chats (chat_id, body, version) VALUES (?1, ?2, ?3)",
                    params![chat.id.as_str(), chat_body(&chat), chat.version as i64],
                )?;
                let mut add = c.prepare_cached(
                    "INSERT OR IGNORE INTO participants (user_id, chat_id) VALUES (?1, ?2)",
                )?;
                for m in &chat.members {
                    add.execute([m.user.as_str(), chat.id.as_str()])?;
                }
                Ok(())
            })
            .await;
        self.inner.chats.forget(&key);
        created
    }

    async fn chat(&self, chat_id: &ChatId) -> Result<Option<Chat>> {
        if let Some(chat) = self.inner.chats.get(chat_id) {
            return Ok(Some(chat));
        }
        let epoch = self.inner.chats.epoch();
        let key = chat_id.to_string();
        let found = self
            .read(move |c| {
                c.prepare_cached("SELECT body, version FROM chats WHERE chat_id = ?1")?
                    .query_row([&key], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
                    .optional()?
                    .map(|(body, version)| chat_from_row(key.clone(), body, version))
                    .transpose()
            })
            .await?;
        if let Some(chat) = &found {
            self.inner.chats.fill(epoch, [(chat_id.clone(), chat.clone())]);
        }
        Ok(found)
    }

    async fn update_chat(&self, chat: &Chat, expected_version: u64) -> Result<bool> {
        let (key, chat) = (chat.id.clone(), chat.clone());
        let updated = self
            .write(move |c| {
                let old: Option<String> = c
                    .query_row(
                        "SELECT body FROM chats WHERE chat_id = ?1 AND version = ?2",
                        params![chat.id.as_str(), expected_version as i64],
                        |r| r.get(0),
                    )
                    .optional()?;
                let Some(old) = old else { return Ok(false) };
                let old: ChatRow = from_json(&old)?;
                c.execute(
                    "UPDATE chats SET body = ?2, version = ?3 WHERE chat_id = ?1",
                    params![chat.id.as_str(), chat_body(&chat), chat.version as i64],
                )?;
                for m in old.members.iter().filter(|m| !chat.is_member(&m.user)) {
                    c.execute(
                        "DELETE FROM participants WHERE user_id = ?1 AND chat_id = ?2",
                        [m.user.as_str(), chat.id.as_str()],
                    )?;
                }
                for m in &chat.members {
                    c.execute(
                        "INSERT OR IGNORE INTO participants (user_id, chat_id) VALUES (?1, ?2)",
                        [m.user.as_str(), chat.id.as_str()],
                    )?;
                }
                Ok(true)
            })
            .await;
        self.inner.chats.forget(&key);
        updated
    }

    async fn chats_of(&self, user: &UserId, after: Option<&ChatId>, limit: usize) -> Result<Vec<Chat>> {
        let user = user.to_string();
        let after = after.map(ChatId::to_string).unwrap_or_default();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT c.chat_id, c.body, c.version FROM participants p JOIN chats c ON c.chat_id = p.chat_id
                 WHERE p.user_id = ?1 AND p.chat_id > ?2 ORDER BY p.chat_id LIMIT ?3",
            )?;
            let rows =
                stmt.query_map(params![&user, &after, limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.map(|row| row.and_then(|(id, body, version)| chat_from_row(id, body, version))).collect()
        })
        .await
    }
}
