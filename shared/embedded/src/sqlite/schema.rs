//! The tables, and the move from an older layout of them.

use rusqlite::Connection;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS chats (
    chat_id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    version INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS participants (
    user_id TEXT NOT NULL,
    chat_id TEXT NOT NULL,
    PRIMARY KEY (user_id, chat_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    connection_id TEXT,
    last_seen INTEGER NOT NULL,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS connections (
    connection_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL
) WITHOUT ROWID;
-- Keyed by message_id, a ULID: a new message lands on the last page of the
-- tree, and its fan-out mark on a page still in cache. Keyed by chat, each
-- message would dirty a page of its own, and every dirty page is a WAL write.
CREATE TABLE IF NOT EXISTS messages (
    message_id TEXT PRIMARY KEY,
    chat_id TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    body TEXT,
    recipients TEXT NOT NULL,
    fanned_out INTEGER NOT NULL DEFAULT 0,
    dedupe TEXT,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS messages_dedupe ON messages (chat_id, dedupe) WHERE dedupe IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_unfinished ON messages (timestamp) WHERE fanned_out = 0;
CREATE INDEX IF NOT EXISTS messages_expiry ON messages (expires_at);
-- Rows, bodies and all, append in arrival order; only the slim index entry
-- lands among the inbox's other rows.
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY,
    inbox TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS inbox_key ON inbox (inbox, message_id);
CREATE INDEX IF NOT EXISTS inbox_expiry ON inbox (expires_at);
CREATE TABLE IF NOT EXISTS attachments (
    attachment_id TEXT PRIMARY KEY,
    uploader TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attachment_chats (
    attachment_id TEXT NOT NULL,
    chat_id TEXT NOT NULL,
    PRIMARY KEY (attachment_id, chat_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY,
    run_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    body TEXT NOT NULL,
    dead INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (run_at) WHERE dead = 0;
CREATE TABLE IF NOT EXISTS quotas (
    user_id TEXT NOT NULL,
    quota TEXT NOT NULL,
    day INTEGER NOT NULL,
    used INTEGER NOT NULL,
    PRIMARY KEY (user_id, quota)
) WITHOUT ROWID;
"#;

/// `PRAGMA user_version` of the layout above.
const LAYOUT: i64 = 2;

/// From layout 1 (0 in `user_version`: messages keyed by chat, inbox rows
/// keyed by inbox): moves the two tables' rows into layout 2. Runs before
/// SCHEMA, in the same transaction.
const FROM_LAYOUT_1: &str = r#"
DROP INDEX IF EXISTS messages_dedupe;
DROP INDEX IF EXISTS messages_unfinished;
DROP INDEX IF EXISTS messages_expiry;
DROP INDEX IF EXISTS inbox_expiry;
ALTER TABLE messages RENAME TO messages_layout_1;
ALTER TABLE inbox RENAME TO inbox_layout_1;
"#;
const FROM_LAYOUT_1_ROWS: &str = r#"
INSERT INTO messages (message_id, chat_id, timestamp, body, recipients, fanned_out, dedupe, expires_at)
    SELECT message_id, chat_id, timestamp, body, recipients, fanned_out, dedupe, expires_at FROM messages_layout_1;
INSERT INTO inbox (inbox, message_id, body, expires_at)
    SELECT inbox, message_id, body, expires_at FROM inbox_layout_1 ORDER BY message_id;
DROP TABLE messages_layout_1;
DROP TABLE inbox_layout_1;
"#;

/// Creates the tables, moving an older layout's rows over first.
pub(super) fn create_schema(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let layout_1 = version == 0
        && tx.query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'messages'",
            [],
            |r| r.get::<_, i64>(0),
        )? > 0;
    if layout_1 {
        tracing::info!("moving the database to layout {LAYOUT}");
        tx.execute_batch(FROM_LAYOUT_1)?;
    }
    tx.execute_batch(SCHEMA)?;
    if layout_1 {
        tx.execute_batch(FROM_LAYOUT_1_ROWS)?;
    }
    tx.pragma_update(None, "user_version", LAYOUT)?;
    tx.commit()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rusqlite::{Connection, params};

    use crate::sqlite::rows::id;
    use crate::sqlite::{Durability, SqliteStore};
    use courier_core::domain::InboxKey;
    use courier_core::ids::{ChatId, MessageId};
    use courier_core::ports::{MessageStore, SystemClock};

    #[tokio::test]
    async fn a_database_of_the_first_layout_keeps_its_messages() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let (message, inbox) = ("01JDX0000000000000000000M1", "bob#phone");
        let body = r#"{"messageId":"01JDX0000000000000000000M1","message":"kept"}"#;
        {
            // The tables as the first release of courier-local made them.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE messages (chat_id TEXT NOT NULL, message_id TEXT NOT NULL, timestamp INTEGER NOT NULL,
                     body TEXT, recipients TEXT NOT NULL, fanned_out INTEGER NOT NULL DEFAULT 0, dedupe TEXT,
                     expires_at INTEGER NOT NULL, PRIMARY KEY (chat_id, message_id)) WITHOUT ROWID;
                 CREATE UNIQUE INDEX messages_dedupe ON messages (chat_id, dedupe) WHERE dedupe IS NOT NULL;
                 CREATE INDEX messages_unfinished ON messages (timestamp) WHERE fanned_out = 0;
                 CREATE INDEX messages_expiry ON messages (expires_at);
                 CREATE TABLE inbox (inbox TEXT NOT NULL, message_id TEXT NOT NULL, body TEXT NOT NULL,
                     expires_at INTEGER NOT NULL, PRIMARY KEY (inbox, message_id)) WITHOUT ROWID;
                 CREATE INDEX inbox_expiry ON inbox (expires_at);",
            )
            .unwrap();
            old.execute(
                "INSERT INTO messages VALUES ('chat-1', ?1, 5, ?2, '[\"bob#phone\"]', 0, 'alice#laptop#c-1', ?3)",
                params![message, body, i64::MAX],
            )
            .unwrap();
            old.execute("INSERT INTO inbox VALUES (?1, ?2, ?3, ?4)", params![inbox, message, body, i64::MAX])
                .unwrap();
        }
        for _ in 0..2 {
            // Opened twice: the second open finds the new layout and leaves it be.
            let store = SqliteStore::open(&path, Durability::Process, Arc::new(SystemClock)).unwrap();
            let key = InboxKey::parse(inbox).unwrap();
            let page = store.inbox_page(&key, None, 10, 0).await.unwrap();
            assert_eq!(page, vec![(id::<MessageId>(message.into()).unwrap(), body.to_owned())]);
            let chat: ChatId = id("chat-1".into()).unwrap();
            let row = store.message(&chat, &id(message.into()).unwrap()).await.unwrap().unwrap();
            assert!(!row.fanned_out, "the feed still finishes it");
            assert_eq!(store.unfinished(10, 10).await.unwrap().len(), 1);
            let seq: i64 =
                store.read(|c| c.query_row("SELECT seq FROM inbox", [], |r| r.get(0))).await.unwrap();
            assert_eq!(seq, 1, "the inbox row moved into the new layout");
            store.close();
        }
    }
}
