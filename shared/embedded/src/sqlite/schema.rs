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
-- Layout 5: every message once, in arrival order (seq), with the inboxes
-- it went to; body and recipients go once every inbox has acked it (the row
-- stays, for its dedupe key, until it expires). What each inbox still holds
-- is kept in memory, rebuilt from here and the cursors (inboxes.rs).
CREATE TABLE IF NOT EXISTS log (
    seq INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    chat_id TEXT,
    timestamp INTEGER NOT NULL,
    body TEXT,
    recipients TEXT,
    fanned_out INTEGER NOT NULL,
    dedupe TEXT,
    expires_at INTEGER NOT NULL
);
-- Both grow at their end: message ids are ULIDs and expiry follows arrival.
CREATE INDEX IF NOT EXISTS log_message ON log (message_id);
CREATE INDEX IF NOT EXISTS log_expiry ON log (expires_at);
CREATE INDEX IF NOT EXISTS log_unfinished ON log (timestamp) WHERE fanned_out = 0;
-- An inbox that acked: the highest seq it acked, and the seqs below it that
-- it still holds (a JSON list, usually empty).
CREATE TABLE IF NOT EXISTS cursors (
    inbox TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    held TEXT NOT NULL
) WITHOUT ROWID;
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
-- Layout 3 (protocol version 2) adds what follows; it changes no table above.
-- deleteAccount finds a user's attachments here, not by a scan.
CREATE INDEX IF NOT EXISTS attachments_uploader ON attachments (uploader);
-- A row per ready device: its first upload carries both keys, so a device
-- without a row has no keys at all. The signed keys are JSON (SignedKey).
CREATE TABLE IF NOT EXISTS device_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    identity_key TEXT NOT NULL,
    signed_pre_key TEXT NOT NULL,
    fallback_key TEXT,
    PRIMARY KEY (user_id, device_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS one_time_keys (
    user_id TEXT NOT NULL,
    device_id TEXT NOT NULL,
    key_id TEXT NOT NULL,
    public_key TEXT NOT NULL,
    PRIMARY KEY (user_id, device_id, key_id)
) WITHOUT ROWID;
-- The current hour's one-time prekey claims per claiming device and scope
-- (a target device, or '*' for all); a row of an older hour starts over.
CREATE TABLE IF NOT EXISTS key_claims (
    claimer TEXT NOT NULL,
    scope TEXT NOT NULL,
    hour INTEGER NOT NULL,
    used INTEGER NOT NULL,
    PRIMARY KEY (claimer, scope)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS key_claims_hour ON key_claims (hour);
CREATE TABLE IF NOT EXISTS receipts (
    chat_id TEXT NOT NULL,
    user_id TEXT NOT NULL,
    delivered TEXT,
    read TEXT,
    private_read TEXT,
    PRIMARY KEY (chat_id, user_id)
) WITHOUT ROWID;
-- The dedupe keys of sendToDevices batches: a namespace apart from the chat
-- messages' (messages.dedupe), kept as long as the batch's inbox rows.
CREATE TABLE IF NOT EXISTS device_message_dedupe (
    dedupe TEXT PRIMARY KEY,
    message_id TEXT NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS device_message_dedupe_expiry ON device_message_dedupe (expires_at);
"#;

/// `PRAGMA user_version` of the layout. Layout 3 only adds tables and
/// indexes to layout 2, so SCHEMA alone moves a layout 2 database on; layout
/// 4 adds [`LAYOUT_4`]'s columns; layout 5 moves the messages and inbox
/// tables into the log ([`FROM_LAYOUT_4`]).
const LAYOUT: i64 = 5;

/// The messages and inbox tables of layouts 2 to 4: a message row, and a row
/// with the body per recipient inbox.
const LAYOUT_2_MESSAGES: &str = r#"
-- Keyed by message_id, a ULID: a new message lands on the last page of the
-- tree, and its fan-out mark on a page still in cache. Keyed by chat, each
-- message would dirty a page of its own, and every dirty page is a WAL write.
CREATE TABLE messages (
    message_id TEXT PRIMARY KEY,
    chat_id TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    body TEXT,
    recipients TEXT NOT NULL,
    fanned_out INTEGER NOT NULL DEFAULT 0,
    dedupe TEXT,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_dedupe ON messages (chat_id, dedupe) WHERE dedupe IS NOT NULL;
CREATE INDEX messages_unfinished ON messages (timestamp) WHERE fanned_out = 0;
CREATE INDEX messages_expiry ON messages (expires_at);
-- Rows, bodies and all, append in arrival order; only the slim index entry
-- lands among the inbox's other rows.
CREATE TABLE inbox (
    seq INTEGER PRIMARY KEY,
    inbox TEXT NOT NULL,
    message_id TEXT NOT NULL,
    body TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE UNIQUE INDEX inbox_key ON inbox (inbox, message_id);
CREATE INDEX inbox_expiry ON inbox (expires_at);
"#;

/// From layout 4 (or older, moved to it first): each message becomes one
/// log row listing the inboxes that still hold it (none: acked by all, kept
/// for its dedupe key); each device message's inbox row (no message row)
/// becomes a row of its own. No inbox has acked anything yet in the log's terms.
const FROM_LAYOUT_4: &str = r#"
CREATE INDEX inbox_by_message ON inbox (message_id);
INSERT INTO log (message_id, chat_id, timestamp, body, recipients, fanned_out, dedupe, expires_at)
SELECT message_id, chat_id, timestamp, body, recipients, fanned_out, dedupe, expires_at FROM (
    SELECT m.message_id, m.chat_id, m.timestamp, h.body, h.recipients, m.fanned_out, m.dedupe, m.expires_at
    FROM messages m LEFT JOIN (
        SELECT message_id, min(body) AS body, json_group_array(inbox) AS recipients
        FROM inbox GROUP BY message_id
    ) h USING (message_id)
    UNION ALL
    SELECT i.message_id, NULL, 0, i.body, json_array(i.inbox), 1, NULL, i.expires_at
    FROM inbox i WHERE NOT EXISTS (SELECT 1 FROM messages m WHERE m.message_id = i.message_id)
) ORDER BY message_id;
DROP TABLE inbox;
DROP TABLE messages;
"#;

/// Layout 4 (push notifications): each device's push registration (JSON, a
/// `PushRegistration`) and its wake mark (when the outstanding wake-up was
/// begun; NULL when none is). Added to the layout 3 table SCHEMA makes or
/// finds, since `CREATE TABLE IF NOT EXISTS` leaves an existing table as it
/// is; NULL in both is what every device had before.
const LAYOUT_4: &str = r#"
ALTER TABLE devices ADD COLUMN push TEXT;
ALTER TABLE devices ADD COLUMN woken_at INTEGER;
"#;

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
    if layout_1 {
        tx.execute_batch(LAYOUT_2_MESSAGES)?;
    }
    tx.execute_batch(SCHEMA)?;
    if layout_1 {
        tx.execute_batch(FROM_LAYOUT_1_ROWS)?;
    }
    if version < 4 {
        tx.execute_batch(LAYOUT_4)?;
    }
    let messages_table = tx.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'messages'",
        [],
        |r| r.get::<_, i64>(0),
    )? > 0;
    if messages_table {
        tx.execute_batch(FROM_LAYOUT_4)?;
    }
    tx.pragma_update(None, "user_version", LAYOUT)?;
    tx.commit()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rusqlite::{Connection, params};

    use super::{LAYOUT, LAYOUT_2_MESSAGES};
    use crate::sqlite::rows::id;
    use crate::sqlite::{Durability, SqliteStore};
    use courier_core::domain::InboxKey;
    use courier_core::ids::{ChatId, MessageId};
    use courier_core::ports::{MessageStore, SystemClock};
    use std::path::Path;

    /// Today's tables at `path` with the messages and inbox tables of layouts
    /// 2 to 4 in place of the log and the cursors, then `downgrade` run on
    /// them: a database of an older layout, for the test to fill.
    fn older_layout(path: &Path, downgrade: &str) -> Connection {
        SqliteStore::open(path, Durability::Process, Arc::new(SystemClock)).unwrap().close();
        let old = Connection::open(path).unwrap();
        old.execute_batch(LAYOUT_2_MESSAGES).unwrap();
        old.execute_batch("DROP TABLE log; DROP TABLE cursors;").unwrap();
        old.execute_batch(downgrade).unwrap();
        old
    }

    /// Opens the store at `path`, which must then be of the newest layout.
    async fn open_newest(path: &Path) -> SqliteStore {
        let store = SqliteStore::open(path, Durability::Process, Arc::new(SystemClock)).unwrap();
        let version: i64 =
            store.read(|c| c.query_row("PRAGMA user_version", [], |r| r.get(0))).await.unwrap();
        assert_eq!(version, LAYOUT);
        store
    }

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
                store.read(|c| c.query_row("SELECT seq FROM log", [], |r| r.get(0))).await.unwrap();
            assert_eq!(seq, 1, "the message moved into the log");
            store.close();
        }
    }

    #[tokio::test]
    async fn a_database_of_the_second_layout_keeps_everything_and_gains_the_new_tables() {
        use courier_core::ids::{AttachmentId, DeviceId, UserId};
        use courier_core::ports::{
            AttachmentStore, ChatStore, DeviceStore, KeyStore, KeyUpload, Markers, ReceiptStore, SignedKey,
            Uploaded,
        };

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layout2.db");
        let (message, inbox, chat) =
            ("01JDX0000000000000000000M1", "bob#phone", "01JDX0000000000000000000C1");
        let body = r#"{"messageId":"01JDX0000000000000000000M1","message":"kept"}"#;
        {
            // Layouts 3 and 4 only add tables, indexes and columns, so layout
            // 2 is today's schema without them; its rows are written as
            // layout 2 wrote them.
            let old = older_layout(
                &path,
                "DROP INDEX attachments_uploader;
                 DROP TABLE device_keys; DROP TABLE one_time_keys;
                 DROP TABLE key_claims; DROP TABLE receipts; DROP TABLE device_message_dedupe;
                 ALTER TABLE devices DROP COLUMN push; ALTER TABLE devices DROP COLUMN woken_at;
                 PRAGMA user_version = 2;",
            );
            old.execute(
                "INSERT INTO chats VALUES (?1, ?2, 0)",
                params![
                    chat,
                    r#"{"name":"old","members":[{"user":"alice","joined_at":1},{"user":"bob","joined_at":1}],"admins":["alice"],"created_at":1}"#
                ],
            )
            .unwrap();
            old.execute("INSERT INTO participants VALUES ('alice', ?1), ('bob', ?1)", [chat]).unwrap();
            old.execute("INSERT INTO devices VALUES ('bob', 'phone', NULL, ?1)", [i64::MAX - 1]).unwrap();
            old.execute(
                "INSERT INTO messages VALUES (?1, ?2, 5, ?3, '[\"bob#phone\"]', 0, 'alice#laptop#c-1', ?4)",
                params![message, chat, body, i64::MAX],
            )
            .unwrap();
            old.execute(
                "INSERT INTO inbox (inbox, message_id, body, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![inbox, message, body, i64::MAX],
            )
            .unwrap();
            old.execute(
                "INSERT INTO attachments VALUES ('01JDX0000000000000000000A1', 'alice', 'image/png', 3, ?1, 1)",
                ["ab".repeat(32)],
            )
            .unwrap();
        }
        let (alice, bob): (UserId, UserId) = (id("alice".into()).unwrap(), id("bob".into()).unwrap());
        let phone: DeviceId = id("phone".into()).unwrap();
        for round in 0..2 {
            // Opened twice: the second open finds the new layout and leaves it be.
            let store = open_newest(&path).await;
            let key = InboxKey::parse(inbox).unwrap();
            let page = store.inbox_page(&key, None, 10, 0).await.unwrap();
            assert_eq!(page, vec![(id::<MessageId>(message.into()).unwrap(), body.to_owned())]);
            let chat_id: ChatId = id(chat.into()).unwrap();
            assert_eq!(
                store.unfinished(10, 10).await.unwrap(),
                vec![(chat_id.clone(), id(message.into()).unwrap())]
            );
            let old_chat = store.chat(&chat_id).await.unwrap().expect("the chat is kept");
            assert_eq!(
                (old_chat.name.as_str(), old_chat.encrypted),
                ("old", false),
                "no old chat is encrypted"
            );
            assert_eq!(store.chats_of(&bob, None, 10).await.unwrap().len(), 1);
            assert_eq!(store.devices_of(std::slice::from_ref(&bob), 0).await.unwrap().len(), 1);
            let attachment: AttachmentId = id("01JDX0000000000000000000A1".into()).unwrap();
            assert!(store.attachment(&attachment).await.unwrap().is_some());

            // The new tables work on the moved database.
            if round == 0 {
                let upload = KeyUpload {
                    identity_key: Some("identity".into()),
                    signed_pre_key: Some(SignedKey {
                        key_id: "s1".into(),
                        public_key: "spk".into(),
                        signature: "sig".into(),
                    }),
                    ..KeyUpload::default()
                };
                let stored = store.upload_keys(&bob, &phone, &upload, 200).await.unwrap();
                assert_eq!(stored, Uploaded::Stored { one_time_keys: 0, became_ready: true });
                let to = Markers { read: Some(id(message.into()).unwrap()), ..Markers::default() };
                assert!(store.advance(&chat_id, &alice, &to).await.unwrap().is_some());
            }
            assert_eq!(
                store.device_keys(std::slice::from_ref(&bob)).await.unwrap().len(),
                1,
                "round {round}"
            );
            assert_eq!(store.receipts(&chat_id).await.unwrap().len(), 1, "round {round}");
            store.close();
        }
    }

    #[tokio::test]
    async fn a_database_of_the_third_layout_keeps_everything_and_gains_push_registrations() {
        use courier_core::ids::{DeviceId, UserId};
        use courier_core::ports::{
            ChatStore, DeviceStore, KeyStore, Platform, PushRegistration, ReceiptStore, WebPushKeys,
        };

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layout3.db");
        let (message, inbox, chat) =
            ("01JDX0000000000000000000M1", "bob#phone", "01JDX0000000000000000000C1");
        let body = r#"{"messageId":"01JDX0000000000000000000M1","message":"kept"}"#;
        {
            // Layout 4 only adds the two device columns, so layout 3 is
            // today's schema without them; its rows of every table that
            // version 2 of the protocol brought are written as layout 3 wrote them.
            let old = older_layout(
                &path,
                "ALTER TABLE devices DROP COLUMN push; ALTER TABLE devices DROP COLUMN woken_at;
                 PRAGMA user_version = 3;",
            );
            old.execute(
                "INSERT INTO chats VALUES (?1, ?2, 0)",
                params![
                    chat,
                    r#"{"name":"old","members":[{"user":"alice","joined_at":1},{"user":"bob","joined_at":1}],"admins":["alice"],"created_at":1,"encrypted":true}"#
                ],
            )
            .unwrap();
            old.execute("INSERT INTO participants VALUES ('alice', ?1), ('bob', ?1)", [chat]).unwrap();
            old.execute("INSERT INTO devices VALUES ('bob', 'phone', NULL, ?1)", [i64::MAX - 1]).unwrap();
            old.execute("INSERT INTO devices VALUES ('bob', 'laptop', 'conn-1', ?1)", [i64::MAX - 1])
                .unwrap();
            old.execute(
                "INSERT INTO inbox (inbox, message_id, body, expires_at) VALUES (?1, ?2, ?3, ?4)",
                params![inbox, message, body, i64::MAX],
            )
            .unwrap();
            old.execute(
                "INSERT INTO device_keys VALUES ('bob', 'phone', 'identity', ?1, NULL)",
                [r#"{"keyId":"s1","publicKey":"spk","signature":"sig"}"#],
            )
            .unwrap();
            old.execute("INSERT INTO one_time_keys VALUES ('bob', 'phone', 'k1', 'otk')", []).unwrap();
            old.execute("INSERT INTO receipts VALUES (?1, 'alice', NULL, ?2, ?2)", [chat, message]).unwrap();
        }
        let bob: UserId = id("bob".into()).unwrap();
        let (phone, laptop): (DeviceId, DeviceId) =
            (id("phone".into()).unwrap(), id("laptop".into()).unwrap());
        let registration = PushRegistration {
            platform: Platform::WebPush,
            address: "https://push.example/sub".into(),
            keys: Some(WebPushKeys { p256dh: "key".into(), auth: "auth".into() }),
            endpoint: None,
        };
        for round in 0..2 {
            // Opened twice: the second open finds the newest layout and leaves it be.
            let store = open_newest(&path).await;
            let key = InboxKey::parse(inbox).unwrap();
            let page = store.inbox_page(&key, None, 10, 0).await.unwrap();
            assert_eq!(page, vec![(id::<MessageId>(message.into()).unwrap(), body.to_owned())]);
            let chat_id: ChatId = id(chat.into()).unwrap();
            assert!(store.chat(&chat_id).await.unwrap().expect("the chat is kept").encrypted);
            assert_eq!(store.device_keys(std::slice::from_ref(&bob)).await.unwrap().len(), 1);
            assert_eq!(store.one_time_key_count(&bob, &phone).await.unwrap(), 1);
            assert_eq!(store.receipts(&chat_id).await.unwrap().len(), 1);
            let mut devices = store.devices_of(std::slice::from_ref(&bob), 0).await.unwrap();
            devices.sort_by(|a, b| a.id.cmp(&b.id));
            let laptop_row = &devices[0];
            assert_eq!(
                laptop_row.connection.as_ref().map(|c| c.as_str()),
                Some("conn-1"),
                "connections are kept"
            );

            // The new columns work on the moved database.
            if round == 0 {
                assert_eq!(devices.iter().map(|d| d.push.clone()).collect::<Vec<_>>(), vec![None, None]);
                assert!(store.register_push(&bob, &phone, &registration).await.unwrap());
                let woken = store.begin_wake(&bob, &phone, 1_000, 0).await.unwrap();
                assert_eq!(woken.as_ref(), Some(&registration));
                assert_eq!(store.begin_wake(&bob, &laptop, 1_000, 0).await.unwrap(), None, "no registration");
            } else {
                let phone_row = devices.iter().find(|d| d.id == phone).unwrap();
                assert_eq!(phone_row.push.as_ref(), Some(&registration), "kept across a reopen");
                assert_eq!(
                    store.begin_wake(&bob, &phone, 2_000, 0).await.unwrap(),
                    None,
                    "and so is the mark"
                );
            }
            store.close();
        }
    }
    #[tokio::test]
    async fn a_database_of_the_fourth_layout_moves_its_messages_into_the_log() {
        use courier_core::ids::{DeviceId, UserId};
        use courier_core::ports::{DedupeKey, Store, StoredMessage};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layout4.db");
        let (m1, m2, d1) =
            ("01JDX0000000000000000000M1", "01JDX0000000000000000000M2", "01JDX0000000000000000000D1");
        let chat = "01JDX0000000000000000000C1";
        let body = |m: &str| format!(r#"{{"messageId":"{m}","message":"kept"}}"#);
        {
            // Layout 4 is today's schema with the messages and inbox tables
            // instead of the log and the cursors.
            let old = older_layout(&path, "PRAGMA user_version = 4;");
            // M1 went to bob, carol and dave (no device yet); carol acked it.
            old.execute(
                "INSERT INTO messages VALUES (?1, ?2, 5, NULL, '[]', 1, 'alice#laptop#c-1', ?3)",
                params![m1, chat, i64::MAX],
            )
            .unwrap();
            // M2 every recipient acked: only its row is left, for its dedupe key.
            old.execute(
                "INSERT INTO messages VALUES (?1, ?2, 6, NULL, '[]', 1, 'alice#laptop#c-2', ?3)",
                params![m2, chat, i64::MAX],
            )
            .unwrap();
            for (inbox, message, text) in
                [("bob#phone", m1, body(m1)), ("dave#*", m1, body(m1)), ("carol#phone", d1, body(d1))]
            {
                old.execute(
                    "INSERT INTO inbox (inbox, message_id, body, expires_at) VALUES (?1, ?2, ?3, ?4)",
                    params![inbox, message, text, i64::MAX],
                )
                .unwrap();
            }
        }
        let key = |k: &str| InboxKey::parse(k).unwrap();
        let mid = |m: &str| id::<MessageId>(m.into()).unwrap();
        let (alice, dave): (UserId, UserId) = (id("alice".into()).unwrap(), id("dave".into()).unwrap());
        let tab: DeviceId = id("tab".into()).unwrap();
        for round in 0..2 {
            let store = open_newest(&path).await;
            let carol = store.inbox_page(&key("carol#phone"), None, 10, 0).await.unwrap();
            assert_eq!(carol, vec![(mid(d1), body(d1))], "the device message stays carol's alone");
            let retry = StoredMessage {
                chat: id(chat.into()).unwrap(),
                id: mid("01JDX0000000000000000000M3"),
                timestamp: 7,
                json: body("01JDX0000000000000000000M3"),
                recipients: vec![key("bob#phone")],
                fanned_out: true,
            };
            let dedupe = DedupeKey {
                user: alice.clone(),
                device: id("laptop".into()).unwrap(),
                client_message_id: "c-2".into(),
            };
            match store.store(&retry, Some(&dedupe), i64::MAX).await.unwrap() {
                Store::Duplicate(first) => assert_eq!(first.id, mid(m2), "round {round}"),
                Store::Stored => panic!("the dedupe key of an acked message was lost"),
            }
            let bob = store.inbox_page(&key("bob#phone"), None, 10, 0).await.unwrap();
            if round == 0 {
                assert_eq!(bob, vec![(mid(m1), body(m1))]);
                assert_eq!(store.ack(&key("bob#phone"), &[mid(m1)]).await.unwrap().len(), 1);
                assert_eq!(store.claim_pending(&dave, &tab).await.unwrap(), 1);
            } else {
                assert!(bob.is_empty(), "bob's ack is kept across a reopen");
                let dave = store.inbox_page(&key("dave#tab"), None, 10, 0).await.unwrap();
                assert_eq!(dave, vec![(mid(m1), body(m1))], "and so is dave's claim");
            }
            let old_tables: i64 = store
                .read(|c| {
                    c.query_row(
                        "SELECT count(*) FROM sqlite_master WHERE name IN ('messages', 'inbox')",
                        [],
                        |r| r.get(0),
                    )
                })
                .await
                .unwrap();
            assert_eq!(old_tables, 0);
            store.close();
        }
    }
}
