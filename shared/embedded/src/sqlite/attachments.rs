//! `AttachmentStore` on SQLite: declared uploads, and the chats each was sent to.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params};

use super::SqliteStore;
use super::rows::id;
use courier_core::error::Result;
use courier_core::ids::{AttachmentId, ChatId, UserId};
use courier_core::ports::{Attachment, AttachmentStore};

#[async_trait]
impl AttachmentStore for SqliteStore {
    async fn put_attachment(&self, a: &Attachment) -> Result<()> {
        let a = a.clone();
        self.write(move |c| {
            c.execute(
                "INSERT INTO attachments (attachment_id, uploader, content_type, size, sha256, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    a.id.as_str(),
                    a.uploader.as_str(),
                    a.content_type,
                    a.size as i64,
                    a.sha256,
                    a.created_at
                ],
            )
            .map(drop)
        })
        .await
    }

    async fn attachment(&self, attachment_id: &AttachmentId) -> Result<Option<Attachment>> {
        let attachment_id = attachment_id.to_string();
        self.read(move |c| {
            c.prepare_cached(
                "SELECT attachment_id, uploader, content_type, size, sha256, created_at FROM attachments WHERE attachment_id = ?1",
            )?
            .query_row([&attachment_id], attachment_from_row)
            .optional()
        })
        .await
    }

    async fn link(&self, ids: &[AttachmentId], chat: &ChatId) -> Result<()> {
        let (ids, chat) = (ids.to_vec(), chat.to_string());
        self.write(move |c| {
            let mut link = c.prepare_cached(
                "INSERT OR IGNORE INTO attachment_chats (attachment_id, chat_id) VALUES (?1, ?2)",
            )?;
            for a in &ids {
                link.execute([a.as_str(), &chat])?;
            }
            Ok(())
        })
        .await
    }

    async fn chats_of_attachment(&self, attachment_id: &AttachmentId) -> Result<Vec<ChatId>> {
        let attachment_id = attachment_id.to_string();
        self.read(move |c| {
            let mut stmt =
                c.prepare_cached("SELECT chat_id FROM attachment_chats WHERE attachment_id = ?1")?;
            let rows = stmt.query_map([&attachment_id], |r| r.get::<_, String>(0))?;
            rows.map(|row| row.and_then(id)).collect()
        })
        .await
    }

    async fn remove_attachments_of(&self, uploader: &UserId) -> Result<Vec<Attachment>> {
        let uploader = uploader.to_string();
        self.write(move |c| {
            let removed: Vec<Attachment> = c
                .prepare_cached(
                    "DELETE FROM attachments WHERE uploader = ?1
                     RETURNING attachment_id, uploader, content_type, size, sha256, created_at",
                )?
                .query_map([&uploader], attachment_from_row)?
                .collect::<rusqlite::Result<_>>()?;
            let mut unlink = c.prepare_cached("DELETE FROM attachment_chats WHERE attachment_id = ?1")?;
            for a in &removed {
                unlink.execute([a.id.as_str()])?;
            }
            Ok(removed)
        })
        .await
    }
}

fn attachment_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Attachment> {
    Ok(Attachment {
        id: id(r.get(0)?)?,
        uploader: id(r.get(1)?)?,
        content_type: r.get(2)?,
        size: r.get::<_, i64>(3)? as u64,
        sha256: r.get(4)?,
        created_at: r.get(5)?,
    })
}
