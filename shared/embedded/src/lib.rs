//! Adapters for one machine: SQLite for every table, files for blobs, and an
//! in-process job queue and change feed that live in the same database, so a
//! restart loses nothing.

mod cache;
mod files;
mod runners;
mod sqlite;

pub use files::{CHECKSUM_HEADER, FileBlobs, Upload, UploadError};
pub use runners::{spawn_cleanup, spawn_feed, spawn_job_runner};
pub use sqlite::{Durability, SqliteStore};

use std::sync::Arc;

use courier_core::ports::{Clock, Push, Wakeups};
use courier_core::{Error, Ports};

/// A SQLite error as the domain sees it: a busy or locked database is worth
/// a retry, anything else is a bug.
pub(crate) fn db_error(e: rusqlite::Error) -> Error {
    match e.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            Error::unavailable(e)
        }
        _ => Error::internal(e),
    }
}

/// Every port on one machine: `store` for the tables and the job queue,
/// `blobs` for media, `push` to reach live connections and `wakeups` to
/// wake devices that are not connected (the push services this machine may
/// reach: courier-wake's `Wakers`).
pub fn ports(
    store: &SqliteStore,
    blobs: &FileBlobs,
    push: Arc<dyn Push>,
    wakeups: Arc<dyn Wakeups>,
    clock: Arc<dyn Clock>,
) -> Ports {
    Ports {
        chats: Arc::new(store.clone()),
        devices: Arc::new(store.clone()),
        messages: Arc::new(store.clone()),
        retention: Arc::new(store.clone()),
        attachments: Arc::new(store.clone()),
        quotas: Arc::new(store.clone()),
        keys: Arc::new(store.clone()),
        receipts: Arc::new(store.clone()),
        wakeups,
        blobs: Arc::new(blobs.clone()),
        push,
        jobs: Arc::new(store.clone()),
        clock,
    }
}
