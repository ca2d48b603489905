//! `SqliteStore`: every table port, and the job queue, on one SQLite database in WAL mode.
//!
//! One writer thread owns the write connection and commits whatever writes
//! are waiting as one transaction (group commit): each write still gets its
//! own answer only after the commit that holds it, and a failing write rolls
//! back alone (each runs in a savepoint). Reads run on a small pool of
//! connections on tokio's blocking threads, so they never queue behind writes.
//! WAL checkpoints run on their own thread, so no commit waits for one. The
//! chats, devices and device keys that every send reads are cached (see `cache.rs`).
//!
//! This file holds the store and its plumbing (open, close, queueing writes,
//! pooled reads); each port is implemented in a file of its own.

mod attachments;
mod chats;
mod devices;
mod inboxes;
mod jobs;
mod keys;
mod messages;
mod quotas;
mod receipts;
mod rows;
mod schema;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::{Notify, oneshot};

use super::cache::ReadCache;
use courier_core::domain::{Chat, Device, Millis};
use courier_core::error::{Error, Result};
use courier_core::ids::{ChatId, UserId};
use courier_core::ports::DeviceKeys;
use inboxes::Inboxes;
use schema::create_schema;
use writer::{checkpoint_loop, in_savepoint, write_loop};

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

/// Read connections, and reads in flight at once: reads take microseconds
/// from the page cache, so a few connections keep every core busy, and a
/// bounded pool never opens a connection per read under load.
const READERS: usize = 8;
/// How much of the database file every connection maps.
const MMAP_BYTES: i64 = 1 << 30;
/// The writer's page cache (KiB): the writer keeps its cache across commits,
/// so the pages its inserts land on stay in memory instead of being read again.
const WRITER_CACHE_KIB: i64 = 64 * 1024;

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
    /// The keys of a user's ready devices, which every encrypted send reads.
    keys: ReadCache<UserId, Vec<DeviceKeys>>,
    /// Which inbox holds which message (the writer's to change).
    inboxes: Arc<Mutex<Inboxes>>,
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
            let inboxes = Inboxes::rebuild(&writer)?;
            let checkpointer = open(path, durability)?;
            let readers =
                (0..READERS).map(|_| open(path, durability)).collect::<rusqlite::Result<Vec<_>>>()?;
            Ok((writer, inboxes, checkpointer, readers))
        };
        let (writer, inboxes, checkpointer, readers) = connections().map_err(crate::db_error)?;
        let inboxes = Arc::new(Mutex::new(inboxes));
        // A failed commit leaves the database as it was before the group,
        // and the index ahead of it: read it again from the database.
        let on_commit = {
            let inboxes = inboxes.clone();
            move || messages::lock(&inboxes).mark_committed()
        };
        let recover = {
            let inboxes = inboxes.clone();
            move |conn: &Connection| match Inboxes::rebuild(conn) {
                Ok(rebuilt) => *messages::lock(&inboxes) = rebuilt,
                Err(e) => tracing::error!(error = %e, "rebuilding the inbox index failed"),
            }
        };
        let (tx, rx) = mpsc::channel::<WriteOp>();
        // One slot: commits made while a checkpoint runs ask for one more, not one each.
        let (committed, commits) = mpsc::sync_channel::<()>(1);
        std::thread::Builder::new()
            .name("courier-sqlite-writer".into())
            .spawn(move || write_loop(writer, rx, committed, on_commit, recover))
            .map_err(Error::internal)?;
        std::thread::Builder::new()
            .name("courier-sqlite-checkpointer".into())
            .spawn(move || checkpoint_loop(checkpointer, commits))
            .map_err(Error::internal)?;
        let store = Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writes: Mutex::new(Some(tx)),
                readers: Mutex::new(readers),
                reading: tokio::sync::Semaphore::new(READERS),
                chats: ReadCache::new(),
                devices: ReadCache::new(),
                keys: ReadCache::new(),
                inboxes,
                jobs_queued: Notify::new(),
                clock,
            }),
        };
        // Rows every inbox acked before the last stop, whose compaction did not run.
        store.compact_if_done();
        Ok(store)
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

    /// Runs `f` in the next group commit; answers after that commit. Any
    /// write may leave rows no inbox holds (an ack, a removed device), so
    /// each queues their compaction if none is queued.
    pub(crate) async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.queue(f, move |outcome| {
            let _ = tx.send(outcome);
        })?;
        let outcome = rx.await.map_err(|_| Error::internal("the store's writer stopped"))?;
        self.compact_if_done();
        outcome
    }

    /// Waits until every write queued before this call has committed.
    /// A compaction that is due is queued first, so it is committed too.
    pub async fn flush(&self) -> Result<()> {
        self.compact_if_done();
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
            // One read transaction for all of `f`: outside one, every
            // statement takes and drops the WAL read lock (fcntl calls on
            // the shared memory file), which was most of what a page of
            // 100 bodies cost. It also gives `f` one snapshot.
            let result = read_transaction(&conn, f);
            inner.readers.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
            result.map_err(crate::db_error)
        })
        .await
        .map_err(Error::internal)?
    }

    fn now(&self) -> Millis {
        self.inner.clock.now()
    }
}

fn read_transaction<R>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<R>,
) -> rusqlite::Result<R> {
    conn.prepare_cached("BEGIN")?.execute([])?;
    let result = f(conn);
    // Ends the read whatever `f` returned; a read has nothing to roll back.
    conn.prepare_cached("COMMIT")?.execute([])?;
    result
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.writes.get_mut().unwrap_or_else(|e| e.into_inner()).take();
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
            retention: Arc::new(store.clone()),
            attachments: Arc::new(store.clone()),
            quotas: Arc::new(store.clone()),
            keys: Arc::new(store.clone()),
            receipts: Arc::new(store.clone()),
        };
        contract::all(&tables).await;
        contract::races(&tables).await;
    }
}
