//! `SqliteStore`: every table port, and the job queue, on one SQLite database in WAL mode.
//!
//! One writer thread owns the write connection and commits whatever writes
//! are waiting as one transaction (group commit): each write still gets its
//! own answer only after the commit that holds it, and a failing write rolls
//! back alone (each runs in a savepoint). Reads run on a small pool of
//! connections on tokio's blocking threads, so they never queue behind writes.
//! WAL checkpoints run on their own thread, so no commit waits for one. The
//! chats and devices that every send reads are cached (see `cache.rs`).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tokio::sync::{Notify, oneshot};

use super::cache::ReadCache;
use courier_core::domain::{Chat, Device, InboxKey, Member, Millis};
use courier_core::error::{Error, Result};
use courier_core::ids::{AttachmentId, ChatId, ConnectionId, DeviceId, MessageId, UserId};
use courier_core::ports::{
    Attachment, AttachmentStore, ChatStore, Connected, DedupeKey, DeviceStore, Job, Jobs, MessageStore,
    Store, StoredMessage,
};

/// How far a commit goes before a write is answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// The commit reaches the OS before the answer (WAL, `synchronous=NORMAL`):
    /// it survives the process being killed, not a power cut.
    #[default]
    Process,
    /// The commit is fsynced before the answer (`synchronous=FULL`): it
    /// survives a power cut too.
    Disk,
}

/// Most writes one transaction takes before it commits.
const MAX_GROUP: usize = 512;
/// Read connections, and reads in flight at once: reads take microseconds
/// from the page cache, so a few connections keep every core busy, and a
/// bounded pool never opens a connection per read under load.
const READERS: usize = 8;
/// How much of the database file every connection maps.
const MMAP_BYTES: i64 = 1 << 30;
/// The writer's page cache (KiB): the writer keeps its cache across commits,
/// so the pages its inserts land on stay in memory instead of being read again.
const WRITER_CACHE_KIB: i64 = 64 * 1024;
/// The most often the checkpointer copies the WAL back into the database.
/// Often, so each checkpoint is small: its fsync holds up the WAL writes of
/// commits behind it (p99 at 2,000 msgs/s: 1.2 to 1.8 ms with 200 ms, 1.0 ms
/// with 10 to 20 ms; throughput the same).
const CHECKPOINT_EVERY: Duration = Duration::from_millis(20);

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
fn create_schema(conn: &mut Connection) -> rusqlite::Result<()> {
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

type Completion = Box<dyn FnOnce(Result<()>) + Send>;
type WriteOp = Box<dyn FnOnce(&Connection) -> Completion + Send>;

/// SQLite behind every table port. Cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writes: Mutex<Option<mpsc::Sender<WriteOp>>>,
    readers: Mutex<Vec<Connection>>,
    /// One permit per read connection: a read holds one while it runs.
    reading: tokio::sync::Semaphore,
    chats: ReadCache<ChatId, Chat>,
    /// Every device row of a user, expired or not.
    devices: ReadCache<UserId, Vec<Device>>,
    /// Woken when a job is queued, so the runner need not poll for it.
    jobs_queued: Notify,
    clock: Arc<dyn courier_core::ports::Clock>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").field("path", &self.inner.path).finish()
    }
}

fn open(path: &Path, durability: Durability) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    let sync = match durability {
        Durability::Process => "NORMAL",
        Durability::Disk => "FULL",
    };
    conn.pragma_update(None, "synchronous", sync)?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    // Each write in a group commit runs in a savepoint, and a savepoint
    // copies every page it first touches into a statement journal: a temp
    // file by default, a write system call per page. In memory instead.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // Pages come from a shared mapping instead of a pread copy per page; a
    // read connection's cache starts cold after every commit, so this is
    // most of what a read costs.
    conn.pragma_update(None, "mmap_size", MMAP_BYTES)?;
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and starts its writer thread.
    pub fn open(
        path: &Path,
        durability: Durability,
        clock: Arc<dyn courier_core::ports::Clock>,
    ) -> Result<Self> {
        let connections = || -> rusqlite::Result<_> {
            let mut writer = open(path, durability)?;
            create_schema(&mut writer)?;
            // The checkpointer thread does this work, off the commit path.
            writer.pragma_update(None, "wal_autocheckpoint", 0)?;
            writer.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
            let checkpointer = open(path, durability)?;
            let readers =
                (0..READERS).map(|_| open(path, durability)).collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((writer, checkpointer, readers))
        };
        let (writer, checkpointer, readers) = connections().map_err(crate::db_error)?;
        let (tx, rx) = mpsc::channel::<WriteOp>();
        // One slot: commits made while a checkpoint runs ask for one more, not one each.
        let (committed, commits) = mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("courier-sqlite-writer".into())
            .spawn(move || write_loop(writer, rx, committed))
            .map_err(Error::internal)?;
        std::thread::Builder::new()
            .name("courier-sqlite-checkpointer".into())
            .spawn(move || checkpoint_loop(checkpointer, commits))
            .map_err(Error::internal)?;
        Ok(Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writes: Mutex::new(Some(tx)),
                readers: Mutex::new(readers),
                reading: tokio::sync::Semaphore::new(READERS),
                chats: ReadCache::new(),
                devices: ReadCache::new(),
                jobs_queued: Notify::new(),
                clock,
            }),
        })
    }

    /// Stops taking writes and waits for the writer to commit what it has.
    pub fn close(&self) {
        self.inner.writes.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Queues `f` for the next group commit; `done` gets its outcome once that commit ends.
    fn queue<R, F>(&self, f: F, done: impl FnOnce(Result<R>) + Send + 'static) -> Result<()>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let op: WriteOp = Box::new(move |conn| {
            let outcome = in_savepoint(conn, f);
            Box::new(move |commit: Result<()>| done(commit.and_then(|()| outcome.map_err(crate::db_error))))
        });
        let sender = self.inner.writes.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let sender = sender.ok_or_else(|| Error::unavailable("the store is closing"))?;
        sender.send(op).map_err(|_| Error::unavailable("the store is closed"))
    }

    /// Runs `f` in the next group commit without waiting for it: for writes
    /// whose loss a crash may cause and a later pass repairs (the fan-out
    /// mark: the feed finishes a message left unmarked). Failures are logged.
    /// Writes commit in the order they are queued, so it has landed once
    /// any write queued after it has been answered.
    fn write_detached<F>(&self, what: &'static str, f: F) -> Result<()>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<()> + Send + 'static,
    {
        self.queue(f, move |outcome| {
            if let Err(e) = outcome {
                tracing::warn!(error = %e, "{what} not written");
            }
        })
    }

    /// Runs `f` in the next group commit; answers after that commit.
    pub(crate) async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.queue(f, move |outcome| {
            let _ = tx.send(outcome);
        })?;
        rx.await.map_err(|_| Error::internal("the store's writer stopped"))?
    }

    /// Waits until every write queued before this call has committed.
    pub async fn flush(&self) -> Result<()> {
        self.write(|_| Ok(())).await
    }

    /// Runs `f` on a read connection on a blocking thread.
    async fn read<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let _permit = self.inner.reading.acquire().await.map_err(Error::internal)?;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            // A permit is held, so a connection is free, unless an earlier read panicked with it.
            let pooled = inner.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let conn = match pooled {
                Some(c) => c,
                None => open(&inner.path, Durability::Process).map_err(crate::db_error)?,
            };
            let result = f(&conn);
            inner.readers.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
            result.map_err(crate::db_error)
        })
        .await
        .map_err(Error::internal)?
    }

    fn now(&self) -> Millis {
        self.inner.clock.now()
    }

    // ---- the job queue's consumer side ----

    /// Waits until a job may be due: one was queued, or `timeout` passed.
    pub async fn jobs_queued(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.inner.jobs_queued.notified()).await;
    }

    /// Jobs due now, with their ids and how often they were tried.
    pub async fn due_jobs(&self, limit: usize) -> Result<Vec<(i64, u32, Job)>> {
        let now = self.now();
        let rows: Vec<(i64, u32, String)> = self
            .read(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT job_id, attempts, body FROM jobs WHERE dead = 0 AND run_at <= ?1 ORDER BY run_at LIMIT ?2",
                )?;
                stmt.query_map(params![now, limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect()
            })
            .await?;
        let mut jobs = Vec::with_capacity(rows.len());
        for (id, attempts, body) in rows {
            match serde_json::from_str(&body) {
                Ok(job) => jobs.push((id, attempts, job)),
                Err(e) => {
                    tracing::error!(job = id, error = %e, "unreadable job buried");
                    self.bury_job(id).await?;
                }
            }
        }
        Ok(jobs)
    }

    pub async fn complete_job(&self, id: i64) -> Result<()> {
        self.write(move |c| c.execute("DELETE FROM jobs WHERE job_id = ?1", [id]).map(drop)).await
    }

    pub async fn retry_job(&self, id: i64, run_at: Millis) -> Result<()> {
        self.write(move |c| {
            c.execute(
                "UPDATE jobs SET attempts = attempts + 1, run_at = ?2 WHERE job_id = ?1",
                params![id, run_at],
            )
            .map(drop)
        })
        .await
    }

    /// Sets a job aside for good: the dead-letter queue of the local shape.
    pub async fn bury_job(&self, id: i64) -> Result<()> {
        self.write(move |c| c.execute("UPDATE jobs SET dead = 1 WHERE job_id = ?1", [id]).map(drop)).await
    }

    pub async fn dead_jobs(&self) -> Result<u64> {
        self.read(|c| c.query_row("SELECT count(*) FROM jobs WHERE dead = 1", [], |r| r.get::<_, i64>(0)))
            .await
            .map(|n| n as u64)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.writes.get_mut().unwrap_or_else(|e| e.into_inner()).take();
    }
}

fn in_savepoint<R>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<R>,
) -> rusqlite::Result<R> {
    conn.prepare_cached("SAVEPOINT op")?.execute([])?;
    match f(conn) {
        Ok(r) => {
            conn.prepare_cached("RELEASE op")?.execute([])?;
            Ok(r)
        }
        Err(e) => {
            conn.prepare_cached("ROLLBACK TO op")?.execute([])?;
            conn.prepare_cached("RELEASE op")?.execute([])?;
            Err(e)
        }
    }
}

/// The checkpointer thread: after commits, copies their pages from the WAL
/// into the database (PASSIVE: it never blocks the writer or readers), at
/// most every [`CHECKPOINT_EVERY`], and once more when the writer stops. An
/// idle store does not wake it.
fn checkpoint_loop(conn: Connection, commits: mpsc::Receiver<()>) {
    let checkpoint = || {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    };
    while commits.recv().is_ok() {
        checkpoint();
        std::thread::sleep(CHECKPOINT_EVERY);
    }
    checkpoint();
}

/// The writer thread: take what is waiting, run it in one transaction, commit,
/// answer, and tell the checkpointer. `committed` is dropped when it ends,
/// which stops the checkpointer.
fn write_loop(mut conn: Connection, ops: mpsc::Receiver<WriteOp>, committed: mpsc::SyncSender<()>) {
    while let Ok(first) = ops.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_GROUP {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let commit = (|| -> rusqlite::Result<Vec<Completion>> {
            let tx = Transaction::new(&mut conn, rusqlite::TransactionBehavior::Immediate)?;
            let completions: Vec<Completion> = batch.drain(..).map(|op| op(&tx)).collect();
            tx.commit()?;
            Ok(completions)
        })();
        match commit {
            Ok(completions) => {
                // Full means a checkpoint is already asked for.
                let _ = committed.try_send(());
                completions.into_iter().for_each(|done| done(Ok(())));
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed");
                // The ops were consumed by the failed transaction; their
                // senders drop and each waiting write sees the writer error.
                drop(batch);
            }
        }
    }
}

// ---- row helpers ----

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("domain types serialize")
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> rusqlite::Result<T> {
    serde_json::from_str(text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into()))
}

fn id<T: TryFrom<String, Error = String>>(text: String) -> rusqlite::Result<T> {
    T::try_from(text)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into()))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ChatRow {
    name: String,
    members: Vec<Member>,
    admins: Vec<UserId>,
    created_at: Millis,
}

fn chat_from_row(chat_id: String, body: String, version: i64) -> rusqlite::Result<Chat> {
    let row: ChatRow = from_json(&body)?;
    Ok(Chat {
        id: id(chat_id)?,
        name: row.name,
        members: row.members,
        admins: row.admins,
        created_at: row.created_at,
        version: version as u64,
    })
}

fn chat_body(chat: &Chat) -> String {
    json(&ChatRow {
        name: chat.name.clone(),
        members: chat.members.clone(),
        admins: chat.admins.clone(),
        created_at: chat.created_at,
    })
}

fn dedupe_text(key: &DedupeKey) -> String {
    format!("{}#{}#{}", key.user, key.device, key.client_message_id)
}

fn message_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredMessage> {
    let recipients: String = r.get("recipients")?;
    let recipients: Vec<String> = from_json(&recipients)?;
    Ok(StoredMessage {
        chat: id(r.get("chat_id")?)?,
        id: id(r.get("message_id")?)?,
        timestamp: r.get("timestamp")?,
        json: r.get::<_, Option<String>>("body")?.unwrap_or_default(),
        recipients: recipients.iter().filter_map(|k| InboxKey::parse(k)).collect(),
        fanned_out: r.get::<_, i64>("fanned_out")? != 0,
    })
}

/// Each user's device rows, expired or not (what the device cache holds).
fn every_device_of(c: &Connection, users: Vec<UserId>) -> rusqlite::Result<Vec<(UserId, Vec<Device>)>> {
    let mut stmt =
        c.prepare_cached("SELECT device_id, connection_id, last_seen FROM devices WHERE user_id = ?1")?;
    let mut all = Vec::with_capacity(users.len());
    for user in users {
        let rows = stmt.query_map([user.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?, r.get::<_, Millis>(2)?))
        })?;
        let mut devices = Vec::new();
        for row in rows {
            let (device, connection, last_seen) = row?;
            let connection = connection.map(id).transpose()?;
            devices.push(Device { user: user.clone(), id: id(device)?, connection, last_seen });
        }
        all.push((user, devices));
    }
    Ok(all)
}

fn delete_device_rows(c: &Connection, user: &str, device: &str) -> rusqlite::Result<()> {
    let inbox = format!("{user}#{device}");
    c.execute("DELETE FROM inbox WHERE inbox = ?1", [&inbox])?;
    c.execute("DELETE FROM connections WHERE user_id = ?1 AND device_id = ?2", [user, device])?;
    c.execute("DELETE FROM devices WHERE user_id = ?1 AND device_id = ?2", [user, device])?;
    Ok(())
}

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

    async fn chats_of(&self, user: &UserId) -> Result<Vec<Chat>> {
        let user = user.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT c.chat_id, c.body, c.version FROM participants p JOIN chats c ON c.chat_id = p.chat_id
                 WHERE p.user_id = ?1 ORDER BY c.chat_id",
            )?;
            let rows = stmt.query_map([&user], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            rows.map(|row| row.and_then(|(id, body, version)| chat_from_row(id, body, version))).collect()
        })
        .await
    }
}

#[async_trait]
impl DeviceStore for SqliteStore {
    async fn connect(
        &self,
        user: &UserId,
        device: &DeviceId,
        connection: &ConnectionId,
        now: Millis,
        max_devices: usize,
        expired_before: Millis,
    ) -> Result<Connected> {
        let owner = user.clone();
        let (user, device, connection) = (user.to_string(), device.to_string(), connection.to_string());
        let connected = self.write(move |c| {
            let existing: Option<(Option<String>, Millis)> = c
                .query_row(
                    "SELECT connection_id, last_seen FROM devices WHERE user_id = ?1 AND device_id = ?2",
                    [&user, &device],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            // A device unseen for too long has expired: it comes back as a new one, inbox and all gone.
            let existing = match existing {
                Some((_, last_seen)) if last_seen < expired_before => {
                    delete_device_rows(c, &user, &device)?;
                    None
                }
                other => other,
            };
            let outcome = match existing {
                Some((previous, _)) => {
                    c.execute(
                        "UPDATE devices SET connection_id = ?3, last_seen = ?4 WHERE user_id = ?1 AND device_id = ?2",
                        params![user, device, connection, now],
                    )?;
                    let replaced = previous.filter(|p| p != &connection);
                    if let Some(old) = &replaced {
                        c.execute("DELETE FROM connections WHERE connection_id = ?1", [old])?;
                    }
                    Connected::Ok {
                        new_device: false,
                        first_device: false,
                        replaced: replaced.map(id).transpose()?,
                    }
                }
                None => {
                    let live: i64 = c.query_row(
                        "SELECT count(*) FROM devices WHERE user_id = ?1 AND last_seen >= ?2",
                        params![user, expired_before],
                        |r| r.get(0),
                    )?;
                    if live as usize >= max_devices {
                        return Ok(Connected::DeviceLimit);
                    }
                    c.execute(
                        "INSERT INTO devices (user_id, device_id, connection_id, last_seen) VALUES (?1, ?2, ?3, ?4)",
                        params![user, device, connection, now],
                    )?;
                    Connected::Ok { new_device: true, first_device: live == 0, replaced: None }
                }
            };
            c.execute(
                "INSERT OR REPLACE INTO connections (connection_id, user_id, device_id) VALUES (?1, ?2, ?3)",
                [&connection, &user, &device],
            )?;
            Ok(outcome)
        })
        .await;
        self.inner.devices.forget(&owner);
        connected
    }

    async fn disconnect(&self, connection: &ConnectionId, now: Millis) -> Result<()> {
        let connection = connection.to_string();
        let owner = self
            .write(move |c| {
                let owner: Option<(String, String)> = c
                    .query_row(
                        "SELECT user_id, device_id FROM connections WHERE connection_id = ?1",
                        [&connection],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let Some((user, device)) = owner else { return Ok(None) };
                c.execute("DELETE FROM connections WHERE connection_id = ?1", [&connection])?;
                c.execute(
                    "UPDATE devices SET connection_id = NULL, last_seen = ?4
                 WHERE user_id = ?1 AND device_id = ?2 AND connection_id = ?3",
                    params![user, device, connection, now],
                )?;
                Ok(Some(id::<UserId>(user)?))
            })
            .await;
        match &owner {
            Ok(Some(user)) => self.inner.devices.forget(user),
            Ok(None) => {}
            Err(_) => self.inner.devices.forget_all(),
        }
        owner.map(drop)
    }

    async fn devices_of(&self, users: &[UserId], expired_before: Millis) -> Result<Vec<Device>> {
        let mut devices = Vec::new();
        let mut missing = Vec::new();
        for user in users {
            match self.inner.devices.get(user) {
                Some(known) => devices.extend(known),
                None => missing.push(user.clone()),
            }
        }
        if !missing.is_empty() {
            let epoch = self.inner.devices.epoch();
            let read = self.read(move |c| every_device_of(c, missing)).await?;
            devices.extend(read.iter().flat_map(|(_, theirs)| theirs.iter().cloned()));
            self.inner.devices.fill(epoch, read);
        }
        devices.retain(|d| d.last_seen >= expired_before);
        Ok(devices)
    }

    async fn remove_device(&self, user: &UserId, device: &DeviceId) -> Result<Option<Device>> {
        let (owner, user, device) = (user.clone(), user.clone(), device.clone());
        let removed = self
            .write(move |c| {
                let found: Option<(Option<String>, Millis)> = c
                    .query_row(
                        "SELECT connection_id, last_seen FROM devices WHERE user_id = ?1 AND device_id = ?2",
                        [user.as_str(), device.as_str()],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                let Some((connection, last_seen)) = found else { return Ok(None) };
                delete_device_rows(c, user.as_str(), device.as_str())?;
                Ok(Some(Device { user, id: device, connection: connection.map(id).transpose()?, last_seen }))
            })
            .await;
        self.inner.devices.forget(&owner);
        removed
    }

    async fn expire_devices(&self, before: Millis) -> Result<u64> {
        let expired = self
            .write(move |c| {
                let stale: Vec<(String, String)> = c
                .prepare(
                    "SELECT user_id, device_id FROM devices WHERE last_seen < ?1 AND connection_id IS NULL",
                )?
                .query_map([before], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
                for (user, device) in &stale {
                    delete_device_rows(c, user, device)?;
                }
                Ok(stale.len() as u64)
            })
            .await;
        self.inner.devices.forget_all();
        expired
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
            c.prepare_cached(
                "INSERT INTO messages (chat_id, message_id, timestamp, body, recipients, dedupe, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                message.chat.as_str(),
                message.id.as_str(),
                message.timestamp,
                message.json,
                json(&recipients),
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

    async fn ack(&self, inbox: &InboxKey, ids: &[MessageId]) -> Result<u64> {
        let (inbox, ids) = (inbox.key(), ids.to_vec());
        self.write(move |c| {
            let mut delete = c.prepare_cached("DELETE FROM inbox WHERE inbox = ?1 AND message_id = ?2")?;
            let mut acked = 0;
            for message_id in &ids {
                acked += delete.execute([&inbox, message_id.as_str()])? as u64;
            }
            Ok(acked)
        })
        .await
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
            Ok((inbox + messages) as u64)
        })
        .await
    }
}

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
            .query_row([&attachment_id], |r| {
                Ok(Attachment {
                    id: id(r.get(0)?)?,
                    uploader: id(r.get(1)?)?,
                    content_type: r.get(2)?,
                    size: r.get::<_, i64>(3)? as u64,
                    sha256: r.get(4)?,
                    created_at: r.get(5)?,
                })
            })
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
}

#[async_trait]
impl Jobs for SqliteStore {
    async fn enqueue(&self, job: &Job, delay: Duration) -> Result<()> {
        let body = json(job);
        let run_at = self.now() + delay.as_millis() as Millis;
        self.write(move |c| {
            c.execute("INSERT INTO jobs (run_at, body) VALUES (?1, ?2)", params![run_at, body]).map(drop)
        })
        .await?;
        self.inner.jobs_queued.notify_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use courier_core::ports::SystemClock;
    use courier_testkit::contract::{self, Tables};

    #[tokio::test]
    async fn sqlite_keeps_the_table_contract() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("c.db"), Durability::Process, Arc::new(SystemClock)).unwrap();
        let tables = Tables {
            chats: Arc::new(store.clone()),
            devices: Arc::new(store.clone()),
            messages: Arc::new(store.clone()),
            attachments: Arc::new(store.clone()),
        };
        contract::all(&tables).await;
        contract::racing_devices(&tables).await;
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
                store.read(|c| c.query_row("SELECT seq FROM inbox", [], |r| r.get(0))).await.unwrap();
            assert_eq!(seq, 1, "the inbox row moved into the new layout");
            store.close();
        }
    }

    #[tokio::test]
    async fn commits_reach_the_database_file_without_waiting_for_close() {
        // The writer never checkpoints (wal_autocheckpoint=0): if commits did
        // not wake the checkpointer, the WAL would only grow while the store runs.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.db");
        let store = SqliteStore::open(&path, Durability::Process, Arc::new(SystemClock)).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        let body = "x".repeat(1000);
        for i in 0..200 {
            let body = body.clone();
            store
                .write(move |c| {
                    c.execute("INSERT INTO jobs (run_at, body) VALUES (?1, ?2)", params![i, body])
                })
                .await
                .unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::metadata(&path).unwrap().len() < before + 200_000 {
            assert!(std::time::Instant::now() < deadline, "the rows never left the WAL");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        store.close();
    }

    #[tokio::test]
    async fn a_failing_write_rolls_back_alone_within_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("g.db"), Durability::Process, Arc::new(SystemClock)).unwrap();
        let writes = (0..50).map(|i| {
            let store = store.clone();
            async move {
                store
                    .write(move |c| {
                        c.execute("INSERT INTO jobs (run_at, body) VALUES (?1, 'x')", [i])?;
                        if i % 10 == 0 {
                            // A constraint violation after a successful insert in the same op.
                            c.execute("INSERT INTO jobs (job_id, run_at, body) VALUES (1, 0, 'dup')", [])?;
                            c.execute("INSERT INTO jobs (job_id, run_at, body) VALUES (1, 0, 'dup')", [])?;
                        }
                        Ok(())
                    })
                    .await
            }
        });
        let results = futures_util::future::join_all(writes).await;
        assert_eq!(results.iter().filter(|r| r.is_err()).count(), 5);
        let rows: i64 = store
            .read(|c| c.query_row("SELECT count(*) FROM jobs WHERE body = 'x'", [], |r| r.get(0)))
            .await
            .unwrap();
        assert_eq!(rows, 45, "the five failing writes left nothing, the others all landed");
    }
}
